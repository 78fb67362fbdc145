"""`m3w images`: fetch every image URL once, ever, validate and resize it into the image store.

    URLs (filtered/ documents' image nodes, or a text file of URLs)
      → per input file: distinct URLs by hash bucket            (no task, and not the driver, holds them all)
      → per bucket group: anti-join with the group's index     → pending = never seen, or retryable with
                                                                  attempts left
      → fetch units of ≤ urls_per_unit URLs (threads inside: I/O bound)
      → per URL: safe fetch → decode (pixel cap) → filter rules on the real size → resize → JPEG → blob shard
      → per unit: its blob shard, then its rows file (the commit)
      → per bucket group: one new sorted index file per touched bucket → `_store.json` (the run's commit)

The store's layout is in `schemas/images.py`. A killed run is resumed by running it again: the rows files it
finished are indexed first (they are the source of truth for "already fetched"), then the rest is planned.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import io as bytes_io
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps, UnidentifiedImageError

from m3w.cli import OutputDir, stage_options
from m3w.config import to_dict
from m3w.errors import ConfigError
from m3w.pipeline import io
from m3w.pipeline.fetch import FetchConfig, shared_fetcher
from m3w.pipeline.filters import ImageFilterConfig, check_image_size
from m3w.pipeline.image_filters import ImageFilters, ImageFiltersConfig
from m3w.pipeline.image_filters.context import first_contexts
from m3w.pipeline.image_filters.duplicates import run_phash_counts
from m3w.pipeline.image_filters.replay import STAGE as IMAGE_FILTERS_STAGE
from m3w.pipeline.image_filters.replay import run_image_filters
from m3w.pipeline.imagestore import (
    BlobShardWriter,
    ImageStore,
    NoStoreError,
    commit_generation,
    compact_buckets,
    shard_hash_range,
    write_rows,
)
from m3w.pipeline.io import stable_hash
from m3w.pipeline.lease import Lease
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.ray_runner import Unit, init_ray, run_units
from m3w.pipeline.stats import current_totals
from m3w.schemas import images as spec
from m3w.schemas.documents import document_files, iter_image_urls, open_documents

RESIZE_MODES = ("center_crop", "pad", "keep_ratio")
RESAMPLE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
}


@dataclass
class ImagesConfig:
    image_size: int = 320  # Flamingo: 320×320 inputs
    resize_mode: str = "center_crop"  # center_crop | pad (letterbox) | keep_ratio (shorter side = image_size)
    pad_color: list[int] = field(default_factory=lambda: [0, 0, 0])
    # Antialiased bicubic: what CLIP/SigLIP preprocessing resizes with, and 1.7x faster than Lanczos in Pillow
    resample: str = "bicubic"  # bicubic | lanczos | bilinear
    jpeg_quality: int = 95  # img2dataset's default encode quality
    max_pixels: int = 50_000_000  # decoded width × height cap: decompression bombs end as too_large
    min_side: int = 10  # below this (tracking pixels, spacers) an image cannot be resized meaningfully
    max_attempts: int = 3  # fetches of a URL whose outcome may be transient (timeouts, 5xx)
    # URLs per fetch task = per blob shard and rows file (img2dataset's shard size): what a kill can lose
    urls_per_unit: int = 10_000
    threads_per_task: int = 32  # concurrent fetches inside one task
    buckets: int = spec.DEFAULT_BUCKETS  # index buckets of a new store (an existing store keeps its own)
    plan_rows_per_task: int = 2_000_000  # URLs + index records one planning/indexing task holds at most
    retain_generations: int = spec.RETAIN_GENERATIONS  # a superseded file's generations kept, for readers
    fetch: FetchConfig = field(default_factory=FetchConfig)
    filters: ImageFilterConfig = field(default_factory=ImageFilterConfig)  # the filter stage's image rules
    image_filters: ImageFiltersConfig = field(default_factory=ImageFiltersConfig)  # scores in the index

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} not in {RESIZE_MODES}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample {self.resample!r} not in {sorted(RESAMPLE_FILTERS)}")

    def store_settings(self) -> dict[str, Any]:
        """What the stored blobs depend on: one store holds images of one geometry and encoding."""
        return {
            k: to_dict(self)[k]
            for k in ("image_size", "resize_mode", "pad_color", "resample", "jpeg_quality")
        }


# ------------------------------------------------------------------------------------------------ decoding


class ImageError(Exception):
    """An image that ends in a non-ok status; `original` keeps what was learnt before (width, height, format)."""

    def __init__(self, status: str, message: str, original: tuple[int, int, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.original = original


@dataclass
class Decoded:
    width: int
    height: int
    format: str
    jpeg: bytes
    resized_width: int
    resized_height: int
    scores: dict[str, Any] = field(default_factory=dict)  # the image filters' cheap signals (index columns)


def _draft_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """The smallest size the resize step needs, so JPEG decoding can scale down by 1/2..1/8 for free."""
    scale = size / (max(width, height) if mode == "pad" else min(width, height))
    return math.ceil(width * scale), math.ceil(height * scale)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit scans: scale to 8 bits instead of clipping
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # logos with alpha: onto white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize(
    img: Image.Image,
    size: int,
    mode: str,
    pad_color: tuple[int, int, int] = (0, 0, 0),
    resample: str = "bicubic",
) -> Image.Image:
    """center_crop: fill size×size, cropping the long side; pad: fit inside size×size, padding the rest;
    keep_ratio: shorter side = size, aspect ratio kept."""
    w, h = img.size
    fltr = RESAMPLE_FILTERS[resample]
    if mode == "center_crop":
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        return img.resize((size, size), fltr, box=(left, top, left + side, top + side), reducing_gap=3.0)
    if mode == "keep_ratio":
        scale = size / min(w, h)
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), fltr, reducing_gap=3.0)
    if mode == "pad":
        scale = size / max(w, h)
        inner = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), fltr, reducing_gap=3.0)
        canvas = Image.new("RGB", (size, size), pad_color)
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    raise ValueError(f"unknown resize mode {mode!r}")


def decode_and_resize(data: bytes, config: ImagesConfig) -> Decoded:
    """Validate and resize untrusted image bytes. Raises ImageError with the status to record."""
    try:
        img = Image.open(bytes_io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"not a decodable image (starts with {data[:16]!r})") from None
    width, height = img.size
    fmt = (img.format or "unknown").lower()
    original = (width, height, fmt)
    if width * height > config.max_pixels:
        raise ImageError(
            "too_large", f"{width}x{height} = {width * height} pixels > {config.max_pixels}", original
        )
    if min(width, height) < config.min_side:
        raise ImageError("too_small", f"{width}x{height} has a side < {config.min_side} px", original)
    if config.filters.enabled:  # the filter stage's image rules, now on the decoded size
        keep, reason = check_image_size(width, height, fmt, config.filters)
        if not keep:
            raise ImageError("filtered", reason, original)
    try:
        img.draft(None, _draft_size(width, height, config.image_size, config.resize_mode))
        img = _to_rgb(ImageOps.exif_transpose(img))
        out = resize(img, config.image_size, config.resize_mode, tuple(config.pad_color), config.resample)
        buffer = bytes_io.BytesIO()
        out.save(buffer, "JPEG", quality=config.jpeg_quality)
    except Exception as exc:  # noqa: BLE001 - any failure decoding untrusted bytes is that image's decode error
        raise ImageError("decode_error", f"{type(exc).__name__}: {exc}", original) from None
    return Decoded(width, height, fmt, buffer.getvalue(), out.width, out.height)


def decode_data_uri(url: str, max_bytes: int) -> bytes:
    """Bytes of a `data:image/...` URI (no network involved)."""
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep or not header.lower().startswith("image/"):
        raise ImageError("bad_url", f"not an image data URI: {url[:80]}")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageError("too_large", f"data URI over {max_bytes} bytes")
    try:
        if header.lower().endswith(";base64"):
            return base64.b64decode(payload, validate=False)
        return unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("bad_url", f"bad data URI: {exc}") from None


# ---------------------------------------------------------------------------------------------- one URL


class _Worker:
    """Everything one fetch unit shares between its fetch threads."""

    def __init__(self, blobs: BlobShardWriter, config: ImagesConfig, contexts: dict[str, str]) -> None:
        self.blobs = blobs
        self.config = config
        self.contexts = contexts  # url → the page text image-text relevance compares it with
        self.fetcher = shared_fetcher(config.fetch)
        self.filters = ImageFilters(config.image_filters)
        self._for_models: dict[str, bytes] = {}  # url → stored JPEG, until the model steps score its batch
        # The same bytes under several URLs (logos, CDN mirrors) are decoded once per unit.
        self._by_sha: dict[str, Decoded | ImageError] = {}
        self._lock = threading.Lock()

    def process(self, url: str, attempts_before: int) -> dict[str, Any]:
        """One URL → its index row: download, decode and resize, the image filters' signals, the blob shard."""
        row: dict[str, Any] = {"url": url, "attempts": attempts_before + 1, "status": "ok"}
        try:
            data = self._download(url, row, tries=max(1, self.config.max_attempts - attempts_before))
            row["original_bytes"] = len(data)
            row["sha256"] = sha = hashlib.sha256(data).hexdigest()
            with self._lock:
                outcome = self._by_sha.get(sha)
            if outcome is None:
                try:
                    outcome = decode_and_resize(data, self.config)
                    outcome.scores = self.filters.signals(outcome.jpeg)
                except ImageError as exc:
                    outcome = exc
                with self._lock:
                    self._by_sha[sha] = outcome
            if isinstance(outcome, ImageError):
                raise outcome
            row.update(original_width=outcome.width, original_height=outcome.height,
                       original_format=outcome.format, resized_width=outcome.resized_width,
                       resized_height=outcome.resized_height, **outcome.scores)  # fmt: skip
            if self.filters.uses_models:
                with self._lock:
                    self._for_models[url] = outcome.jpeg
            row["resized_sha256"], row["blob_length"] = self.blobs.add(outcome.jpeg)
            row["blob_shard"] = self.blobs.shard
        except ImageError as exc:
            row["status"], row["error_message"] = exc.status, str(exc)[:1000]
            if exc.original:
                row["original_width"], row["original_height"], row["original_format"] = exc.original
        row["fetched_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return row

    def _download(self, url: str, row: dict[str, Any], tries: int) -> bytes:
        if url.startswith("data:"):
            return decode_data_uri(url, self.config.fetch.max_bytes)
        result = self.fetcher.fetch(url, tries=tries)  # transient failures retried now, within max_attempts
        row["attempts"] += result.attempts - 1
        row["http_status"] = result.http_status
        if not result.ok or result.content is None:
            raise ImageError(result.status, result.error or "empty response")
        return result.content  # the bytes decide what it is, not the Content-Type (often wrong both ways)

    def score_models(self, rows: list[dict[str, Any]]) -> None:
        """The model steps on a batch of stored images (run on the task's thread, batched for the GPU)."""
        with self._lock:
            jpegs = [self._for_models.pop(row["url"]) for row in rows]
        self.filters.score_models(rows, jpegs, [self.contexts.get(row["url"]) for row in rows])

    def fetch_all(self, todo: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every URL of a unit. Results come back as they complete; a URL of a busy or rate-limited host never
        holds a thread that others could use (per-host limits are per process: the fetcher is shared by the
        tasks a Ray worker runs)."""
        rows, batch = [], []
        for row in self.fetcher.map_polite(lambda r: self.process(r["url"], r["attempts"]), todo,
                                           url_of=lambda r: r["url"], threads=self.config.threads_per_task):  # fmt: skip
            rows.append(row)
            if self.filters.uses_models and row["status"] == "ok":
                batch.append(row)
                if len(batch) >= self.filters.batch_size:
                    self.score_models(batch)
                    batch = []
        if batch:
            self.score_models(batch)
        return rows


# ------------------------------------------------------------------------------------------------- inputs


def _text_urls(url: str) -> list[str]:
    """One URL a line, the whole line (URLs may contain spaces); blank lines and `#` comments skipped."""
    with io.open_input(url, "r", encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        return [line for line in lines if line and not line.startswith("#")]


def input_files(inputs: Iterable[str | Path]) -> list[str]:
    """The files behind the inputs: filtered/ folders (their document files), parquet files, URL lists. The
    first documents file of each input is opened here, so that an input in another format is refused in one
    line before any work starts (a bad file further on fails its own task)."""
    files = []
    for item in map(str, inputs):
        if io.is_dir(item):  # its document files only: excluded/ and _cache/ are not inputs
            found = document_files(item)
        elif io.is_file(item):
            found = [item]
        else:
            raise FileNotFoundError(f"input not found: {item}")
        if found and found[0].endswith(".parquet"):
            open_documents(found[0])  # reads the footer: FormatError (one line) if it is not documents
        files.extend(found)
    return files


def file_urls(url: str) -> list[str]:
    return list(iter_image_urls(url)) if url.endswith(".parquet") else _text_urls(url)


def iter_input_urls(inputs: Iterable[str | Path]) -> Iterator[str]:
    """Image URLs of filtered/ folders or parquet files (image nodes), or of text files (one URL a line)."""
    for url in input_files(inputs):
        yield from file_urls(url)


# --------------------------------------------------------------------------------------- the run's steps
#
# A run is generation g = committed + 1 of the store. Its steps, each a set of Ray tasks:
#   urls     one task per input file: its distinct image URLs with their hashes, sorted by hash, to
#            _runs/g/urls/u<i>.parquet (per-bucket counts go back to the driver)
#   plan     one task per group of consecutive buckets: that group's input URLs anti-joined with the group's
#            index files → _runs/g/pending/p<k>.parquet, one row group per fetch unit
#   fetch    one task per fetch unit (≤ urls_per_unit URLs): blob shard, then rows file (the commit)
#   compact  one task per group: the group's index files merged with the rows of its fetch units
# then the driver writes _store.json (the generation's commit). The driver holds counts, never URLs.

# `context`: what the URL's first page in this input says about the image (image-text relevance compares the
# two), when that step runs; null otherwise, and for URL lists.
URL_LIST_SCHEMA = pa.schema(
    [("url_hash", pa.int64()), ("url_hash2", pa.int64()), ("url", pa.string()), ("context", pa.string())]
)
PENDING_SCHEMA = pa.schema([*URL_LIST_SCHEMA, ("attempts", pa.int32())])


@dataclass(frozen=True)
class UrlListArgs:
    input: str
    out: str
    buckets: int
    context_chars: int | None = None  # with image-text relevance on: the page text kept per URL


def collect_urls(args: UrlListArgs) -> tuple[None, dict[str, int]]:
    """Ray task: one input file → its distinct URLs sorted by hash (with their page text, when image-text
    relevance runs). Returns counts, URLs per bucket included (`bucket.<b>`: summed over the inputs by the
    runner, so the driver holds H numbers, not H per input)."""
    urls = sorted(set(file_urls(args.input)))
    hashes = np.array([spec.url_hashes(u) for u in urls], dtype=np.int64).reshape(-1, 2)
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))
    contexts = {}
    if args.context_chars is not None and args.input.endswith(".parquet"):
        contexts = first_contexts(args.input, args.context_chars)
    ordered = [urls[i] for i in order.tolist()]
    table = pa.table(
        {"url_hash": hashes[order, 0], "url_hash2": hashes[order, 1], "url": ordered,
         "context": [contexts.get(u) for u in ordered]},
        schema=URL_LIST_SCHEMA,
    )  # fmt: skip
    io.write_parquet_atomic(table, args.out, row_group_size=65_536)
    per_bucket = np.bincount(spec.bucket_of(hashes[:, 0], args.buckets), minlength=args.buckets)
    counts = {f"bucket.{b}": int(n) for b, n in enumerate(per_bucket.tolist()) if n}
    return None, {"input_urls": len(urls), **counts}


def _read_hash_range(url: str, low: int, high: int, columns: list[str]) -> pa.Table:
    """Rows of a hash-sorted parquet file with url_hash in [low, high], reading only the row groups that can
    hold them (footer statistics)."""
    parquet = io.parquet_file(url)
    meta = parquet.metadata
    column = parquet.schema_arrow.get_field_index("url_hash")
    groups = []
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max or (stats.max >= low and stats.min <= high):
            groups.append(i)
    if not groups:
        return parquet.schema_arrow.empty_table().select(columns)
    table = parquet.read_row_groups(groups, columns=columns)
    hashes = table.column("url_hash")
    return table.filter(pc.and_(pc.greater_equal(hashes, low), pc.less_equal(hashes, high)))


def _match(rec_h: np.ndarray, rec_h2: np.ndarray, h: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """For each query (h, h2), its position in the records sorted by (url_hash, url_hash2), or -1."""
    pos = np.searchsorted(rec_h, h, "left")
    out = np.full(len(h), -1, dtype=np.int64)
    inside = pos < len(rec_h)
    same = np.zeros(len(h), dtype=bool)
    same[inside] = rec_h[pos[inside]] == h[inside]
    exact = same.copy()
    exact[same] = rec_h2[pos[same]] == h2[same]
    out[exact] = pos[exact]
    for q in np.nonzero(same & ~exact)[0]:  # 64-bit hash collisions: vanishingly rare, scan the run
        i = pos[q] + 1
        while i < len(rec_h) and rec_h[i] == h[q]:
            if rec_h2[i] == h2[q]:
                out[q] = i
                break
            i += 1
    return out


@dataclass(frozen=True)
class PlanArgs:
    store: str
    buckets: tuple[int, int]  # [first, stop)
    url_lists: tuple[str, ...]
    out: str
    max_attempts: int
    urls_per_unit: int


def plan_group(args: PlanArgs) -> tuple[int, dict[str, int]]:
    """Ray task: the pending URLs of one bucket group. Returns (pending URLs, counts)."""
    store = ImageStore(args.store)
    state = store.state()
    first, stop = args.buckets
    low, high = (
        spec.bucket_hash_range(first, state.buckets)[0],
        spec.bucket_hash_range(stop - 1, state.buckets)[1],
    )
    tables = []
    for position, url_list in enumerate(args.url_lists):
        table = _read_hash_range(url_list, low, high, URL_LIST_SCHEMA.names)
        tables.append(table.append_column("_input", pa.array(np.full(table.num_rows, position, np.int32))))
    urls = pa.concat_tables(tables) if tables else URL_LIST_SCHEMA.empty_table().append_column(
        "_input", pa.array([], pa.int32()))  # fmt: skip
    # A URL of several inputs keeps the page text of the first input that has one (deterministic).
    urls = urls.append_column("_no_context", pc.is_null(urls.column("context")))
    urls = urls.sort_by([("url_hash", "ascending"), ("url_hash2", "ascending"), ("_no_context", "ascending"),
                         ("_input", "ascending")]).drop_columns(["_input", "_no_context"])  # fmt: skip
    h, h2 = urls.column("url_hash").to_numpy(), urls.column("url_hash2").to_numpy()
    distinct = np.ones(len(h), dtype=bool)
    distinct[1:] = (h[1:] != h[:-1]) | (h2[1:] != h2[:-1])
    urls, h, h2 = urls.filter(pa.array(distinct)), h[distinct], h2[distinct]
    records = np.concatenate(
        [store.bucket_records(b, state) for b in range(first, stop)] or [spec.empty_records()]
    )
    at = _match(records["url_hash"], records["url_hash2"], h, h2)
    known = at >= 0
    final = np.zeros(len(h), dtype=bool)
    final[known] = records["final"][at[known]] == 1
    attempts = np.zeros(len(h), dtype=np.int32)
    attempts[known] = records["attempts"][at[known]]
    exhausted = known & ~final & (attempts >= args.max_attempts)
    pending = ~final & ~exhausted
    table = urls.filter(pa.array(pending)).append_column("attempts", pa.array(attempts[pending], pa.int32()))
    io.write_parquet_atomic(table.cast(PENDING_SCHEMA), args.out, row_group_size=max(1, args.urls_per_unit))
    counts = {"urls": len(h), "already_final": int(final.sum()), "retries_exhausted": int(exhausted.sum()),
              "pending": int(pending.sum())}  # fmt: skip
    return int(pending.sum()), counts


@dataclass(frozen=True)
class FetchArgs:
    store: str
    shard: int
    pending: str
    row_group: int
    config: ImagesConfig


def _unit_counts(table: pa.Table) -> dict[str, int]:
    counts = Counter(f"status.{s}" for s in table.column("status").to_pylist())
    counts["images"] = table.num_rows
    counts["images_ok"] = counts["status.ok"]
    counts["bytes_downloaded"] = int(pc.sum(table.column("original_bytes")).as_py() or 0)
    return dict(counts)


def fetch_unit(args: FetchArgs) -> tuple[list[int] | None, dict[str, int]]:
    """Ray task: fetch one unit's URLs into its blob shard, then write its rows file (the commit).
    Returns (url_hash range of its rows, counts). A unit whose rows file exists is not fetched again."""
    store = ImageStore(args.store)
    rows_url = store.url(spec.rows_relpath(args.shard))
    if io.exists(rows_url):  # done before a kill: the rows file is the proof, whatever the manifest says
        table = io.read_parquet(rows_url)
    else:
        todo = io.parquet_file(args.pending).read_row_group(args.row_group).to_pylist()
        blobs = BlobShardWriter(store, args.shard)
        try:
            contexts = {row["url"]: row["context"] for row in todo if row.get("context")}
            rows = _Worker(blobs, args.config, contexts).fetch_all(todo)
        except BaseException as exc:
            blobs.abort(exc)
            raise
        offsets = blobs.close()  # the images first: a committed row never points at a missing blob
        table = write_rows(store, args.shard, rows, offsets)
    hashes = table.column("url_hash")
    span = [pc.min(hashes).as_py(), pc.max(hashes).as_py()] if table.num_rows else None
    return span, _unit_counts(table)


@dataclass(frozen=True)
class CompactArgs:
    store: str
    buckets: tuple[int, int]
    shards: tuple[int, ...]
    index_generations: tuple[int, ...]  # of buckets[0] .. buckets[1]-1
    generation: int


def compact_group(args: CompactArgs) -> tuple[dict[int, int], dict[str, int]]:
    """Ray task: fold a group's new rows into its buckets' index files. Returns ({bucket: records}, counts)."""
    first, stop = args.buckets
    written = compact_buckets(ImageStore(args.store), range(first, stop), list(args.shards),
                              dict(zip(range(first, stop), args.index_generations)), args.generation)  # fmt: skip
    return written, {"buckets_rewritten": len(written)}


# -------------------------------------------------------------------------------------------------- stage


@dataclass
class ImagesSummary:
    store: str
    urls: int  # distinct URLs in the inputs
    already_final: int  # skipped: a final status from an earlier run
    retries_exhausted: int  # skipped: still failing after max_attempts
    fetched: int  # attempted in this run
    statuses: dict[str, int]  # this run's outcomes
    units_done: int
    units_failed: int
    seconds: float
    failures: dict[str, str] = field(default_factory=dict)
    generation: int = 0  # the store's generation after the run
    filter_drops: dict[str, int] = field(default_factory=dict)  # stored images each image filter step drops

    @property
    def images_per_s(self) -> float:
        return self.fetched / self.seconds if self.seconds else 0.0


def bucket_groups(weights: list[int], target: int) -> list[tuple[int, int]]:
    """Consecutive buckets packed into groups of about `target` rows (a bucket is never split)."""
    groups, start, total = [], 0, 0
    for bucket, weight in enumerate(weights):
        if total and total + weight > target:
            groups.append((start, bucket))
            start, total = bucket, 0
        total += weight
    groups.append((start, len(weights)))
    return groups


def _check_store_settings(store: ImageStore, state: spec.StoreState, config: ImagesConfig) -> None:
    wanted = config.store_settings()
    if state.settings != wanted:
        raise ConfigError(f"{store.root} holds images made with {state.settings}; this config asks for {wanted}. "
                         "Use another --store for another image geometry.")  # fmt: skip


def _commit_generation(
    store: ImageStore,
    state: spec.StoreState,
    generation: int,
    shards: dict[int, list[int] | None],
    groups: list[tuple[int, int]],
    run: dict[str, Any],
    retain: int,
) -> tuple[spec.StoreState, dict[str, str]]:
    """Compact the buckets the new rows touch, then commit `generation`; the old index files are superseded,
    kept `retain` generations for readers of earlier ones. Returns (new state, failed groups)."""
    units = []
    for first, stop in groups:
        low = spec.bucket_hash_range(first, state.buckets)[0]
        high = spec.bucket_hash_range(stop - 1, state.buckets)[1]
        mine = [s for s, span in sorted(shards.items()) if span and span[0] <= high and span[1] >= low]
        if mine:
            args = CompactArgs(store.root, (first, stop), tuple(mine),
                               tuple(state.index_generations[first:stop]), generation)  # fmt: skip
            units.append(Unit(f"compact-{first:05d}-{stop:05d}", args))
    result = run_units(compact_group, units, None, desc="images: index", **run)
    new = replace(state, generation=generation, index_generations=list(state.index_generations),
                  index_rows=list(state.index_rows), history=list(state.history))  # fmt: skip
    if result.failed:
        return state, result.failures
    superseded = []
    for written in result.outputs.values():
        for bucket, records in written.items():
            if new.index_generations[bucket] >= 0:
                superseded.append(spec.index_relpath(bucket, new.index_generations[bucket]))
            new.index_generations[bucket], new.index_rows[bucket] = generation, records
    new.history.append({"generation": generation, "units": len(shards),
                        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})  # fmt: skip
    commit_generation(store, new, superseded, retain)
    return new, {}


def rows_files(store: ImageStore) -> list[str]:
    """Every rows file of the store (one per fetch unit, all generations), as URLs."""
    files = []
    for generation in io.list_dir(store.url("rows"), dirs=True):
        folder = store.url(f"rows/{generation}")
        files.extend(io.join(folder, n) for n in io.list_dir(folder) if n.endswith(".parquet"))
    return files


def recover_interrupted_run(
    store: ImageStore, state: spec.StoreState, run: dict[str, Any], retain: int
) -> spec.StoreState:
    """Commit what a killed run had finished: its rows files exist, its generation was never committed. Every
    writer of a new generation calls it first (that generation's folders may hold the killed run's files)."""
    generation = state.generation + 1
    prefix = spec.rows_relpath(spec.shard_id(generation, 0)).rsplit("/", 1)[0]
    names = [n for n in io.list_dir(store.url(prefix)) if n.endswith(".parquet")]
    if not names:
        return state
    shards = {spec.shard_id(generation, int(n[1:].split(".")[0])): None for n in names}
    shards = {s: list(span) if (span := shard_hash_range(store, s)) else None for s in shards}
    state, failures = _commit_generation(store, state, generation, shards, [(0, state.buckets)], run, retain)
    if failures:
        raise RuntimeError(f"could not index the rows of an interrupted run in {store.root}: {failures}")
    io.remove_tree(store.url(spec.run_relpath(generation)))
    return state


def _task_gpus(config: ImageFiltersConfig, units: list, ray_address: str | None) -> float:
    """The GPU share of each fetch task: some when a model step runs and the cluster has GPUs, else none."""
    if not units or not ImageFilters(config).uses_models:
        return 0.0
    import ray

    from m3w.pipeline.image_filters.models import task_gpus  # imports torch: only when a model step runs

    init_ray(ray_address)
    return task_gpus(config, ray.cluster_resources().get("GPU", 0.0))


def run_images(
    inputs: Iterable[str | Path],
    store_dir: str | Path,
    config: ImagesConfig | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    allow_hosts: Sequence[str] = (),
) -> ImagesSummary:
    """Fetch every not-yet-final image URL of `inputs` into the store at `store_dir` (a path or a URL).
    `allow_hosts` adds private addresses to `config.fetch.allow_hosts` (e.g. `127.0.0.1:8000` for a mirror)."""
    config = config or ImagesConfig()
    if allow_hosts:
        config = replace(
            config, fetch=replace(config.fetch, allow_hosts=[*config.fetch.allow_hosts, *allow_hosts])
        )
    start = time.monotonic()
    files = input_files(inputs)
    store = ImageStore(io.absolute(store_dir))
    run = {"workers": workers, "ray_address": ray_address}
    io.makedirs(store.root)
    with Lease(store.root):
        io.remove_temp_files(store.root)  # a killed run's partial files: this run rewrites what they were
        try:
            state = store.state()  # an old-layout store raises LegacyStoreError: it is never silently ignored
        except NoStoreError:
            state = store.create(config.store_settings(), config.buckets)
        _check_store_settings(store, state, config)
        state = recover_interrupted_run(store, state, run, config.retain_generations)
        generation = state.generation + 1
        scratch = store.url(spec.run_relpath(generation))
        url_lists = [io.join(scratch, "urls", f"u{i:06d}.parquet") for i in range(len(files))]
        clip = config.image_filters.clip
        context_chars = clip.max_text_chars if clip.enabled else None  # what each page says about its images
        collected = run_units(collect_urls, [Unit(f"urls-{i:06d}", UrlListArgs(f, u, state.buckets, context_chars))
                                             for i, (f, u) in enumerate(zip(files, url_lists))],
                              None, desc="images: urls", **run)  # fmt: skip
        if collected.failed:
            raise RuntimeError(f"could not read the image URLs of: {collected.failures}")
        weights = [collected.counts[f"bucket.{b}"] + state.index_rows[b] for b in range(state.buckets)]
        groups = bucket_groups(weights, config.plan_rows_per_task)
        pending_files = [io.join(scratch, "pending", f"p{first:05d}.parquet") for first, _ in groups]
        plan_units = [Unit(f"plan-{first:05d}", PlanArgs(store.root, (first, stop), tuple(url_lists), out,
                                                         config.max_attempts, config.urls_per_unit))
                      for (first, stop), out in zip(groups, pending_files)]  # fmt: skip
        planned = run_units(plan_group, plan_units, None, desc="images: plan", **run)
        fetch_units = []
        for unit, out in zip(plan_units, pending_files):
            for row_group in range(math.ceil(planned.outputs.get(unit.id, 0) / config.urls_per_unit)):
                shard = spec.shard_id(generation, len(fetch_units))
                fetch_units.append(Unit(f"g{generation:06d}-u{len(fetch_units):06d}",
                                        FetchArgs(store.root, shard, out, row_group, config)))  # fmt: skip
        fetched = run_units(fetch_unit, fetch_units, None, desc="images", rate_key="images",
                            num_gpus_per_task=_task_gpus(config.image_filters, fetch_units, ray_address), **run)  # fmt: skip
        shards = {u.args.shard: fetched.outputs[u.id] for u in fetch_units if u.id in fetched.outputs}
        failures = {**planned.failures, **fetched.failures}
        if shards:
            state, index_failures = _commit_generation(
                store, state, generation, shards, groups, run, config.retain_generations
            )
            failures.update(index_failures)
            counts = dict(fetched.counts)
            Manifest(store.root, "images", stable_hash(to_dict(config))).record(
                f"g{generation:06d}", "failed" if failures else "done", output={"generation": generation,
                "units": len(shards)}, counts=counts, error=json.dumps(failures)[:4000] if failures else None,
            )  # fmt: skip
        io.remove_tree(scratch)  # URL lists and plans serve one run; a re-run plans afresh
        every_rows_file = rows_files(store)
        phash_counts = None
        if config.image_filters.phash.enabled and every_rows_file:  # the store-wide pHash counts
            try:
                phash_counts = run_phash_counts(store.root, every_rows_file, ray_address)
            except Exception as exc:  # noqa: BLE001 - a failed task fails this step (re-run it), not the run
                failures["phash_counts"] = f"{type(exc).__name__}: {exc}"
        # Thresholds on the stored scores: counted per rows file, re-counted only when a threshold changes.
        # Without the counts the duplicate rule needs, the thresholds in force stay the last run's.
        if not ("phash_counts" in failures and config.image_filters.phash.max_duplicates is not None):
            decided = run_image_filters(store.root, config.image_filters, every_rows_file,
                                        phash_counts=phash_counts, **run)  # fmt: skip
            failures.update(decided.failures)
    filter_counts, _, _ = current_totals(Manifest(store.root, IMAGE_FILTERS_STAGE))
    drops = {k.removeprefix("drop.").removesuffix(".images"): v for k, v in filter_counts.items()
             if k.startswith("drop.")}  # fmt: skip
    statuses = {k.removeprefix("status."): v for k, v in fetched.counts.items() if k.startswith("status.")}
    return ImagesSummary(store=store.root, urls=planned.counts["urls"],
                         already_final=planned.counts["already_final"],
                         retries_exhausted=planned.counts["retries_exhausted"],
                         fetched=fetched.counts["images"], statuses=dict(sorted(statuses.items())),
                         units_done=fetched.done, units_failed=len(failures),
                         seconds=time.monotonic() - start, failures=failures,
                         generation=state.generation, filter_drops=dict(sorted(drops.items())))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- CLI


@click.command("images")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--store", required=True, type=OutputDir(), help="Image store: a folder (created if missing) or a URL."
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="IP[:PORT]|CIDR[:PORT]",
    help="Admit this private address (repeatable), e.g. 127.0.0.1:8000 for a local mirror.",
)
@stage_options(ImagesConfig, set_help="Override one config value, e.g. fetch.read_timeout=5.")
def images_cmd(
    inputs: tuple[str, ...],
    store: str,
    allow_hosts: tuple[str, ...],
    config: ImagesConfig,
    workers: int | None,
    ray_address: str | None,
) -> None:
    """Fetch, validate and resize the image URLs of INPUT... (filtered/ folders or URL lists, local or fsspec
    URLs) into --store."""
    summary = run_images(inputs, store, config, workers=workers, ray_address=ray_address,
                         allow_hosts=allow_hosts)  # fmt: skip
    click.echo(f"{summary.urls} URLs: {summary.already_final} already final, {summary.retries_exhausted} out of "
               f"retries, {summary.fetched} fetched in {summary.seconds:.1f}s "
               f"({summary.images_per_s:.1f} images/s); store generation {summary.generation}")  # fmt: skip
    for status, n in summary.statuses.items():
        click.echo(f"  {status:<16} {n}")
    for step, n in summary.filter_drops.items():
        click.echo(f"  dropped by {step}: {n} stored images (thresholds in {spec.IMAGE_FILTERS_FILE})")
    for unit, error in summary.failures.items():
        click.echo(f"unit {unit} failed: {error.splitlines()[0]}", err=True)
    if summary.units_failed:
        raise SystemExit(1)
