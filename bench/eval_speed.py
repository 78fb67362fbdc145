"""`m3w eval` speed: the demo's three evaluations with the query items run one by one vs together.

The tiny preset (random weights, saved and loaded back as `m3w eval --model` loads it) scores the demo's held-out
sets (demo.web.write_eval_sets) with the demo's settings (demo.run.EVALS: fast binding at 0/1/2/4/8 shots, VQA
greedy at 0/1/2/4, captioning with 3 beams at 0/2/4/8), each with the images-shuffled control, on one torch
thread. Each task runs with `batch_size=1` (every item on its own, as before batching) and with the default batch
(items whose prompts have one length run together); the reports must be identical but for the timings. CPU seconds
are measured, so a busy machine moves the figures less than wall time would.

Last line: `eval_cpu_s_one_by_one=<float> eval_cpu_s_batched=<float> speedup=<float> identical=<bool>`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from m3w.demo.run import EVALS  # noqa: E402
from m3w.demo.web import write_eval_sets  # noqa: E402
from m3w.model import Flamingo, build_preset  # noqa: E402
from m3w.trainer.evaluate import EvalSettings, evaluate  # noqa: E402


def timed_reports(model, root: Path, batch_size: int) -> tuple[float, dict[str, list[dict]]]:
    start = time.process_time()
    reports = {}
    for task, spec in EVALS.items():
        chosen = EvalSettings(task, shuffle_images=True, batch_size=batch_size, **spec["settings"])
        support = root / spec["support"] if spec["support"] else None
        report = evaluate(model, chosen, root / spec["data"], support)
        reports[task] = [{k: v for k, v in r.items() if k != "seconds"} for r in report["results"]]
        reports[task].append(report.get("caption_loss"))
    return time.process_time() - start, reports


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="m3w-eval-speed-") as tmp:
        tmp = Path(tmp)
        Flamingo.from_config(build_preset("tiny", tmp / "parts")).save_pretrained(tmp / "model")
        model = Flamingo.from_pretrained(tmp / "model")
        root = write_eval_sets(tmp / "eval", seed=7)
        one_by_one, expected = timed_reports(model, root, batch_size=1)
        batched, got = timed_reports(model, root, batch_size=EvalSettings.batch_size)
    print(f"eval_cpu_s_one_by_one={one_by_one:.1f} eval_cpu_s_batched={batched:.1f} "
          f"speedup={one_by_one / batched:.2f} identical={got == expected}")  # fmt: skip


if __name__ == "__main__":
    main()
