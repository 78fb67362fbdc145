"""The `images/` store: a content-addressed image store keyed by URL.

Layout of a store directory:
    index/*.parquet        one row per URL attempt (IMAGE_INDEX_SCHEMA); per URL the row with the most attempts
                           wins (ties: the later file). pipeline.imagestore.ImageStore merges them
    blobs/ab/<sha256>.jpg  resized image bytes, named by the sha256 of the *resized* JPEG bytes
    _manifest.jsonl        the stage manifest (schemas.manifest)

Statuses follow img2dataset's convention (status + error_message + sizes + sha256 per URL), with a closed set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "m3w.images/1"

STATUS_OK = "ok"
STATUSES = (
    "ok",
    "http_error",
    "timeout",
    "not_an_image",
    "too_small",
    "decode_error",
    "opted_out",
    "blocked_address",
    "too_large",
    "filtered",  # downloaded and decoded, but the filter stage's image rules (real size/aspect) refused it
    "bad_url",
)
# Statuses that may be transient: retried (bounded) on the next run. Every other status is final.
# "http_error_5xx" stands for http_error with a 5xx or 429 status, or none (connection refused/reset);
# pipeline.imagestore.is_final applies this rule.
RETRYABLE_STATUSES = ("timeout", "http_error_5xx")

IMAGE_INDEX_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("attempts", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("original_format", pa.string()),
        pa.field("original_bytes", pa.int64()),
        pa.field("sha256", pa.string()),  # of the original downloaded bytes
        pa.field("resized_sha256", pa.string()),  # blob key of the stored resized JPEG
        pa.field("resized_width", pa.int32()),
        pa.field("resized_height", pa.int32()),
        pa.field("fetched_at", pa.string()),
        # Image filter scores of the stored image (pipeline.image_filters; null: the step was off).
        pa.field("phash", pa.int64()),  # 64-bit DCT perceptual hash of the luma, as a signed integer
        pa.field("blur", pa.float32()),  # variance of the Laplacian of the luma (low: blurred or flat)
        pa.field("text_share", pa.float32()),  # share of text/QR-code-like tiles, 0..1
        pa.field("clip_similarity", pa.float32()),  # cosine similarity to the image's text on its page
        pa.field("clip_model", pa.string()),
        pa.field("nsfw_score", pa.float32()),  # NSFW probability, 0..1
        pa.field("nsfw_model", pa.string()),
    ],
    metadata={b"m3w.schema_version": SCHEMA_VERSION.encode()},
)


# The image filter thresholds in force (an ImageFiltersConfig as JSON), written by each `m3w images` run; readers of
# the store apply them to the index's scores. With them, the key of the store's pHash duplicate counts
# (schemas.image_duplicates) that the duplicate rule reads, or null.
IMAGE_FILTERS_FILE = "_image_filters.json"


def write_image_filters(root: str | Path, config: dict[str, Any], phash_counts: str | None = None) -> None:
    from m3w.pipeline.io import atomic_open

    record = {"schema": SCHEMA_VERSION, "image_filters": config, "phash_counts": phash_counts}
    with atomic_open(Path(root) / IMAGE_FILTERS_FILE, "w") as f:
        json.dump(record, f, sort_keys=True, indent=1)


def _read_record(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / IMAGE_FILTERS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_image_filters(root: str | Path) -> dict[str, Any] | None:
    record = _read_record(root)
    return None if record is None else record["image_filters"]


def read_phash_counts(root: str | Path) -> str | None:
    record = _read_record(root)
    return None if record is None else record.get("phash_counts")


def blob_relpath(resized_sha256: str) -> str:
    return f"blobs/{resized_sha256[:2]}/{resized_sha256}.jpg"
