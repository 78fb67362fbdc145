"""File helpers shared by the stages: atomic local writes and fsspec inputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `final`; rename it into place only if the block succeeds.

    Readers never see a partial file, and a killed writer leaves only a `.tmp-*` file that the next run ignores.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(final: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    with atomic_path(final) as tmp, open(tmp, mode) as f:
        yield f


def write_parquet_atomic(table: pa.Table, final: str | Path) -> None:
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of a JSON-serialisable object (config hashes, ids): same input, same hash, any process."""
    data = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:n]


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")
