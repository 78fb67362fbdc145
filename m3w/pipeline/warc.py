"""WARC inputs: resolve what the user named into WARC locations, and stream HTTP response records from one.

Inputs may be local paths, globs, fsspec URLs (`http(s)://`, `s3://`, ...), Common Crawl paths files
(`warc.paths.gz`: one path per line, relative to the Common Crawl base URL), or a crawl id
(`CC-MAIN-2024-22`) whose paths file is fetched from the base URL.

Records are streamed with fastwarc; a WARC is never held in memory. http(s) WARCs are read as one streaming GET
(no range requests needed, so any plain web server works); other remote schemes go through fsspec.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from m3w.pipeline.io import is_remote

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
            resp.raw.decode_content = False  # the WARC's own gzip members are decoded by fastwarc
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


@dataclass
class HtmlRecord:
    """One HTTP response record that claims (or sniffs as) HTML, with its provenance."""

    url: str
    record_id: str
    date: str | None
    offset: int
    length: int | None  # bytes of the (compressed) record in the WARC; None for the last record of a stream
    status: int | None
    charset: str | None
    body: bytes
    body_truncated: bool  # the body hit the size cap


_HTML_SNIFF = re.compile(rb"<!doctype\s+html|<html|<head|<body|<meta|<title|<div|<p[\s>]", re.I)
HTML_TYPES = ("text/html", "application/xhtml+xml")


def _is_html(content_type: str | None, body_start: bytes) -> bool:
    if content_type:
        return content_type.split(";", 1)[0].strip().lower() in HTML_TYPES
    # No Content-Type (old crawls): sniff, and refuse binary bodies.
    return b"\x00" not in body_start and bool(_HTML_SNIFF.search(body_start))


def _gunzip_bounded(data: bytes, limit: int) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, limit + 1)


def iter_html_records(stream: IO[bytes], counts: dict[str, int], max_body_bytes: int) -> Iterator[HtmlRecord]:
    """Yield the HTML response records of a WARC stream, counting what is skipped into `counts`.

    Counts: `records`, `responses`, `html` (HTML responses of any status), `skip.http_status`, `skip.not_html`,
    `skip.truncated` (a record cut short), `skip.read_error` (garbled WARC: reading stops there, everything
    before it is kept).
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    def bump(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    pending: HtmlRecord | None = None  # held until the next record's offset gives its length
    iterator = ArchiveIterator(stream, parse_http=True, quirks_mode=True)
    try:
        for record in iterator:
            bump("records")
            if pending is not None:
                pending.length = record.stream_pos - pending.offset
                yield pending
                pending = None
            if record.headers.get("Content-Length") is None:
                bump(
                    "skip.truncated"
                )  # Content-Length is mandatory: the WARC ends inside this record's header
                continue
            if record.record_type != WarcRecordType.response or not record.is_http:
                continue
            bump("responses")
            body = record.reader.read(max_body_bytes + 1)
            headers = record.http_headers
            if len(body) < min(record.content_length, max_body_bytes + 1):
                bump("skip.truncated")  # the WARC ends inside this record
                continue
            if not _is_html(record.http_content_type, body[:1024]):
                bump("skip.not_html")
                continue
            bump("html")
            status = headers.status_code if headers is not None else None
            if status != 200:
                bump("skip.http_status")
                continue
            encoding = (headers.get("Content-Encoding") or "").lower() if headers is not None else ""
            if "gzip" in encoding and body[:2] == b"\x1f\x8b":
                try:
                    body = _gunzip_bounded(body, max_body_bytes)
                except zlib.error:
                    pass  # mislabelled: many crawlers store the decoded body and keep the header
            url = (record.headers.get("WARC-Target-URI") or "").strip().strip("<>")
            date = record.headers.get("WARC-Date")
            pending = HtmlRecord(
                url=url,
                record_id=record.record_id or "",
                date=date,
                offset=record.stream_pos,
                length=None,
                status=status,
                charset=record.http_charset,
                body=body[:max_body_bytes],
                body_truncated=len(body) > max_body_bytes,
            )
    except (OSError, ValueError, EOFError, zlib.error):
        # A truncated gzip member or garbage bytes: fastwarc cannot resync inside a gzip stream, so the rest of
        # this WARC is lost; what was read so far is kept and the error is counted, not raised.
        bump("skip.read_error")
    if pending is not None:
        yield pending


def warc_size(path: str) -> int | None:
    """Size in bytes of a local WARC (for the length of its last record and MB/s figures); None if remote."""
    if is_remote(path):
        return None
    try:
        return os.path.getsize(path.removeprefix("file://"))
    except OSError:
        return None
