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

TEMP_PREFIX = ".tmp-"


def current_umask() -> int:
    """The process umask, read without changing it (os.umask sets it, which races with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(final: Path) -> tuple[int, str]:
    """An open temp file (fd, path) next to `final`, with the mode `open()` would give `final` (0666 less the
    umask) rather than mkstemp's owner-only 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{final.name}.", dir=final.parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def remove_temp_files(directory: str | Path) -> int:
    """Delete the `.tmp-*` files that killed writers left under `directory` (call it before a run starts
    writing there: a stage has one writer per output directory). Returns how many went."""
    removed = 0
    for root, _, files in os.walk(directory):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                    removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `final`; rename it into place only if the block succeeds.

    Readers never see a partial file; a killed writer leaves a `.tmp-*` file that the next run removes.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(final)
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
