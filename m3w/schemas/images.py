"""The `images/` store: a content-addressed image store keyed by URL.

Layout of a store directory:
    index/*.parquet        one row per URL attempt (IMAGE_INDEX_SCHEMA); per URL the row with the most attempts
                           wins (ties: the later file). pipeline.imagestore.ImageStore merges them
    blobs/ab/<sha256>.jpg  resized image bytes, named by the sha256 of the *resized* JPEG bytes
    _manifest.jsonl        the stage manifest (schemas.manifest)

Statuses follow img2dataset's convention (status + error_message + sizes + sha256 per URL), with a closed set.
"""

from __future__ import annotations

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
    ],
    metadata={b"m3w.schema_version": SCHEMA_VERSION.encode()},
)


def blob_relpath(resized_sha256: str) -> str:
    return f"blobs/{resized_sha256[:2]}/{resized_sha256}.jpg"
