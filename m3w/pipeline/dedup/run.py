"""Run a corpus-wide dedup as one Ray task graph, resumable task by task, cached as a whole.

    map (unit) ──▶ exact rules, in order: same URL ─▶ same text ─▶ same image set   (hash partition)
               ├─▶ MinHash bands (hash partition) ─▶ verify_a (group) ─▶ verify_b (group) ─▶ cluster rounds (group)
               ├─▶ image URL counts (hash partition)
               └─▶ domain paragraph counts (hash partition)
    exact rules + cluster ─▶ names (group of the kept) ─▶ collect (group of the dropped) ─▶ drops/<unit>.parquet

Every task writes its outputs and then a small JSON marker with its figures (rows, bytes read and written,
seconds, peak RSS); a re-run after a kill skips the tasks whose marker exists, and a directory with `_done`
is a cached result. Tasks are submitted together and Ray starts each as soon as its inputs are written; only the
clustering rounds wait for the driver, which adds a round while the last one still changed a label.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from m3w.config import to_dict
from m3w.pipeline.dedup import drops, mapper, pairs, reduce
from m3w.pipeline.dedup.keys import DOMAIN_PARAGRAPH, IMAGE_FREQUENCY
from m3w.pipeline.dedup.layout import BANDS, IMAGES, PARAGRAPHS, Layout, SignalsUnit, plan_layout
from m3w.pipeline.filters.config import DedupConfig
from m3w.pipeline.io import exists, join, name_of, read_bytes, stable_hash, write_bytes
from m3w.pipeline.ray_runner import ray_task
from m3w.schemas.filter_cache import BYTES_READ

DEDUP_VERSION = "m3w.filter-dedup/2"
DONE = "_done"


class DedupError(RuntimeError):
    """A dedup task failed: no unit can be decided until a re-run completes it."""


@dataclass
class DedupRun:
    directory: str
    cached: bool
    layout: Layout
    tasks: list[dict[str, Any]] = field(default_factory=list)  # figures of the tasks run now (none if cached)

    def drops_file(self, unit: str) -> str:
        return self.layout.drops_file(unit)


def decisions_key(units: Sequence[SignalsUnit], config: DedupConfig) -> str:
    """Decisions are valid for exactly this dedup config and these signal files (whose names carry the inputs'
    fingerprints and the signals config)."""
    files = sorted(name_of(u.signals) for u in units)
    return stable_hash({"version": DEDUP_VERSION, "dedup": to_dict(config), "files": files})


# ------------------------------------------------------------------------------------------------ memory


def release_memory() -> None:
    """Hand freed memory back to the OS (Python objects, Arrow's pool, glibc's heap), so that a Ray worker does
    not carry one task's high-water mark into the next."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS count (Linux: VmHWM), so that a reused Ray worker reports the peak of
    the task it runs now, not of an earlier one. False where the kernel does not offer it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident bytes of this process since start or the last `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ tasks


def _task(
    phase: str,
    name: str,
    marker: str,
    fn: Callable[..., dict[str, Any]],
    layout: Layout,
    args: tuple,
    *deps: Any,
) -> dict:
    """Run one dedup task unless its marker says it is done. `deps` are the figures of the tasks it waits for
    (Ray passes them once those tasks finished); counting reducers' chunk numbers reach `collect` this way."""
    if exists(marker):
        return {**json.loads(read_bytes(marker)), "skipped": True}
    release_memory()
    measured = reset_peak_rss()
    read_before = sum(BYTES_READ.values())
    start = time.monotonic()
    if phase == "collect":
        args = (*args, _chunks(deps))
    figures = fn(layout, *args)
    figures.update(
        phase=phase,
        task=name,
        bytes_read=sum(BYTES_READ.values()) - read_before,
        seconds=round(time.monotonic() - start, 3),
        peak_rss=peak_rss() if measured else None,
    )
    write_bytes(marker, json.dumps(figures, sort_keys=True).encode())
    release_memory()
    return figures


def _chunks(deps: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    chunks: dict[str, dict[int, int]] = {IMAGES: {}, PARAGRAPHS: {}}
    for figures in deps:
        if figures.get("phase") in chunks:
            chunks[figures["phase"]][int(figures["task"])] = figures["chunks"]
    return {kind: [by_partition[k] for k in sorted(by_partition)] for kind, by_partition in chunks.items()}


class _Graph:
    """Submits tasks with their dependencies; Ray runs each when the tasks it depends on have finished."""

    def __init__(self, layout: Layout) -> None:
        import ray

        self.ray = ray
        self.layout = layout
        self.remote = ray.remote(num_cpus=1, max_retries=1)(ray_task(_task))
        self.layout_ref = ray.put(layout)
        self.refs: list[Any] = []

    def marker(self, phase: str, name: str) -> str:
        return self.layout.path("_tasks", f"{phase}.{name}.json")

    def submit(
        self, phase: str, name: str, fn: Callable[..., dict], args: tuple, deps: Sequence[Any] = ()
    ) -> Any:
        ref = self.remote.remote(phase, name, self.marker(phase, name), fn, self.layout_ref, args, *deps)
        self.refs.append(ref)
        return ref

    def wait(self) -> list[dict[str, Any]]:
        return self.get(self.refs)

    def get(self, refs: list[Any]) -> list[dict[str, Any]]:
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            line = next((s for s in str(cause).splitlines() if s.strip()), type(cause).__name__)
            raise DedupError(f"dedup failed: {type(cause).__name__}: {line}") from exc


class _InProcess(_Graph):
    """Runs each task at once in this process, in submission order (tests and debugging, no Ray)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.refs = []

    def submit(
        self, phase: str, name: str, fn: Callable[..., dict], args: tuple, deps: Sequence[Any] = ()
    ) -> Any:
        try:
            figures = _task(phase, name, self.marker(phase, name), fn, self.layout, args, *deps)
        except Exception as exc:  # noqa: BLE001 - reported like a failed Ray task
            raise DedupError(f"dedup failed: {type(exc).__name__}: {exc}") from exc
        self.refs.append(figures)
        return figures

    def get(self, refs: list[Any]) -> list[dict[str, Any]]:
        return refs


def run_dedup(
    units: Sequence[SignalsUnit], config: DedupConfig, cache_dir: str, in_process: bool = False
) -> DedupRun:
    """Drop lists for the corpus of `units` (in this order: a unit's ordinal is its index) under `cache_dir` (a
    local path or fsspec URL), from the cache when this config and these signals were seen before. Ray must be
    initialised, unless `in_process`: then every task runs here, one after the other."""
    directory = join(cache_dir, decisions_key(units, config))
    layout = plan_layout(directory, list(units), config)
    done = join(directory, DONE)
    if exists(done):
        return DedupRun(directory, True, layout)
    graph = _InProcess(layout) if in_process else _Graph(layout)
    # Every phase function takes the layout first: `submit` passes it from the object store.
    maps = [graph.submit("map", f"{u:07d}", mapper.map_unit, (u, unit)) for u, unit in enumerate(units)]
    exact: list[Any] = []
    for rule in layout.exact:
        previous = list(exact)
        exact += [
            graph.submit(rule, f"{k:05d}", reduce.reduce_exact, (rule, k), maps + previous)
            for k in range(layout.partitions[rule])
        ]
    counts = [
        graph.submit(kind, f"{k:05d}", reduce.reduce_counts, (kind, k, rule.name, limit), maps)
        for kind, rule, limit in (
            (IMAGES, IMAGE_FREQUENCY, config.image_url_max_docs),
            (PARAGRAPHS, DOMAIN_PARAGRAPH, config.paragraph_max_docs_per_domain),
        )
        for k in range(layout.partitions[kind])
    ]
    groups = range(layout.groups)
    members = [{u: units[u] for u in layout.group_units(g)} for g in groups]
    near: list[Any] = []
    last_round = -1
    if config.near_duplicates:
        bands = [
            graph.submit(BANDS, f"{k:05d}", reduce.reduce_bands, (k,), maps)
            for k in range(layout.partitions[BANDS])
        ]
        verify_a = [
            graph.submit("verify_a", f"{g:05d}", pairs.verify_a, (g, members[g]), bands + exact)
            for g in groups
        ]
        near = [
            graph.submit("verify_b", f"{g:05d}", pairs.verify_b, (g, members[g]), verify_a) for g in groups
        ]
        # Rounds of connected components until one sends no message (the driver sees only the counts).
        while last_round < 0 or sum(f["messages"] for f in graph.get(near)):
            last_round += 1
            near = [
                graph.submit("cluster", f"{last_round}.{g:05d}", pairs.cluster_round, (g, last_round), near)
                for g in groups
            ]
    names = [
        graph.submit("names", f"{g:05d}", drops.names, (g, members[g], last_round), exact + near)
        for g in groups
    ]
    for g in groups:
        graph.submit("collect", f"{g:05d}", drops.collect, (g, members[g]), names + counts)
    figures = graph.wait()
    summary = {"partitions": layout.partitions, "groups": layout.groups, "tasks": len(figures)}
    write_bytes(done, json.dumps(summary, sort_keys=True).encode())
    return DedupRun(directory, False, layout, figures)
