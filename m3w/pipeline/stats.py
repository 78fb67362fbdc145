"""`m3w stats`: the funnel of a pipeline run, from stage manifests, as a table and a PNG bar chart.

For the filter stage the funnel is input → each filter (in the order documents meet them) → output, for
documents, paragraphs, images and words; each item is dropped by exactly one filter, so every row is the
previous row minus that filter's drops. Other stages contribute their summed counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from m3w.pipeline.manifest import Manifest
from m3w.schemas import manifest as spec

MEASURES = ("documents", "paragraphs", "images", "words")


def current_totals(manifest: Manifest) -> tuple[dict[str, int], int, int]:
    """Counts summed over units done under the most recent config, with (units counted, units in manifest).

    A re-run under a new config rewrites every unit; counting only the newest config keeps an interrupted
    re-run from mixing two configs in one funnel.
    """
    entries = manifest.entries()
    if not entries:
        return {}, 0, 0
    latest_hash = max(entries.values(), key=lambda e: e.get("time", ""))["config_hash"]
    totals: dict[str, int] = {}
    counted = 0
    for entry in entries.values():
        if entry["status"] == spec.STATUS_DONE and entry.get("config_hash") == latest_hash:
            counted += 1
            for key, value in entry["counts"].items():
                totals[key] = totals.get(key, 0) + value
    return totals, counted, len(entries)


def _filter_order(names: set[str]) -> list[str]:
    from m3w.pipeline.filters import filter_names
    from m3w.pipeline.image_filters import ROW_STEPS

    known = [*filter_names(), *ROW_STEPS]
    return sorted(names, key=lambda n: (known.index(n) if n in known else len(known), n))


def filter_rows(stage: str, totals: dict[str, int]) -> list[dict[str, Any]]:
    """Funnel rows of a filter manifest: remaining counts after each step, and what that step dropped."""
    remaining = {m: totals.get(f"in.{m}", 0) for m in MEASURES}
    rows = [{"stage": stage, "step": "input", **remaining, "dropped": dict.fromkeys(MEASURES, 0)}]
    names = {key[len("drop.") :].rsplit(".", 1)[0] for key in totals if key.startswith("drop.")}
    for name in _filter_order(names):
        dropped = {m: totals.get(f"drop.{name}.{m}", 0) for m in MEASURES}
        remaining = {m: remaining[m] - dropped[m] for m in MEASURES}
        rows.append({"stage": stage, "step": name, **remaining, "dropped": dropped})
    out = {m: totals.get(f"out.{m}", 0) for m in MEASURES}
    rows.append({"stage": stage, "step": "output", **out, "dropped": dict.fromkeys(MEASURES, 0)})
    return rows


def funnel(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Rows of the funnel over stage output directories, in the order given.

    Each row: {"stage", "step", "documents", "paragraphs", "images", "words", "dropped": {measure: n}} for
    the filter stage; {"stage", "step": "totals", "counts": {...}} for other stages.
    """
    rows: list[dict[str, Any]] = []
    for directory in map(str, dirs):
        stages = Manifest.stages(directory)
        if not stages:
            raise FileNotFoundError(f"no stage manifest in {directory}: not a stage output directory")
        for stage in stages:
            totals, counted, units = current_totals(Manifest(directory, stage))
            if any(key.startswith("in.") for key in totals):
                rows.extend(filter_rows(stage, totals))
            else:
                rows.append({"stage": stage, "step": "totals", "counts": totals, "units": (counted, units)})
    return rows


def format_funnel(rows: list[dict[str, Any]]) -> str:
    lines = []
    header = f"{'stage':<8} {'step':<30}" + "".join(f"{m:>22}" for m in MEASURES)
    for i, row in enumerate(rows):
        if "counts" not in row:
            if i == 0 or "counts" in rows[i - 1] or rows[i - 1]["stage"] != row["stage"]:
                lines.append(header)
            cells = []
            for m in MEASURES:
                lost = row["dropped"][m]
                cells.append(f"{row[m]:>12,}" + (f" (-{lost:,})" if lost else "").rjust(10))
            lines.append(f"{row['stage']:<8} {row['step']:<30}" + "".join(f"{c:>22}" for c in cells))
        else:
            counted, units = row["units"]
            shown = ", ".join(f"{k}={v:,}" for k, v in sorted(row["counts"].items()))
            lines.append(f"{row['stage']}: {counted}/{units} units: {shown}")
    return "\n".join(lines)


def format_skips(dirs: list[str | Path], reason: str | None = None, limit: int = 50) -> str:
    """The extract stage's per-record skip logs (`m3w.schemas.skips`) of done units: a count per reason, then
    the first `limit` records (of `reason` only, when given) with their WARC, offset, record id and detail."""
    from collections import Counter

    from m3w.schemas.skips import iter_skips, skip_log_files

    lines = []
    for directory in map(Path, dirs):
        units = Manifest(directory, "extract").done_units()
        files = skip_log_files(directory, units)
        by_reason: Counter = Counter()
        shown = []
        for row in iter_skips(files):
            by_reason[row["reason"]] += 1
            if (reason is None or row["reason"] == reason) and len(shown) < limit:
                shown.append(row)
        lines.append(f"{directory}: {sum(by_reason.values()):,} skipped records in {len(files)} of {len(units)} "
                     f"done extract units")  # fmt: skip
        lines += [f"  {name:<28} {n:>12,}" for name, n in by_reason.most_common()]
        for row in shown:
            where = f"{row['warc_path'].rsplit('/', 1)[-1]}@{row['offset']}" + (
                f"+{row['length']}" if row["length"] is not None else ""
            )
            record = row["record_id"] or f"({row['record_type'] or 'damage'})"
            lines.append(f"  {row['reason']:<22} {where} {record} {row['url'] or ''}\n      {row['detail']}")
    return "\n".join(lines)


def plot_funnel(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One horizontal bar chart per measure: what remains after each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "counts" not in r]
    if not rows:
        raise ValueError("no filter funnel in these manifests to plot")
    labels = [f"{r['stage']}: {r['step']}" for r in rows]
    fig, axes = plt.subplots(
        1, len(MEASURES), figsize=(4 * len(MEASURES) + 3, 0.32 * len(rows) + 1.5), sharey=True
    )
    for ax, measure in zip(axes, MEASURES):
        values = [r[measure] for r in rows]
        ax.barh(
            range(len(rows)),
            values,
            color=["#4c72b0" if r["step"] not in ("input", "output") else "#dd8452" for r in rows],
        )
        ax.set_title(measure)
        ax.ticklabel_format(axis="x", style="plain")
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()  # the axes share y: inverting each would cancel out; input on top
    fig.suptitle("m3w funnel: what remains after each step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@click.command("stats")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--png", "png_path", type=click.Path(dir_okay=False), help="Chart path (default: LAST_DIR/_funnel.png)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the funnel rows as JSON instead of a table.")
@click.option(
    "--skips", "list_skips", is_flag=True, help="List extract's skipped records (per-record skip logs)."
)
@click.option("--reason", default=None, help="With --skips: only records skipped for this reason.")
@click.option(
    "--limit", type=int, default=50, show_default=True, help="With --skips: records listed per dir."
)
def stats_cmd(
    dirs: tuple[str, ...],
    png_path: str | None,
    as_json: bool,
    list_skips: bool,
    reason: str | None,
    limit: int,
) -> None:
    """Funnel table (input → each filter → output) and a PNG bar chart from the manifests in DIRS."""
    if list_skips:
        click.echo(format_skips(list(dirs), reason, limit))
        return
    try:
        rows = funnel(list(dirs))
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(json.dumps(rows, indent=1) if as_json else format_funnel(rows))
    if any("counts" not in r for r in rows):
        path = plot_funnel(rows, png_path or Path(dirs[-1]) / "_funnel.png")
        click.echo(f"chart: {path}", err=as_json)
