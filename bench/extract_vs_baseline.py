"""Speed of this checkout's extraction against another checkout's (an older commit), on the same WARC, same run.

    .venv/bin/python bench/extract_vs_baseline.py BASELINE_ROOT [WARC] [--passes N]

BASELINE_ROOT is a directory holding the older `m3w/` package (e.g. `git archive <commit> m3w | tar -x -C DIR`).
Passes alternate, baseline then this checkout, each in a fresh process (no cache warm from the other), so load
drift on a shared machine reaches both sides; each side's best pass counts (noise only ever adds time). Figures are
pages per CPU-second of `iter_warc_documents`, WARC reading included. The last line is
`baseline_pages_per_cpu_s=<f> pages_per_cpu_s=<f> speedup_vs_baseline=<f>`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.extract import DEFAULT_WARC  # noqa: E402

ONE_PASS = r"""
import sys, time
from collections import Counter
sys.path.insert(0, sys.argv[1])
from m3w.pipeline.extract import ExtractConfig, iter_warc_documents
counts, cpu = Counter(), time.process_time()
for _ in iter_warc_documents(sys.argv[2], ExtractConfig(), counts):
    pass
print(counts["html"] / (time.process_time() - cpu))
"""


def one_pass(root: Path, warc: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", ONE_PASS, str(root), warc], capture_output=True, text=True, cwd="/"
    )
    if out.returncode:
        sys.exit(f"a pass over {root} failed:\n{out.stderr}")
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="directory holding the baseline's m3w/ package")
    parser.add_argument("warc", nargs="?", default=str(DEFAULT_WARC))
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    if not (args.baseline / "m3w" / "pipeline" / "extract.py").is_file():
        parser.error(f"{args.baseline} holds no m3w/ package")
    figures: dict[str, list[float]] = {"baseline": [], "new": []}
    for _ in range(args.passes):
        for side, root in (("baseline", args.baseline), ("new", ROOT)):
            figures[side].append(one_pass(root, args.warc))
            print(f"{side} {figures[side][-1]:.1f} pages/CPU-s", flush=True)
    old, new = max(figures["baseline"]), max(figures["new"])
    print(f"baseline_pages_per_cpu_s={old:.1f} pages_per_cpu_s={new:.1f} speedup_vs_baseline={new / old:.3f}")


if __name__ == "__main__":
    main()
