"""The demo's report: one self-contained HTML page that reads like a paper's figure page.

Everything is inside the file (charts and pictures as data URIs), so it opens in a browser with nothing beside
it. Sections: the verdict; few-shot fast binding (figure + table); VQA and captioning; the held-out caption loss;
the corpus funnel (documents, images, tokens: one unit per chart, numbers on the bars); whole sample windows as
`m3w inspect` renders them; training curves and gates; step times and the commands that were run.

Every metric has one sentence under it saying what it measures and what a good value is (`EXPLAIN`).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One sentence per metric: what it measures and what a good value is.
EXPLAIN = {
    "binding": "Fast-binding accuracy: the share of questions where the model ranks the made-up name that the "
    "prompt bound to the question's kind of picture above the episode's other name; chance is 0.5, and a model "
    "that learns in context climbs with the number of shots while staying at chance when the images are "
    "shuffled.",
    "vqa": "VQA accuracy (VQAv2): min(#annotators who gave the generated answer / 3, 1), averaged over items; 1 "
    "is perfect, and a model that reads the picture scores well above the images-shuffled control.",
    "captioning": "CIDEr-D: tf-idf weighted n-gram agreement of the generated caption with five references "
    "(×10); higher is better (strong COCO models score above 1), and real images should beat shuffled ones.",
    "caption_loss": "Held-out caption loss: mean negative log-likelihood per token of held-out captions after "
    "their own picture and after another item's picture; lower is better, and a ratio of at most 0.7 means the "
    "captions are predicted from the pictures.",
    "funnel": "What remains after each step of the pipeline, one unit per chart; a good crawl keeps most of "
    "the article text and pictures and drops boilerplate, duplicates, other languages and thin pages.",
    "training": "Next-token negative log-likelihood on each dataset's training batches (the weighted total is "
    "what is optimised); it should fall, M3W the least because much of its text cannot be predicted.",
    "gates": "tanh(α) of each gated cross-attention and dense block: 0 at the start (the frozen LM alone), "
    "moving away from 0 as the model learns to use the pictures.",
}
TASK_TITLES = {
    "binding": "Fast binding (made-up names, open-ended miniImageNet style)",
    "vqa": "Visual question answering (colour, count and shape questions)",
    "captioning": "Captioning",
}
STYLE = """
body { font: 16px/1.55 Georgia, "Times New Roman", serif; max-width: 62rem; margin: 2rem auto; padding: 0 1.2rem;
       color: #1d1d1d; background: #fff; }
h1 { font-size: 1.7rem; line-height: 1.25; margin-bottom: .4rem; }
h2 { font-size: 1.3rem; margin-top: 2.4rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-size: 1.08rem; margin-top: 1.6rem; }
.summary { color: #333; }
figure { margin: 1.2rem 0 .4rem; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: .92rem; color: #333; margin-top: .4rem; }
.explain { font-size: .92rem; color: #444; background: #f6f7f9; border-left: 3px solid #9aa7b8;
           padding: .35rem .7rem; margin: .5rem 0 1rem; }
table.results { border-collapse: collapse; margin: .6rem 0 1.2rem; font: 14px/1.4 system-ui, sans-serif; }
table.results caption { caption-side: top; text-align: left; font-size: .85rem; color: #555; padding-bottom: .3rem; }
table.results td, table.results th { border-bottom: 1px solid #ddd; padding: .3rem .8rem; text-align: right; }
table.results td:first-child, table.results th:first-child { text-align: left; }
table.results th { border-bottom: 2px solid #999; }
.ci { color: #777; font-size: .85em; }
.verdict { border-radius: 6px; padding: .4rem 1.2rem .6rem; margin: 1.2rem 0; font: 15px/1.5 system-ui, sans-serif; }
.verdict h2 { border: 0; margin: .4rem 0; font-size: 1.15rem; }
.verdict.pass { background: #eef8ef; border: 1px solid #9fd0a6; }
.verdict.fail { background: #fcefed; border: 1px solid #e3a69b; }
.verdict li.pass b { color: #1c7a32; } .verdict li.fail b { color: #b3261e; }
.prompts { display: flex; flex-direction: column; gap: .6rem; margin: .6rem 0; }
.prompts img.prompt { max-width: 100%; border: 1px solid #e3e3e3; align-self: flex-start; }
.inspect .sample { font: 14px/1.5 system-ui, sans-serif; }
ol.commands code { font-size: .82rem; word-break: break-all; }
details { margin: .5rem 0 1rem; font: 14px/1.5 system-ui, sans-serif; }
"""
COLOURS = {"real": "#1f5fbf", "shuffled": "#d2472a", "chance": "#6b6b6b"}


@dataclass
class ReportInputs:
    """What the report shows, gathered by demo.run (tests build it by hand)."""

    title: str
    summary: str  # one paragraph: what was run
    verdict: list[tuple[bool, str]]  # (passed, sentence with its figures)
    evals: dict[str, dict]  # task → `m3w eval` results JSON
    funnel: dict[str, list[tuple[str, int]]]  # chart title (its unit) → (step, count) rows
    filter_table: list[dict] = field(default_factory=list)  # `m3w stats` filter rows
    samples: list[tuple[str, str]] = field(default_factory=list)  # (heading, `m3w inspect` sample HTML)
    training: list[dict] = field(default_factory=list)  # metrics.jsonl records
    times: dict[str, float] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    tensorboard: str = ""  # the TensorBoard log root


# ---- charts ---------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def png_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def shots_axis(ax, shots: list[int]) -> None:
    ax.set_xticks(range(len(shots)), [str(k) for k in shots])
    ax.set_xlabel("shots (support examples in the prompt)")
    ax.set_xlim(-0.4, len(shots) - 0.6)


def fewshot_figure(report: dict, ylabel: str, ylim: tuple[float, float] | None = None):
    """Score vs shots: real and shuffled images with 95% error bars, chance as a line with its 95% band. The
    two curves are nudged apart sideways so neither hides the other."""
    plt = _pyplot()
    rows = report["results"]
    shots = sorted({r["shots"] for r in rows})
    x = {k: i for i, k in enumerate(shots)}
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    chance = report.get("chance")
    if chance:
        xs = [-0.4, len(shots) - 0.6]
        ax.fill_between(xs, *[[v, v] for v in chance["ci95"]], color=COLOURS["chance"], alpha=0.15, lw=0)
        ax.plot(xs, [chance["score"]] * 2, ":", color=COLOURS["chance"], lw=2, label="chance (95% range)")
    for images, style, nudge in (("real", "o-", -0.06), ("shuffled", "s--", 0.06)):
        cells = sorted((r for r in rows if r["images"] == images), key=lambda r: r["shots"])
        if not cells:
            continue
        xs = [x[r["shots"]] + nudge for r in cells]
        ys = [r["score"] for r in cells]
        errors = [[r["score"] - r["ci95"][0] for r in cells], [r["ci95"][1] - r["score"] for r in cells]]
        ax.errorbar(xs, ys, yerr=errors, fmt=style, color=COLOURS[images], lw=2, ms=7, capsize=4,
                    label=f"{images} images", zorder=3)  # fmt: skip
    shots_axis(ax, shots)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", frameon=False, fontsize=10)
    return fig


def funnel_figure(title: str, rows: list[tuple[str, int]], colour: str):
    """One unit: horizontal bars, first step on top, the count written at the end of every bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 0.42 * len(rows) + 0.9))
    values = [v for _, v in rows]
    ax.barh(range(len(rows)), values, color=colour, height=0.7)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,}", va="center", fontsize=10)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values + [1]) * 1.15)
    ax.set_title(title, loc="left", fontsize=12, fontweight="bold")
    ax.xaxis.set_visible(False)
    ax.spines["bottom"].set_visible(False)
    return fig


def training_figures(records: list[dict]) -> tuple[str, str]:
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name in records[0]["loss"]:
        ax.plot(steps, [r["loss"].get(name) for r in records], lw=1.8, label=name)
    ax.plot(steps, [r["loss/total"] for r in records], "k--", lw=1.5, label="weighted total")
    ax.set(xlabel="optimizer step", ylabel="loss (NLL per token)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=9)
    losses = png_uri(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name in records[0]["gates"]:
        ax.plot(steps, [r["gates"].get(name) for r in records], lw=1.8, label=name)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(xlabel="optimizer step", ylabel="tanh(α)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=9, ncol=2)
    return losses, png_uri(fig)


# ---- HTML pieces ---------------------------------------------------------------------------------------------


def esc(text: Any) -> str:
    return html.escape(str(text))


def figure(uri: str, caption: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{caption}</figcaption></figure>'


def explain(key: str) -> str:
    return f'<p class="explain">{esc(EXPLAIN[key])}</p>'


def interval(cell: dict) -> str:
    low, high = cell["ci95"]
    return f'{cell["score"]:.3f} <span class="ci">[{low:.2f}, {high:.2f}]</span>'


def results_table(report: dict) -> str:
    """shots × real / shuffled / chance, each with its 95% interval."""
    rows = report["results"]
    chance = report.get("chance")
    head = "<th>shots</th><th>support</th><th>real images</th><th>shuffled images</th>"
    head += "<th>chance</th>" if chance else ""
    body = []
    for shots in sorted({r["shots"] for r in rows}):
        cells = {r["images"]: r for r in rows if r["shots"] == shots}
        first = next(iter(cells.values()))
        tds = "".join(
            f"<td>{interval(cells[c])}</td>" if c in cells else "<td>–</td>" for c in ("real", "shuffled")
        )
        tds += f"<td>{interval(chance)}</td>" if chance else ""
        body.append(f"<tr><td>{shots}</td><td>{esc(first['selection'])}</td>{tds}</tr>")
    n = rows[0]["n"] if rows else 0
    return (
        f'<table class="results"><caption>{esc(report["metric"])}, n = {n} items, 95% confidence intervals '
        f"over the items in brackets</caption><tr>{head}</tr>{''.join(body)}</table>"
    )


def prompt_examples(report: dict, shots: int) -> str:
    """The rendered prompts of the first items at `shots` (real images): what the model saw and answered."""
    from m3w.trainer.fewshot.render import render_prompt

    cells = [r for r in report["results"] if r["images"] == "real" and r["shots"] == shots]
    if not cells or not cells[0].get("prompts"):
        return ""
    answers = {p["id"]: p for p in cells[0]["predictions"]}
    pictures = []
    for shown in cells[0]["prompts"]:
        answer = answers[shown["id"]]
        picture = render_prompt(shown["text"], shown["images"], answer["prediction"], answer["answers"])
        pictures.append(f'<img class="prompt" src="{image_uri(picture)}" alt="prompt {esc(shown["id"])}">')
    return (
        f'<div class="prompts">{"".join(pictures)}</div><p class="explain">{shots}-shot prompts of the first '
        "items as the model saw them (each picture with the text after it), and its answer: green when right.</p>"
    )


def task_section(task: str, report: dict, ylabel: str, ylim=None, example_shots: int | None = None) -> str:
    shots = sorted({r["shots"] for r in report["results"]})
    chosen = example_shots if example_shots in shots else shots[-1]
    fig = fewshot_figure(report, ylabel, ylim)
    caption = (
        f"<b>{esc(TASK_TITLES.get(task, task))}.</b> {esc(report['metric'])} against the number of shots with "
        "the true images (blue), with every image moved to another item (red), and chance (grey band: where "
        "95% of uniform guessers would score); bars are 95% confidence intervals over the items."
    )
    if not report.get("chance"):
        caption = caption.replace(", and chance (grey band: where 95% of uniform guessers would score)", "")
    return (
        figure(png_uri(fig), caption, f"{task} score against shots")
        + explain(task)
        + results_table(report)
        + prompt_examples(report, chosen)
    )


def verdict_html(verdict: list[tuple[bool, str]]) -> str:
    passed = all(ok for ok, _ in verdict)
    items = "".join(
        f'<li class="{"pass" if ok else "fail"}"><b>{"PASS" if ok else "FAIL"}</b> {esc(text)}</li>'
        for ok, text in verdict
    )
    word = "PASS" if passed else "FAIL"
    return f'<div class="verdict {word.lower()}"><h2>Verdict: {word}</h2><ul>{items}</ul></div>'


def filter_table_html(rows: list[dict]) -> str:
    if not rows:
        return ""
    measures = ("documents", "paragraphs", "images", "words")
    head = "".join(f"<th>{m}</th>" for m in measures)
    body = []
    for row in rows:
        cells = "".join(
            f"<td>{row[m]:,}"
            + (f' <span class="ci">(−{row["dropped"][m]:,})</span>' if row["dropped"][m] else "")
            + "</td>"
            for m in measures
        )
        body.append(f"<tr><td>{esc(row['step'])}</td>{cells}</tr>")
    return (
        "<details><summary>Every filter step (what remains, and what the step removed)</summary>"
        f'<table class="results"><tr><th>step</th>{head}</tr>{"".join(body)}</table></details>'
    )


def write_report(inputs: ReportInputs, path: Path) -> Path:
    """Write the page; returns its path."""
    from m3w.pipeline.inspect import STYLE as INSPECT_STYLE

    sections = []
    binding = inputs.evals.get("binding")
    if binding:
        sections.append(
            "<h2>1. Learning in context: fast binding</h2>"
            "<p>Each question is an episode: support pictures of two kinds, each kind bound to a made-up name "
            "(“This is a dakop.”), then a new picture of one kind and “This is a”. The names are fresh, held out "
            "of training, so without the support nothing tells the name; the shuffled control moves every "
            "picture to another episode, so the names no longer match the pictures.</p>"
            + task_section("binding", binding, "accuracy", (0, 1.02), example_shots=4)
        )
    other = [t for t in ("vqa", "captioning") if t in inputs.evals]
    if other:
        parts = ["<h2>2. Visual question answering and captioning</h2>"]
        for task in other:
            report = inputs.evals[task]
            ylim = (0, 1.02) if task == "vqa" else None
            parts.append(
                f"<h3>{esc(TASK_TITLES[task])}</h3>" + task_section(task, report, report["metric"], ylim)
            )
            loss = report.get("caption_loss")
            if loss:
                parts.append(
                    f'<h3>Held-out caption loss</h3><table class="results"><tr><th>images</th><th>NLL per token'
                    f"</th></tr><tr><td>real</td><td>{loss['real']:.3f}</td></tr><tr><td>shuffled</td>"
                    f"<td>{loss['shuffled']:.3f}</td></tr><tr><td>ratio real / shuffled</td>"
                    f"<td>{loss['ratio']:.3f}</td></tr></table>" + explain("caption_loss")
                )
        sections.append("".join(parts))
    if inputs.funnel:
        colours = ["#4c72b0", "#55a868", "#c44e52"]
        charts = "".join(
            figure(png_uri(funnel_figure(title, rows, colour)), esc(title), title)
            for (title, rows), colour in zip(inputs.funnel.items(), colours)
        )
        sections.append(
            f"<h2>3. The corpus: crawl → documents → shards</h2>{charts}{explain('funnel')}"
            + filter_table_html(inputs.filter_table)
        )
    if inputs.samples:
        blocks = "".join(f"<h3>{esc(title)}</h3>{block}" for title, block in inputs.samples)
        sections.append(
            "<h2>4. Training samples, whole</h2><p>Windows as the trainer reads them, rendered by "
            "<code>m3w inspect</code>: each picture where its <code>&lt;image&gt;</code> token stands; … marks "
            f'where a window cuts its document (at a token boundary).</p><div class="inspect">{blocks}</div>'
        )
    if inputs.training:
        losses, gates = training_figures(inputs.training)
        tb = f"<p>TensorBoard: <code>tensorboard --logdir {esc(inputs.tensorboard)}</code> (one folder per run: " \
             "training curves, eval scores and rendered prompts).</p>" if inputs.tensorboard else ""  # fmt: skip
        sections.append(
            "<h2>5. Training</h2>"
            + figure(losses, "<b>Training loss per dataset.</b>", "training loss")
            + explain("training")
            + figure(gates, "<b>Gate values.</b>", "gate values")
            + explain("gates")
            + tb
        )
    if inputs.times or inputs.commands:
        times = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f} s</td></tr>" for k, v in inputs.times.items())
        commands = "".join(f"<li><code>{esc(c)}</code></li>" for c in inputs.commands)
        sections.append(
            f'<h2>6. How this was made</h2><ol class="commands">{commands}</ol>'
            f'<table class="results"><tr><th>step</th><th>time</th></tr>{times}</table>'
        )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(inputs.title)}</title>'
        f"<style>{INSPECT_STYLE}\n{STYLE}</style></head><body><h1>{esc(inputs.title)}</h1>"
        f'<p class="summary">{esc(inputs.summary)}</p>{verdict_html(inputs.verdict)}{"".join(sections)}'
        "</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
