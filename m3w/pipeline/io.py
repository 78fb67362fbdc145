"""Storage for every stage: one set of helpers over fsspec, so `s3://bucket/x`, `gs://…` and a local path take
the same code path.

Object storage has no rename, no append and no locks, so nothing here relies on them:
- a write is whole or absent: local files are written to a temp name and renamed; remote objects are written
  to a local temp file and uploaded in one PUT (or one multipart upload, which appears only when complete);
- there is no append: logs that grow (the stage manifest) are one small object per entry;
- a unit's output is committed by what its stage writes last (its manifest entry, or its index file), never by
  a rename of a directory.

Paths are strings (a `Path` cannot hold `s3://`): build them with `join`.
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


def file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask (not mkstemp's owner-only 0600)."""
    return 0o666 & ~current_umask()


def temp_file(final: Path) -> tuple[int, str]:
    """An open temp file (fd, path) next to `final`, with the mode `open()` would give `final`."""
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{final.name}.", dir=final.parent)
    os.fchmod(fd, file_mode())
    return fd, tmp


def remove_temp_files(directory: str | Path) -> int:
    """Delete the `.tmp-*` files that killed writers left under a local `directory` (call it before a run
    starts writing there: a stage has one writer per output directory). Returns how many went. Object
    storage has none: remote outputs are built in the local temp dir and uploaded whole."""
    if is_remote(directory):
        return 0
    removed = 0
    for root, _, files in os.walk(local_path(directory)):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                    removed += 1
    return removed


# Called just before an output is published (renamed into place by `commit`, uploaded by `atomic_path`, or PUT by
# `write_bytes`). Ray workers set it (ray_runner) to a check that raises once their job's driver is gone, so a
# worker outliving a killed job never publishes a file.
commit_check: Callable[[], None] | None = None


def commit(tmp: str | Path, final: str | Path) -> None:
    """Publish a finished local temp file under its final name (atomic on one filesystem)."""
    if commit_check is not None:
        commit_check()
    os.replace(tmp, final)


def is_remote(url: str | Path) -> bool:
    url = str(url)
    return "://" in url and not url.startswith("file://")


def local_path(url: str | Path) -> str:
    url = str(url)
    return url[len("file://") :] if url.startswith("file://") else url


def absolute(url: str | Path) -> str:
    """A URL as given, a local path made absolute (Ray workers may run in another working directory)."""
    return str(url) if is_remote(url) else os.path.abspath(local_path(url))


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


def parent_of(url: str | Path) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[0]


def _fresh(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a remote URL, its listing cache dropped: object-store filesystems cache
    listings, and other processes write, so the cache is never trusted."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    return fs, path


def exists(url: str | Path) -> bool:
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs, path = _fresh(url)
    return fs.exists(path)


def is_dir(url: str | Path) -> bool:
    if not is_remote(url):
        return os.path.isdir(local_path(url))
    fs, path = _fresh(url)
    return fs.isdir(path)


def is_file(url: str | Path) -> bool:
    if not is_remote(url):
        return os.path.isfile(local_path(url))
    fs, path = _fresh(url)
    return fs.isfile(path)


def version_of(url: str | Path) -> str:
    """What changes when a file is rewritten: size and mtime locally, size and ETag (or mtime) elsewhere."""
    if not is_remote(url):
        st = os.stat(local_path(url))
        return f"{st.st_size}-{st.st_mtime_ns}"
    fs, path = _fresh(url)
    info = fs.info(path)
    return f"{info.get('size')}-{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"


def find_files(url: str | Path) -> dict[str, int]:
    """Every file under the folder `url`, as {path relative to `url`: size in bytes}; {} when it is absent."""
    fs, path = _fresh(url)
    return {p[len(path) :].lstrip("/"): int(info["size"]) for p, info in fs.find(path, detail=True).items()}


def size(url: str | Path) -> int:
    fs, path = url_to_fs(url)
    return int(fs.size(path))


def list_dir(url: str | Path, *, dirs: bool = False) -> list[str]:
    """Names (not paths) of the files (or, with `dirs`, the subfolders) directly in `url`, sorted; [] when
    `url` does not exist."""
    if not is_remote(url):
        root = local_path(url)
        try:
            entries = list(os.scandir(root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name for e in entries if (e.is_dir() if dirs else e.is_file()))
    fs, path = _fresh(url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    want = "directory" if dirs else "file"
    return sorted(name_of(e["name"]) for e in entries if e["type"] == want)


def makedirs(url: str | Path) -> None:
    """Create a local directory; object stores have none to create."""
    if not is_remote(url):
        os.makedirs(local_path(url), exist_ok=True)


def remove(url: str | Path, missing_ok: bool = True) -> None:
    fs, path = url_to_fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(url: str | Path) -> None:
    fs, path = url_to_fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def local_folder(final: str | Path) -> Iterator[Path]:
    """Yield a local folder to fill: `final` itself when local, else a temp folder uploaded to `final` (a URL)
    file by file when the block succeeds (for writers that only take a folder, like `save_pretrained`)."""
    if not is_remote(final):
        os.makedirs(local_path(final), exist_ok=True)
        yield Path(local_path(final))
        return
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        yield Path(tmp)
        if commit_check is not None:
            commit_check()
        fs, path = url_to_fs(final)
        for file in sorted(Path(tmp).rglob("*")):
            if file.is_file():
                fs.put_file(str(file), f"{path}/{file.relative_to(tmp).as_posix()}")


def open_input(url: str | Path, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """An open file for reading (local path or any fsspec URL)."""
    if not is_remote(url):
        return open(local_path(url), mode, **kwargs)  # noqa: SIM115 - the caller closes it
    return fsspec.open(str(url), mode, **kwargs).open()


def read_bytes(url: str | Path) -> bytes:
    if not is_remote(url):
        return Path(local_path(url)).read_bytes()
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def read_text(url: str | Path) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str | Path) -> Any:
    return json.loads(read_bytes(url))


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


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a local temp path; when the block succeeds it becomes `final` (a local path or a URL) whole.

    Readers never see a partial file, and a killed writer leaves only a local `.tmp-*` file (beside `final`,
    which the next run ignores, or in the temp dir for a remote `final`).
    """
    remote = is_remote(final)
    if remote:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name_of(final)}.")
    else:
        target = Path(local_path(final))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(target)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if remote:
            if commit_check is not None:
                commit_check()
            fs, path = url_to_fs(final)
            fs.put_file(str(tmp_path), path)
        else:
            commit(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(final: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    with atomic_path(final) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_bytes(url: str | Path, data: bytes) -> None:
    """Write a whole file at once (atomically: all or nothing)."""
    if is_remote(url):
        if commit_check is not None:
            commit_check()
        fs, path = url_to_fs(url)
        fs.pipe_file(path, data)  # one PUT: the object appears whole
        return
    with atomic_open(url, "wb") as f:
        f.write(data)


def write_json(url: str | Path, obj: Any, indent: int | None = None) -> None:
    write_bytes(url, (json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False) + "\n").encode())


def create_exclusive(url: str | Path, data: bytes) -> bool:
    """Create `url` with `data` only if it does not exist; False when it already did. Local files use O_EXCL;
    object stores a conditional PUT (If-None-Match: *), where the store supports it."""
    if not is_remote(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # open()'s mode, less the umask
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, path = url_to_fs(url)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def write_parquet_atomic(table: pa.Table, final: str | Path, **kwargs: Any) -> None:
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression=kwargs.pop("compression", "zstd"), **kwargs)


def parquet_file(url: str | Path) -> pq.ParquetFile:
    """A ParquetFile on a local path or any fsspec URL (reads the footer only)."""
    if not is_remote(url):
        return pq.ParquetFile(local_path(url))
    fs, path = url_to_fs(url)
    return pq.ParquetFile(path, filesystem=fs)


def read_parquet(url: str | Path, columns: list[str] | None = None) -> pa.Table:
    if not is_remote(url):
        return pq.read_table(local_path(url), columns=columns)
    fs, path = url_to_fs(url)
    return pq.read_table(path, columns=columns, filesystem=fs)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of a JSON-serialisable object (config hashes, ids): same input, same hash, any process."""
    data = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:n]
