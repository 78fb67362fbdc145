"""`python -m m3w.demo.run --out demo-out` (what `make demo` runs): the whole product on a synthetic web, end to end.

1. web    build a small Common Crawl-like web (demo.web) and serve it on 127.0.0.1
2. build  `m3w build configs/demo.yaml`: extract → filter → images → shards (M3W, pairs, video pairs), on Ray
3. train  pretrain the tiny LM on the corpus text (demo.lm: Flamingo freezes a *pretrained* LM, and there is
          no hub offline), then `m3w train configs/train_tiny.yaml` with it frozen: the four streams, paper
          loss weights, one batch of every dataset per optimizer step
4. eval   `m3w eval` at 0/2/4/8 shots on held-out items (classification, VQA, captioning), with the
          images-shuffled control
5. report demo-out/report.html + PNGs: funnel, samples (`m3w inspect`), training curves per dataset, gate values,
          few-shot tables

Every step runs the `m3w` command a user runs on Common Crawl, in a subprocess, as a user would. Re-running
resumes: the web is rebuilt identically (same port when free), finished build stages are skipped.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from m3w import CONFIGS_DIR
from m3w.demo.web import build_web

ROOT = Path(__file__).resolve().parents[2]
M3W = [sys.executable, "-m", "m3w"]
# The demo's eval prompts: the wording the synthetic web uses for its pictures (see demo.web.DESCRIBE/DETAIL).
EVAL_TASKS = {
    "classification": {"prompt": "The shapes are", "limit": None},
    "vqa": {"prompt": "Question:{question} Short answer:", "limit": 24},
    "captioning": {"prompt": "Here you can see", "limit": 12},
}


class Steps:
    """Runs and times the demo's steps; prints each step's time as it ends."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.times: dict[str, float] = {}
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, cmd: list[str]) -> None:
        """One `m3w` command; its output goes to logs/<name>.log (the tail is shown if it fails)."""
        print(f"[demo] {name}: {' '.join(cmd[2:] if cmd[:2] == M3W[:2] else cmd)}", flush=True)
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())
        self.times[name] = self.times.get(name, 0.0) + time.monotonic() - start
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-4000:]
            raise SystemExit(f"[demo] step {name} failed (exit {proc.returncode}); log: {log}\n{tail}")
        print(f"[demo] {name} done in {self.times[name]:.1f}s", flush=True)

    def timed(self, name: str, fn, *args, **kwargs) -> Any:
        start = time.monotonic()
        result = fn(*args, **kwargs)
        self.times[name] = time.monotonic() - start
        print(f"[demo] {name} done in {self.times[name]:.1f}s", flush=True)
        return result


def serve(directory: Path, preferred_port: int = 0):
    """A threaded static server on 127.0.0.1 (the previous run's port when free, so the web stays identical)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - stdlib signature
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", preferred_port), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def previous_port(web_dir: Path) -> int:
    try:
        return int(json.loads((web_dir / "web.json").read_text())["base_url"].rsplit(":", 1)[1])
    except (OSError, ValueError, KeyError, IndexError):
        return 0


# ---- report --------------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(records: list[dict], report: Path) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in records[0]["loss"]:
        ax.plot(steps, [r["loss"].get(name) for r in records], label=name)
    ax.plot(steps, [r["loss/total"] for r in records], "k--", label="weighted total")
    ax.set(xlabel="optimizer step", ylabel="loss (NLL)", title="Training loss per dataset")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "training_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in records[0]["gates"]:
        ax.plot(steps, [r["gates"].get(name) for r in records], label=name)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="optimizer step", ylabel="tanh(alpha)", title="Gate values of the GATED XATTN-DENSE layers")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(report / "gates.png", dpi=110)
    plt.close(fig)
    return "training_curves.png", "gates.png"


def plot_fewshot(results: dict[str, dict], report: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6))
    axes = axes if len(results) > 1 else [axes]
    for ax, (task, res) in zip(axes, results.items()):
        for images, style in (("real", "o-"), ("shuffled", "s--")):
            rows = [r for r in res["results"] if r["images"] == images]
            ax.plot([r["shots"] for r in rows], [r["score"] for r in rows], style, label=f"{images} images")
        if res.get("chance") is not None:
            ax.axhline(res["chance"], color="grey", ls=":", label="chance")
        ax.set(title=f"{task} ({res['metric']})", xlabel="shots", xticks=[r["shots"] for r in res["results"]])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "fewshot.png", dpi=110)
    plt.close(fig)
    return "fewshot.png"


def corpus_funnel(corpus: Path, report: Path) -> tuple[list[tuple[str, int]], str, str | None]:
    """The end-to-end funnel (pages → documents → kept → images → samples) and the filter-step chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from m3w.pipeline.stats import funnel, plot_funnel

    stages = {r["stage"]: r["counts"] for r in json.loads((corpus / "build_summary.json").read_text())}
    if any(stages.get(s) is None for s in ("extract", "filter", "images", "shards")):
        raise RuntimeError("build_summary.json lacks a stage: run the build first")
    e, f, i, s = (stages[k] for k in ("extract", "filter", "images", "shards"))
    rows = [
        ("WARC records", e.get("records", 0)),
        ("HTML pages", e.get("html", 0)),
        ("documents extracted", e.get("documents", 0)),
        ("documents kept by the filters", f.get("out.documents", 0)),
        ("image nodes kept", f.get("out.images", 0)),
        ("distinct image URLs fetched", i.get("urls", 0)),
        ("images stored (ok)", i.get("status.ok", 0)),
        ("M3W samples", s.get("m3w.samples", 0)),
        ("alt-text pairs", s.get("alt_pairs.samples", 0)),
        ("caption pairs", s.get("caption_pairs.samples", 0)),
        ("video pairs", s.get("video_pairs.samples", 0)),
    ]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color="#4c72b0")
    for y, (_, v) in enumerate(rows):
        ax.text(v, y, f" {v:,}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_title("Pipeline funnel: crawl → corpus")
    fig.tight_layout()
    fig.savefig(report / "funnel.png", dpi=110)
    plt.close(fig)
    try:
        filter_png = plot_funnel(funnel([corpus / "filtered"]), report / "filter_funnel.png").name
    except (ValueError, FileNotFoundError):
        filter_png = None
    return rows, "funnel.png", filter_png


def table_html(res: dict) -> str:
    columns = [c for c in ("real", "shuffled") if any(r["images"] == c for r in res["results"])]
    head = "".join(f"<th>{c} images</th>" for c in columns)
    body = []
    for shots in dict.fromkeys(r["shots"] for r in res["results"]):
        cells = {r["images"]: r for r in res["results"] if r["shots"] == shots}
        sel = next(iter(cells.values()))["selection"]
        body.append(
            f"<tr><td>{shots}</td><td>{sel}</td>"
            + "".join(f"<td>{cells[c]['score']:.3f}</td>" if c in cells else "<td></td>" for c in columns)
            + "</tr>"
        )
    chance = f", chance {res['chance']:.3f}" if res.get("chance") is not None else ""
    n = res["results"][0]["n"] if res["results"] else 0
    return (
        f"<h3>{res['task']} — {res['metric']} (n={n}{chance})</h3><table><tr><th>shots</th><th>support</th>"
        f"{head}</tr>{''.join(body)}</table>"
    )


def examples_html(res: dict, k: int = 6) -> str:
    best = max((r for r in res["results"] if r["images"] == "real"), key=lambda r: r["shots"])
    rows = "".join(
        f"<tr><td>{html.escape(p['prediction'])}</td><td>{html.escape(' | '.join(p['answers'][:3]))}</td></tr>"
        for p in best["predictions"][:k]
    )
    return f"<details><summary>{best['shots']}-shot predictions</summary><table><tr><th>prediction</th><th>references</th></tr>{rows}</table></details>"


def write_report(
    out: Path,
    times: dict[str, float],
    funnel_rows,
    pngs: dict[str, str | None],
    results: dict,
    inspect_pages: list[str],
    verdict: list[str],
) -> Path:
    report = out / "report.html"
    timing = "".join(f"<tr><td>{k}</td><td>{v:.1f} s</td></tr>" for k, v in times.items())
    funnel_table = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:,}</td></tr>" for k, v in funnel_rows)
    img = lambda name, alt: f'<img src="report/{name}" alt="{alt}">' if name else ""  # noqa: E731
    tables = "".join(table_html(r) + examples_html(r) for r in results.values())
    samples = "".join(
        f'<p><a href="report/{p}">{p}</a></p><iframe src="report/{p}" title="{p}"></iframe>'
        for p in inspect_pages
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>m3w demo report</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1em}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%;border:1px solid #eee;margin:.5em 0}}
iframe{{width:100%;height:28em;border:1px solid #ccc}}.verdict{{background:#f4f6fa;padding:.6em 1em}}</style></head>
<body><h1>m3w demo: a synthetic crawl → corpus → tiny Flamingo → few-shot evaluation</h1>
<div class="verdict"><b>Few-shot verdict (classification, the demo task):</b><ul>{"".join(f"<li>{html.escape(v)}</li>" for v in verdict)}</ul></div>
<h2>1. Pipeline funnel</h2>{img(pngs["funnel"], "pipeline funnel")}
<table><tr><th>stage</th><th>count</th></tr>{funnel_table}</table>
{img(pngs.get("filter_funnel"), "filter funnel")}
<h2>2. Samples (rendered by <code>m3w inspect</code>)</h2>{samples}
<h2>3. Training (paper loss weights, one batch of every dataset per step)</h2>
{img(pngs["training"], "training curves per dataset")}
<h2>4. Gate values over time</h2>{img(pngs["gates"], "gate values")}
<h2>5. Few-shot evaluation (held-out items; images-shuffled control)</h2>{img(pngs["fewshot"], "few-shot scores")}
{tables}
<h2>Step times</h2><table><tr><th>step</th><th>time</th></tr>{timing}</table>
</body></html>
"""
    report.write_text(page)
    return report


def verdict_lines(res: dict) -> list[str]:
    """The issue's three checks on the demo task, stated with their figures. Means over the shot counts, and a
    majority-class baseline next to chance: a model that always answers the commonest class beats chance
    without looking at any image."""
    by = {(r["shots"], r["images"]): r["score"] for r in res["results"]}
    shots = sorted({r["shots"] for r in res["results"]})
    labels = [p["answers"][0] for p in res["results"][0]["predictions"]]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    real = sum(by[(k, "real")] for k in shots) / len(shots)
    shuffled = sum(by[(k, "shuffled")] for k in shots) / len(shots)
    lines = [
        "accuracy with real images: " + ", ".join(f"{k}-shot {by[(k, 'real')]:.3f}" for k in shots),
        "with images shuffled: " + ", ".join(f"{k}-shot {by[(k, 'shuffled')]:.3f}" for k in shots),
        f"chance {res['chance']:.3f}; majority-class baseline {majority:.3f}",
    ]
    checks = {
        f"real images beat the shuffled control (mean over shots {real:.3f} vs {shuffled:.3f})": real
        > shuffled,
        f"beats chance and the majority-class baseline (mean {real:.3f})": real
        > max(res["chance"], majority),
        "4-shot >= 0-shot": by[(4, "real")] >= by[(0, "real")]
        if (4, "real") in by and (0, "real") in by
        else False,
    }
    return lines + [f"{'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]


# ---- the demo ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="m3w end-to-end demo")
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--pages", type=int, default=240)
    parser.add_argument("--lm-steps", type=int, default=120, help="pretraining steps of the frozen tiny LM")
    parser.add_argument("--train-steps", type=int, default=250)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--shots", default="0,2,4,8")
    parser.add_argument("--num-beams", type=int, default=3, help="beam width for VQA and captioning")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # One intra-op thread per process: the trainer's data-loader workers use the other core. On 2 cores, two
    # torch threads per process fighting the workers made a training step ~10x slower in our measurements.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    out = Path(args.out).resolve()
    web_dir, corpus, run_dir, report_dir = out / "web", out / "corpus", out / "train", out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    total_start = time.monotonic()

    # 1. the web, served on loopback (same port as last time when free, so the web is byte-identical)
    (web_dir / "site").mkdir(parents=True, exist_ok=True)
    server, base_url = serve(web_dir / "site", previous_port(web_dir))
    web = steps.timed("web", build_web, web_dir, base_url, pages=args.pages)
    print(f"[demo] web: {web['counts']['pages']} pages, {len(web['warcs'])} WARCs at {base_url}", flush=True)
    try:
        # 2. the pipeline, through `m3w build`
        # 128-token M3W windows (paper: 256) halve the training step time of the 2-core demo
        steps.run("build", M3W + ["build", str(CONFIGS_DIR / "demo.yaml"), "--set", f"out={corpus}",
                                  "--set", f"extract.cc_base_url={base_url}/",
                                  "--set", f"images.allow_hosts=[{base_url.removeprefix('http://')}]",
                                  "--set", f"shards.video_table={web_dir / web['videos']}",
                                  "--set", "shards.options.windows.seq_len=128"])  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()

    # 3. a pretrained frozen LM (offline stand-in for a hub download: see demo.lm), then `m3w train`
    steps.run("pretrain LM", [sys.executable, "-m", "m3w.demo.lm", str(corpus / "filtered"), "--out", str(out / "lm"),
                              "--steps", str(args.lm_steps)])  # fmt: skip
    shards = corpus / "shards"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each time: the report's curves are this run's
    steps.run("train", M3W + ["train", str(CONFIGS_DIR / "train_tiny.yaml"),
                              "--set", f"output_dir={run_dir}", "--set", f"steps={args.train_steps}",
                              "--set", f"optim.lr={args.lr}", "--set", "optim.warmup_steps=10",
                              "--set", f"checkpoint_every={args.train_steps}", "--set", "log_every=5",
                              "--set", f"model.config.lm={out / 'lm' / 'lm'}",
                              *[x for d in ("m3w", "alt_pairs", "caption_pairs", "video_pairs")
                                for x in ("--set", f"datasets.{d}.path={shards / d}")]])  # fmt: skip

    # 4. few-shot evaluation, through `m3w eval`
    results = {}
    eval_root = web_dir / web["eval"]
    for task, opts in EVAL_TASKS.items():
        result_path = out / f"eval_{task}.json"
        cmd = M3W + ["eval", "--model", str(run_dir / "final"), "--task", task,
                     "--data", str(eval_root / task / "query"), "--support", str(eval_root / task / "support"),
                     "--shots", args.shots, "--shuffle-images", "--prompt", opts["prompt"], "--out", str(result_path)]  # fmt: skip
        if task != "classification":
            cmd += ["--num-beams", str(args.num_beams)]
        if opts["limit"]:
            cmd += ["--limit", str(opts["limit"])]
        steps.run(f"eval {task}", cmd)
        results[task] = json.loads(result_path.read_text())

    # 5. the report
    def make_report() -> Path:
        inspect_pages = []
        for dataset, limit in (("m3w", 6), ("caption_pairs", 12)):
            page = f"inspect_{dataset}.html"
            steps.run(
                f"inspect {dataset}",
                M3W
                + ["inspect", str(shards / dataset), "--out", str(report_dir / page), "--limit", str(limit)],
            )
            inspect_pages.append(page)
        funnel_rows, funnel_png, filter_png = corpus_funnel(corpus, report_dir)
        training_png, gates_png = plot_training(read_metrics(run_dir / "metrics.jsonl"), report_dir)
        pngs = {"funnel": funnel_png, "filter_funnel": filter_png, "training": training_png, "gates": gates_png,
                "fewshot": plot_fewshot(results, report_dir)}  # fmt: skip
        times = dict(steps.times, total=time.monotonic() - total_start)
        return write_report(
            out, times, funnel_rows, pngs, results, inspect_pages, verdict_lines(results["classification"])
        )

    report = steps.timed("report", make_report)
    total = time.monotonic() - total_start

    print("\n[demo] step times:")
    for name, seconds in steps.times.items():
        print(f"  {name:<22} {seconds:7.1f}s")
    print(f"  {'total':<22} {total:7.1f}s")
    print()
    for res in results.values():
        from m3w.trainer.evaluate import format_table

        print(format_table(res) + "\n")
    for line in verdict_lines(results["classification"]):
        print(f"[demo] {line}")
    print(f"\n[demo] report: {report}  (PNGs in {report_dir})")


if __name__ == "__main__":
    main()
