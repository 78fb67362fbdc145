"""`m3w images`: fetch every image URL once, ever, validate and resize it into the content-addressed store.

    URLs (filtered/ documents' image nodes, or a text file of URLs)
      → pending = never seen, or seen with a retryable status and attempts left
      → deterministic chunks by URL hash → one Ray task each (threads inside: I/O bound)
      → per URL: safe fetch → decode (pixel cap) → filter rules on the real size → resize → JPEG → blob
      → one index parquet per chunk, written atomically

The index is the source of truth for "already fetched": a chunk whose index file exists is never fetched again,
even if the job was killed before the manifest recorded it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import hashlib
import io
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
from PIL import Image, ImageOps, UnidentifiedImageError

from m3w.cli import OutputDir, stage_options
from m3w.config import to_dict
from m3w.pipeline.fetch import FetchConfig, shared_fetcher
from m3w.pipeline.filters import ImageFilterConfig, check_image_size
from m3w.pipeline.image_filters import ImageFilters, ImageFiltersConfig
from m3w.pipeline.image_filters.context import first_contexts
from m3w.pipeline.image_filters.duplicates import run_phash_counts
from m3w.pipeline.image_filters.replay import STAGE as IMAGE_FILTERS_STAGE
from m3w.pipeline.image_filters.replay import run_image_filters
from m3w.pipeline.imagestore import ImageStore, is_final
from m3w.pipeline.io import stable_hash
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.ray_runner import RunSummary, Unit, init_ray, run_units
from m3w.pipeline.stats import current_totals
from m3w.schemas.documents import iter_image_urls
from m3w.schemas.images import IMAGE_FILTERS_FILE

RESIZE_MODES = ("center_crop", "pad", "keep_ratio")
RESAMPLE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
}
STORE_CONFIG = "_store_config.json"


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
    urls_per_unit: int = 200  # URLs per Ray task / index file: what a kill can lose, and the load balance
    threads_per_task: int = 32  # concurrent fetches inside one task
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
        img = Image.open(io.BytesIO(data))  # reads the header only
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
        buffer = io.BytesIO()
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
    """Everything one Ray task shares between its fetch threads."""

    def __init__(self, store: ImageStore, config: ImagesConfig, contexts: dict[str, str]) -> None:
        self.store = store
        self.config = config
        self.contexts = contexts  # url → the page text image-text relevance compares it with
        self.fetcher = shared_fetcher(config.fetch)
        self.filters = ImageFilters(config.image_filters)
        self._for_models: dict[str, bytes] = {}  # url → stored JPEG, until the model steps score its batch
        # The same bytes under several URLs (logos, CDN mirrors) are decoded once per task.
        self._by_sha: dict[str, Decoded | ImageError] = {}
        self._lock = threading.Lock()

    def process(self, url: str, attempts_before: int) -> dict[str, Any]:
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
            row["resized_sha256"] = self.store.write_blob(outcome.jpeg)
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


@dataclass(frozen=True)
class ChunkArgs:
    store_dir: str
    name: str
    urls: tuple[tuple[str, int], ...]  # (url, attempts so far)
    config: ImagesConfig
    contexts: dict[str, str] = field(default_factory=dict)  # of these URLs, when image-text relevance runs


def fetch_chunk(args: ChunkArgs) -> tuple[str, dict[str, int]]:
    """Ray task: fetch one chunk of URLs and write its index file. Returns (index relpath, counts)."""
    store = ImageStore(args.store_dir)
    worker = _Worker(store, args.config, args.contexts)
    # Results come back as they complete; a URL of a busy or rate-limited host never holds a thread that others
    # could use (per-host limits are per process: the fetcher is shared by the tasks a Ray worker runs).
    rows, batch = [], []
    for row in worker.fetcher.map_polite(lambda item: worker.process(*item), args.urls, url_of=lambda item: item[0],
                                         threads=args.config.threads_per_task):  # fmt: skip
        rows.append(row)
        if worker.filters.uses_models and row["status"] == "ok":
            batch.append(row)
            if len(batch) >= worker.filters.batch_size:
                worker.score_models(batch)
                batch = []
    if batch:
        worker.score_models(batch)
    relpath = store.write_index(args.name, rows)
    counts = Counter(f"status.{row['status']}" for row in rows)
    counts["images"] = len(rows)
    counts["images_ok"] = counts["status.ok"]
    counts["bytes_downloaded"] = sum(row.get("original_bytes") or 0 for row in rows)
    return relpath, dict(counts)


# ------------------------------------------------------------------------------------------------- inputs


def is_documents_input(path: Path) -> bool:
    """A filtered/ directory or documents parquet file, as opposed to a text file of URLs."""
    return path.is_dir() or path.suffix == ".parquet"


def iter_input_urls(inputs: Iterable[str | Path]) -> Iterator[str]:
    """Image URLs of filtered/ directories or parquet files (image nodes), or of text files (one URL a line)."""
    for path in map(Path, inputs):
        if is_documents_input(path):  # a directory's own documents: not excluded/, _cache/
            yield from iter_image_urls(path)
        elif path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    fields = line.split()
                    if fields and not fields[0].startswith("#"):
                        yield fields[0]
        else:
            raise FileNotFoundError(f"input not found: {path}")


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
    filter_drops: dict[str, int] = field(default_factory=dict)  # stored images each image filter step drops

    @property
    def images_per_s(self) -> float:
        return self.fetched / self.seconds if self.seconds else 0.0


def plan_units(
    pending: list[tuple[str, int]],
    store_dir: str,
    config: ImagesConfig,
    contexts: dict[str, str] | None = None,
) -> list[Unit]:
    """Deterministic chunks of the pending URLs by URL hash; the run key names this pending set. `contexts`
    (url → page text) go to the chunk of their URL."""
    if not pending:
        return []
    run_key = hashlib.sha256("\n".join(f"{u}\t{a}" for u, a in pending).encode()).hexdigest()[:12]
    n_units = math.ceil(len(pending) / config.urls_per_unit)
    buckets: list[list[tuple[str, int]]] = [[] for _ in range(n_units)]
    for url, attempts in pending:
        buckets[int(hashlib.sha1(url.encode()).hexdigest()[:8], 16) % n_units].append((url, attempts))
    contexts = contexts or {}
    units = []
    for i, bucket in enumerate(buckets):
        if bucket:
            name = f"{run_key}-{i:05d}"
            chunk_contexts = {url: contexts[url] for url, _ in bucket if url in contexts}
            units.append(Unit(name, ChunkArgs(store_dir, name, tuple(bucket), config, chunk_contexts)))
    return units


@contextlib.contextmanager
def _store_lock(store_dir: Path) -> Iterator[None]:
    """One writer per store: two runs would fetch the same pending URLs twice."""
    with open(store_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another `m3w images` run is writing to {store_dir}") from None
        yield


def _check_store_settings(store_dir: Path, config: ImagesConfig) -> None:
    path = store_dir / STORE_CONFIG
    wanted = config.store_settings()
    if path.exists():
        found = json.loads(path.read_text())
        if found != wanted:
            raise ValueError(f"{store_dir} holds images made with {found}; this config asks for {wanted}. "
                             "Use another --store for another image geometry.")  # fmt: skip
    else:
        path.write_text(json.dumps(wanted, sort_keys=True) + "\n")


def _task_gpus(config: ImageFiltersConfig, pending: list, ray_address: str | None) -> float:
    """The GPU share of each fetch task: some when a model step runs and the cluster has GPUs, else none."""
    if not pending or not ImageFilters(config).uses_models:
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
    """Fetch every not-yet-final image URL of `inputs` into the store at `store_dir`. `allow_hosts` adds
    private addresses to `config.fetch.allow_hosts` (e.g. `127.0.0.1:8000` for a local mirror)."""
    config = config or ImagesConfig()
    if allow_hosts:
        config = replace(
            config, fetch=replace(config.fetch, allow_hosts=[*config.fetch.allow_hosts, *allow_hosts])
        )
    start = time.monotonic()
    inputs = list(inputs)
    store_path = Path(store_dir)
    store_path.mkdir(parents=True, exist_ok=True)
    urls = sorted(set(iter_input_urls(inputs)))
    with _store_lock(store_path):
        _check_store_settings(store_path, config)
        known = ImageStore(store_path).lookup(urls)
        pending, final, exhausted = [], 0, 0
        for url in urls:
            row = known.get(url)
            if row is None:
                pending.append((url, 0))
            elif is_final(row["status"], row["http_status"]):
                final += 1
            elif (row["attempts"] or 0) >= config.max_attempts:
                exhausted += 1
            else:
                pending.append((url, row["attempts"] or 0))
        contexts = {}
        if config.image_filters.clip.enabled and pending:  # what each page says about its images
            contexts = first_contexts([p for p in map(Path, inputs) if is_documents_input(p)],
                                      {u for u, _ in pending}, config.image_filters.clip.max_text_chars)  # fmt: skip
        manifest = Manifest(store_path, "images", stable_hash(to_dict(config)))
        result = run_units(fetch_chunk, plan_units(pending, str(store_path), config, contexts), manifest,
                           workers=workers, ray_address=ray_address, desc="images", rate_key="images",
                           num_gpus_per_task=_task_gpus(config.image_filters, pending, ray_address))  # fmt: skip
        index_files = ImageStore(store_path).index_files()
        phash_counts, count_failure = None, {}
        if config.image_filters.phash.enabled and index_files:  # the corpus-wide pHash counts
            try:
                phash_counts = run_phash_counts(store_path, index_files, ray_address)
            except Exception as exc:  # noqa: BLE001 - a failed task fails this step (re-run it), not the run
                count_failure = {"phash_counts": f"{type(exc).__name__}: {exc}"}
        # Thresholds on the stored scores: counted per index file, re-counted only when a threshold changes.
        # Without the counts the duplicate rule needs, the thresholds in force stay the last run's.
        decided = RunSummary(0, 0, 0, Counter(), 0.0, {})
        if not (count_failure and config.image_filters.phash.max_duplicates is not None):
            decided = run_image_filters(store_path, config.image_filters, index_files, workers=workers,
                                        ray_address=ray_address, phash_counts=phash_counts)  # fmt: skip
    filter_counts, _, _ = current_totals(Manifest(store_path, IMAGE_FILTERS_STAGE))
    statuses = {k.removeprefix("status."): v for k, v in result.counts.items() if k.startswith("status.")}
    drops = {
        k.removeprefix("drop.").removesuffix(".images"): v
        for k, v in filter_counts.items()
        if k.startswith("drop.")
    }
    return ImagesSummary(store=str(store_path), urls=len(urls), already_final=final, retries_exhausted=exhausted,
                         fetched=result.counts["images"], statuses=dict(sorted(statuses.items())),
                         units_done=result.done, units_failed=result.failed + decided.failed + len(count_failure),
                         seconds=time.monotonic() - start,
                         failures={**result.failures, **count_failure, **decided.failures},
                         filter_drops=dict(sorted(drops.items())))  # fmt: skip


@click.command("images")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--store", required=True, type=OutputDir(), help="Image store directory (created if missing).")
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
    """Fetch, validate and resize the image URLs of INPUT... (filtered/ dirs or URL lists) into --store."""
    summary = run_images(inputs, store, config, workers=workers, ray_address=ray_address,
                         allow_hosts=allow_hosts)  # fmt: skip
    click.echo(f"{summary.urls} URLs: {summary.already_final} already final, {summary.retries_exhausted} out of "
               f"retries, {summary.fetched} fetched in {summary.seconds:.1f}s "
               f"({summary.images_per_s:.1f} images/s)")  # fmt: skip
    for status, n in summary.statuses.items():
        click.echo(f"  {status:<16} {n}")
    for step, n in summary.filter_drops.items():
        click.echo(f"  dropped by {step}: {n} stored images (thresholds in {IMAGE_FILTERS_FILE})")
    for unit, error in summary.failures.items():
        click.echo(f"unit {unit} failed: {error.splitlines()[0]}", err=True)
    if summary.units_failed:
        raise SystemExit(1)
