"""Per-document signals: everything the filters and dedup decide on, computed once and cached per unit.

Signals depend only on the document and on `FilterConfig.signals_part()` (n-gram sizes, languages, MinHash
shape), never on thresholds, so a threshold change re-decides from the cache without recomputing them.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from m3w.pipeline.filters.config import FilterConfig
from m3w.pipeline.filters.lang import identify
from m3w.pipeline.filters.text import MAX_STATS_CHARS, TextStats, text_stats, words
from m3w.schemas.documents import NODE_IMAGE, NODE_TEXT
from m3w.schemas.filter_cache import SIGNALS_SCHEMA

if TYPE_CHECKING:  # datasketch (and the scipy it imports) only where signatures are computed
    from datasketch import MinHash

_SPACE_RE = re.compile(r"\s+")


def hash64(text: str) -> int:
    """Stable signed 64-bit hash (fits parquet int64) of a string."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big", signed=True
    )


def normalise_text(text: str) -> str:
    return _SPACE_RE.sub(" ", text).strip().lower()


def normalise_url(url: str) -> str:
    """Lower-case scheme and host, drop the fragment and a trailing slash: the same page fetched twice."""
    if not url.strip():
        return ""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url.strip()
    path = parts.path.rstrip("/") or "/"
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def domain_of(doc: dict[str, Any]) -> str:
    if doc.get("domain"):
        return doc["domain"].lower()
    try:
        host = urlsplit(doc.get("url") or "").hostname or ""
    except ValueError:
        host = ""
    return host.removeprefix("www.")


@functools.lru_cache(maxsize=4)
def _template(num_perm: int, seed: int) -> MinHash:
    from datasketch import MinHash

    # Building the permutations costs ~1 ms; every document reuses the template's.
    return MinHash(num_perm=num_perm, seed=seed)


def minhash_signature(text: str, config: FilterConfig) -> np.ndarray | None:
    """MinHash (datasketch) of the word shingles of `text`; None when the text has no words."""
    cfg = config.dedup
    tokens = words(text[:MAX_STATS_CHARS])
    if not tokens:
        return None
    n = cfg.minhash_shingle_words
    shingles = {" ".join(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1))}
    num_perm = cfg.minhash_bands * cfg.minhash_rows
    template = _template(num_perm, cfg.minhash_seed)
    mh = type(template)(
        num_perm=num_perm, seed=cfg.minhash_seed, permutations=template.permutations, scheme=template.scheme
    )
    mh.update_batch([s.encode("utf-8") for s in shingles])
    return mh.hashvalues.astype(np.uint32)


def band_keys(signature: np.ndarray, rows: int) -> list[int]:
    """One key per band: a hash of the band's rows, tagged with the band number so bands never collide."""
    return [
        int.from_bytes(
            hashlib.blake2b(band.tobytes(), digest_size=8, person=f"band{b}".encode()).digest(),
            "big",
            signed=True,
        )
        for b, band in enumerate(signature.reshape(-1, rows))
    ]


def stats_language(lang: str, config: FilterConfig) -> str:
    """The word lists a document is measured with: its own language if configured, else the first configured."""
    languages = config.document.languages
    if not languages or lang in languages:
        return lang or "en"
    return languages[0]


def node_stats(node: dict[str, Any], lang: str, config: FilterConfig) -> dict[str, Any]:
    text = node.get("text") or ""
    s = text_stats(text, lang, config.stats.char_repetition_ngram, config.stats.word_repetition_ngram)
    return {
        "node_index": node["node_index"],
        "hash": hash64(normalise_text(text[:MAX_STATS_CHARS])),
        "chars": len(text),
        "words": s.words,
        "char_repetition": s.char_repetition,
        "word_repetition": s.word_repetition,
        "special_chars": s.special_chars,
        "stopwords": s.stopwords,
        "flagged_words": s.flagged_words,
    }


def stats_columns(table: pa.Table) -> tuple[np.ndarray, np.ndarray, TextStats]:
    """Every text node of a signals table at once: (row of its document, node_index, TextStats of arrays).

    Values are widened to float64/int64 so that batch decisions equal the one-at-a-time ones on `stats_of`.
    """
    nodes = table["nodes"].combine_chunks()
    flat = pc.list_flatten(nodes)
    rows = pc.list_parent_indices(nodes).to_numpy()

    def column(name: str, dtype: type) -> np.ndarray:
        return np.asarray(pc.struct_field(flat, name).to_numpy(zero_copy_only=False), dtype=dtype)

    stats = TextStats(
        words=column("words", np.int64),
        char_repetition=column("char_repetition", np.float64),
        word_repetition=column("word_repetition", np.float64),
        special_chars=column("special_chars", np.float64),
        stopwords=column("stopwords", np.float64),
        flagged_words=column("flagged_words", np.float64),
    )
    return rows, column("node_index", np.int64), stats


def stats_of(row: dict[str, Any]) -> TextStats:
    """TextStats of one cached node-stats row."""
    return TextStats(
        words=row["words"],
        char_repetition=row["char_repetition"],
        word_repetition=row["word_repetition"],
        special_chars=row["special_chars"],
        stopwords=row["stopwords"],
        flagged_words=row["flagged_words"],
    )


def document_signals(doc: dict[str, Any], config: FilterConfig) -> dict[str, Any]:
    nodes = doc.get("nodes") or []
    texts = [n.get("text") or "" for n in nodes if n["kind"] == NODE_TEXT]
    full_text = "\n".join(texts)
    lang, score = identify(full_text)
    wordlist_lang = stats_language(lang, config)
    images = [n for n in nodes if n["kind"] == NODE_IMAGE and n.get("url")]
    image_urls = sorted({n["url"] for n in images})
    signature = minhash_signature(full_text, config)
    normalised = normalise_text(full_text)
    url_key = normalise_url(doc.get("url") or "")
    return {
        "doc_id": doc["doc_id"],
        "url_hash": hash64(url_key) if url_key else None,
        "domain": domain_of(doc),
        "fetch_date": doc.get("fetch_date") or "",
        "lang": lang,
        "lang_score": score,
        "text_hash": hash64(normalised) if normalised else None,
        "image_set_hash": hash64("\n".join(image_urls)) if image_urls else None,
        "images": [{"node_index": n["node_index"], "url_hash": hash64(n["url"])} for n in images],
        "bands": band_keys(signature, config.dedup.minhash_rows) if signature is not None else None,
        "signature": signature.tolist() if signature is not None else None,
        "nodes": [node_stats(n, wordlist_lang, config) for n in nodes if n["kind"] == NODE_TEXT],
    }


def signals_table(docs: Iterable[dict[str, Any]], config: FilterConfig) -> pa.Table:
    return pa.Table.from_pylist([document_signals(d, config) for d in docs], schema=SIGNALS_SCHEMA)
