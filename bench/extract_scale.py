"""Scale benchmark of `m3w extract`: does one unit's memory stay flat as its WARC grows?

    .venv/bin/python bench/extract_scale.py [--copies 1,3,9] [WARC]     (default: the webcorpus trafilatura WARC)

For each size, a WARC made of that many copies of WARC (its gzip members concatenated: a valid WARC, as Common
Crawl's are) is extracted by `extract_unit`, the Ray task's function, in a fresh process that reports its own
peak RSS and CPU seconds, so every size starts from the same baseline. Per size it prints pages, MB, peak RSS and
pages per CPU-second. The last line: `rss_exponent=<f> time_exponent=<f> max_unit_rss_mb=<f>` (exponents: log-log
slopes of peak RSS and CPU time against WARC size; max: at the largest size). Targets (issue 16): peak RSS <= 1024
MiB per worker whatever the WARC size, so rss_exponent ~ 0; time_exponent ~ 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WARC = (
    Path(os.environ.get("M3W_WEBCORPUS", ROOT.parent / "shared" / "webcorpus"))
    / "warc"
    / "trafilatura_eval.warc.gz"
)
# Runs in the child: one unit, then its own peak RSS (Linux reports KiB) and CPU seconds as JSON.
CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
from m3w.config import to_dict
from m3w.pipeline.extract import ExtractConfig, extract_unit
cpu = time.process_time()
_, counts = extract_unit((sys.argv[1], sys.argv[2], to_dict(ExtractConfig())))
print(json.dumps({"pages": counts.get("html", 0), "documents": counts.get("documents", 0),
                  "cpu_s": time.process_time() - cpu,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def slope(x: list[float], y: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("warc", nargs="?", default=str(DEFAULT_WARC))
    parser.add_argument("--copies", default="1,3,9")
    args = parser.parse_args()
    copies = [int(c) for c in args.copies.split(",")]
    source = Path(args.warc).read_bytes()
    sizes, rss, cpu = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in copies:
            warc = Path(tmp) / f"copies-{n}.warc.gz"
            with open(warc, "wb") as f:
                for _ in range(n):
                    f.write(source)
            run = subprocess.run([sys.executable, "-c", CHILD, str(warc), str(Path(tmp) / f"out-{n}"), str(ROOT)],
                                 check=True, capture_output=True, text=True)  # fmt: skip
            result = json.loads(run.stdout.strip().splitlines()[-1])
            size_mb = warc.stat().st_size / 1e6
            print(f"{n} copies: {result['pages']} pages ({result['documents']} documents), {size_mb:.0f} MB, "
                  f"peak RSS {result['rss_mb']:.0f} MB, {result['pages'] / result['cpu_s']:.1f} pages/CPU-s")  # fmt: skip
            sizes.append(size_mb)
            rss.append(result["rss_mb"])
            cpu.append(result["cpu_s"])
            warc.unlink()
    print(
        f"rss_exponent={slope(sizes, rss):.3f} time_exponent={slope(sizes, cpu):.3f} max_unit_rss_mb={rss[-1]:.1f}"
    )


if __name__ == "__main__":
    main()
