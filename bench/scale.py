"""Scale benchmark of corpus-wide dedup + decide: does memory per task stay flat as the corpus grows?

    .venv/bin/python bench/scale.py [--sizes 30000,100000,300000,1000000] [--unit-docs 10000]

For each size, Ray tasks write a synthetic corpus in m3w's formats (documents/ and the filter's cached signals,
one file per unit of `--unit-docs` documents), then the real `run_dedup` and `decide_unit` run on it.

The corpus, calibrated on the webcorpus signals (1,311 pages: text nodes per document median 16, mean 37;
image nodes median 1-2, mean 3.3; image URLs of ~100 characters): 10% exact copies (same text, images, other
URL), 5% near copies (~6% of MinHash values changed, one paragraph and one image changed), 3% refetches (same
URL, one paragraph changed), the rest distinct; domains Zipf-distributed; each domain has boilerplate
paragraphs that half its pages repeat; image URLs are 60% the page's own, 25% from a Zipf pool of its domain's,
15% from a Zipf pool shared by the web. Paragraph text is short: decide's cost per node is what is measured.

Per size it prints wall time, bytes read by all dedup and decide tasks over the signal bytes (documents/ that
decide reads is not counted), and the peak RSS of the largest task and of the driver. Peak RSS per task: each
task restarts its process's peak count (Linux `clear_refs` 5 → `VmHWM`) when it starts and reads it when it
ends, so a reused Ray worker reports the task it ran, including the worker's own baseline. The last line:
`rss_exponent=<f> read_amplification=<f> time_exponent=<f> max_task_rss_mb=<f>` (exponents: log-log slopes
across sizes; read amplification: the largest across sizes; max task RSS: at the largest size). Targets:
rss_exponent <= 0.1, read_amplification <= 3, time_exponent <= 1.1, max_task_rss_mb <= 1024 at 1 M documents.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m3w.config import load_config  # noqa: E402
from m3w.pipeline.dedup import SignalsUnit, run_dedup  # noqa: E402
from m3w.pipeline.dedup.keys import mix64  # noqa: E402
from m3w.pipeline.dedup.run import peak_rss, release_memory, reset_peak_rss  # noqa: E402
from m3w.pipeline.filter import DecideTask, decide_unit  # noqa: E402
from m3w.pipeline.filters import FilterConfig  # noqa: E402
from m3w.pipeline.ray_runner import init_ray  # noqa: E402
from m3w.schemas import filter_cache  # noqa: E402
from m3w.schemas.documents import DOCUMENT_SCHEMA  # noqa: E402
from m3w.schemas.filter_cache import SIGNALS_SCHEMA, write_signals  # noqa: E402

# Dedup only: the quality filters are per-unit work whose cost does not depend on the corpus size. Reduce tasks
# of 500 k key rows and groups of 50 k documents (defaults: 2 M and 250 k), so that even the smallest corpus
# fills its tasks: the curve then shows how memory per task grows with the corpus, not tasks filling up.
CONFIG = [
    "image.enabled=false",
    "paragraph.enabled=false",
    "document.enabled=false",
    "dedup.reducer_rows=500000",
    "dedup.group_documents=50000",
]
BANDS, ROWS = 14, 8
NUM_PERM = BANDS * ROWS
TEXT = "Lorem ipsum dolor sit amet."


# ------------------------------------------------------------------------------------------------ corpus


def h(*parts: Any) -> np.ndarray:
    """A 64-bit hash of (broadcast) integer arrays."""
    arrays = np.broadcast_arrays(*(np.asarray(p, dtype=np.int64) for p in parts))
    out = np.full(arrays[0].shape, 0x5EED, dtype=np.int64)
    for part in arrays:
        out = mix64(out, part)
    return out


def uniform(*parts: Any) -> np.ndarray:
    return (h(*parts).view(np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def below(n: int | np.ndarray, *parts: Any) -> np.ndarray:
    return (uniform(*parts) * n).astype(np.int64)


def zipf(n: int, u: np.ndarray, s: float = 1.1) -> np.ndarray:
    cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** s)
    return np.searchsorted(cdf, u * cdf[-1])


EXACT, NEAR, REFETCH, FRESH = 0, 1, 2, 3


def kinds(i: np.ndarray) -> np.ndarray:
    r = below(1000, i, 1)
    kind = np.select([r < 100, r < 150, r < 180], [EXACT, NEAR, REFETCH], FRESH)
    return np.where(i < 100, FRESH, kind)


def sources(i: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """The fresh document each copy copies (the first fresh one of 8 random earlier candidates)."""
    source = i.copy()
    pending = kind != FRESH
    for t in range(8):
        candidate = below(np.maximum(i, 1), i, 2 + t)
        take = pending & (kinds(candidate) == FRESH)
        source[take] = candidate[take]
        pending &= ~take
    return source


def ragged(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner row, position within the row) of each element of rows of `lengths` elements."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, np.arange(int(lengths.sum())) - start


def make_unit(directory: str, size: int, ordinal: int, start: int, n: int) -> dict[str, Any]:
    """Documents and signals of the global documents [start, start + n) of a corpus of `size` documents."""
    i = np.arange(start, start + n, dtype=np.int64)
    kind = kinds(i)
    source = sources(i, kind)
    kind = np.where(source == i, FRESH, kind)
    root = source  # the content a document carries (its own when fresh)
    domains = max(100, size // 50)
    domain = zipf(domains, uniform(i, 20))
    domain = np.where(kind == REFETCH, zipf(domains, uniform(source, 20)), domain)
    root_domain = zipf(domains, uniform(root, 20))
    changed = kind != EXACT  # near copies and refetches change a little of what they copy
    changed &= kind != FRESH

    z = (uniform(root, 21) + uniform(root, 22) + uniform(root, 23) + uniform(root, 24) - 2) * math.sqrt(3)
    paragraphs = np.clip(np.round(np.exp(math.log(16) + 1.3 * z)), 1, 300).astype(np.int64)
    images = np.minimum(np.floor(np.log1p(-uniform(root, 25)) / math.log(1 - 0.23)).astype(np.int64), 60)

    # text nodes: boilerplate of the content's domain in the first four, the last one changed by edits
    p_doc, p = ragged(paragraphs)
    boiler = (p < 4) & (below(2, root[p_doc], 26, p) == 0)
    p_hash = np.where(boiler, h(root_domain[p_doc], 27, p), h(root[p_doc], 28, p))
    edited = changed[p_doc] & (p == paragraphs[p_doc] - 1)
    p_hash = np.where(edited, h(i[p_doc], 29), p_hash)
    words = 5 + below(60, root[p_doc], 30, p)

    # image nodes
    g_doc, g = ragged(images)
    category = below(100, root[g_doc], 31, g)
    image_id = np.select(
        [category < 60, category < 85],
        [h(root[g_doc], 32, g), h(root_domain[g_doc], 33, zipf(50, uniform(root[g_doc], 34, g)))],
        h(35, zipf(100_000, uniform(root[g_doc], 36, g))),
    )
    image_id = np.where((kind[g_doc] == NEAR) & (g == 0), h(i[g_doc], 37), image_id)

    signature = (h(root[:, None], 38, np.arange(NUM_PERM)) & 0xFFFFFFFF).astype(np.uint32)
    edit = changed[:, None] & (below(16, i[:, None], 39, np.arange(NUM_PERM)) == 0)
    signature = np.where(
        edit, (h(i[:, None], 40, np.arange(NUM_PERM)) & 0xFFFFFFFF).astype(np.uint32), signature
    )
    bands = np.zeros((n, BANDS), dtype=np.int64)
    for b in range(BANDS):
        key = h(np.full(n, b), 41)
        for r in range(ROWS):
            key = mix64(key, signature[:, b * ROWS + r].astype(np.int64))
        bands[:, b] = key
    text_hash = np.where(changed, h(i, 42), h(root, 42))
    page = np.where(kind == REFETCH, source, i)
    url_hash = h(page, 43)
    urls = [
        f"https://www.site{d}.example.com/articles/{u & 0xFFFFFFFFFFFF:012x}/index.html"
        for d, u in zip(domain, url_hash)
    ]
    image_urls = [
        f"https://cdn.site{d}.example.com/images/2024/{u & 0xFFFFFFFFFFFF:012x}/full-size-photo.jpg"
        for d, u in zip(root_domain[g_doc], image_id)
    ]
    # The hash of each document's set of distinct image URLs: a wrapping sum over its distinct ones.
    order = np.lexsort((image_id, g_doc))
    sorted_doc, sorted_id = g_doc[order], image_id[order]
    distinct = np.ones(len(order), dtype=bool)
    distinct[1:] = (sorted_doc[1:] != sorted_doc[:-1]) | (sorted_id[1:] != sorted_id[:-1])
    set_hash = np.zeros(n, dtype=np.int64)
    with np.errstate(over="ignore"):
        np.add.at(set_hash, sorted_doc[distinct], h(sorted_id[distinct], 50))
    image_set_hash = pa.array(set_hash, mask=images == 0)
    seconds = np.datetime64("2019-01-01T00:00:00") + below(6 * 365 * 86400, i, 44).astype("timedelta64[s]")
    dates = [f"{d}Z" for d in np.datetime_as_string(seconds, unit="s")]
    doc_ids = [
        f"{a & 0xFFFFFFFFFFFFFFFF:016x}{b & 0xFFFFFFFFFFFFFFFF:016x}"
        for a, b in zip(h(size, i, 45).tolist(), h(size, i, 46).tolist())
    ]
    domain_names = [f"site{d}.example.com" for d in domain]

    p_off = np.concatenate([[0], np.cumsum(paragraphs)]).astype(np.int32)
    g_off = np.concatenate([[0], np.cumsum(images)]).astype(np.int32)
    floats = {
        name: uniform(root[p_doc], 47 + k, p).astype(np.float32) * scale
        for k, (name, scale) in enumerate(
            [
                ("char_repetition", 0.1),
                ("word_repetition", 0.1),
                ("special_chars", 0.3),
                ("stopwords", 0.6),
                ("flagged_words", 0.0),
            ]
        )
    }
    node_stats = pa.StructArray.from_arrays(
        [p.astype(np.int32), p_hash, words * 6, words, *floats.values()],
        names=["node_index", "hash", "chars", "words", *floats],
    )
    image_nodes = pa.StructArray.from_arrays(
        [(paragraphs[g_doc] + g).astype(np.int32), image_id], names=["node_index", "url_hash"]
    )
    sig_offsets = np.arange(0, (n + 1) * NUM_PERM, NUM_PERM, dtype=np.int32)
    band_offsets = np.arange(0, (n + 1) * BANDS, BANDS, dtype=np.int32)
    signals = pa.Table.from_arrays(
        [
            pa.array(doc_ids),
            url_hash,
            pa.array(domain_names),
            pa.array(dates),
            pa.array(["en"] * n),
            np.full(n, 0.95, np.float32),
            text_hash,
            image_set_hash,
            pa.ListArray.from_arrays(g_off, image_nodes),
            pa.ListArray.from_arrays(band_offsets, pa.array(bands.reshape(-1))),
            pa.ListArray.from_arrays(sig_offsets, pa.array(signature.reshape(-1))),
            pa.ListArray.from_arrays(p_off, node_stats),
        ],
        schema=SIGNALS_SCHEMA,
    )
    name = f"unit{ordinal:05d}"
    signals_path = os.path.join(directory, "signals", f"{name}.parquet")
    write_signals(signals, signals_path)

    text_nodes = {
        "kind": ["text"] * len(p),
        "node_index": p.astype(np.int32),
        "text": [TEXT] * len(p),
        "url": None,
    }
    image_node = {
        "kind": ["image"] * len(g),
        "node_index": (paragraphs[g_doc] + g).astype(np.int32),
        "text": None,
        "url": image_urls,
    }
    node_table = pa.concat_tables([_nodes(text_nodes, len(p)), _nodes(image_node, len(g))])
    # Each document's text nodes, then its images: order the concatenation by document.
    order = np.argsort(np.concatenate([p_doc, g_doc]), kind="stable")
    nodes = pa.ListArray.from_arrays(
        np.concatenate([[0], np.cumsum(paragraphs + images)]).astype(np.int32),
        pa.StructArray.from_arrays(
            [
                node_table[f.name].combine_chunks().take(order)
                for f in DOCUMENT_SCHEMA.field("nodes").type.value_type
            ],
            fields=list(DOCUMENT_SCHEMA.field("nodes").type.value_type),
        ),
    )
    columns = {
        "doc_id": pa.array(doc_ids),
        "url": pa.array(urls),
        "domain": pa.array(domain_names),
        "fetch_date": pa.array(dates),
        "nodes": nodes,
    }
    documents = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in DOCUMENT_SCHEMA}).cast(
        DOCUMENT_SCHEMA
    )
    docs_path = os.path.join(directory, "documents", f"{name}.parquet")
    os.makedirs(os.path.dirname(docs_path), exist_ok=True)
    pq.write_table(documents, docs_path, compression="zstd")
    return {
        "unit": SignalsUnit(name, signals_path, n, n * BANDS, len(g), len(p)),
        "documents": docs_path,
        "signal_bytes": os.path.getsize(signals_path),
        "document_bytes": os.path.getsize(docs_path),
    }


def _nodes(columns: dict[str, Any], n: int) -> pa.Table:
    fields = DOCUMENT_SCHEMA.field("nodes").type.value_type
    return pa.table(
        {
            f.name: pa.array(columns[f.name], f.type)
            if columns.get(f.name) is not None
            else pa.nulls(n, f.type)
            for f in fields
        }
    )


# ------------------------------------------------------------------------------------------------ runs


def decide_measured(task: DecideTask) -> dict[str, Any]:
    # (The module's counter, not a copy: Ray pickles this function's globals by value, modules by name.)
    release_memory()
    measured = reset_peak_rss()
    before = sum(filter_cache.BYTES_READ.values())
    start = time.monotonic()
    _, counts = decide_unit(task)
    figures = {
        "phase": "decide",
        "bytes_read": sum(filter_cache.BYTES_READ.values()) - before,
        "seconds": time.monotonic() - start,
        "peak_rss": peak_rss() if measured else None,
        "rows_in": counts["in.documents"],
        "out": counts["out.documents"],
    }
    release_memory()
    return figures


def run_size(root: Path, size: int, unit_docs: int, config: FilterConfig) -> dict[str, Any]:
    import ray

    directory = root / f"n{size}"
    make = ray.remote(num_cpus=1)(make_unit)
    starts = list(range(0, size, unit_docs))
    made = ray.get(
        [make.remote(str(directory), size, u, s, min(unit_docs, size - s)) for u, s in enumerate(starts)]
    )
    units = [m["unit"] for m in made]
    signal_bytes = sum(m["signal_bytes"] for m in made)

    reset_peak_rss()
    start = time.perf_counter()
    dedup = run_dedup(units, config.dedup, str(directory / "dedup"))
    dedup_s = time.perf_counter() - start
    decide = ray.remote(num_cpus=1, max_retries=0)(decide_measured)
    tasks = [
        DecideTask(
            u.name, m["documents"], u.signals, dedup.drops_file(u.name), str(directory / "filtered"), config
        )
        for u, m in zip(units, made)
    ]
    decided = ray.get([decide.remote(t) for t in tasks])
    wall = time.perf_counter() - start
    driver = peak_rss()
    figures = dedup.tasks + decided
    by_phase: dict[str, list[dict]] = defaultdict(list)
    for f in figures:
        by_phase[f["phase"]].append(f)
    largest = max(figures, key=lambda f: f["peak_rss"] or 0)
    result = {
        "size": size,
        "units": len(units),
        "tasks": len(figures),
        "wall": wall,
        "dedup_s": dedup_s,
        "signal_bytes": signal_bytes,
        "bytes_read": sum(f["bytes_read"] for f in figures),
        "key_bytes": sum(f.get("bytes_out", 0) for f in by_phase["map"]),
        "max_task_rss": largest["peak_rss"],
        "max_task_phase": largest["phase"],
        "driver_rss": driver,
        "kept": sum(f["out"] for f in decided),
    }
    print(
        f"{size:>9,} docs {len(units):>4} units {len(figures):>5} tasks | {wall:7.1f} s (dedup {dedup_s:6.1f} s) | "
        f"read {result['bytes_read'] / signal_bytes:4.2f}× signal bytes ({signal_bytes / size:5.0f} B/doc, keys "
        f"{result['key_bytes'] / size:5.0f} B/doc) | largest task {largest['peak_rss'] / 2**20:6.0f} MB "
        f"({largest['phase']}) | driver {driver / 2**20:5.0f} MB | kept {result['kept'] / size:.1%}",
        flush=True,
    )
    for phase, items in by_phase.items():
        rss = max(f["peak_rss"] or 0 for f in items) / 2**20
        rows = max(f.get("rows_in", 0) for f in items)
        read = sum(f["bytes_read"] for f in items) / size
        secs = sum(f["seconds"] for f in items)
        print(
            f"    {phase:<22} {len(items):>4} tasks  max rows in {rows:>10,}  peak {rss:6.0f} MB  read {read:6.0f} B/doc  {secs:7.1f} task-s"
        )
    result["measured"] = measured(size, len(units), figures, by_phase, signal_bytes, result)
    shutil.rmtree(directory)
    return result


def worker_baseline() -> int:
    """Peak RSS of a Ray worker that imported what dedup and decide tasks import, and did nothing else."""
    import m3w.pipeline.dedup.run  # noqa: F401
    import m3w.pipeline.filter  # noqa: F401

    reset_peak_rss()
    return peak_rss()


def measured(
    size: int,
    units: int,
    figures: list[dict],
    by_phase: dict[str, list[dict]],
    signal_bytes: int,
    result: dict,
) -> dict[str, Any]:
    """The per-row costs `m3w/pipeline/dedup/plan.py` keeps in MEASURED, from this size's tasks."""
    import ray

    base = max(ray.get([ray.remote(num_cpus=1)(worker_baseline).remote() for _ in range(2)]))

    def per_row(phases: list[str]) -> int:
        return max(
            max(0, (f["peak_rss"] or 0) - base) // max(f.get("rows_in", 0), 1)
            for p in phases
            for f in by_phase[p]
        )

    exact = [p for p in by_phase if p.startswith("dedup.")]
    groups = len(by_phase["verify_a"])
    return {
        "rows_per_document": {
            p: round(sum(f["rows_in"] for f in by_phase[p]) / size, 2)
            for p in [*exact, "bands", "images", "paragraphs"]
        },
        "signal_bytes_per_document": round(signal_bytes / size),
        "key_bytes_per_document": round(result["key_bytes"] / size),
        "read_bytes_per_document": round(result["bytes_read"] / size),
        "worker_baseline_bytes": base,
        "bytes_per_row": {
            "exact": per_row(exact),
            **{k: per_row([k]) for k in ("bands", "images", "paragraphs")},
        },
        "map_bytes_per_document": per_row(["map"]),
        "group_bytes_per_document": max(
            max(0, (f["peak_rss"] or 0) - base) * groups // size
            for p in ("verify_a", "verify_b", "names", "collect", "cluster")
            for f in by_phase[p]
        ),
        "decide_bytes": max(f["peak_rss"] or 0 for f in by_phase["decide"]),
        "cluster_rounds": len(by_phase["cluster"]) // groups,
        "near_pairs_per_document": round(sum(f["rows_out"] for f in by_phase["verify_b"]) / size, 3),
    }


def slope(x: list[float], y: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="30000,100000,300000,1000000")
    parser.add_argument("--unit-docs", type=int, default=10_000)
    parser.add_argument("--work-dir", default=None, help="Where the corpus is written (default: a temp dir).")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="Filter config override."
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    config = load_config(FilterConfig, None, [*CONFIG, *args.overrides])
    init_ray(args.ray_address)
    print(
        f"dedup config: reducer_rows={config.dedup.reducer_rows:,} group_documents={config.dedup.group_documents:,}"
    )
    with tempfile.TemporaryDirectory(prefix="m3w-scale-", dir=args.work_dir) as tmp:
        results = [run_size(Path(tmp), n, args.unit_docs, config) for n in sizes]
    docs = [r["size"] for r in results]
    rss_exponent = slope(docs, [r["max_task_rss"] for r in results])
    time_exponent = slope(docs, [r["wall"] for r in results])
    amplification = max(r["bytes_read"] / r["signal_bytes"] for r in results)
    print(f"measured: {results[-1]['measured']}")
    print(
        f"rss_exponent={rss_exponent:.3f} read_amplification={amplification:.3f} "
        f"time_exponent={time_exponent:.3f} max_task_rss_mb={results[-1]['max_task_rss'] / 2**20:.1f}"
    )


if __name__ == "__main__":
    main()
