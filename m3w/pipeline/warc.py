"""WARC inputs: resolve what the user named into WARC locations, and stream HTTP response records from one.

Inputs may be local paths, globs, fsspec URLs (`http(s)://`, `s3://`, ...), Common Crawl paths files
(`warc.paths.gz`: one path per line, relative to the Common Crawl base URL), or a crawl id
(`CC-MAIN-2024-22`) whose paths file is fetched from the base URL.

A WARC is streamed, never held in memory: http(s) WARCs as one streaming GET (no range requests needed, so any
plain web server works), other remote schemes through fsspec. The reader is our own, because one damaged record
must cost one record: it inflates gzip members one at a time and resumes at the next member (or, in an
uncompressed WARC, the next `WARC/x.y` line) after any framing error, bounds every header and body, and reports
every response it cannot turn into a page as a `Skip` with a reason.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import os
import re
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from m3w.pipeline.io import is_remote

try:  # ISA-L inflates 2-2.5x faster than zlib, and inflating is most of what reading a WARC costs. Same API.
    from isal import isal_zlib as inflate_lib

    INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, inflate_lib.error)
except ImportError:  # pragma: no cover - a platform without isal wheels
    inflate_lib = zlib  # type: ignore[no-redef]
    INFLATE_ERRORS = (zlib.error,)

DEFAULT_CC_BASE_URL = "https://data.commoncrawl.org/"
CRAWL_ID_RE = re.compile(r"^CC-MAIN-\d{4}-\d{2}$")
_GLOB_CHARS = re.compile(r"[*?\[]")
HTTP_TIMEOUT_S = 60


def _is_paths_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith((".paths.gz", ".paths", ".paths.txt"))


def _join_base(base_url: str, rel: str) -> str:
    if "://" in rel or os.path.isabs(rel):
        return rel
    return base_url.rstrip("/") + "/" + rel.lstrip("/")


@contextmanager
def open_input(path: str) -> Iterator[IO[bytes]]:
    """Open a local path or URL for streaming binary reads. Errors (missing file, HTTP 404) raise here."""
    if path.startswith(("http://", "https://")):
        import requests

        with requests.get(path, stream=True, timeout=HTTP_TIMEOUT_S) as resp:
            resp.raise_for_status()
            resp.raw.decode_content = False  # the WARC's own gzip members are inflated by the reader
            yield resp.raw
    elif is_remote(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            yield f
    else:
        with open(path.removeprefix("file://"), "rb") as f:
            yield f


def read_paths_file(path: str, base_url: str = DEFAULT_CC_BASE_URL) -> list[str]:
    """Lines of a Common Crawl paths file (gzipped or not), each made absolute under `base_url`."""
    with open_input(path) as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    lines = data.decode("utf-8").splitlines()
    return [_join_base(base_url, line.strip()) for line in lines if line.strip()]


def crawl_paths_url(crawl_id: str, base_url: str = DEFAULT_CC_BASE_URL) -> str:
    if not CRAWL_ID_RE.match(crawl_id):
        raise ValueError(f"not a Common Crawl id: {crawl_id!r} (expected CC-MAIN-YYYY-WW)")
    return _join_base(base_url, f"crawl-data/{crawl_id}/warc.paths.gz")


def _expand_glob(pattern: str) -> list[str]:
    if is_remote(pattern):
        import fsspec

        _, _, paths = fsspec.get_fs_token_paths(pattern)
        protocol = pattern.split("://", 1)[0]
        return sorted(f"{protocol}://{p}" for p in paths)
    return sorted(glob.glob(os.path.expanduser(pattern)))


def resolve_inputs(
    inputs: Sequence[str] = (),
    crawl: str | None = None,
    limit: int | None = None,
    cc_base_url: str = DEFAULT_CC_BASE_URL,
) -> list[str]:
    """Every WARC named by `inputs` (paths, globs, URLs, paths files) and `crawl`, in order, without duplicates.

    `limit` keeps the first N. A glob that matches nothing is an error (a typo should not silently do nothing).
    """
    resolved: list[str] = []
    sources = list(inputs) + ([crawl_paths_url(crawl, cc_base_url)] if crawl else [])
    for item in sources:
        if _is_paths_file(item):
            resolved.extend(read_paths_file(item, cc_base_url))
        elif _GLOB_CHARS.search(item) and not item.startswith(("http://", "https://")):
            matches = _expand_glob(item)
            if not matches:
                raise FileNotFoundError(f"no WARC matches {item!r}")
            resolved.extend(matches)
        else:
            resolved.append(item)
    unique = list(dict.fromkeys(resolved))
    return unique[:limit] if limit else unique


# ---------------------------------------------------------------------------------------------- reading

GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_RAW_CHUNK = 1 << 20  # compressed bytes read at a time
_OUT_CHUNK = 1 << 20  # decompressed bytes produced at a time: a huge member never lands in memory at once
_FEED = 32 << 10  # compressed bytes handed to zlib at a time (zlib copies what it does not use)
_MEMBER_KEEP = 8 << 20  # raw bytes of the current gzip member kept, to search them after damage
_SEARCH_OVERLAP = 64 << 10  # bytes re-searched across reads, so a member or line split by a read is found
_PLAIN_KEEP = 1 << 20  # block bytes kept in a plain WARC, to re-read them after a Content-Length that lied
_TRAILER_MAX = 16  # CR/LF bytes tolerated after a record block (the standard says exactly CRLF CRLF)
_VERSION_LINE = re.compile(rb"WARC/\d+\.\d+\r?\n")


@dataclass
class WarcOptions:
    """Bounds on what one record may cost. A record over a bound is a logged skip, never the end of its file."""

    max_warc_header_bytes: int = 32_768  # real WARC headers are < 2 kB; a 100 kB Target-URI is damage
    max_http_header_bytes: int = 65_536  # servers refuse (and crawlers truncate) far smaller heads
    max_http_header_lines: int = 500
    max_search_bytes: int = 64 << 20  # searched for a first record before a file is called "not a WARC"


class WarcError(Exception):
    """The file is not a WARC, or it ends inside a record: its unit fails (and is retried), never "done"."""


@dataclass
class Skip:
    """A response record that yields no document, or a damaged stretch of a WARC, and why.

    `offset`/`length` locate it in the file: for a gzipped WARC the gzip member(s) holding it (seek there and
    inflate), else its bytes. `record_type` is None when damage hid the record header.
    """

    reason: str
    offset: int | None
    length: int | None = None
    record_id: str | None = None
    record_type: str | None = None
    url: str | None = None
    detail: str = ""


@dataclass
class HtmlRecord:
    """One HTTP 200 response whose body is HTML, with its provenance. `body` is the entity body with the
    chunked transfer coding and gzip/deflate/br content codings undone."""

    url: str
    record_id: str
    date: str | None
    offset: int
    length: int | None  # bytes of the record (its gzip member) in the file; None inside a multi-record member
    status: int
    charset: str | None
    body: bytes


class _Stream:
    """The decompressed bytes of a WARC, read front to back, and the places where a record may start.

    Gzipped WARCs are inflated member by member. A member whose data begins with `WARC/` starts a record: that
    is a *boundary*, which no record runs past, so a lying Content-Length or a damaged member costs one record.
    A member that fails to inflate (or the garbage between members) is reported in `damage`, and reading goes
    on at the next gzip header that inflates to `WARC/`. `pos` counts decompressed bytes from the start;
    boundaries map back to byte offsets in the file.
    """

    def __init__(self, raw: IO[bytes], search_limit: int) -> None:
        self.raw = raw
        self.buf = bytearray()
        self.i = 0  # buf[i:] is unread
        self.pos = 0  # decompressed position of buf[i]
        self.damage: list[Skip] = []
        self.truncated: str | None = None  # why the input ended inside a gzip member
        self.boundaries: deque[list] = deque()  # [pos, file offset, starts a record (None: not known yet)]
        self.member_offset = 0  # file offset of the gzip member holding pos
        self.record_members = 0  # members that started a record: evidence of one record per member
        self._raw_eof = False
        # Compressed input: a chunk of the file, read from _zi on. Members are fed in slices of it, so no byte of
        # the file is copied on the way to zlib however many members a chunk holds.
        self._z = b""
        self._zi = 0
        self._z_offset = 0  # file offset of _z[0]
        self._inflater: Any = None
        self._member_start = 0  # file offset of the current member
        self._member_chunks: list[tuple[bytes, int]] | None = (
            None  # its compressed bytes: (chunk, from index)
        )
        self._member_ends: deque[tuple[int, int]] = deque()  # (pos, file offset) where members ended
        head = self._read_raw(_RAW_CHUNK)
        self.gzip = head.startswith(GZIP_MAGIC[:2])
        if self.gzip:
            self._z = head
        elif _VERSION_LINE.match(head):
            self.buf += head
        else:
            self._find_first_record(head, search_limit)

    # -- the file
    def _read_raw(self, n: int) -> bytes:
        if self._raw_eof:
            return b""
        data = self.raw.read(n)
        if not data:
            self._raw_eof = True
        return data

    def _more_input(self) -> bool:
        """Append the next chunk of the file to the compressed input. False at the end of the file."""
        data = self._read_raw(_RAW_CHUNK)
        if not data:
            return False
        left = self._z[self._zi :]
        self._z_offset += self._zi
        self._z, self._zi = (left + data if left else data), 0
        if self._member_chunks is not None:
            self._member_chunks.append((self._z, len(left)))
            if sum(len(c) - i for c, i in self._member_chunks) > _MEMBER_KEEP:
                self._member_chunks = None  # a huge member: after damage, search on from where it broke
        return True

    def _find_first_record(self, head: bytes, search_limit: int) -> None:
        """A file that does not start with a record: start at the first gzip member that inflates to `WARC/` or
        the first `WARC/x.y` line within `search_limit` bytes, else it is not a WARC."""
        if head.startswith(ZSTD_MAGIC):
            raise WarcError("not a WARC: zstd-compressed (gzip and uncompressed WARCs are read)")
        if not head:
            raise WarcError("not a WARC: the file is empty")
        data, offset = bytearray(head), 0
        while True:
            member, line = _find_gzip_member(data), _find_version_line(data)
            if member is not None and (line is None or member < line):
                self.gzip, self._z, self._z_offset = True, bytes(data[member:]), offset + member
                first = offset + member
                break
            if line is not None:
                self.buf += data[line:]
                self.pos = first = offset + line
                break
            more = self._read_raw(_RAW_CHUNK)
            if not more or offset + len(data) > search_limit:
                raise WarcError(f"not a WARC: no record in its first {offset + len(data):,} bytes "
                                f"(it starts with {head[:16]!r})")  # fmt: skip
            keep = min(len(data), _SEARCH_OVERLAP)
            offset += len(data) - keep
            data = data[-keep:] + more
        self.damage.append(Skip("garbage", 0, first, detail="bytes before the first record"))

    # -- inflating
    def _fill(self) -> bool:
        """Append more decompressed data to buf. False when the input is exhausted."""
        if not self.gzip:
            data = self._read_raw(_RAW_CHUNK)
            self.buf += data
            return bool(data)
        while True:
            if self._inflater is None and not self._start_member():
                return False
            if self._zi == len(self._z) and not self._more_input():
                self._lost_member("the file ends inside a gzip member")
                continue
            piece = memoryview(self._z)[self._zi : self._zi + _FEED]
            try:
                out = self._inflater.decompress(piece, _OUT_CHUNK)
            except INFLATE_ERRORS as exc:
                self._lost_member(f"corrupt gzip member: {exc}")
                continue
            done = self._inflater.eof
            self._zi += len(piece) - len(
                self._inflater.unused_data if done else self._inflater.unconsumed_tail
            )
            if out:
                self.buf += out
            if done:
                self._inflater, self._member_chunks = None, None
                self._member_ends.append((len(self.buf) - self.i + self.pos, self._z_offset + self._zi))
            if out:
                return True

    def _start_member(self) -> bool:
        """Begin the gzip member at the front of the compressed input, searching past garbage to the next one."""
        while len(self._z) - self._zi < len(GZIP_MAGIC) and self._more_input():
            pass
        if self._zi == len(self._z):
            return False
        if not self._z.startswith(GZIP_MAGIC, self._zi):
            start = self._z_offset + self._zi
            found = self._search_member(self._z[self._zi :], start)
            where = "between gzip members" if found else "after the last gzip member"
            self.damage.append(Skip("garbage", start, self._z_offset - start, detail=f"bytes {where}"))
            if not found:
                return False
        self._inflater = inflate_lib.decompressobj(16 + zlib.MAX_WBITS)
        self._member_start = self._z_offset + self._zi
        self._member_chunks = [(self._z, self._zi)]
        at = len(self.buf) - self.i + self.pos
        if self.boundaries and self.boundaries[-1][0] == at:
            self.boundaries.pop()  # the previous member gave no data (it was lost): this one starts here
        self.boundaries.append([at, self._member_start, None])
        return True

    def _lost_member(self, why: str) -> None:
        """The current member cannot be inflated (corrupt, or the file ends inside it): go on at the next member
        that inflates to `WARC/`, searched from just after this member's start."""
        start, self._inflater = self._member_start, None
        if self._member_chunks is not None:
            data, offset = b"".join(c[i:] for c, i in self._member_chunks)[1:], start + 1
        else:
            data, offset = self._z[self._zi :], self._z_offset + self._zi
        self._member_chunks = None
        if self._search_member(data, offset) or not why.startswith("the file ends"):
            self.damage.append(Skip("corrupt_gzip", start, self._z_offset - start, detail=why))
        else:
            self.truncated = f"{why} (the member at offset {start:,})"

    def _search_member(self, data: bytes, offset: int) -> bool:
        """Find the next gzip member that inflates to `WARC/` in `data` (the file from `offset` to the end of what
        has been read) and in the rest of the file. The compressed input then starts there."""
        buf = bytearray(data)
        while True:
            at = _find_gzip_member(buf)
            if at is not None:
                self._z, self._zi, self._z_offset = bytes(buf[at:]), 0, offset + at
                return True
            more = self._read_raw(_RAW_CHUNK)
            if not more:
                self._z, self._zi, self._z_offset = b"", 0, offset + len(buf)
                return False
            keep = min(len(buf), _SEARCH_OVERLAP)
            offset += len(buf) - keep
            buf = buf[-keep:] + more

    # -- reading
    def _compact(self) -> None:
        if self.i > (1 << 20) and self.i > len(self.buf) // 2:
            del self.buf[: self.i]
            self.i = 0

    def _advance(self, n: int) -> None:
        self.i += n
        self.pos += n

    def ensure(self, n: int) -> bool:
        """At least n unread bytes buffered (False at the end of the input)."""
        while len(self.buf) - self.i < n:
            if not self._fill():
                return False
        return True

    def _next_boundary(self) -> int | None:
        """Position of the next boundary at or after pos (a member that starts a record), if one is known."""
        boundaries = self.boundaries
        while boundaries:
            b = boundaries[0]
            if b[0] < self.pos:
                self.member_offset = b[1]
                boundaries.popleft()
                continue
            if b[2] is None:
                at = b[0] - self.pos + self.i
                while len(self.buf) < at + 5 and self._fill():
                    pass
                b[2] = self.buf.startswith(b"WARC/", at)
            if b[2]:
                return b[0]
            self.member_offset = b[1]  # a member that continues a record (one record split across members)
            boundaries.popleft()
        return None

    def begin_record(self) -> tuple[int, bool]:
        """Start a record at pos: (its file offset, whether it starts a gzip member)."""
        if not self.gzip:
            return self.pos, False
        at_member = self._next_boundary() == self.pos
        if at_member:
            self.member_offset = self.boundaries.popleft()[1]
            self.record_members += 1
        return self.member_offset, at_member

    def end_offset(self) -> int | None:
        """File offset where the record just read ends, when that is the end of its gzip member."""
        if not self.gzip:
            return self.pos
        self.ensure(1)  # inflates past the member's end, if the record ended there
        ends = self._member_ends
        while ends and ends[0][0] < self.pos:
            ends.popleft()
        return ends[0][1] if ends and ends[0][0] == self.pos else None

    def _end(self) -> int:
        """Index in buf where reading must stop: the next boundary, or the end of what is buffered."""
        stop = self._next_boundary()
        return len(self.buf) if stop is None else min(len(self.buf), stop - self.pos + self.i)

    def read(self, n: int, keep: int) -> tuple[bytes, int]:
        """Consume up to n bytes, stopping early at a boundary or the end of the input. Returns (the first
        `keep` of them, how many were consumed)."""
        parts, kept, done = [], 0, 0
        while done < n:
            if self.i == len(self.buf) and not self._fill():
                break
            take = min(n - done, self._end() - self.i)
            if take <= 0:
                break
            if kept < keep:
                k = min(take, keep - kept)
                with memoryview(self.buf) as view:
                    parts.append(bytes(view[self.i : self.i + k]))
                kept += k
            self._advance(take)
            done += take
            self._compact()
        return (parts[0] if len(parts) == 1 else b"".join(parts)), done

    def peek(self, n: int) -> bytes:
        """Up to n bytes ahead, not crossing a boundary, without consuming them."""
        while len(self.buf) - self.i < n and self._end() == len(self.buf) and self._fill():
            pass
        return bytes(self.buf[self.i : min(self.i + n, self._end())])

    def read_head(self, limit: int) -> tuple[bytes, int, bool]:
        """Consume a header: everything up to and including the first empty line, not crossing a boundary.
        Returns (its first `limit` bytes, its length, whether the empty line was found)."""
        parts, kept, total = [], 0, 0
        while True:
            end = self._end()
            crlf = self.buf.find(b"\n\r\n", self.i, end)
            lf = self.buf.find(b"\n\n", self.i, crlf if crlf >= 0 else end)  # LF-only writers exist
            found = lf + 2 if lf >= 0 else crlf + 3 if crlf >= 0 else -1
            # Without the empty line, consume all but 2 bytes (it may straddle the next read): bounded memory.
            stop = found if found >= 0 else max(self.i, end - 2)
            if kept < limit:
                k = min(stop - self.i, limit - kept)
                parts.append(self.buf[self.i : self.i + k])
                kept += k
            total += stop - self.i
            self._advance(stop - self.i)
            if found >= 0:
                return b"".join(parts), total, True
            if end < len(self.buf) or not self._fill():
                rest = end - self.i
                if kept < limit:
                    parts.append(self.buf[self.i : self.i + min(rest, limit - kept)])
                self._advance(rest)
                return b"".join(parts), total + rest, False
            self._compact()

    def at_record_end(self) -> bool:
        """Whether the block just read ends where a record should: at the CRLF CRLF trailer, or at up to
        `_TRAILER_MAX` CR/LF bytes followed by a record or the end of the input. The trailer is then consumed;
        anything else means the block's Content-Length lied."""
        skipped = 0
        while skipped < _TRAILER_MAX and self.ensure(skipped + 1) and self.buf[self.i + skipped] in (10, 13):
            skipped += 1
        if self.buf.startswith(b"\r\n\r\n", self.i):
            ok = True
        elif not self.ensure(skipped + 5):
            ok = len(self.buf) - self.i == skipped
        else:
            ok = self.buf.startswith(b"WARC/", self.i + skipped)
        if ok:
            self._advance(skipped)
        return ok

    def push_back(self, data: bytes) -> None:
        """Put consumed bytes back in front (a plain WARC re-read after a Content-Length that lied)."""
        self.buf[self.i : self.i] = data
        self.pos -= len(data)

    def resync(self, lines: bool) -> int:
        """Skip to the next record start: the next boundary or, when `lines`, the next `WARC/x.y` line, whichever
        comes first. Returns how many bytes were skipped."""
        skipped = 0
        while True:
            end = self._end()
            found = _find_version_line(self.buf, self.i, end, at_start=False) if lines else None
            target = found if found is not None else end
            if found is None and end == len(self.buf):
                target = max(
                    self.i, end - 16
                )  # a version line cut by the end of the buffer is found next round
            skipped += target - self.i
            self._advance(target - self.i)
            self._compact()
            if found is not None or end < len(self.buf) or self._next_boundary() == self.pos:
                return skipped
            if not self._fill():
                skipped += len(self.buf) - self.i
                self._advance(len(self.buf) - self.i)
                return skipped


def _find_gzip_member(data: bytes | bytearray) -> int | None:
    """Offset of the first gzip header in `data` whose member inflates to `WARC/`."""
    at = data.find(GZIP_MAGIC)
    while at >= 0:
        try:
            if (
                inflate_lib.decompressobj(16 + zlib.MAX_WBITS)
                .decompress(data[at : at + 65536], 8)
                .startswith(b"WARC/")
            ):
                return at
        except INFLATE_ERRORS:
            pass
        at = data.find(GZIP_MAGIC, at + 1)
    return None


def _find_version_line(
    data: bytes | bytearray, start: int = 0, end: int | None = None, at_start: bool = True
) -> int | None:
    """Offset of the first `WARC/x.y` line in data[start:end]: at `start` (when `at_start`) or after a newline."""
    end = len(data) if end is None else end
    if at_start and start < end and _VERSION_LINE.match(data, start):
        return start
    at = data.find(b"\nWARC/", start, end)
    while at >= 0:
        if _VERSION_LINE.match(data, at + 1):
            return at + 1
        at = data.find(b"\nWARC/", at + 1, end)
    return None


# ---------------------------------------------------------------------------------------------- records

_HTML_SNIFF = re.compile(rb"<!doctype\s+html|<html|<head|<body|<meta|<title|<div|<p[\s>]", re.I)
HTML_TYPES = ("text/html", "application/xhtml+xml")
_BINARY_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"%PDF", b"PK\x03\x04", b"RIFF", b"\x00\x00\x01\x00")
_CONTROL_BYTES = bytes([*range(0, 9), 11, *range(14, 32), 127])


def _is_html(content_type: str | None, body_start: bytes) -> bool:
    if content_type:
        return content_type.split(";", 1)[0].strip().lower() in HTML_TYPES
    # No Content-Type (old crawls): sniff, and refuse binary bodies.
    return b"\x00" not in body_start and bool(_HTML_SNIFF.search(body_start))


def looks_binary(body: bytes) -> bool:
    """A body that cannot be a web page whatever its label: a file signature, NUL bytes (text in UTF-16 starts
    with a BOM), or more than 1% control bytes."""
    sample = body[:4096]
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    if sample.startswith(_BINARY_MAGIC) or b"\x00" in sample:
        return True
    return len(sample) - len(sample.translate(None, _CONTROL_BYTES)) > 0.01 * len(sample)


class _BodyError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _looks_like_markup(body: bytes) -> bool:
    return body.lstrip()[:1] == b"<"


def _dechunk(body: bytes, limit: int) -> bytes | None:
    """Undo HTTP/1.1 chunked transfer coding; None if `body` is not chunked (the crawler stored it decoded and
    kept the header). A body cut short keeps its complete chunks."""
    out, total, pos = [], 0, 0
    while True:
        eol = body.find(b"\n", pos, pos + 256)
        size_field = body[pos:eol].split(b";", 1)[0].strip() if eol >= 0 else b""
        if not size_field or len(size_field) > 16 or size_field.strip(b"0123456789abcdefABCDEF"):
            return b"".join(out) if out else None
        size = int(size_field, 16)
        pos = eol + 1
        if size == 0:
            return b"".join(out)
        chunk = body[pos : pos + size]
        total += len(chunk)
        if total > limit:
            raise _BodyError("too_large", f"the chunked body decodes to over {limit:,} bytes")
        out.append(chunk)
        pos += size
        if body.startswith(b"\r\n", pos):
            pos += 2
        elif body.startswith(b"\n", pos):
            pos += 1
        elif pos < len(body):
            return b"".join(out)  # broken framing after a chunk: keep what decoded


def _inflate(body: bytes, wbits: int, limit: int, coding: str) -> bytes:
    """Bounded inflate (a decompression bomb stops at `limit`); concatenated gzip members are all read."""
    out, total = [], 0
    while body:
        inflater = inflate_lib.decompressobj(wbits)
        part = inflater.decompress(body, limit + 1 - total)
        total += len(part)
        out.append(part)
        if total > limit:
            raise _BodyError("too_large", f"the {coding} body inflates to over {limit:,} bytes")
        body = inflater.unused_data if inflater.eof and wbits > 15 else b""
        if not body.startswith(GZIP_MAGIC[:2]):
            break
    return b"".join(out)


def _decode_content(body: bytes, codings: list[str], limit: int) -> bytes:
    """Undo Content-Encoding codings (listed in the order they were applied). A body that is not encoded as
    labelled is taken as stored decoded: crawlers often keep the header after decoding the body."""
    for coding in reversed(codings):
        try:
            if coding in ("gzip", "x-gzip"):
                if body.startswith(GZIP_MAGIC[:2]):
                    body = _inflate(body, 16 + zlib.MAX_WBITS, limit, coding)
            elif coding == "deflate":
                # RFC 9110 says zlib-wrapped; many servers send raw deflate.
                wrapped = len(body) > 1 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0
                if wrapped or not _looks_like_markup(body):
                    body = _inflate(body, zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS, limit, coding)
            elif coding == "br":
                if not _looks_like_markup(body):
                    body = _unbrotli(body, limit)
            elif coding not in ("identity", "none", ""):
                if not _looks_like_markup(body):
                    raise _BodyError("bad_encoding", f"unknown Content-Encoding {coding!r}")
        except INFLATE_ERRORS as exc:
            if not _looks_like_markup(body):
                raise _BodyError("bad_encoding", f"{coding} body does not inflate: {exc}") from None
    return body


def _unbrotli(body: bytes, limit: int) -> bytes:
    try:
        import brotli
    except ImportError:
        raise _BodyError("bad_encoding", "br body, and the brotli package is not installed") from None
    decompressor, out, total = brotli.Decompressor(), [], 0
    try:
        for start in range(0, len(body), 65536):
            part = decompressor.process(body[start : start + 65536])
            total += len(part)
            if total > limit:
                raise _BodyError("too_large", f"the br body decodes to over {limit:,} bytes")
            out.append(part)
    except brotli.error as exc:
        raise _BodyError("bad_encoding", f"br body does not decode: {exc}") from None
    return b"".join(out)


def _parse_http_head(head: bytes, max_lines: int) -> tuple[int, dict[str, str]]:
    """(status, headers with lower-case names; repeated headers joined by ", ") of an HTTP response head."""
    lines = head.split(b"\n")
    if len(lines) > max_lines:
        raise _BodyError("http_header_too_large", f"{len(lines):,} HTTP header lines")
    status_line = lines[0].split(None, 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/") or not status_line[1].isdigit():
        raise _BodyError("bad_http", f"not an HTTP status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep and name and not name[:1].isspace():
            key = name.strip().lower().decode("latin-1")
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return int(status_line[1]), headers


def _charset(content_type: str | None) -> str | None:
    for param in (content_type or "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip("\"'") or None
    return None


@dataclass
class _Response:
    status: int
    headers: dict[str, str]  # lower-case names; repeated fields joined by ", "
    head_size: int  # bytes of the HTTP head, blank line included


class _RecordReader:
    """The records of a `_Stream`: HTML responses and `Skip`s, in file order (see `iter_html_records`)."""

    def __init__(self, stream: _Stream, counts: Any, max_body_bytes: int, options: WarcOptions) -> None:
        self.s = stream
        self.counts = counts
        self.max_body = max_body_bytes
        self.options = options
        self.n_records = 0

    def _bump(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def records(self) -> Iterator[HtmlRecord | Skip]:
        s = self.s
        while True:
            if s.damage:
                yield from s.damage
                s.damage.clear()
            if not s.ensure(1):
                break
            item = self._record()
            if item is not None:
                yield item
            if not self.n_records and s.pos > self.options.max_search_bytes:
                break
        yield from s.damage
        if s.truncated:
            raise WarcError(s.truncated)
        if not self.n_records:
            raise WarcError("not a WARC: no readable record in the file")

    def _resync(self, at_member: bool) -> int:
        # Once a gzipped WARC shows one record per member, only member starts are trusted: a page about WARCs
        # may hold a `WARC/1.0` line.
        return self.s.resync(lines=not (at_member and self.s.record_members >= 2))

    @staticmethod
    def _header(head: bytes) -> tuple[dict[str, str], bool]:
        """The fields of a WARC header after its version line (lower-case names), and whether every line parsed.
        Values are cut at 2 kB: a record is located by offset, not by its longest field."""
        headers: dict[str, str] = {}
        last, ok = "", True
        for line in head.split(b"\n")[1:]:
            if line[:1] in (b" ", b"\t") and last:  # a folded line continues the previous field
                headers[last] += " " + line.strip()[:2048].decode("utf-8", "replace")
                continue
            name, sep, value = line.partition(b":")
            if sep:
                last = name.strip().lower().decode("latin-1")
                headers[last] = value.strip()[:2048].decode("utf-8", "replace")
            elif line.strip():
                ok = False
        return headers, ok

    def _record(self) -> HtmlRecord | Skip | None:
        s = self.s
        offset, at_member = s.begin_record()
        if not _VERSION_LINE.match(s.peek(16)):
            skipped = self._resync(at_member)
            return Skip(
                "bad_warc_header", offset, skipped, detail="no WARC/x.y line where a record should start"
            )
        limit = self.options.max_warc_header_bytes
        head, head_length, complete = s.read_head(limit)
        headers, parsed = self._header(head)
        record_type = headers.get("warc-type", "").lower() or None
        record_id = headers.get("warc-record-id")
        url = headers.get("warc-target-uri", "").strip().strip("<>")[:2048] or None

        def skip(reason: str, detail: str, length: int | None = None) -> Skip:
            return Skip(reason, offset, length, record_id, record_type, url, detail)

        problem = f"a WARC header of {head_length:,} bytes (at most {limit:,})" if head_length > limit else ""
        if record_type is not None:
            self.n_records += 1
            self._bump("records")
            if record_type == "response":
                self._bump("responses")
        block_length = headers.get("content-length", "").strip()
        if not complete or not block_length.isdigit() or (not parsed and not problem):
            reason = "warc_header_too_large" if problem else "bad_warc_header"
            detail = problem or ("the WARC header is cut off" if not complete else
                                 "no valid Content-Length" if parsed else "a WARC header line without a colon")  # fmt: skip
            return skip(reason, f"{detail} ({self._resync(at_member):,} bytes skipped)")
        is_response = record_type == "response"
        size = int(block_length)
        # Kept (bounded) where a lying Content-Length could hide the next record inside this block and no member
        # boundary would stop it (a plain WARC, a multi-record gzip member): the block is then searched again.
        reread = 0 if s.gzip and at_member else _PLAIN_KEEP
        response: _Response | Skip | None = None
        if is_response and not problem:
            response = self._response_head(
                s.peek(min(size, self.options.max_http_header_bytes + 4)), size, headers
            )
        head_size = response.head_size if isinstance(response, _Response) else 0
        head, got = s.read(head_size, head_size)
        keep = self.max_body + 1 if isinstance(response, _Response) else 0
        body, body_got = s.read(size - got, max(keep, reread - len(head)))
        got += body_got
        if got < size:
            if s.truncated:
                raise WarcError(s.truncated)
            at_end = not s.ensure(1)
            line_at = _find_version_line(head + body, at_start=False) if reread and at_end else None
            if line_at is not None:
                s.push_back((head + body)[line_at:])
            elif at_end and not s.gzip:
                raise WarcError(f"the file ends inside the record at offset {offset:,} ({got:,} of {size:,} "
                                f"bytes)")  # fmt: skip
            return skip("bad_content_length", f"the record ends after {got:,} of its {size:,} bytes")
        if not s.at_record_end():
            if reread and len(head) + len(body) == size:
                s.push_back(head + body)
            skipped = self._resync(at_member)
            return skip("bad_content_length", f"no record follows its {size:,}-byte block ({skipped:,} bytes "
                        f"skipped to the next record)")  # fmt: skip
        end = s.end_offset()
        length = None if end is None else end - offset
        if problem:
            return skip("warc_header_too_large", problem, length) if is_response else None
        if response is None:
            return None
        if isinstance(response, Skip):
            response.offset, response.length = offset, length
            response.record_id, response.record_type, response.url = record_id, record_type, url
            return response
        if size - head_size > self.max_body:
            return skip("too_large", f"a body of {size - head_size:,} bytes", length)
        try:
            if "chunked" in response.headers.get("transfer-encoding", "").lower():
                body = _dechunk(body, self.max_body) or body
            codings = response.headers.get("content-encoding", "").lower().split(",")
            body = _decode_content(body, [c.strip() for c in codings if c.strip()], self.max_body)
        except _BodyError as exc:
            return skip(exc.reason, str(exc), length)
        content_type = response.headers.get("content-type")
        if looks_binary(body):
            return skip("binary", f"a binary body ({body[:8]!r}...) labelled {content_type}", length)
        return HtmlRecord(
            url=url or "", record_id=record_id or "", date=headers.get("warc-date"), offset=offset, length=length,
            status=response.status, charset=_charset(content_type), body=body,
        )  # fmt: skip

    def _response_head(self, head: bytes, size: int, warc_headers: dict[str, str]) -> _Response | Skip:
        """The HTTP head of an HTTP 200 HTML response, else the Skip saying why the record is not one. `head` is
        the start of the block."""
        if not head.startswith(b"HTTP/"):
            is_http = warc_headers.get("content-type", "").lower().startswith("application/http")
            return Skip("bad_http" if is_http else "not_http", None, detail=f"the block starts {head[:40]!r}")
        crlf = head.find(b"\r\n\r\n")
        lf = head.find(b"\n\n", 0, crlf if crlf >= 0 else len(head))  # LF-only servers exist (ClueWeb09)
        end = lf + 2 if lf >= 0 else crlf + 4 if crlf >= 0 else 0
        if end < 2:
            if size > len(head):
                return Skip(
                    "http_header_too_large", None, detail=f"no end of the HTTP header in {len(head):,} bytes"
                )
            end = len(head)  # a head without a body
        try:
            status, headers = _parse_http_head(head[:end].rstrip(), self.options.max_http_header_lines)
        except _BodyError as exc:
            return Skip(exc.reason, None, detail=str(exc))
        content_type = headers.get("content-type")
        if not _is_html(content_type, head[end : end + 1024]):
            return Skip("not_html", None, detail=f"Content-Type {content_type}")
        self._bump("html")
        if status != 200:
            return Skip("http_status", None, detail=f"HTTP {status}")
        return _Response(status, headers, end)


def iter_html_records(
    stream: IO[bytes], counts: Any, max_body_bytes: int, options: WarcOptions | None = None
) -> Iterator[HtmlRecord | Skip]:
    """Every HTTP 200 HTML response of a WARC stream, and a `Skip` for every other response record and every
    damaged stretch of the file, in file order.

    A damaged record costs that record only: reading resumes at the next gzip member (or `WARC/x.y` line) that
    starts a record. Counts into `counts`: `records` (records whose header was read), `responses`, `html`
    (HTML responses of any status). Raises WarcError, after yielding what it could read, when the stream is not
    a WARC or ends inside a record (a truncated download).
    """
    reader = _RecordReader(_Stream(stream, (options or WarcOptions()).max_search_bytes), counts, max_body_bytes,
                           options or WarcOptions())  # fmt: skip
    return reader.records()
