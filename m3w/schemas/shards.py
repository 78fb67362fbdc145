"""WebDataset shard samples and the shard-set manifest `shards.json` (defined, written and read here).

A sample in `shards/<dataset>/<name>-<unit>-000000.tar`:
    <key>.json    SAMPLE_JSON_FIELDS below
    <key>.0.jpg … <key>.{n-1}.jpg   one file per media item (images), 320x320 JPEG
For video pairs, the one media item is T frames: <key>.0.jpg … <key>.{T-1}.jpg with "media": [{"frames": T}].

`__key__` is derived from the document id and window index, with no dots (webdataset splits keys on dots).
Each `<image>` token in `input_ids` has exactly one media item, in order.

Each unit (one input file) writes its own tars, named after the unit; `shards.json` lists every shard of the
dataset in unit order with its counts, which is what readers (the trainer, `m3w inspect`) go by:

    {"schema": SCHEMA_VERSION, "dataset": str, "tokenizer": {"name", "fingerprint"},
     "seq_len": L, "max_media": N, "num_frames": T, "config_hash": str, "config": {...},
     "inputs": [unit ids], "failed_units": [unit ids],
     "shards": [{"name", "samples", "tokens", "images", "bytes"}, ...],
     "totals": {"shards", "samples", "tokens", "images", "bytes"}, "unit_counts": {name: int}}
"""

from __future__ import annotations

import json
from typing import Any

from m3w.errors import FormatError

SCHEMA_VERSION = "m3w.shards/1"
SHARD_MANIFEST = "shards.json"  # per shard folder
# seq_len (L), max_media (N) and num_frames (T) bound every sample of a set (the trainer checks them against
# its config)
SAMPLE_LIMITS = ("seq_len", "max_media", "num_frames")

DATASETS = ("m3w", "alt_pairs", "caption_pairs", "video_pairs")

SAMPLE_JSON_FIELDS = (
    "schema",  # SCHEMA_VERSION
    "dataset",  # one of DATASETS
    "input_ids",  # list[int], token ids including <image> and <EOC>
    "text",  # the window text, decodes from input_ids
    "images",  # list of media keys in order, e.g. ["0.jpg", "1.jpg"]; for video: frame keys of the one item
    "media_kind",  # "image" | "video"
    "num_frames",  # 1 for images, T for video
    "tokenizer",  # {"name": str, "fingerprint": str}
    "provenance",  # {"doc_id", "url", "warc_path", "warc_record_id", "warc_offset", "node_indices", "window_index"}
)
# Extra provenance keys per dataset (additive): m3w "token_start" (window offset in the document's token
# sequence); alt/caption pairs "image_url"; video pairs "table_row", "frame_times", "distinct_frames",
# "fill" ("none" | "loop" | "pad": how a clip shorter than T/fps seconds was filled), "duration".

TOTALS = ("samples", "tokens", "images", "bytes")


def shard_manifest(
    dataset: str,
    tokenizer: dict[str, str],
    shards: list[dict[str, Any]],
    limits: dict[str, int],
    *,
    config_hash: str = "",
    config: dict[str, Any] | None = None,
    inputs: list[str] | None = None,
    failed_units: list[str] | None = None,
    unit_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The `shards.json` of a dataset whose shards (in reading order) are `shards`, every sample within
    `limits` (SAMPLE_LIMITS)."""
    return {
        "schema": SCHEMA_VERSION,
        "dataset": dataset,
        "tokenizer": tokenizer,
        **{key: int(limits[key]) for key in SAMPLE_LIMITS},
        "config_hash": config_hash,
        "config": config or {},
        "inputs": inputs or [],
        "failed_units": failed_units or [],
        "shards": shards,
        "totals": {"shards": len(shards), **{k: sum(int(s.get(k, 0)) for s in shards) for k in TOTALS}},
        "unit_counts": dict(sorted((unit_counts or {}).items())),
    }


def write_shard_manifest(folder: str, manifest: dict[str, Any]) -> None:
    """Write `folder/shards.json` (a local path or a URL) in one piece."""
    from m3w.pipeline import io

    data = json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    io.write_bytes(io.join(folder, SHARD_MANIFEST), data.encode())


def read_shard_manifest(folder: str) -> dict[str, Any]:
    """Read and check `folder/shards.json` (a local path or an fsspec URL)."""
    from m3w.pipeline import io

    url = io.join(str(folder), SHARD_MANIFEST)
    try:
        manifest = io.read_json(url)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no shard manifest at {url}: run `m3w shards` first") from exc
    except ValueError as exc:  # not JSON (a torn write, another file of that name), or not UTF-8
        raise FormatError(f"{url}: not a shard manifest ({exc})") from exc
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema != SCHEMA_VERSION:
        raise FormatError(f"{url}: schema {schema!r}, expected {SCHEMA_VERSION!r}")
    missing = [k for k in SAMPLE_LIMITS if not isinstance(manifest.get(k), int)]
    if missing:
        raise FormatError(f"{url} does not say its {', '.join(missing)}: re-run `m3w shards` to rewrite it")
    return manifest


def shard_urls(folder: str, manifest: dict[str, Any], non_empty: bool = True) -> list[str]:
    """The URLs of a manifest's shards, in order (by default only those holding samples)."""
    from m3w.pipeline import io

    return [
        io.join(str(folder), s["name"])
        for s in manifest["shards"]
        if s.get("samples", 0) > 0 or not non_empty
    ]
