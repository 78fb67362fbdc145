"""Run a stage's units as Ray tasks: local Ray by default, a cluster via `--ray-address` / `RAY_ADDRESS`.

Every stage has the same shape: a list of units (one input → one output), a pure function per unit that writes
its output atomically and returns counts, and a manifest. `run_units` skips done units, retries failed ones,
bounds the tasks in flight, records each result as it arrives (so a killed job loses only units in flight), and
shows a progress bar with a rate.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from m3w.pipeline.io import remove_temp_files
from m3w.pipeline.manifest import Manifest


def _is_loopback(address: str | None) -> bool:
    host = (address or "").split("://")[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray pinned to 127.0.0.1 with no dashboard."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None or _is_loopback(address):
        # Ray maps 127.0.0.1 to the machine's routable address unless it runs in single-node mode; a local job
        # should listen on loopback only. The env var reaches workers; the constant covers an imported ray.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    if address is None or _is_loopback(address):
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False
        )


@dataclass(frozen=True)
class Unit:
    """One input of a stage. `id` names it in the manifest; `args` is what the unit function receives."""

    id: str
    args: Any


@dataclass
class RunSummary:
    done: int
    failed: int
    skipped: int
    counts: Counter
    seconds: float
    failures: dict[str, str]


def _call(fn: Callable[[Any], tuple[str | None, dict[str, int]]], args: Any) -> tuple[str, Any]:
    """Run one unit inside a worker. Exceptions come back as values so one bad unit never kills the job."""
    try:
        return "done", fn(args)
    except Exception as exc:  # noqa: BLE001 - any failure of a unit is recorded, not raised
        return "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"


def run_units(
    fn: Callable[[Any], tuple[str | None, dict[str, int]]],
    units: Sequence[Unit],
    manifest: Manifest,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    desc: str = "units",
    rate_key: str | None = None,
    num_cpus_per_task: float = 1.0,
    num_gpus_per_task: float = 0.0,
    memory_per_task: int | None = None,
) -> RunSummary:
    """Run `fn` over the units not yet done in `manifest`, at most `workers` at a time, and record each result.

    `fn(args) -> (output_relpath, counts)` must write its output atomically. `rate_key` names the count shown
    as a rate on the progress bar (e.g. "pages" → pages/s).
    """
    import ray

    start = time.monotonic()
    done_before = manifest.done_units(manifest.config_hash or None)
    todo = [u for u in units if u.id not in done_before]
    skipped = len(units) - len(todo)
    summary = RunSummary(0, 0, skipped, Counter(), 0.0, {})
    if not todo:
        summary.seconds = time.monotonic() - start
        return summary

    remove_temp_files(manifest.dir)  # a killed run's partial outputs: this run rewrites those units
    init_ray(ray_address)
    workers = max(1, workers or int(ray.available_resources().get("CPU", 1)))
    options: dict[str, Any] = {"num_cpus": num_cpus_per_task, "num_gpus": num_gpus_per_task, "max_retries": 0}
    if memory_per_task:
        options["memory"] = memory_per_task
    remote = ray.remote(_call).options(**options)
    fn_ref = ray.put(fn)

    pending: dict[Any, Unit] = {}
    queue = list(todo)
    bar = tqdm(total=len(todo), desc=desc, unit="unit", dynamic_ncols=True, mininterval=1.0)
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                unit = queue.pop(0)
                pending[remote.remote(fn_ref, unit.args)] = unit
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                unit = pending.pop(ref)
                try:
                    status, value = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a dead worker (OOM, segfault) fails the unit only
                    status, value = "failed", f"{type(exc).__name__}: {exc}"
                if status == "done":
                    output, counts = value
                    manifest.done(unit.id, output, counts)
                    summary.done += 1
                    summary.counts.update(counts)
                else:
                    manifest.failed(unit.id, value)
                    summary.failed += 1
                    summary.failures[unit.id] = value
                bar.update(1)
                if rate_key:
                    elapsed = max(time.monotonic() - start, 1e-9)
                    bar.set_postfix_str(f"{summary.counts[rate_key] / elapsed:.1f} {rate_key}/s")
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    summary.seconds = time.monotonic() - start
    return summary
