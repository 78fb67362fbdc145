"""The image store's pHash duplicate counts (`pipeline/image_filters/duplicates.py` computes them).

Layout, under the store:
    _phash/counts/<key>/map/<n>.parts   during a count only: the pHashes of the stored images of rows file n,
                                        hash-partitioned (the filter dedup's partitioned files,
                                        `schemas.filter_cache.write_parts`)
    _phash/counts/<key>/<p>.parquet     per partition: every pHash that ≥ 2 stored images have, with how many,
                                        most-used first (row-group statistics find the pHashes over K quickly)
    _phash/counts/<key>/_done           the counts of exactly these rows files are complete (written last):
                                        {"partitions": P}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from m3w.pipeline.io import exists, join, parquet_file, read_bytes, write_bytes, write_parquet_atomic
from m3w.schemas.documents import check_version

SCHEMA_VERSION = "m3w.image-duplicates/1"
_META = {b"m3w.schema_version": SCHEMA_VERSION.encode()}
PHASH_DIR = "_phash"
COUNTS_ROW_GROUP = 65_536
DONE = "_done"

PHASH_KEYS_SCHEMA = pa.schema([pa.field("phash", pa.int64(), nullable=False)], metadata=_META)
PHASH_COUNTS_SCHEMA = pa.schema(
    [
        pa.field("phash", pa.int64(), nullable=False),
        pa.field("images", pa.int64(), nullable=False),  # stored images (distinct URLs) with this pHash
    ],
    metadata=_META,
)


def counts_root(store: str | Path) -> str:
    return join(store, PHASH_DIR, "counts")


def counts_dir(store: str | Path, key: str) -> str:
    return join(counts_root(store), key)


def map_file(directory: str, ordinal: int) -> str:
    return join(directory, "map", f"{ordinal:07d}.parts")


def counts_file(directory: str, partition: int) -> str:
    return join(directory, f"{partition:05d}.parquet")


def write_counts(url: str, phashes: np.ndarray, images: np.ndarray) -> None:
    """One partition's counts, most-used first."""
    order = np.lexsort((phashes, -images))
    table = pa.table({"phash": phashes[order], "images": images[order]}, schema=PHASH_COUNTS_SCHEMA)
    write_parquet_atomic(table, url, row_group_size=COUNTS_ROW_GROUP)


def mark_done(directory: str, partitions: int) -> None:
    write_bytes(join(directory, DONE), json.dumps({"partitions": partitions}).encode())


def done_partitions(directory: str) -> int | None:
    """The partitions of complete counts in `directory`, or None when they are not complete."""
    marker = join(directory, DONE)
    return json.loads(read_bytes(marker))["partitions"] if exists(marker) else None


def read_counts(directory: str, more_than: int = 1) -> dict[int, int]:
    """pHash → stored images with it, for the pHashes more than `more_than` images have, from complete counts.
    Files are sorted most-used first, so a high `more_than` reads only their first row groups."""
    partitions = done_partitions(directory)
    if partitions is None:
        raise FileNotFoundError(
            f"no complete pHash counts at {directory}: run `m3w images` on the store again"
        )
    out: dict[int, int] = {}
    for partition in range(partitions):
        parquet = parquet_file(counts_file(directory, partition))
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
