"""Units write their own shards; `shards.json` is the small final step.

    unit (one input file) → <name>-<unit>-000000.tar, … written directly by the unit, in input order
                          → its manifest entry lists those shards with their counts (written last: the commit)
    final step            → shards.json = the done units' shards in unit order (+ totals, counts, failures);
                            tars no unit lists any more are removed

Shard names and contents come from the unit alone, so the output is byte-identical whatever the number of
workers, and a killed job resumes by re-running only the units without an entry.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from m3w.config import from_dict, to_dict
from m3w.pipeline import io
from m3w.pipeline.io import stable_hash
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.ray_runner import Unit, run_units
from m3w.pipeline.shards.config import ShardsConfig
from m3w.pipeline.shards.samples import cached_tokenizer
from m3w.pipeline.tario import ShardWriter
from m3w.schemas import shards as spec


@dataclass(frozen=True)
class Dataset:
    """One output dataset of a stage: its folder under OUT and the prefix of its shard names."""

    dataset: str
    name: str
    dedup: bool = False  # one sample per (media bytes, text) within a unit


class UnitShards:
    """The shards one unit writes for one dataset (a context manager around a ShardWriter)."""

    def __init__(self, out: str, dataset: Dataset, uid: str, config: ShardsConfig, counts: Counter) -> None:
        self.dataset = dataset
        self.writer = ShardWriter(io.join(out, dataset.dataset), f"{dataset.name}-{uid}",
                                  config.shard_max_samples, config.shard_max_bytes)  # fmt: skip
        self.counts = counts
        self._keys: set[str] = set()
        self._pairs: set[str] = set()

    def __enter__(self) -> UnitShards:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.writer.__exit__(*exc)

    def add(self, key: str, sample: dict, media: list[bytes]) -> bool:
        """Write one sample (its JSON and media files, in order); False when it is a duplicate."""
        prefix = "" if self.dataset.dataset in ("m3w", "video_pairs") else f"{self.dataset.dataset}."
        if key in self._keys:  # the same page twice in one input
            self.counts[f"{prefix}skip.duplicate_key"] += 1
            return False
        self._keys.add(key)
        if self.dataset.dedup:
            pair = stable_hash([[hashlib.sha256(m).hexdigest() for m in media], sample["text"]])
            if pair in self._pairs:
                self.counts[f"{prefix}skip.duplicate_pair"] += 1
                return False
            self._pairs.add(pair)
        files = {"json": json.dumps(sample, sort_keys=True, ensure_ascii=False).encode()}
        files.update(zip(sample["images"], media))
        self.writer.write(key, files, tokens=len(sample["input_ids"]), images=len(media))
        return True

    def shards(self) -> list[dict]:
        return [s.to_json() for s in self.writer.shards]


def unit_config(args: dict) -> ShardsConfig:
    return from_dict(ShardsConfig, args["config"])


def open_datasets(args: dict, counts: Counter) -> dict[str, UnitShards]:
    """The UnitShards of every dataset a unit writes (from its args)."""
    config = unit_config(args)
    return {d["dataset"]: UnitShards(args["out"], Dataset(**d), args["uid"], config, counts)
            for d in args["datasets"]}  # fmt: skip


def run_stage(
    stage: str,
    fn: Callable[[dict], tuple[Any, dict[str, int]]],
    units: list[tuple[str, dict]],
    datasets: list[Dataset],
    out: str,
    config: ShardsConfig,
    config_hash: str,
    *,
    workers: int | None,
    ray_address: str | None,
    rate_key: str = "documents",
) -> dict[str, dict]:
    """Run the units (each writes its shards of every dataset), then write each dataset's `shards.json`."""
    _, tok_info = cached_tokenizer(config.tokenizer)
    manifest = Manifest(io.join(out, datasets[0].dataset), stage, config_hash)
    common = {"config": to_dict(config), "out": out, "datasets": [d.__dict__ for d in datasets]}
    ray_units = [Unit(uid, dict(args, uid=uid, **common)) for uid, args in units]
    summary = run_units(fn, ray_units, manifest, workers=workers, ray_address=ray_address,
                        desc=f"shards {stage}", rate_key=rate_key)  # fmt: skip
    entries = manifest.entries()
    unit_ids = [uid for uid, _ in units]  # already in sorted input order
    done = [u for u in unit_ids if entries.get(u, {}).get("status") == "done"
            and entries[u].get("config_hash") == config_hash]  # fmt: skip
    failed = [u for u in unit_ids if u not in set(done)]
    unit_counts: Counter = Counter()
    for uid in done:
        unit_counts.update(entries[uid]["counts"])
    results = {}
    for d in datasets:
        shards = [s for uid in done for s in entries[uid]["output"][d.dataset]]
        manifest_json = spec.shard_manifest(d.dataset, tok_info, shards, sample_limits(d.dataset, config),
                                            config_hash=config_hash,
                                            config=to_dict(config), inputs=done, failed_units=failed,
                                            unit_counts=dict(unit_counts))  # fmt: skip
        folder = io.join(out, d.dataset)
        spec.write_shard_manifest(folder, manifest_json)
        remove_unlisted_shards(folder, d.name, {s["name"] for s in shards})
        results[d.dataset] = dict(
            manifest_json, unit_failures={u: e[:500] for u, e in summary.failures.items()}
        )
    return results


def sample_limits(dataset: str, config: ShardsConfig) -> dict[str, int]:
    """L, N and T that bound every sample of `dataset` (written into shards.json for the trainer to check)."""
    if dataset == "m3w":
        return {"seq_len": config.windows.seq_len, "max_media": config.windows.max_images, "num_frames": 1}
    if dataset == "video_pairs":
        return {"seq_len": config.video.max_tokens, "max_media": 1, "num_frames": config.video.num_frames}
    tokens = config.pairs.alt_max_tokens if dataset == "alt_pairs" else config.pairs.caption_max_tokens
    return {"seq_len": tokens, "max_media": 1, "num_frames": 1}


def remove_unlisted_shards(folder: str, name: str, keep: set[str]) -> None:
    """Tars of this name that no done unit lists (an earlier run with other inputs or sizes), and temp files
    of killed writers, are removed: the folder holds exactly what shards.json lists."""
    for file in io.list_dir(folder):
        stale = file.startswith(f"{name}-") and file.endswith(".tar") and file not in keep
        if stale or file.startswith(f".tmp-{name}-"):
            io.remove(io.join(folder, file))
