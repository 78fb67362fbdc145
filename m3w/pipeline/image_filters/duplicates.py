"""pHash duplicate counts across the whole image store, for the rule `image_filters.phash.max_duplicates`.

The count of a pHash is how many stored images (distinct URLs with status ok) have it: a picture re-hosted,
resized or re-encoded under many URLs is one picture used many times. It is OBELICS's "image used in more than K
documents" on the picture instead of its URL (the filter stage's dedup already counts identical image URLs across
documents: `dedup.image_url_max_docs`). The counts are kept in the store (`schemas/image_duplicates.py`), and
`duplicate_counts` reads them.

A corpus-wide group-by on the filter dedup's machinery, so that no task, and not the driver, holds the store's
pHashes:

    map     one task per run of consecutive rows files (≤ ROWS_PER_TASK rows: a store has many small index
            files): the pHashes of their stored images, hash-partitioned on a 64-bit mix of the pHash (pHash bits
            are far from uniform) into one partitioned file (`filter_cache.write_parts`)
    reduce  one task per partition: that partition of every map file (one byte range of each), counted; the
            map files go once every partition is counted
    read    the pHashes over K (few: the most-used pictures), by the decide step and by the store's readers

The counts are cached under a key of the rows files they came from: a run that adds rows files counts again.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from m3w.pipeline.dedup.keys import hash_partition, mix64
from m3w.pipeline.io import parquet_file, stable_hash, url_to_fs
from m3w.schemas import image_duplicates as spec
from m3w.schemas.filter_cache import read_parts, write_parts
from m3w.schemas.images import STATUS_OK

ROWS_PER_TASK = 4_000_000  # rows one map task reads, pHashes one reduce task counts (32 MB of int64)


def shuffle_keys(phashes: np.ndarray) -> np.ndarray:
    """Well-spread 64-bit keys of pHashes (splitmix64's finaliser: a bijection, so no two pHashes collide)."""
    return mix64(phashes, np.zeros_like(phashes))


def map_rows_files(rows_files: Sequence[str], out: str, partitions: int) -> int:
    """Ray task: the pHashes of some rows files' stored images, partitioned. Returns their number."""
    tables = [parquet_file(f).read(columns=["status", "phash"]) for f in rows_files]
    table = pa.concat_tables(tables)
    table = table.filter(pc.and_(pc.equal(table["status"], STATUS_OK), pc.is_valid(table["phash"])))
    phashes = table.column("phash").to_numpy()
    keys = pa.table({"phash": phashes}, schema=spec.PHASH_KEYS_SCHEMA)
    write_parts(out, keys, hash_partition(shuffle_keys(phashes), partitions), partitions)
    return len(phashes)


def count_partition(map_files: Sequence[str], partition: int, partitions: int, out: str) -> int:
    """Ray task: count one partition's pHashes over every map file; keep those ≥ 2 stored images have. Returns
    how many pHashes were kept."""
    phashes = read_parts(map_files, partition, partitions, spec.PHASH_KEYS_SCHEMA).column("phash").to_numpy()
    values, images = np.unique(phashes, return_counts=True)
    shared = images >= 2
    spec.write_counts(out, values[shared], images[shared].astype(np.int64))
    return int(shared.sum())


def counts_key(rows_files: Sequence[str | Path]) -> str:
    """The counts' cache key: the rows files they count (whole paths: file names may repeat across folders)."""
    return stable_hash({"version": spec.SCHEMA_VERSION, "files": sorted(map(str, rows_files))})


def _runs(sizes: Sequence[int], limit: int) -> list[range]:
    """Runs of consecutive items whose sizes add up to at most `limit` (an item over it alone)."""
    runs, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            runs.append(range(start, i))
            start, total = i, 0
        total += size
    return [*runs, range(start, len(sizes))] if sizes else []


def run_phash_counts(
    store: str | Path,
    rows_files: Sequence[str | Path],
    ray_address: str | None = None,
    rows_per_task: int = ROWS_PER_TASK,
) -> str:
    """Count the pHashes of the stored images of `rows_files` (map and reduce as Ray tasks); returns the key
    of the counts (`schemas.image_duplicates.counts_dir`). Cached: the same rows files are counted once."""
    import ray

    from m3w.pipeline.ray_runner import init_ray, ray_task

    key = counts_key(rows_files)
    directory = spec.counts_dir(store, key)
    if spec.done_partitions(directory) is not None:
        return key
    files = [str(f) for f in rows_files]
    rows = [parquet_file(f).metadata.num_rows for f in files]  # footers: an upper bound of the stored images
    partitions = max(1, math.ceil(sum(rows) / rows_per_task))
    runs = _runs(rows, rows_per_task)
    init_ray(ray_address)
    map_files = [spec.map_file(directory, i) for i in range(len(runs))]
    mapper = ray.remote(max_retries=1)(ray_task(map_rows_files))
    ray.get([mapper.remote([files[i] for i in run], out, partitions) for run, out in zip(runs, map_files)])
    reducer = ray.remote(max_retries=1)(ray_task(count_partition))
    ray.get(
        [reducer.remote(map_files, p, partitions, spec.counts_file(directory, p)) for p in range(partitions)]
    )
    spec.mark_done(directory, partitions)
    fs, root = url_to_fs(spec.counts_root(store))
    fs.rm(f"{root}/{key}/map", recursive=True)  # the shuffle's files: counted
    for old in fs.ls(root, detail=False):  # counts of an earlier set of rows files: superseded
        if old.rstrip("/").rsplit("/", 1)[-1] != key:
            fs.rm(old, recursive=True)
    return key


@functools.lru_cache(maxsize=8)
def duplicate_counts(store: str, key: str, more_than: int = 1) -> dict[int, int]:
    """pHash → stored images with it, for the pHashes that more than `more_than` stored images have (the
    duplicate rule's drops with `more_than` = K; every shared pHash with the default). Cached per process:
    counts under a key never change."""
    return spec.read_counts(spec.counts_dir(store, key), more_than)
