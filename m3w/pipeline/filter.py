"""`m3w filter`: documents/ → filtered/ + excluded/, with quality filters and corpus-wide dedup.

Three phases, each cached so that a config change recomputes only what it touches:

1. signals (one Ray task per unit): per-node text statistics, language, hashes and MinHash signatures, cached
   in `OUT/_cache/signals/` under the input file's fingerprint and `FilterConfig.signals_part()`;
2. dedup (a Ray task graph over hash partitions of the signals' keys, see `pipeline/dedup/`): one drop list per
   unit, cached in `OUT/_cache/dedup/` under the dedup config and the signal files;
3. decide (one Ray task per unit): thresholds on the cached signals and the unit's own drop list; writes
   `OUT/<unit>.parquet` (kept documents, failed nodes removed, node_index unchanged) and
   `OUT/excluded/<unit>.parquet` (every drop with its reason).

The stage manifest's config hash covers the whole config and the dedup decisions it used, so a threshold change
re-runs phase 3 only, and a re-run with nothing changed does nothing. WARC files are never read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
import pyarrow.compute as pc

from m3w.cli import OutputDir, stage_options
from m3w.config import to_dict
from m3w.pipeline import io
from m3w.pipeline.dedup import DedupError, SignalsUnit, UnitDrops, load_unit_drops, run_dedup
from m3w.pipeline.filters import (
    DocumentItem,
    FilterConfig,
    ImageItem,
    Step,
    document_steps,
    first_drops,
    image_steps,
    paragraph_steps,
    run_steps,
)
from m3w.pipeline.filters.lang import identify
from m3w.pipeline.filters.signals import signals_table, stats_columns, stats_of
from m3w.pipeline.filters.text import MAX_STATS_CHARS, TextStats, word_repetition_ratio, words
from m3w.pipeline.io import atomic_path, name_of, stable_hash
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.ray_runner import Unit, init_ray, run_units
from m3w.schemas.documents import (
    NODE_IMAGE,
    NODE_TEXT,
    DocumentWriter,
    document_files,
    iter_documents,
    write_excluded,
)
from m3w.schemas.filter_cache import SIGNALS_VERSION, iter_signals, write_signals

STAGE = "filter"
_SIGNALS_COUNTS = ("documents", "band_rows", "image_rows", "paragraph_rows")
SIGNALS_STAGE = "filter.signals"
CACHE_DIR = "_cache"
EXCLUDED_DIR = "excluded"
MEASURES = ("documents", "paragraphs", "images", "words")
CONTENT_CHARS = 1000  # of a paragraph kept in excluded/, enough to read why it went
ROWS_PER_GROUP = 256
# ---------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputUnit:
    name: str
    path: str  # a local path or a URL
    fingerprint: str  # changes when the file is rewritten: cached signals of the old file go stale


def discover_units(docs_dir: str | Path) -> list[InputUnit]:
    """The documents files of an extract output directory (one parquet per unit, temp files ignored)."""
    units = []
    for path in document_files(io.absolute(docs_dir)):
        name = io.name_of(path)
        units.append(
            InputUnit(name.removesuffix(".parquet"), path, stable_hash([name, io.version_of(path)], 12))
        )
    return units


# ---------------------------------------------------------------------------------------------------- phase 1


@dataclass(frozen=True)
class SignalsTask:
    docs_path: str
    out_path: str
    config: FilterConfig


def signals_unit(task: SignalsTask) -> tuple[str, dict[str, int]]:
    table = signals_table(iter_documents(task.docs_path), task.config)
    write_signals(table, task.out_path)
    return io.name_of(task.out_path), {
        "documents": table.num_rows,
        # Key rows each dedup rule gets from this unit: they size its partitions.
        "band_rows": len(pc.list_flatten(table["bands"])),
        "image_rows": len(pc.list_flatten(table["images"])),
        "paragraph_rows": len(pc.list_flatten(table["nodes"])),
    }


# ---------------------------------------------------------------------------------------------------- phase 3


@dataclass(frozen=True)
class DecideTask:
    unit: str
    docs_path: str
    signals_path: str
    drops_path: str | None  # the unit's dedup drop list; None when dedup is off
    out_dir: str
    config: FilterConfig


class Funnel:
    """Counts for the manifest: `in.<measure>`, `drop.<filter>.<measure>`, `out.<measure>`."""

    def __init__(self) -> None:
        # in/out always present (also as 0), so a unit that keeps nothing still says so.
        self.counts: Counter = Counter({f"{p}.{m}": 0 for p in ("in", "out") for m in MEASURES})
        self._keys: dict[str, list[str]] = {}

    def add(
        self, prefix: str, documents: int = 0, paragraphs: int = 0, images: int = 0, words: int = 0
    ) -> None:
        keys = self._keys.get(prefix) or self._keys.setdefault(prefix, [f"{prefix}.{m}" for m in MEASURES])
        for key, value in zip(keys, (documents, paragraphs, images, words)):
            if value:
                self.counts[key] += value


def _node_words(node: dict[str, Any], node_stats: dict[int, dict[str, Any]]) -> int:
    return node_stats[node["node_index"]]["words"] if node["kind"] == NODE_TEXT else 0


def _sizes(nodes: list[dict[str, Any]], node_stats: dict[int, dict[str, Any]]) -> dict[str, int]:
    paragraphs = images = words = 0
    for node in nodes:  # one pass: this runs twice for every document
        if node["kind"] == NODE_TEXT:
            paragraphs += 1
            words += node_stats[node["node_index"]]["words"]
        elif node["kind"] == NODE_IMAGE:
            images += 1
    return {"paragraphs": paragraphs, "images": images, "words": words}


def _excluded(doc: dict[str, Any], level: str, node: dict[str, Any] | None, name: str, reason: str) -> dict:
    if node is None:
        content = doc.get("url")
    else:
        content = node.get("url") if node["kind"] == NODE_IMAGE else (node.get("text") or "")[:CONTENT_CHARS]
    return {
        "doc_id": doc["doc_id"],
        "url": doc.get("url"),
        "level": level,
        "node_index": None if node is None else node["node_index"],
        "filter": name,
        "reason": reason,
        "content": content,
    }


def document_item(
    nodes: list[dict[str, Any]], node_stats: dict[int, dict[str, Any]], config: FilterConfig
) -> DocumentItem:
    """Document-level statistics of the nodes that survived: per-node counts are summed from the cache; the
    language and the repetition of the joined text are measured on what is left."""
    text_nodes = [n for n in nodes if n["kind"] == NODE_TEXT]
    stats = [node_stats[n["node_index"]] for n in text_nodes]
    n_words = sum(s["words"] for s in stats)
    n_chars = sum(s["chars"] for s in stats)
    text = "\n".join(n.get("text") or "" for n in text_nodes)
    lang, score = identify(text)

    def mean(key: str, weight: str) -> float:
        total = n_chars if weight == "chars" else n_words
        return sum(s[key] * s[weight] for s in stats) / total if total else 0.0

    return DocumentItem(
        images=sum(1 for n in nodes if n["kind"] == NODE_IMAGE),
        text=TextStats(
            words=n_words,
            char_repetition=mean("char_repetition", "chars"),
            word_repetition=word_repetition_ratio(
                words(text[:MAX_STATS_CHARS]), config.stats.word_repetition_ngram
            ),
            special_chars=mean("special_chars", "chars"),
            stopwords=mean("stopwords", "words"),
            flagged_words=mean("flagged_words", "words"),
        ),
        lang=lang,
        lang_score=score,
    )


class DocumentFilter:
    """Applies the steps and a unit's dedup drops to one document at a time, counting into a Funnel."""

    def __init__(
        self, config: FilterConfig, drops: UnitDrops | None = None, signals: pa.Table | None = None
    ) -> None:
        self.config = config
        self.drops = drops or UnitDrops()
        self.image_steps = image_steps(config)
        self.paragraph_steps = paragraph_steps(config)
        self.document_steps = document_steps(config)
        self.funnel = Funnel()
        # Paragraph thresholds of a batch of documents decided in one numpy pass: (row, node_index) → index of
        # the first paragraph step that drops the node (-1: kept). Without a batch, nodes are decided one by one.
        self.paragraph_verdicts: dict[tuple[int, int], int] | None = None
        if signals is not None:
            self.judge_paragraphs(signals)

    def judge_paragraphs(self, signals: pa.Table, first_row: int = 0) -> None:
        """Decide the paragraphs of the documents in `signals` (rows first_row, first_row + 1, … of the unit)."""
        rows, node_index, stats = stats_columns(signals)
        first = first_drops(self.paragraph_steps, stats, len(node_index))
        self.paragraph_verdicts = dict(
            zip(zip((rows + first_row).tolist(), node_index.tolist()), first.tolist())
        )

    def steps(self) -> list[Step]:
        return [*self.image_steps, *self.paragraph_steps, *self.document_steps]

    def _paragraph_drop(self, row: int, node_stats: dict[str, Any]) -> tuple[str, str] | None:
        if self.paragraph_verdicts is None:
            return run_steps(self.paragraph_steps, stats_of(node_stats))
        first = self.paragraph_verdicts[(row, node_stats["node_index"])]
        if first < 0:
            return None
        step = self.paragraph_steps[first]
        return step.name, step.keep(stats_of(node_stats))[1]

    def _node_drop(
        self, row: int, node: dict[str, Any], stats: dict[int, dict[str, Any]]
    ) -> tuple[str, str] | None:
        # Dedup drops a node only if the quality steps kept it, so each node has one reason: the first.
        if node["kind"] == NODE_IMAGE:
            item = ImageItem(node.get("url") or "", node.get("alt"), node.get("width"), node.get("height"))
            dropped = run_steps(self.image_steps, item)
        elif node["kind"] == NODE_TEXT:
            dropped = self._paragraph_drop(row, stats[node["node_index"]])
        else:
            return None  # video nodes are judged by the video pipeline
        return dropped or self.drops.nodes.get((row, node["node_index"]))

    def __call__(
        self, doc: dict[str, Any], signals: dict[str, Any], row: int = -1
    ) -> tuple[dict[str, Any] | None, list[dict]]:
        """Decide document `doc` (row `row` of its unit, which keys its dedup drops) from its signals."""
        nodes = doc.get("nodes") or []
        stats = {s["node_index"]: s for s in signals["nodes"]}
        self.funnel.add("in", documents=1, **_sizes(nodes, stats))
        doc_drop = self.drops.documents.get(row)
        if doc_drop is not None:
            self.funnel.add(f"drop.{doc_drop[0]}", documents=1, **_sizes(nodes, stats))
            return None, [_excluded(doc, "document", None, *doc_drop)]

        excluded, kept = [], []
        for node in nodes:
            dropped = self._node_drop(row, node, stats)
            if dropped is None:
                kept.append(node)
                continue
            if node["kind"] == NODE_IMAGE:
                self.funnel.add(f"drop.{dropped[0]}", images=1)
                excluded.append(_excluded(doc, "image", node, *dropped))
            else:
                self.funnel.add(f"drop.{dropped[0]}", paragraphs=1, words=_node_words(node, stats))
                excluded.append(_excluded(doc, "paragraph", node, *dropped))

        # (The document statistics cost a language identification: skipped when no document step runs.)
        item = document_item(kept, stats, self.config) if self.document_steps else None
        dropped = run_steps(self.document_steps, item) if item is not None else None
        if dropped is not None:
            self.funnel.add(f"drop.{dropped[0]}", documents=1, **_sizes(kept, stats))
            excluded.append(_excluded(doc, "document", None, *dropped))
            return None, excluded
        self.funnel.add("out", documents=1, **_sizes(kept, stats))
        return {**doc, "nodes": kept}, excluded


def decide_unit(task: DecideTask) -> tuple[str, dict[str, int]]:
    drops = load_unit_drops(task.drops_path) if task.drops_path else None
    doc_filter = DocumentFilter(task.config, drops)
    # Signals stream beside the documents, batch by batch, so memory does not grow with the unit.
    batches = iter_signals(task.signals_path, ["doc_id", "nodes"], ROWS_PER_GROUP)
    batch: list[dict[str, Any]] = []
    start = 0
    out_dir = task.out_dir
    output = f"{task.unit}.parquet"
    excluded: list[dict[str, Any]] = []
    # Kept documents stream out in row groups. Each file is renamed into place only when whole, and the
    # manifest records the unit only after both exist, so a killed unit is simply redone.
    with atomic_path(io.join(out_dir, output)) as tmp, DocumentWriter(tmp, ROWS_PER_GROUP) as writer:
        row = -1
        for row, doc in enumerate(iter_documents(task.docs_path)):  # noqa: B007 - `row` is checked after
            if row == start + len(batch):
                table = next(batches, None)
                batch, start = (table.to_pylist() if table is not None else []), row
                if table is not None:
                    doc_filter.judge_paragraphs(table, row)
            signals = batch[row - start] if row - start < len(batch) else None
            if signals is None or signals["doc_id"] != doc["doc_id"]:
                raise ValueError(f"{task.signals_path} does not match {task.docs_path} at row {row}")
            out, dropped = doc_filter(doc, signals, row)
            excluded.extend(dropped)
            if out is not None:
                writer.write(out)
    if row - start + 1 < len(batch) or next(batches, None) is not None:
        raise ValueError(f"{task.signals_path} has more rows than {task.docs_path}")
    with atomic_path(io.join(out_dir, EXCLUDED_DIR, output)) as tmp:
        write_excluded(excluded, tmp)
    counts = Counter(doc_filter.funnel.counts)
    for step in doc_filter.steps():
        counts[f"seen.{step.name}"] += sum(step.counters.values())
    return output, dict(counts)


# ---------------------------------------------------------------------------------------------------- driver


def run_filter(
    docs_dir: str | Path,
    out_dir: str | Path,
    config: FilterConfig | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Filter and dedup every unit of `docs_dir` into `out_dir`. Returns a summary with the funnel counts."""
    config = config or FilterConfig()
    out_dir = io.absolute(out_dir)
    units = discover_units(docs_dir)
    if not units:
        raise FileNotFoundError(f"no documents (*.parquet) in {docs_dir}")
    init_ray(ray_address)

    signals_hash = stable_hash({"version": SIGNALS_VERSION, **config.signals_part()})
    signals_dir = io.join(out_dir, CACHE_DIR, "signals")
    signals_path = {
        u.name: io.join(signals_dir, f"{u.name}.{u.fingerprint}.{signals_hash}.parquet") for u in units
    }
    signals = run_units(
        signals_unit,
        [
            Unit(f"{u.name}@{u.fingerprint}", SignalsTask(str(u.path), str(signals_path[u.name]), config))
            for u in units
        ],
        Manifest(signals_dir, SIGNALS_STAGE, signals_hash),
        workers=workers,
        ray_address=ray_address,
        desc="filter: signals",
        rate_key="documents",
    )
    failed = {uid.split("@", 1)[0]: err for uid, err in signals.failures.items()}
    ready = [u for u in units if u.name not in failed]

    counts = Manifest(signals_dir, SIGNALS_STAGE, signals_hash).entries()
    dedup_units = [
        SignalsUnit(
            u.name,
            str(signals_path[u.name]),
            **{
                k: v for k, v in counts[f"{u.name}@{u.fingerprint}"]["counts"].items() if k in _SIGNALS_COUNTS
            },
        )
        for u in ready
    ]
    dedup, dedup_error = None, None
    if config.dedup.enabled and dedup_units:
        try:
            dedup = run_dedup(dedup_units, config.dedup, io.join(out_dir, CACHE_DIR, "dedup"))
        except DedupError as exc:
            dedup_error = str(exc)

    config_hash = stable_hash({"config": to_dict(config), "dedup": dedup and name_of(dedup.directory)})
    manifest = Manifest(out_dir, STAGE, config_hash)
    for name, error in failed.items():
        manifest.failed(name, f"signals: {error}")
    if dedup_error:  # nothing can be decided without the corpus-wide drops; a re-run resumes the dedup
        for u in ready:
            manifest.failed(u.name, dedup_error)
            failed[u.name] = dedup_error
        ready = []
    tasks = [
        Unit(
            u.name,
            DecideTask(
                u.name,
                str(u.path),
                str(signals_path[u.name]),
                dedup and dedup.drops_file(u.name),
                str(out_dir),
                config,
            ),
        )
        for u in ready
    ]
    decided = run_units(
        decide_unit,
        tasks,
        manifest,
        workers=workers,
        ray_address=ray_address,
        desc="filter",
        rate_key="in.documents",
    )
    return {
        "units": len(units),
        "done": decided.done,
        "skipped": decided.skipped,
        "failed": decided.failed + len(failed),
        "failures": {**failed, **decided.failures},
        "signals_computed": signals.done,
        "signals_cached": signals.skipped,
        "dedup_cached": bool(dedup and dedup.cached),
        "dedup_tasks": dedup.tasks if dedup else [],
        "config_hash": config_hash,
        "counts": dict(manifest.totals()),
        "seconds": signals.seconds + decided.seconds,
    }


@click.command("filter")
@click.argument("docs_dir")
@click.option("--out", "out_dir", required=True, type=OutputDir(), help="Output directory.")
@stage_options(FilterConfig)
def filter_cmd(
    docs_dir: str, out_dir: str, config: FilterConfig, workers: int | None, ray_address: str | None
) -> None:
    """Quality filters and corpus-wide dedup: DOCS_DIR (documents/) → OUT (kept) + OUT/excluded/ (reasons)."""
    from m3w.pipeline.stats import format_funnel, funnel

    summary = run_filter(docs_dir, out_dir, config, workers=workers, ray_address=ray_address)
    click.echo(format_funnel(funnel([out_dir])))
    click.echo(
        f"units: {summary['done']} filtered, {summary['skipped']} already done, {summary['failed']} failed; "
        f"signals cached for {summary['signals_cached']}/{summary['units']}; dedup cached: {summary['dedup_cached']}"
    )
    for unit, error in summary["failures"].items():
        click.echo(f"FAILED {unit}: {error.splitlines()[0]}", err=True)
    if summary["failed"]:
        raise SystemExit(1)
