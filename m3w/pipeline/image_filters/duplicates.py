"""pHash duplicate counts across the whole image store, for the rule `image_filters.phash.max_duplicates`.

The count of a pHash is how many stored images (distinct URLs with status ok) have it: a picture re-hosted,
resized or re-encoded under many URLs is one picture used many times. It is OBELICS's "image used in more than K
documents" on the picture instead of its URL (the filter stage's dedup already counts identical image URLs across
documents: `dedup.image_url_max_docs`). The counts are kept in the store (`schemas/image_duplicates.py`), and
`duplicate_counts` reads the count of any pHash.

A corpus-wide group-by, split like the filter stage's dedup counts so that no task, and not the driver, holds the
store's pHashes:

    map     one task per index file, once (index files never change): the pHashes of its stored images, each with
            a shuffle key (a 64-bit mix of the pHash: pHash bits are far from uniform), sorted by key
    reduce  one task per key range: the pHashes of its range from every map file, reading only the row groups
            whose key statistics overlap the range (each map byte is read about once), counted
    read    the pHashes over K (few: the most-used pictures), by the decide step and by the store's readers

The counts are cached under a key of the index files they came from: a run that adds index files maps only the
new ones, then counts again.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from m3w.pipeline.io import stable_hash
from m3w.schemas import image_duplicates as spec
from m3w.schemas.images import STATUS_OK

ROWS_PER_REDUCE = 4_000_000  # pHashes one reduce task counts (32 MB of int64 keys and values)
_INT64 = np.iinfo(np.int64)


def shuffle_keys(phashes: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser of each pHash, as int64: uniform keys (and a bijection: no two pHashes collide)."""
    x = phashes.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x.view(np.int64)


def key_ranges(n: int) -> list[tuple[int, int]]:
    """`n` contiguous, inclusive ranges covering the int64 keys."""
    bounds = [_INT64.min + (2**64 * i) // n for i in range(n)] + [_INT64.max + 1]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]


def map_index_file(store: str, index_file: str) -> int:
    """Ray task: the pHashes of one index file's stored images → its map file (once). Returns their number."""
    out = spec.map_path(store, index_file)
    if not out.exists():
        table = pq.read_table(index_file, columns=["status", "phash"])
        table = table.filter(pc.and_(pc.equal(table["status"], STATUS_OK), pc.is_valid(table["phash"])))
        phashes = table.column("phash").to_numpy()
        spec.write_keys(out, shuffle_keys(phashes), phashes)
    return pq.ParquetFile(out).metadata.num_rows


def count_range(map_files: Sequence[str], low: int, high: int, out: str) -> int:
    """Ray task: count the pHashes whose key is in [low, high] over every map file; keep those ≥ 2 images have.
    Returns how many pHashes were kept."""
    parts = [spec.read_key_range(Path(f), low, high) for f in map_files]
    phashes, images = np.unique(np.concatenate(parts or [np.empty(0, np.int64)]), return_counts=True)
    shared = images >= 2
    spec.write_counts(Path(out), phashes[shared], images[shared].astype(np.int64))
    return int(shared.sum())


def counts_key(index_files: Sequence[str | Path]) -> str:
    return stable_hash({"version": spec.SCHEMA_VERSION, "files": sorted(Path(f).name for f in index_files)})


def run_phash_counts(
    store: str | Path,
    index_files: Sequence[str | Path],
    ray_address: str | None = None,
    rows_per_reduce: int = ROWS_PER_REDUCE,
) -> str:
    """Count the pHashes of the stored images of `index_files` (map and reduce as Ray tasks); returns the key
    of the counts (`schemas.image_duplicates.counts_dir`). Cached: the same index files are counted once."""
    import ray

    from m3w.pipeline.ray_runner import init_ray

    key = counts_key(index_files)
    directory = spec.counts_dir(store, key)
    if spec.is_done(directory):
        return key
    init_ray(ray_address)
    remote_map = ray.remote(max_retries=1)(map_index_file)
    rows = ray.get([remote_map.remote(str(store), str(f)) for f in index_files])
    map_files = [str(spec.map_path(store, f)) for f in index_files]
    ranges = key_ranges(max(1, math.ceil(sum(rows) / rows_per_reduce)))
    remote_count = ray.remote(max_retries=1)(count_range)
    ray.get([remote_count.remote(map_files, low, high, str(directory / f"{i:05d}.parquet"))
             for i, (low, high) in enumerate(ranges)])  # fmt: skip
    spec.mark_done(directory)
    for old in directory.parent.iterdir():  # counts of an earlier set of index files: superseded
        if old != directory and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return key


@functools.lru_cache(maxsize=8)
def duplicate_counts(store: str, key: str, more_than: int = 1) -> dict[int, int]:
    """pHash → stored images with it, for the pHashes that more than `more_than` stored images have (the
    duplicate rule's drops with `more_than` = K; every shared pHash with the default). Cached per process:
    counts under a key never change."""
    directory = spec.counts_dir(store, key)
    if not spec.is_done(directory):
        raise FileNotFoundError(
            f"no complete pHash counts at {directory}: run `m3w images` on the store again"
        )
    return spec.read_counts(directory, more_than)
