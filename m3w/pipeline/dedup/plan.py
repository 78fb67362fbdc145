"""What a dedup + decide run needs at a given corpus size: tasks, bytes moved, memory per task.

    python -m m3w.pipeline.dedup.plan [DOCUMENTS ...]      (default: 141 M and 41 B documents)

Computed from the default `DedupConfig` and the per-row costs `bench/scale.py` measured (MEASURED below: update
them from its `measured:` line when the code changes). The README's "Scale" table is this module's output.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from m3w.pipeline.dedup.keys import EXACT_RULES
from m3w.pipeline.dedup.layout import BANDS, IMAGES, PARAGRAPHS, partitions_for
from m3w.pipeline.filters.config import DedupConfig

# A Common Crawl WARC file holds ~30 k HTML pages (CC-MAIN-2024-22: 2.7 B pages in 90 k files): one unit each.
UNIT_DOCUMENTS = 30_000

# bench/scale.py at 1 M documents (10 k per unit), Ray on 2 CPUs, 2026-12-01: key rows per document of each kind
# (the corpus is calibrated on the webcorpus), bytes per document, and the peak RSS of each kind of task as a
# worker baseline plus bytes per row it holds (rows: key rows for a reducer, documents for the others).
MEASURED = {
    "rows_per_document": {
        "dedup.same_url": 1.0,
        "dedup.exact_text": 1.03,
        "dedup.same_image_set": 0.87,
        BANDS: 14.0,
        IMAGES: 3.35,
        PARAGRAPHS: 34.84,
    },
    "signal_bytes_per_document": 1733,
    "key_bytes_per_document": 577,
    "read_bytes_per_document": 3650,
    "worker_baseline_bytes": 344838144,
    "bytes_per_row": {"exact": 175, BANDS: 36, IMAGES: 97, PARAGRAPHS: 101},
    "map_bytes_per_document": 5235,
    "group_bytes_per_document": 1529,
    "decide_bytes": 405430272,  # streams its unit: flat in the unit's size
    "cluster_rounds": 3,
    "near_pairs_per_document": 0.051,
}


PIECE_OVERHEAD_BYTES = 40  # header and the two offsets a reader fetches per piece (schemas/filter_cache.py)


@dataclass(frozen=True)
class Need:
    phase: str
    tasks: int
    memory: int  # peak bytes of its largest task


def needs(documents: int, config: DedupConfig | None = None) -> list[Need]:
    """Tasks and largest-task memory of every phase of a dedup + decide run over `documents` documents."""
    config = config or DedupConfig()
    m = MEASURED
    base = m["worker_baseline_bytes"]
    units = math.ceil(documents / UNIT_DOCUMENTS)
    groups = math.ceil(documents / config.group_documents)
    out = [Need("map (unit)", units, base + UNIT_DOCUMENTS * m["map_bytes_per_document"])]
    for kind, per_doc in m["rows_per_document"].items():
        rows = documents * per_doc
        partitions = partitions_for(math.ceil(rows), config)
        per_row = m["bytes_per_row"]["exact" if kind in {r.name for r in EXACT_RULES} else kind]
        held = min(rows / partitions, config.reducer_rows)
        out.append(Need(f"reduce {kind} (hash partition)", partitions, int(base + held * per_row)))
    group_memory = int(base + config.group_documents * m["group_bytes_per_document"])
    for phase in ("verify_a", "verify_b", "names", "collect"):
        out.append(Need(f"{phase} (unit group)", groups, group_memory))
    out.append(Need("cluster (unit group × round)", groups * m["cluster_rounds"], group_memory))
    out.append(Need("decide (unit)", units, m["decide_bytes"]))
    return out


def slices(documents: int, config: DedupConfig | None = None) -> int:
    """How many (writer file, partition) pieces the run's tasks read: every exchange is all-to-all, so this grows
    with the square of the corpus. Each piece costs a reader three small requests (header, offsets, rows)."""
    config = config or DedupConfig()
    m = MEASURED
    units = math.ceil(documents / UNIT_DOCUMENTS)
    groups = math.ceil(documents / config.group_documents)
    partitions = {
        kind: partitions_for(math.ceil(documents * n), config) for kind, n in m["rows_per_document"].items()
    }
    exact = [partitions[r.name] for r in EXACT_RULES]
    total = units * sum(partitions.values())  # map → reduce
    total += sum(exact[i] * exact[j] for i in range(len(exact)) for j in range(i + 1, len(exact)))  # forwards
    total += (partitions[BANDS] + sum(exact)) * groups  # → verify_a
    total += groups * groups * (2 + m["cluster_rounds"])  # → verify_b, cluster rounds, names
    total += (partitions[IMAGES] + partitions[PARAGRAPHS] + groups) * groups  # → collect
    return total


def _size(n: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def markdown(
    sizes: tuple[int, ...] = (141_000_000, 41_000_000_000), config: DedupConfig | None = None
) -> str:
    """The README's table: one column per corpus size."""
    config = config or DedupConfig()
    m = MEASURED
    plans = {n: needs(n, config) for n in sizes}
    head = "| | " + " | ".join(f"{_count(n)} documents" for n in sizes) + " |"
    rows = [head, "|---|" + "---|" * len(sizes)]

    def row(label: str, values: list[str]) -> None:
        rows.append(f"| {label} | " + " | ".join(values) + " |")

    row("tasks", [f"{_count(sum(p.tasks for p in plans[n]))}" for n in sizes])
    row("signals written (per unit, cached)", [_size(n * m["signal_bytes_per_document"]) for n in sizes])
    row("keys shuffled (written once, read once)", [_size(n * m["key_bytes_per_document"]) for n in sizes])
    row("bytes read by all tasks", [_size(n * m["read_bytes_per_document"]) for n in sizes])
    row(
        "pieces read (3 requests each; offsets and headers)",
        [f"{_count(slices(n, config))} ({_size(slices(n, config) * PIECE_OVERHEAD_BYTES)})" for n in sizes],
    )
    for i, need in enumerate(plans[sizes[0]]):
        values = [f"{_count(plans[n][i].tasks)} × {plans[n][i].memory / 2**20:,.0f} MB" for n in sizes]
        row(need.phase, values)
    row("largest task", [f"{max(p.memory for p in plans[n]) / 2**20:,.0f} MB" for n in sizes])
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown(tuple(int(float(a)) for a in sys.argv[1:]) or (141_000_000, 41_000_000_000)))
