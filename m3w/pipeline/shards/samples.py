"""What every shard dataset shares: the tokenizer per worker, sample keys, sample JSON, inputs and unit ids."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from m3w.pipeline import io
from m3w.pipeline.io import stable_hash
from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN, load_tokenizer, tokenizer_fingerprint
from m3w.schemas import shards as spec
from m3w.schemas.documents import document_files


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name: str | None):
    """One tokenizer per worker process (loading takes ~0.3 s; a unit may be small)."""
    tok = load_tokenizer(name)
    return tok, {"name": tok.m3w_name, "fingerprint": tokenizer_fingerprint(tok)}


def sample_key(*parts: Any) -> str:
    """A webdataset key: no dots or slashes (webdataset splits on the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", "_".join(str(p) for p in parts))


def provenance(doc: dict, node_indices: list[int], window_index: int, **extra: Any) -> dict:
    return {
        "doc_id": doc["doc_id"],
        "url": doc["url"],
        "warc_path": doc.get("warc_path"),
        "warc_record_id": doc.get("warc_record_id"),
        "warc_offset": doc.get("warc_offset"),
        "node_indices": node_indices,
        "window_index": window_index,
        **extra,
    }


def sample_json(dataset: str, ids: list[int], text: str, n_media: int, tok_info: dict, prov: dict,
                media_kind: str = "image", num_frames: int = 1) -> dict:  # fmt: skip
    n_files = n_media * num_frames
    return {
        "schema": spec.SCHEMA_VERSION,
        "dataset": dataset,
        "input_ids": ids,
        "text": text,
        "images": [f"{i}.jpg" for i in range(n_files)],
        "media_kind": media_kind,
        "num_frames": num_frames,
        "tokenizer": tok_info,
        "provenance": prov,
    }


def pair_ids(tok, text: str, max_tokens: int) -> tuple[list[int], bool]:
    """`<image>text<EOC>` in at most `max_tokens` tokens; True when the text had to be cut."""
    media_id, eoc_id = tok.convert_tokens_to_ids(MEDIA_TOKEN), tok.convert_tokens_to_ids(EOC_TOKEN)
    body = tok(text, add_special_tokens=False)["input_ids"]
    room = max_tokens - 2
    return [media_id, *body[:room], eoc_id], len(body) > room


def input_files(inputs: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(file, unit id) of the parquet files of the given files/folders (local or URLs), in unit order.

    The unit id is the file name plus a hash of where it sits among the inputs (which argument, which name),
    not of its absolute location: the same inputs give the same shard names on a local disk and on s3://.
    """
    files: dict[str, str] = {}
    for position, item in enumerate(map(io.absolute, inputs)):
        if io.is_dir(item):
            # Not recursive: a filter output folder also holds excluded/ and _cache/ parquet files.
            found = document_files(item)
        elif io.is_file(item):
            found = [item]
        else:
            raise FileNotFoundError(f"{item} does not exist")
        for url in found:
            name = io.name_of(url)
            files.setdefault(url, f"{name.removesuffix('.parquet')}-{stable_hash([position, name], 8)}")
    return sorted(files.items(), key=lambda item: item[1])
