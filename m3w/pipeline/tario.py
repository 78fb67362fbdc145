"""Deterministic WebDataset tar files: same samples in, same bytes out.

Every member gets a fixed mtime, uid/gid 0, empty owner names and mode 0644, in the order the caller gives; a
shard is built in a local temp file and stored whole when complete (a rename locally, one upload on object
storage), so readers never see a partial shard. (Ray Data's
`write_webdataset` stamps the current time into tar headers and writes randomly named files, so it cannot give
byte-identical outputs.)
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from m3w.pipeline import io as storage

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant works; a real date keeps `tar tv` readable
TAR_FORMAT = tarfile.GNU_FORMAT
_BLOCK = 512


def member_size(payload_bytes: int) -> int:
    """Bytes one member takes in a tar: a header block plus the payload rounded up to whole blocks."""
    return _BLOCK + -(-payload_bytes // _BLOCK) * _BLOCK


def archive_size(content_bytes: int) -> int:
    """Size of a finished tar: its members, the two zero end blocks, padded to the tar record size."""
    return -(-(content_bytes + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one file with fixed metadata; returns the offset of its data in the archive."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = len(info.tobuf(TAR_FORMAT, tar.encoding, tar.errors))
    start = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return start + header


@dataclass
class ShardInfo:
    """One finished shard, as listed in the shard-set manifest."""

    name: str
    samples: int = 0
    tokens: int = 0
    images: int = 0
    bytes: int = 0
    keys: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "samples": self.samples,
            "tokens": self.tokens,
            "images": self.images,
            "bytes": self.bytes,
        }


class ShardWriter:
    """Write samples into `<prefix>-000000.tar`, `<prefix>-000001.tar`, … under `out_dir` (a path or a URL).

    A shard is closed when it holds `max_samples` samples or when the next sample would push it past
    `max_bytes` (a shard always takes at least one sample). Each shard is built in a local temp file and
    stored whole when closed. Use as a context manager; `shards` lists what was written.
    """

    def __init__(
        self, out_dir: str | Path, prefix: str, max_samples: int | None = 1000, max_bytes: int | None = None
    ):
        if not max_samples and not max_bytes:
            raise ValueError("set max_samples or max_bytes (or both)")
        self.out_dir = str(out_dir)
        storage.makedirs(self.out_dir)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._stack: contextlib.ExitStack | None = None
        self._current: ShardInfo | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish()
        elif self._stack is not None:  # the shard in progress is dropped, never stored
            self._stack.__exit__(exc_type, exc, tb)
            self._tar = self._stack = self._current = None

    def _open_next(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(storage.atomic_path(storage.join(self.out_dir, name)))
        self._tar = tarfile.open(self._tmp, mode="w", format=TAR_FORMAT)
        self._stack.callback(self._tar.close)
        self._current = ShardInfo(name)

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._current.bytes = self._tmp.stat().st_size
        self._stack.close()  # stores the finished shard
        self.shards.append(self._current)
        self._tar = self._stack = self._current = None

    def write(self, key: str, files: dict[str, bytes], tokens: int = 0, images: int = 0) -> None:
        """Add one sample: `files` maps extensions ("json", "0.jpg") to bytes, written as `key.ext` in order."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
        size = sum(member_size(len(data)) for data in files.values())
        cur = self._current
        if cur is not None and (
            (self.max_samples and cur.samples >= self.max_samples)
            or (self.max_bytes and cur.samples and archive_size(cur.bytes + size) > self.max_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open_next()
        for ext, data in files.items():
            add_member(self._tar, f"{key}.{ext}", data)
        cur = self._current
        cur.samples += 1
        cur.tokens += tokens
        cur.images += images
        cur.bytes += size


def iter_tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar's members into samples the way webdataset does: key = name up to the first dot."""
    key, files = None, {}
    with storage.open_input(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name
            stem, _, ext = base.partition(".")
            if stem != key and key is not None:
                yield key, files
                files = {}
            key = stem
            files[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, files
