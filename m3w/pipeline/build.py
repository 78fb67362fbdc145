"""`m3w build CONFIG.yaml`: every stage in order, as one job in one Ray session.

    extract → filter → images → shards (M3W windows, alt-text/caption pairs, video pairs)

Each stage runs through its own Python API (the code behind `m3w extract`, `m3w filter`, ...), so it keeps its
unit-level resume: a killed build re-run loses at most the units in flight. On top of that the build records
each finished stage in `OUT/_manifest/build/` (one entry per stage) under a hash of its settings and of every stage
before it; a re-run skips a finished stage whose inputs and settings did not change, and re-runs everything
downstream of a change. A stage with failed units is not marked finished, so the next run retries them.

Layout of OUT: documents/  filtered/ (+ excluded/)  images/  shards/{m3w,alt_pairs,caption_pairs,video_pairs}/
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from m3w.cli import stage_options
from m3w.config import config_class, load_config, to_dict
from m3w.pipeline.io import atomic_open, stable_hash
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.warc import DEFAULT_CC_BASE_URL

STAGES = ("extract", "filter", "images", "shards")


@dataclass
class StageSettings:
    """A stage's own config: a YAML file of that stage (`config`, relative to the build file) and/or inline
    `options` on top of it (what `--set filter.options.paragraph.min_words=5` changes)."""

    config: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExtractSettings(StageSettings):
    inputs: list[str] = field(default_factory=list)  # WARC paths, globs, URLs or warc.paths(.gz) files
    crawl: str | None = None  # a Common Crawl id, e.g. CC-MAIN-2024-22
    cc_base_url: str = DEFAULT_CC_BASE_URL
    limit: int | None = None  # only the first N WARCs


@dataclass
class FilterSettings(StageSettings):
    pass


@dataclass
class ImagesSettings(StageSettings):
    # Private addresses admitted (IP[:PORT] or CIDR[:PORT]), for images and videos: local mirrors and the demo.
    allow_hosts: list[str] = field(default_factory=list)


@dataclass
class ShardsSettings(StageSettings):
    m3w: bool = True
    pairs: bool = True  # alt-text and caption pairs
    video_table: str | None = None  # CSV/JSONL of (video URL or path, caption); null: no video pairs


@dataclass
class BuildConfig:
    out: str = "corpus"
    ray_address: str | None = None
    workers: int | None = None
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    filter: FilterSettings = field(default_factory=FilterSettings)
    images: ImagesSettings = field(default_factory=ImagesSettings)
    shards: ShardsSettings = field(default_factory=ShardsSettings)


def load_build_config(path: str | Path, overrides: list[str] | None = None) -> tuple[BuildConfig, Path]:
    """The build config and its directory. Stage `config` files are relative to the build file (they ship
    together); data paths (out, inputs, video_table) are relative to the working directory, as on the CLI."""
    return load_config(BuildConfig, path, overrides or []), Path(path).resolve().parent


def stage_config(stage: str, settings: StageSettings, base: Path) -> Any:
    """The stage's dataclass config: defaults ← its YAML file (if any) ← the inline options."""
    path = base / settings.config if settings.config else None
    return load_config(config_class(stage), path, layers=[settings.options], where=f"{stage}.options")


@dataclass
class StageResult:
    stage: str
    status: str  # done | skipped | failed
    seconds: float
    counts: dict[str, Any]
    failures: dict[str, str] = field(default_factory=dict)


class Build:
    def __init__(self, config: BuildConfig, base: Path) -> None:
        self.config = config
        self.base = base
        # Every stage's config is resolved (and checked) now, before any stage runs.
        self.stage_configs = {stage: stage_config(stage, getattr(config, stage), base) for stage in STAGES}
        self.out = Path(config.out)
        self.dirs = {name: self.out / name for name in ("documents", "filtered", "images", "shards")}
        self.results: list[StageResult] = []

    # ---- per stage -------------------------------------------------------------------------------------------
    def extract(self) -> StageResult:
        from m3w.pipeline.extract import run_extract

        s = self.config.extract
        summary = run_extract(
            s.inputs,
            self.dirs["documents"],
            self.config.workers,
            self.config.ray_address,
            crawl=s.crawl,
            limit=s.limit,
            cc_base_url=s.cc_base_url,
            config=self.stage_configs["extract"],
        )
        status = "failed" if summary.failed else "done"
        return StageResult("extract", status, summary.seconds, dict(summary.counts), summary.failures)

    def filter(self) -> StageResult:
        from m3w.pipeline.filter import run_filter

        summary = run_filter(
            self.dirs["documents"],
            self.dirs["filtered"],
            self.stage_configs["filter"],
            self.config.workers,
            self.config.ray_address,
        )
        status = "failed" if summary["failed"] else "done"
        return StageResult("filter", status, summary["seconds"], summary["counts"], summary["failures"])

    def kept_documents(self) -> list[str]:
        """The filter's output files, from its manifest: not excluded/ nor caches, which share its directory."""
        manifest = Manifest(self.dirs["filtered"], "filter")
        outputs = sorted(
            e["output"] for e in manifest.entries().values() if e["status"] == "done" and e["output"]
        )
        if not outputs:
            raise RuntimeError(f"no filtered documents in {self.dirs['filtered']}: did the filter stage run?")
        return [str(self.dirs["filtered"] / o) for o in outputs]

    def images(self) -> StageResult:
        from m3w.pipeline.images import run_images

        s = self.config.images
        summary = run_images(
            self.kept_documents(),
            self.dirs["images"],
            self.stage_configs["images"],
            self.config.workers,
            self.config.ray_address,
            allow_hosts=s.allow_hosts,
        )
        counts = {"urls": summary.urls, "fetched": summary.fetched, "already_final": summary.already_final}
        counts.update({f"status.{k}": v for k, v in summary.statuses.items()})
        status = "failed" if summary.units_failed else "done"
        return StageResult("images", status, summary.seconds, counts, summary.failures)

    def shards(self) -> StageResult:
        from m3w.pipeline.shards import run_m3w_shards, run_pair_shards, run_video_shards

        s = self.config.shards
        config = self.stage_configs["shards"]
        start = time.monotonic()
        results: dict[str, dict] = {}
        common = {"workers": self.config.workers, "ray_address": self.config.ray_address}
        if s.m3w:
            results["m3w"] = run_m3w_shards(
                self.kept_documents(), self.dirs["images"], self.dirs["shards"], config, **common
            )
        if s.pairs:
            results.update(
                run_pair_shards(
                    self.kept_documents(), self.dirs["images"], self.dirs["shards"], config, **common
                )
            )
        if s.video_table:
            results["video_pairs"] = run_video_shards(
                s.video_table,
                self.dirs["shards"],
                config,
                allow_hosts=self.config.images.allow_hosts,
                **common,
            )
        counts = {f"{name}.{k}": v for name, r in results.items() for k, v in r["totals"].items()}
        failures = {f"{name}:{u}": "failed" for name, r in results.items() for u in r.get("failed_units", [])}
        status = "failed" if failures else "done"
        return StageResult("shards", status, time.monotonic() - start, counts, failures)

    # ---- the job ---------------------------------------------------------------------------------------------
    def stage_hashes(self) -> dict[str, str]:
        """Each stage's hash covers its resolved config and settings and those of every stage before it (a
        chain), so an edit that changes no value (a comment, a default spelled out) re-runs nothing."""
        hashes, previous = {}, ""
        settings = to_dict(self.config)
        for stage in STAGES:
            own = {k: v for k, v in settings[stage].items() if k not in ("config", "options")}
            previous = stable_hash([previous, stage, own, to_dict(self.stage_configs[stage])])
            hashes[stage] = previous
        return hashes

    def run(self, only: tuple[str, ...] = STAGES, log=click.echo) -> list[StageResult]:
        from m3w.pipeline.ray_runner import init_ray

        self.out.mkdir(parents=True, exist_ok=True)
        hashes = self.stage_hashes()
        for stage in STAGES:
            if stage not in only:
                continue
            manifest = Manifest(self.out, "build", hashes[stage])
            if stage in manifest.done_units(hashes[stage]):
                result = StageResult(stage, "skipped", 0.0, manifest.entries()[stage]["counts"])
            else:
                log(f"== {stage}")
                init_ray(self.config.ray_address)  # once: every stage then runs in this one Ray session
                result = getattr(self, stage)()
                if result.status == "done":
                    manifest.done(stage, stage, _flat_counts(result.counts))
                else:
                    manifest.failed(stage, json.dumps(result.failures)[:2000])
            self.results.append(result)
            log(f"== {stage}: {result.status} in {result.seconds:.1f}s")
            if result.status == "failed":
                for unit, error in list(result.failures.items())[:5]:
                    log(f"   FAILED {unit}: {str(error).splitlines()[0] if error else ''}")
                break  # downstream stages would read an incomplete input; a re-run retries the failed units
        with atomic_open(self.out / "build_summary.json", "w") as f:
            json.dump([r.__dict__ for r in self.results], f, indent=1, default=str)
        return self.results


def _flat_counts(counts: dict[str, Any]) -> dict[str, int]:
    return {k: int(v) for k, v in counts.items() if isinstance(v, (int, float))}


def run_build(
    config_path: str | Path,
    overrides: list[str] | None = None,
    only: tuple[str, ...] = STAGES,
    log=click.echo,
) -> list[StageResult]:
    config, base = load_build_config(config_path, overrides)
    return Build(config, base).run(only, log)


@click.command("build")
@stage_options(
    config_argument=True, set_help="Override, e.g. extract.limit=2 or filter.options.dedup.enabled=false."
)
@click.option(
    "--only", "only", multiple=True, type=click.Choice(STAGES), help="Run only these stages (repeatable)."
)
def build_cmd(
    config_path: str,
    overrides: tuple[str, ...],
    workers: int | None,
    ray_address: str | None,
    only: tuple[str, ...],
) -> None:
    """Run every stage (extract → filter → images → shards) from one YAML CONFIG, as one job."""
    config, base = load_build_config(config_path, list(overrides))
    if workers is not None:
        config.workers = workers
    if ray_address is not None:
        config.ray_address = ray_address
    build = Build(config, base)  # resolves and checks every stage's config before any stage runs
    results = build.run(tuple(only) or STAGES)
    click.echo(f"{'stage':<8} {'status':<8} {'seconds':>8}")
    for r in results:
        click.echo(f"{r.stage:<8} {r.status:<8} {r.seconds:>8.1f}")
    click.echo(f"corpus: {build.out}")
    if any(r.status == "failed" for r in results):
        raise SystemExit(1)
