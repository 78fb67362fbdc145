"""The image store's pHash duplicate counts (`pipeline/image_filters/duplicates.py` computes them).

Layout, under the store:
    _phash/map/<index file>.parquet      per index file: the pHash of each stored image, with its shuffle key
                                         (a mix of the pHash), sorted by key in row groups of MAP_ROW_GROUP rows
    _phash/counts/<key>/<range>.parquet  per key range: every pHash that ≥ 2 stored images have, with how many,
                                         most-used first (row-group statistics find the pHashes over K quickly)
    _phash/counts/<key>/_done            the counts of exactly these index files are complete (written last)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m3w.pipeline.io import atomic_path
from m3w.schemas.documents import check_version

SCHEMA_VERSION = "m3w.image-duplicates/1"
_META = {b"m3w.schema_version": SCHEMA_VERSION.encode()}
PHASH_DIR = "_phash"
MAP_ROW_GROUP = 65_536
COUNTS_ROW_GROUP = 65_536
DONE = "_done"

PHASH_KEYS_SCHEMA = pa.schema(
    [pa.field("key", pa.int64(), nullable=False), pa.field("phash", pa.int64(), nullable=False)],
    metadata=_META,
)
PHASH_COUNTS_SCHEMA = pa.schema(
    [
        pa.field("phash", pa.int64(), nullable=False),
        pa.field("images", pa.int64(), nullable=False),  # stored images (distinct URLs) with this pHash
    ],
    metadata=_META,
)


def map_path(store: str | Path, index_file: str | Path) -> Path:
    return Path(store) / PHASH_DIR / "map" / f"{Path(index_file).stem}.parquet"


def counts_dir(store: str | Path, key: str) -> Path:
    return Path(store) / PHASH_DIR / "counts" / key


def _write(table: pa.Table, path: Path, row_group_size: int) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)


def write_keys(path: Path, keys: np.ndarray, phashes: np.ndarray) -> None:
    """One map file: (key, pHash) rows sorted by key."""
    order = np.argsort(keys, kind="stable")
    table = pa.table({"key": keys[order], "phash": phashes[order]}, schema=PHASH_KEYS_SCHEMA)
    _write(table, path, MAP_ROW_GROUP)


def read_key_range(path: Path, low: int, high: int) -> np.ndarray:
    """The pHashes of a map file whose key is in [low, high], reading only the row groups that can hold them."""
    parquet = pq.ParquetFile(path)
    check_version(parquet.schema_arrow, SCHEMA_VERSION)
    groups = []
    for i in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(i).column(0).statistics
        if stats is None or not stats.has_min_max or (stats.max >= low and stats.min <= high):
            groups.append(i)
    if not groups:
        return np.empty(0, dtype=np.int64)
    table = parquet.read_row_groups(groups)
    keys = table.column("key").to_numpy()
    return table.column("phash").to_numpy()[(keys >= low) & (keys <= high)]


def write_counts(path: Path, phashes: np.ndarray, images: np.ndarray) -> None:
    """One key range's counts, most-used first."""
    order = np.lexsort((phashes, -images))
    table = pa.table({"phash": phashes[order], "images": images[order]}, schema=PHASH_COUNTS_SCHEMA)
    _write(table, path, COUNTS_ROW_GROUP)


def mark_done(directory: Path) -> None:
    with atomic_path(directory / DONE) as tmp:
        tmp.write_text("")


def is_done(directory: Path) -> bool:
    return (directory / DONE).exists()


def read_counts(directory: Path, more_than: int = 1) -> dict[int, int]:
    """pHash → stored images with it, for the pHashes more than `more_than` images have. Files are sorted
    most-used first, so a high `more_than` reads only their first row groups."""
    out: dict[int, int] = {}
    for path in sorted(directory.glob("*.parquet")):
        parquet = pq.ParquetFile(path)
        check_version(parquet.schema_arrow, SCHEMA_VERSION)
        for i in range(parquet.metadata.num_row_groups):
            stats = parquet.metadata.row_group(i).column(1).statistics
            if stats is not None and stats.has_min_max and stats.max <= more_than:
                break  # this row group and every later one: at most `more_than` each
            table = parquet.read_row_group(i)
            images = table.column("images").to_numpy()
            keep = images > more_than
            out.update(zip(table.column("phash").to_numpy()[keep].tolist(), images[keep].tolist()))
    return out
