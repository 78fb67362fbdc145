"""Benchmark the image store and shard writing as the store grows: memory and lookup cost must not follow it.

    .venv/bin/python bench/store_scale.py [--sizes 33000,200000,1000000] [--out DIR]

The store is grown through generations to each size (≥ 3 sizes spanning ≥ 30×), in m3w's own format, written
with the store's own writer: rows files and blob shards of 10 k URLs (70 % with a stored image of 64 bytes, the
rest http_error/not_an_image/timeout), then one sorted index file per bucket. At each size, in fresh processes:

- a shards task: `m3w_unit` over 400 synthetic documents whose 4,000 image URLs are drawn from the store: its
  peak RSS and the time of its cold lookup of those URLs;
- the images driver, planning only: `run_images` over every URL of the store as URL lists (all already final,
  so it plans and fetches nothing): its peak RSS (Ray tasks do the reading; the driver holds counts);
- files per million images in the store (as `m3w images` leaves it: before this size's compaction), those of
  its current generation; the superseded files it keeps a generation for earlier readers are counted apart;
- the `m3w store compact` driver that then moves this size's new images into compaction shards: its peak RSS
  (its tasks hold at most `plan_rows_per_task` records each).

Then shard writing with 1 and 2 workers (wall time; it should fall). The last line is
`store_rss_exponent=<f> driver_rss_exponent=<f> files_per_million_images=<f>` (exponents: log-log slope of peak
RSS against store size). Peak RSS is the VmHWM of a process that does only that job and then exits (not
`ru_maxrss`, which a child inherits from the benchmark process that forked it, the store's builder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from m3w.pipeline.image_filters.duplicates import ROWS_PER_TASK  # noqa: E402
from m3w.pipeline.images import ImagesConfig  # noqa: E402
from m3w.pipeline.imagestore import BlobShardWriter, ImageStore, index_generation, write_rows  # noqa: E402
from m3w.schemas import images as spec  # noqa: E402
from m3w.schemas.documents import DOCUMENT_SCHEMA  # noqa: E402

URLS_PER_SHARD = 10_000
SHARDS_TASK_DOCS, IMAGES_PER_DOC = 400, 10
# Shard writing: units big enough that a unit's work, not a Ray worker's start, sets the wall time.
WRITING_UNITS, WRITING_DOCS = 8, 1500
WORDS = "the of and to in is was for on that with as by at from his her which this be are an".split()


def url_of(i: int) -> str:
    return f"https://cdn{i % 997}.img{i % 13}.example.com/photos/{i:010d}/picture.jpg"


def grow(store: ImageStore, start: int, stop: int, generation: int) -> None:
    """URLs [start, stop) as one new generation, written the way fetch units write them."""
    shards = []
    for unit, first in enumerate(range(start, stop, URLS_PER_SHARD)):
        shard = spec.shard_id(generation, unit)
        blobs = BlobShardWriter(store, shard)
        rows = []
        for i in range(first, min(first + URLS_PER_SHARD, stop)):
            row = {"url": url_of(i), "attempts": 1, "fetched_at": "2026-01-01T00:00:00+00:00"}
            kind = i % 10
            if kind < 7:
                sha, length = blobs.add(b"\xff\xd8\xff\xe0" + i.to_bytes(8, "little") * 7 + b"\xff\xd9")
                row.update(status="ok", http_status=200, resized_sha256=sha, blob_length=length,
                           original_width=640, original_height=480, original_format="jpeg", resized_width=320,
                           resized_height=320)  # fmt: skip
            elif kind == 7:
                row.update(status="http_error", http_status=404, error_message="HTTP 404")
            elif kind == 8:
                row.update(status="not_an_image", http_status=200, error_message="starts with b'<html>'")
            else:
                row.update(status="timeout", attempts=3, error_message="read timed out")
            rows.append(row)
        write_rows(store, shard, rows, blobs.close())
        shards.append(shard)
    index_generation(store, generation, shards)


def documents(path: Path, urls: list[str], seed: int) -> None:
    rng = random.Random(seed)
    docs = []
    for d in range(len(urls) // IMAGES_PER_DOC):
        nodes = []
        for k, url in enumerate(urls[d * IMAGES_PER_DOC : (d + 1) * IMAGES_PER_DOC]):
            text = " ".join(rng.choice(WORDS) for _ in range(40))
            nodes.append(
                {"kind": "text", "node_index": 2 * k, "text": text.capitalize() + ".", "block": "paragraph"}
            )
            nodes.append({"kind": "image", "node_index": 2 * k + 1, "url": url, "alt": "a picture"})
        docs.append(
            {"doc_id": f"doc{seed}-{d:06d}", "url": f"https://site.example/{seed}/{d}", "nodes": nodes}
        )
    pq.write_table(pa.Table.from_pylist(docs, schema=DOCUMENT_SCHEMA), path)


# ---------------------------------------------------------------------------------------------- child jobs


def peak_rss_mb() -> float:
    """This process's peak resident set since it started (VmHWM; reset by exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_shards_task(store: str, docs: str, out: str) -> dict:
    """One shards unit, as a Ray worker runs it; returns its lookup time and peak RSS."""
    from m3w.config import to_dict
    from m3w.pipeline.shards import ShardsConfig
    from m3w.pipeline.shards.interleaved import m3w_unit, stored_images
    from m3w.pipeline.shards.samples import cached_tokenizer
    from m3w.schemas.documents import iter_documents

    config = ShardsConfig()
    cached_tokenizer(config.tokenizer)
    image_store = ImageStore(store)
    doc_list = list(iter_documents(docs))
    start = time.perf_counter()
    found = stored_images(image_store, doc_list)  # the cold lookup: fences and blocks read for the first time
    lookup = time.perf_counter() - start
    _, counts = m3w_unit({"input": docs, "store": store, "store_generation": image_store.generation, "uid": "bench",
                          "out": out, "config": to_dict(config),
                          "datasets": [{"dataset": "m3w", "name": "m3w", "dedup": False}]})  # fmt: skip
    return {"lookup_s": lookup, "urls": sum(len(d["nodes"]) // 2 for d in doc_list), "found": len(found),
            "samples": counts.get("samples", 0), "rss_mb": peak_rss_mb()}  # fmt: skip


def child_images_driver(store: str, lists: list[str]) -> dict:
    from m3w.pipeline.images import ImagesConfig, run_images
    from m3w.pipeline.ray_runner import init_ray

    init_ray(num_cpus=2)
    start = time.perf_counter()
    summary = run_images(lists, store, ImagesConfig(), workers=2)
    return {"seconds": time.perf_counter() - start, "urls": summary.urls, "final": summary.already_final,
            "exhausted": summary.retries_exhausted, "fetched": summary.fetched, "rss_mb": peak_rss_mb()}  # fmt: skip


def child_compaction(store: str) -> dict:
    from m3w.pipeline.compaction import compact_store
    from m3w.pipeline.ray_runner import init_ray

    init_ray(num_cpus=2)
    start = time.perf_counter()
    counts = compact_store(store, workers=2)
    return {"seconds": time.perf_counter() - start, "copied_images": counts.get("copied_images", 0),
            "rss_mb": peak_rss_mb()}  # fmt: skip


def child_shard_writing(store: str, inputs: str, out: str, workers: int) -> dict:
    from m3w.pipeline.ray_runner import init_ray
    from m3w.pipeline.shards import ShardsConfig, run_m3w_shards

    init_ray(num_cpus=workers)
    start = time.perf_counter()
    result = run_m3w_shards([inputs], store, out, ShardsConfig(), workers=workers)
    return {"seconds": time.perf_counter() - start, "samples": result["totals"]["samples"]}


def run_child(*args: str) -> dict:
    """Run one child job in a fresh Python process (its own peak RSS, cold caches) and return its result."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- main


def projection(images: float = 353e6, ok_share: float = 0.7) -> str:
    """What a store of `images` stored images needs, from the layout's own constants (README "Scale")."""
    urls = images / ok_share
    units = -(-int(urls) // ImagesConfig().urls_per_unit)
    buckets = spec.DEFAULT_BUCKETS
    partitions = -(-int(urls) // ROWS_PER_TASK)  # pHash count files (one per partition of the rows' pHashes)
    # Per fetch unit: blob shard and rows file; then index files, pHash count files, _store/_image_filters/_done.
    files = 2 * units + buckets + partitions + 3
    records = urls / buckets
    fence = spec.index_fence_size(int(records))
    block = spec.FENCE_STRIDE * spec.INDEX_RECORD.itemsize
    return (f"{images / 1e6:.0f} M images ({ok_share:.0%} of {urls / 1e6:.0f} M URLs): {units:,} blob shards + {units:,} "
            f"rows files + {buckets} index files + {partitions} pHash count files = "
            f"{files:,} files ({files / (images / 1e6):.0f} per M images); "
            f"per index file {records / 1e6:.2f} M records = {records * spec.INDEX_RECORD.itemsize / 1e6:.0f} MB, fence "
            f"{fence / 1e3:.0f} KB; a shards task reads {buckets * fence / 1e6:.1f} MB of fences once per process and "
            f"{block / 1e3:.0f} KB of index per image URL")  # fmt: skip


def slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="33000,200000,1000000")
    parser.add_argument("--out", default=None, help="Work folder (default: a temp folder, removed after).")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        root = Path(tmp)
        store = ImageStore(str(root / "images"))
        store.create(ImagesConfig().store_settings(), spec.DEFAULT_BUCKETS)
        rows, grown = [], 0
        for generation, size in enumerate(sizes, start=1):
            start = time.perf_counter()
            grow(store, grown, size, store.generation + 1)  # after the compaction of the size before
            grown = size
            build_s = time.perf_counter() - start
            # The shards task: a fixed number of URLs drawn from the whole store.
            urls = [
                url_of(i)
                for i in random.Random(generation).sample(range(size), SHARDS_TASK_DOCS * IMAGES_PER_DOC)
            ]
            docs = root / f"docs-{generation}.parquet"
            documents(docs, urls, generation)
            task = run_child("shards_task", store.root, str(docs), str(root / f"out-{generation}"))
            # The images driver over every URL of the store, 100 k URLs per list file.
            lists = []
            for first in range(0, size, 100_000):
                path = root / f"urls-{generation}-{first:09d}.txt"
                path.write_text("".join(url_of(i) + "\n" for i in range(first, min(first + 100_000, size))))
                lists.append(str(path))
            driver = run_child("images_driver", store.root, *lists)
            every = store.files()  # before this size's compaction: as `m3w images` leaves the store
            superseded = store.state().superseded_paths()
            kept = {f for f in every if f in superseded or f.rsplit("/", 1)[0] in superseded}
            files = [f for f in every if f not in kept]
            compaction = run_child("compaction", store.root)
            images = int(size * 0.7)
            row = {"urls": size, "files": len(files), "files_per_million_images": len(files) / (images / 1e6),
                   "task_rss_mb": task["rss_mb"], "lookup_s": task["lookup_s"], "lookup_urls": task["urls"],
                   "driver_rss_mb": driver["rss_mb"], "driver_s": driver["seconds"], "build_s": build_s,
                   "compaction_rss_mb": compaction["rss_mb"]}  # fmt: skip
            assert task["found"] == int(sum(1 for u in urls if int(u.split("/")[4]) % 10 < 7)), task
            assert (
                driver["urls"] == size == driver["final"] + driver["exhausted"] and driver["fetched"] == 0
            ), driver
            rows.append(row)
            print(f"store {size:>9,} URLs ({len(files):,} files, {row['files_per_million_images']:.0f} per M images, "
                  f"+ {len(kept):,} superseded kept for readers of the generation before; "
                  f"grown in {build_s:.1f}s): shards task peak RSS {task['rss_mb']:.0f} MB, cold lookup of "
                  f"{task['urls']:,} URLs {task['lookup_s']:.2f}s ({1e6 * task['lookup_s'] / task['urls']:.0f} us/URL); "
                  f"images driver (planning {size:,} URLs, {driver['seconds']:.1f}s) peak RSS "
                  f"{driver['rss_mb']:.0f} MB; store compact driver ({compaction['copied_images']:,} images moved, "
                  f"{compaction['seconds']:.1f}s) peak RSS {compaction['rss_mb']:.0f} MB", flush=True)  # fmt: skip
            for path in lists:
                os.unlink(path)
        # Shard writing in parallel: 1 then 2 workers over the same input files (byte-identical outputs, wall
        # time falls).
        inputs = root / "inputs"
        inputs.mkdir()
        for k in range(WRITING_UNITS):
            sample = random.Random(100 + k).sample(range(sizes[-1]), WRITING_DOCS * IMAGES_PER_DOC)
            documents(inputs / f"part-{k}.parquet", [url_of(i) for i in sample], 100 + k)
        walls = {}
        for workers in (1, 2):
            walls[workers] = run_child("shard_writing", store.root, str(inputs), str(root / f"w{workers}"),
                                       str(workers))["seconds"]  # fmt: skip
        written = sorted((root / "w2" / "m3w").glob("*.*"))
        same = all((root / "w1" / "m3w" / p.name).read_bytes() == p.read_bytes() for p in written)
        print(f"shard writing, {WRITING_UNITS} units of {WRITING_DOCS} documents: 1 worker {walls[1]:.1f}s, 2 workers "
              f"{walls[2]:.1f}s ({walls[1] / walls[2]:.2f}x), outputs byte-identical: {same} "
              f"(CPUs: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    xs = [r["urls"] for r in rows]
    store_exp = slope(xs, [r["task_rss_mb"] for r in rows])
    driver_exp = slope(xs, [r["driver_rss_mb"] for r in rows])
    lookup_exp = slope(xs, [r["lookup_s"] for r in rows])
    compaction_exp = slope(xs, [r["compaction_rss_mb"] for r in rows])
    print(f"lookup time exponent {lookup_exp:.3f} (per URL, cold); sizes span {xs[-1] / xs[0]:.0f}x")
    print(f"compaction_driver_rss_exponent={compaction_exp:.3f}")
    print("projection: " + projection())
    print(f"store_rss_exponent={store_exp:.3f} driver_rss_exponent={driver_exp:.3f} "
          f"files_per_million_images={rows[-1]['files_per_million_images']:.1f}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        job, job_args = sys.argv[2], sys.argv[3:]
        if job == "shards_task":
            result = child_shards_task(*job_args)
        elif job == "images_driver":
            result = child_images_driver(job_args[0], job_args[1:])
        elif job == "compaction":
            result = child_compaction(job_args[0])
        else:
            result = child_shard_writing(job_args[0], job_args[1], job_args[2], int(job_args[3]))
        print(json.dumps(result))
    else:
        main()
