"""Replay benchmark: extract + filter from scratch vs re-filtering after a threshold change, on the same WARCs.

    .venv/bin/python bench/replay.py [WARC ...] [--set paragraph.min_words=6 ...] [--workers N]

Default input: the webcorpus trafilatura WARC (988 pages). Ray is started before either timing, so both
measure the work, not Ray's start-up. The replay re-reads documents/ and the cached signals and dedup
decisions; it never reads a WARC. Last line: `full_s=<float> replay_s=<float> speedup=<float>` (target ≥ 10).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m3w.config import load_config  # noqa: E402
from m3w.pipeline.extract import run_extract  # noqa: E402
from m3w.pipeline.filter import run_filter  # noqa: E402
from m3w.pipeline.filters import FilterConfig  # noqa: E402
from m3w.pipeline.ray_runner import init_ray  # noqa: E402

WEBCORPUS = Path(os.environ.get("M3W_WEBCORPUS", ROOT.parent / "shared" / "webcorpus"))
DEFAULT_WARC = WEBCORPUS / "warc" / "trafilatura_eval.warc.gz"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("warcs", nargs="*", default=[str(DEFAULT_WARC)])
    parser.add_argument(
        "--set", dest="overrides", action="append", default=None, help="The threshold change."
    )
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--ray-address", default=None)
    args = parser.parse_args()
    change = args.overrides or ["paragraph.min_words=6", "document.min_lang_score=0.9"]

    init_ray(args.ray_address)
    with tempfile.TemporaryDirectory(prefix="m3w-replay-") as tmp:
        docs, out = Path(tmp) / "documents", Path(tmp) / "filtered"
        start = time.perf_counter()
        extracted = run_extract(args.warcs, docs, workers=args.workers, ray_address=args.ray_address)
        extract_s = time.perf_counter() - start
        first = run_filter(docs, out, FilterConfig(), workers=args.workers, ray_address=args.ray_address)
        full_s = time.perf_counter() - start

        changed = load_config(FilterConfig, overrides=change)
        start = time.perf_counter()
        replay = run_filter(docs, out, changed, workers=args.workers, ray_address=args.ray_address)
        replay_s = time.perf_counter() - start

    assert replay["signals_computed"] == 0 and replay["dedup_cached"], "replay recomputed cached work"
    pages = extracted.counts.get("documents", 0)
    print(f"input: {', '.join(Path(w).name for w in args.warcs)}: {pages} documents")
    print(f"from scratch: extract {extract_s:.2f}s + filter {full_s - extract_s:.2f}s")
    print(f"change: {' '.join(change)}")
    print(
        f"replay: {replay['done']} units re-decided, signals cached for {replay['signals_cached']}, "
        f"dedup cached: {replay['dedup_cached']}; documents kept {first['counts'].get('out.documents', 0)}"
        f" → {replay['counts'].get('out.documents', 0)}"
    )
    print(f"full_s={full_s:.3f} replay_s={replay_s:.3f} speedup={full_s / replay_s:.3f}")


if __name__ == "__main__":
    main()
