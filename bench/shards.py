"""Benchmark `m3w shards m3w`: samples per CPU-second and bytes per sample, next to extract's pages/CPU-s.

    .venv/bin/python bench/shards.py [WARC]     (default: the webcorpus trafilatura WARC)

Documents come from extracting the WARC (the same run gives extract's rate, via bench/extract.py). Every image
URL of those documents is put into an image store with status ok, pointing at the webcorpus photos resized to
320×320, so the shard stage sees real pages with their real image counts and no network. Then one shard unit
(look up the images, tokenise, cut windows, read the image bytes, write the tars) runs in this process under a
CPU clock. The shard stage is not the bottleneck when its documents/CPU-s is well above extract's pages/CPU-s.
The last line is `samples_per_cpu_s=<float> bytes_per_sample=<float>`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault(
    "TOKENIZERS_PARALLELISM", "false"
)  # as under `m3w`: no idle Rust threads in the CPU clock

import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from m3w.config import to_dict  # noqa: E402
from m3w.pipeline.extract import ExtractConfig, iter_warc_documents  # noqa: E402
from m3w.pipeline.images import resize  # noqa: E402
from m3w.pipeline.imagestore import BlobShardWriter, ImageStore, index_generation, write_rows  # noqa: E402
from m3w.pipeline.io import write_parquet_atomic  # noqa: E402
from m3w.pipeline.shards import ShardsConfig  # noqa: E402
from m3w.pipeline.shards.interleaved import m3w_unit  # noqa: E402
from m3w.pipeline.shards.samples import cached_tokenizer  # noqa: E402
from m3w.schemas import images as image_spec  # noqa: E402
from m3w.schemas.documents import DOCUMENT_SCHEMA  # noqa: E402

WEBCORPUS = ROOT.parent / "shared" / "webcorpus"
DEFAULT_WARC = WEBCORPUS / "warc" / "trafilatura_eval.warc.gz"


def bench_extract():
    spec = importlib.util.spec_from_file_location("bench_extract", ROOT / "bench" / "extract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_inputs(warc: str, root: Path) -> tuple[Path, Path, int]:
    """Filtered documents of the WARC and a store holding every image URL (status ok).

    Returns (filtered parquet, store dir, extracted pages)."""
    from m3w.pipeline.filter import run_filter

    docs = list(iter_warc_documents(warc, ExtractConfig(), Counter()))
    write_parquet_atomic(
        pa.Table.from_pylist(docs, schema=DOCUMENT_SCHEMA), root / "documents" / "docs.parquet"
    )
    run_filter(root / "documents", root / "filtered")
    (filtered,) = sorted((root / "filtered").glob("*.parquet"))
    store = ImageStore(str(root / "images"))
    store.create({}, buckets=image_spec.DEFAULT_BUCKETS)
    shard = image_spec.shard_id(1, 0)
    blobs = BlobShardWriter(store, shard)
    stored = []
    for path in sorted((WEBCORPUS / "photos").iterdir()):
        if path.suffix in (".png", ".jpg"):
            out = io.BytesIO()
            resize(Image.open(path).convert("RGB"), 320, "center_crop").save(out, format="JPEG", quality=90)
            stored.append(blobs.add(out.getvalue()))
    offsets = blobs.close()
    urls = sorted({n["url"] for d in docs for n in d["nodes"] if n["kind"] == "image" and n["url"]})
    rows = []
    for i, url in enumerate(urls):
        sha, length = stored[i % len(stored)]
        rows.append({"url": url, "status": "ok", "attempts": 1, "resized_sha256": sha, "blob_length": length})
    write_rows(store, shard, rows, offsets)
    index_generation(store, 1, [shard])
    return filtered, root / "images", len(docs)


def main() -> None:
    warc = sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT_WARC)
    pages, e_cpu, _, _ = bench_extract().single_process([warc])
    extract_rate = pages / e_cpu
    print(f"extract: {pages} pages in {e_cpu:.2f} CPU-s = {extract_rate:.1f} pages/CPU-s")

    config = ShardsConfig()
    cached_tokenizer(config.tokenizer)  # loading the tokenizer is a once-per-worker cost, not per sample
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        filtered, store, n_pages = build_inputs(warc, root)
        cpu = time.process_time()
        output, counts = m3w_unit({"input": str(filtered), "store": str(store), "uid": "bench",
                                   "out": str(root / "out"), "config": to_dict(config),
                                   "datasets": [{"dataset": "m3w", "name": "m3w", "dedup": False}]})  # fmt: skip
        total_cpu = time.process_time() - cpu
    shards = output["m3w"]
    totals = {k: sum(s[k] for s in shards) for k in ("samples", "images", "tokens", "bytes")}
    samples = totals["samples"]
    docs, per_page = counts["documents"], n_pages / total_cpu
    print(
        f"shards m3w: {n_pages} extracted pages → {docs} filtered documents → {samples} samples, "
        f"{totals['images']} images, {totals['tokens']} tokens; counts {json.dumps(counts, sort_keys=True)}"
    )
    print(f"  one unit (lookups, tokenise, windows, image reads, tars): {total_cpu:.2f} CPU-s")
    print(f"  {docs / total_cpu:.1f} filtered documents/CPU-s = {per_page:.1f} extracted pages/CPU-s, vs extract "
          f"{extract_rate:.1f} pages/CPU-s: {per_page / extract_rate:.1f}x extract's rate "
          f"({'not' if per_page > extract_rate else 'IS'} the bottleneck)")  # fmt: skip
    print(f"samples_per_cpu_s={samples / total_cpu:.1f} bytes_per_sample={totals['bytes'] / samples:.1f}")


if __name__ == "__main__":
    main()
