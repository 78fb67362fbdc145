"""File helpers shared by the stages: atomic writes and reads on a local path or any fsspec URL (`s3://…`).

A write is whole or absent: local files are written to a temp name and renamed; remote objects are written in
one PUT, which appears only when complete. Paths are strings (a `Path` cannot hold `s3://`): build them with
`join`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import fsspec
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


# Called just before an output is published (renamed into place by `commit`, or PUT by `write_bytes`). Ray workers
# set it (ray_runner) to a check that raises once their job's driver is gone, so a worker outliving a killed job
# never publishes a file.
commit_check: Callable[[], None] | None = None


def commit(tmp: str | Path, final: str | Path) -> None:
    """Publish a finished temp file under its final name (atomic on one filesystem)."""
    if commit_check is not None:
        commit_check()
    os.replace(tmp, final)


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
        commit(tmp_path, final)
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


def is_remote(url: str | Path) -> bool:
    url = str(url)
    return "://" in url and not url.startswith("file://")


def local_path(url: str | Path) -> str:
    url = str(url)
    return url[len("file://") :] if url.startswith("file://") else url


def url_to_fs(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def join(base: str | Path, *parts: str) -> str:
    """`base/part/part`: for a local path or a URL (a Path would turn `s3://b` into `s3:/b`)."""
    out = str(base).rstrip("/") if str(base) not in ("/", "") else str(base)
    for part in parts:
        out = f"{out}/{part.strip('/')}" if out else part
    return out


def name_of(url: str | Path) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def exists(url: str | Path) -> bool:
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)  # object-store listings are cached; other processes write
    return fs.exists(path)


def read_bytes(url: str | Path) -> bytes:
    if not is_remote(url):
        return Path(local_path(url)).read_bytes()
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def write_bytes(url: str | Path, data: bytes) -> None:
    """Write a whole file at once (atomically: all or nothing)."""
    if is_remote(url):
        fs, path = url_to_fs(url)
        if commit_check is not None:
            commit_check()
        fs.pipe_file(path, data)  # one PUT: the object appears whole, published
        return
    with atomic_open(local_path(url), "wb") as f:
        f.write(data)


def read_ranges(urls: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
    """Byte ranges [start, end) of files, in order; remote ranges are fetched concurrently."""
    if not urls:
        return []
    if not is_remote(urls[0]):
        out = []
        handles: dict[str, IO[bytes]] = {}
        try:
            for url, start, end in zip(urls, starts, ends):
                f = handles.get(url)
                if f is None:
                    f = handles[url] = open(local_path(url), "rb")  # noqa: SIM115 - closed below
                f.seek(start)
                data = f.read(end - start)
                if len(data) != end - start:
                    raise OSError(f"{url}: short read at {start} ({len(data)} of {end - start} bytes)")
                out.append(data)
        finally:
            for f in handles.values():
                f.close()
        return out
    fs, _ = url_to_fs(urls[0])
    paths = [url_to_fs(u)[1] for u in urls]
    return fs.cat_ranges(paths, list(starts), list(ends), on_error="raise")


def parquet_file(url: str | Path) -> pq.ParquetFile:
    """A ParquetFile on a local path or any fsspec URL (reads the footer only)."""
    if not is_remote(url):
        return pq.ParquetFile(local_path(url))
    fs, path = url_to_fs(url)
    return pq.ParquetFile(path, filesystem=fs)


def write_parquet(table: pa.Table, url: str | Path, **options: Any) -> None:
    """`table` as one parquet file at a local path or fsspec URL, atomically."""
    if not is_remote(url):
        with atomic_path(local_path(url)) as tmp:
            pq.write_table(table, tmp, **options)
        return
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    write_bytes(url, sink.getvalue().to_pybytes())
