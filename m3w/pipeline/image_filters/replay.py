"""The image filters' decide step: thresholds applied to the scores stored in the image index.

It runs at the end of every `m3w images` run, one task per rows file of the store, and counts what each step
drops into the store's manifest (stage `image_filters`, one entry per store generation keyed by the thresholds:
a threshold change re-counts every generation, a re-run with nothing changed counts only new generations). It
also records the thresholds in force in the store
(`schemas.images.IMAGE_FILTERS_FILE`), which is what readers of the store (the shards stage) apply, so changing
a threshold never re-fetches or re-scores an image: re-run `m3w images`, then the shards.

With `phash.max_duplicates` set, the pHash duplicate counts of the whole store (`duplicates.py`) decide too; a
run that adds images changes them, so every generation is counted again, and the store records which counts are
in force next to the thresholds.

A row with status ok is final (never fetched again), so it is never superseded by a later attempt: counting the ok
rows of each rows file counts each stored image once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from m3w.config import from_dict, to_dict
from m3w.pipeline import io
from m3w.pipeline.image_filters.config import ImageFiltersConfig
from m3w.pipeline.image_filters.duplicates import duplicate_counts
from m3w.pipeline.image_filters.steps import ImageFilters
from m3w.pipeline.io import stable_hash
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.ray_runner import RunSummary, Unit, run_units
from m3w.schemas import images as spec

STAGE = "image_filters"
SCORE_COLUMNS = ["phash", "blur", "text_share", "clip_similarity", "clip_model", "nsfw_score", "nsfw_model"]


@dataclass(frozen=True)
class DecideArgs:
    rows_file: str
    config: ImageFiltersConfig
    store: str
    phash_counts: str | None  # the key of the store's pHash counts, when the duplicate rule is on


def image_filters(config: ImageFiltersConfig, store: str | Path, phash_counts: str | None) -> ImageFilters:
    """The steps of `config`, with the pHashes the duplicate rule drops from the store's counts `phash_counts`."""
    limit = config.phash.max_duplicates
    if phash_counts is None or limit is None or not config.phash.enabled:
        return ImageFilters(config)
    return ImageFilters(config, duplicate_counts(str(store), phash_counts, limit))


def decide_unit(args: DecideArgs) -> tuple[dict[str, int], dict[str, int]]:
    """Ray task: the funnel of one rows file's stored images under the thresholds (as output and counts)."""
    table = io.read_parquet(args.rows_file, columns=["status", *SCORE_COLUMNS])
    table = table.filter(pc.equal(table.column("status"), spec.STATUS_OK))
    filters = image_filters(args.config, args.store, args.phash_counts)
    counts = dict(filters.funnel(table.to_pylist()))
    return counts, counts


def thresholds_hash(config: ImageFiltersConfig, phash_counts: str | None) -> str:
    counts = phash_counts if config.phash.enabled and config.phash.max_duplicates is not None else None
    return stable_hash(to_dict(config) if counts is None else {**to_dict(config), "phash_counts": counts})


def run_image_filters(
    store_dir: str | Path,
    config: ImageFiltersConfig,
    rows_files: list[str],
    workers: int | None = None,
    ray_address: str | None = None,
    phash_counts: str | None = None,
) -> RunSummary:
    """Count each step's drops over the store's `rows_files` and record the thresholds in force,
    and the key of the pHash counts (`phash_counts`) the duplicate rule reads. The manifest has one entry per
    generation (a folder of rows files), not per file: a store of 353 M images has ~50 k rows files and should
    not get as many more entries."""
    manifest = Manifest(store_dir, STAGE, thresholds_hash(config, phash_counts))
    done = manifest.done_units(manifest.config_hash)
    by_generation: dict[str, list[str]] = {}
    for path in rows_files:
        by_generation.setdefault(spec.rows_file_unit(path).split("/")[0], []).append(path)
    todo = {g: files for g, files in sorted(by_generation.items()) if g not in done}
    units = [
        Unit(spec.rows_file_unit(path), DecideArgs(path, config, str(store_dir), phash_counts))
        for files in todo.values()
        for path in files
    ]
    summary = run_units(decide_unit, units, None, workers=workers, ray_address=ray_address, desc=STAGE)
    for generation, files in todo.items():
        failed = [spec.rows_file_unit(f) for f in files if spec.rows_file_unit(f) in summary.failures]
        if failed:
            manifest.failed(generation, "; ".join(f"{u}: {summary.failures[u][:300]}" for u in failed))
            continue
        counts: Counter = Counter()
        for path in files:
            counts.update(summary.outputs[spec.rows_file_unit(path)])
        manifest.done(generation, None, dict(counts))
    spec.write_image_filters(str(store_dir), to_dict(config), phash_counts)
    return summary


def store_filters(store_dir: str | Path) -> ImageFilters | None:
    """The thresholds the store's last `m3w images` run recorded, or None (a store from before filters)."""
    recorded: dict[str, Any] | None = spec.read_image_filters(str(store_dir))
    if recorded is None:
        return None
    return image_filters(
        from_dict(ImageFiltersConfig, recorded), store_dir, spec.read_phash_counts(store_dir)
    )
