"""Corpus-wide dedup on Ray, from the cached per-unit signals (see `pipeline/filters/signals.py`).

Each rule is a group-by over the whole corpus, split into Ray tasks by key partition (MinHash: one task per
LSH band), so no worker needs the corpus in memory and no duplicate is missed because two copies landed in
different units. The driver only resolves the (small) groups of duplicates:

- same page URL, identical text, identical non-empty image-URL set, MinHash near duplicates: keep the newest
  fetch (ties: the larger doc_id), applied in that order, each rule on the documents the previous ones kept;
- image URLs found in more than K documents: only those images go (OBELICS's K = 10);
- paragraphs found in more than N documents of one domain: every copy goes.

Decisions are cached under a key of the dedup config and the signal files they came from.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from m3w.config import to_dict
from m3w.pipeline.filters.config import DedupConfig
from m3w.pipeline.filters.signals import hash64
from m3w.pipeline.io import stable_hash, write_parquet_atomic
from m3w.schemas.filter_cache import (
    DEDUP_DOCUMENTS_SCHEMA,
    DEDUP_IMAGE_URLS_SCHEMA,
    DEDUP_PARAGRAPHS_SCHEMA,
    DEDUP_VERSION,
)

DOC_RULES = (
    ("url_key", "dedup.same_url", "same URL"),
    ("text_hash", "dedup.exact_text", "same text"),
    ("image_set_hash", "dedup.same_image_set", "same set of image URLs"),
)
ROWS_PER_PARTITION = 200_000
MAX_BUCKET_PAIRS = 200  # a band bucket larger than this is compared against its first members only


@dataclass
class DedupDecisions:
    documents: dict[str, tuple[str, str]] = field(default_factory=dict)  # doc_id → (filter, reason)
    image_urls: dict[str, int] = field(default_factory=dict)  # URL → documents it occurs in (only > K)
    paragraphs: dict[tuple[str, int], int] = field(default_factory=dict)  # (domain, hash) → documents


# ------------------------------------------------------------------------------------------------ Ray tasks


def _read(files: Sequence[str], columns: list[str]) -> pa.Table:
    tables = [pq.read_table(f, columns=columns) for f in files]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def _partition_of(key: Any, n: int) -> int:
    return (hash64(key) if isinstance(key, str) else int(key)) % n


def group_task(files: Sequence[str], column: str, partition: int, n: int) -> list[list[tuple[str, str]]]:
    """Groups of ≥ 2 documents sharing `column`'s value, for the keys in this partition."""
    table = _read(files, ["doc_id", "fetch_date", column])
    groups: dict[Any, list[tuple[str, str]]] = defaultdict(list)
    for doc_id, date, key in zip(*(table[c].to_pylist() for c in ("doc_id", "fetch_date", column))):
        if key not in (None, "") and _partition_of(key, n) == partition:
            groups[key].append((doc_id, date or ""))
    return [sorted(set(g)) for g in groups.values() if len(set(g)) > 1]


def band_task(
    files: Sequence[str], band: int, threshold: float
) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Pairs of documents in one LSH bucket of `band` whose MinHash Jaccard estimate reaches `threshold`."""
    table = _read(files, ["doc_id", "fetch_date", "bands", "signature"])
    table = table.filter(table["bands"].is_valid())
    if table.num_rows == 0:
        return []
    keys = pc.list_element(table["bands"], band).to_numpy()
    signatures = np.asarray(table["signature"].to_pylist(), dtype=np.uint32)
    ids = table["doc_id"].to_pylist()
    dates = [d or "" for d in table["fetch_date"].to_pylist()]
    buckets: dict[int, list[int]] = defaultdict(list)
    for row, key in enumerate(keys):
        buckets[int(key)].append(row)
    pairs = []
    for rows in buckets.values():
        for i, a in enumerate(rows[:MAX_BUCKET_PAIRS]):
            for b in rows[i + 1 :]:
                if ids[a] != ids[b] and float(np.mean(signatures[a] == signatures[b])) >= threshold:
                    pairs.append(((ids[a], dates[a]), (ids[b], dates[b])))
    return pairs


def count_task(files: Sequence[str], kind: str, partition: int, n: int, limit: int) -> list[tuple[Any, int]]:
    """Keys of this partition found in more than `limit` distinct documents.

    kind "image_url": key = image URL; kind "paragraph": key = (domain, paragraph hash).
    """
    column = "image_urls" if kind == "image_url" else "nodes"
    table = _read(files, ["doc_id", "domain", column])
    docs: dict[Any, set[str]] = defaultdict(set)
    for doc_id, domain, values in zip(*(table[c].to_pylist() for c in ("doc_id", "domain", column))):
        for value in values or []:
            key = value if kind == "image_url" else (domain or "", value["hash"])
            if _partition_of(key if kind == "image_url" else key[1], n) == partition:
                docs[key].add(doc_id)
    return sorted((key, len(ids)) for key, ids in docs.items() if len(ids) > limit)


# ------------------------------------------------------------------------------------------------ resolution


def _newest(members: list[tuple[str, str]]) -> tuple[str, str]:
    return max(members, key=lambda m: (m[1], m[0]))


def _drop_all_but_newest(
    members: list[tuple[str, str]], rule: str, what: str, decisions: DedupDecisions
) -> None:
    alive = [m for m in members if m[0] not in decisions.documents]
    if len(alive) < 2:
        return
    kept_id, kept_date = _newest(alive)
    for doc_id, _ in alive:
        if doc_id != kept_id:
            decisions.documents[doc_id] = (rule, f"{what} as {kept_id} (fetched {kept_date or '?'}, kept)")


def _components(pairs: list[tuple[tuple[str, str], tuple[str, str]]]) -> list[list[tuple[str, str]]]:
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(x: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for x in list(parent):
        members[find(x)].append(x)
    return [sorted(m) for _, m in sorted(members.items())]


def compute_decisions(files: Sequence[str], cfg: DedupConfig) -> DedupDecisions:
    """Run every enabled rule as Ray tasks over the signal files and resolve the duplicate groups."""
    import ray

    decisions = DedupDecisions()
    if not cfg.enabled or not files:
        return decisions
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    n = cfg.num_partitions or max(1, math.ceil(rows / ROWS_PER_PARTITION))
    files_ref = ray.put(list(files))
    remote = ray.remote(max_retries=1)
    group, band, count = remote(group_task), remote(band_task), remote(count_task)

    enabled = {"url_key": cfg.same_url, "text_hash": cfg.exact_text, "image_set_hash": cfg.same_image_set}
    group_refs = {
        col: [group.remote(files_ref, col, p, n) for p in range(n)] for col, *_ in DOC_RULES if enabled[col]
    }
    band_refs = (
        [band.remote(files_ref, b, cfg.minhash_threshold) for b in range(cfg.minhash_bands)]
        if cfg.near_duplicates
        else []
    )
    image_refs = [count.remote(files_ref, "image_url", p, n, cfg.image_url_max_docs) for p in range(n)]
    para_refs = [
        count.remote(files_ref, "paragraph", p, n, cfg.paragraph_max_docs_per_domain) for p in range(n)
    ]

    for column, rule, what in DOC_RULES:
        for groups in ray.get(group_refs.get(column, [])):
            for members in groups:
                _drop_all_but_newest(members, rule, what, decisions)
    pairs = [pair for part in ray.get(band_refs) for pair in part]
    alive_pairs = [
        (a, b) for a, b in pairs if a[0] not in decisions.documents and b[0] not in decisions.documents
    ]
    for members in _components(alive_pairs):
        _drop_all_but_newest(
            members, "dedup.near_duplicate", f"MinHash Jaccard ≥ {cfg.minhash_threshold} with", decisions
        )
    decisions.image_urls = dict(kv for part in ray.get(image_refs) for kv in part)
    decisions.paragraphs = {tuple(k): v for part in ray.get(para_refs) for k, v in part}
    return decisions


# ------------------------------------------------------------------------------------------------ cache


def decisions_key(files: Sequence[str], cfg: DedupConfig) -> str:
    """Decisions are valid for exactly this dedup config and these signal files (whose names carry the inputs'
    fingerprints and the signals config)."""
    return stable_hash(
        {"version": DEDUP_VERSION, "dedup": to_dict(cfg), "files": sorted(Path(f).name for f in files)}
    )


def save_decisions(decisions: DedupDecisions, directory: Path) -> None:
    docs = sorted(decisions.documents.items())
    write_parquet_atomic(
        pa.Table.from_pylist(
            [{"doc_id": d, "filter": f, "reason": r} for d, (f, r) in docs], schema=DEDUP_DOCUMENTS_SCHEMA
        ),
        directory / "documents.parquet",
    )
    write_parquet_atomic(
        pa.Table.from_pylist(
            [{"url": u, "docs": c} for u, c in sorted(decisions.image_urls.items())],
            schema=DEDUP_IMAGE_URLS_SCHEMA,
        ),
        directory / "image_urls.parquet",
    )
    write_parquet_atomic(
        pa.Table.from_pylist(
            [{"domain": d, "hash": h, "docs": c} for (d, h), c in sorted(decisions.paragraphs.items())],
            schema=DEDUP_PARAGRAPHS_SCHEMA,
        ),
        directory / "paragraphs.parquet",
    )
    (directory / "_done").touch()  # written last: a directory without it is an interrupted run


def load_decisions(directory: Path) -> DedupDecisions | None:
    if not (directory / "_done").exists():
        return None
    docs = pq.read_table(directory / "documents.parquet").to_pylist()
    urls = pq.read_table(directory / "image_urls.parquet").to_pylist()
    paragraphs = pq.read_table(directory / "paragraphs.parquet").to_pylist()
    return DedupDecisions(
        documents={r["doc_id"]: (r["filter"], r["reason"]) for r in docs},
        image_urls={r["url"]: r["docs"] for r in urls},
        paragraphs={(r["domain"], r["hash"]): r["docs"] for r in paragraphs},
    )


def run_dedup(files: Sequence[str], cfg: DedupConfig, cache_dir: Path) -> tuple[DedupDecisions, Path, bool]:
    """Decisions for the corpus in `files`, from the cache when this config and these files were seen before.

    Returns (decisions, their directory, whether they came from the cache). Ray must be initialised.
    """
    directory = Path(cache_dir) / decisions_key(files, cfg)
    cached = load_decisions(directory)
    if cached is not None:
        return cached, directory, True
    decisions = compute_decisions(files, cfg)
    directory.mkdir(parents=True, exist_ok=True)
    save_decisions(decisions, directory)
    return decisions, directory, False
