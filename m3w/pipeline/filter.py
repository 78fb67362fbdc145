"""`m3w filter`: documents/ → filtered/ + excluded/, with quality filters and corpus-wide dedup.

Three phases, each cached so that a config change recomputes only what it touches:

1. signals (one Ray task per unit): per-node text statistics, language, hashes and MinHash signatures, cached
   in `OUT/_cache/signals/` under the input file's fingerprint and `FilterConfig.signals_part()`;
2. dedup (Ray tasks per key partition / LSH band, see `pipeline/dedup.py`): corpus-wide decisions, cached in
   `OUT/_cache/dedup/` under the dedup config and the signal files;
3. decide (one Ray task per unit): thresholds on the cached signals; writes `OUT/<unit>.parquet` (kept documents,
   failed nodes removed, node_index unchanged) and `OUT/excluded/<unit>.parquet` (every drop with its reason).

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
import pyarrow.parquet as pq

from m3w.cli import OutputDir, stage_options
from m3w.config import to_dict
from m3w.pipeline.dedup import DedupDecisions, load_decisions, run_dedup
from m3w.pipeline.filters import (
    DOMAIN_PARAGRAPH,
    IMAGE_FREQUENCY,
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
from m3w.pipeline.filters.signals import domain_of, signals_table, stats_columns, stats_of
from m3w.pipeline.filters.text import MAX_STATS_CHARS, TextStats, word_repetition_ratio, words
from m3w.pipeline.io import atomic_path, stable_hash, write_parquet_atomic
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
from m3w.schemas.filter_cache import SIGNALS_VERSION

STAGE = "filter"
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
    path: Path
    fingerprint: str  # changes when the file is rewritten: cached signals of the old file go stale


def discover_units(docs_dir: str | Path) -> list[InputUnit]:
    """The documents files of an extract output directory (one parquet per unit, temp files ignored)."""
    units = []
    for path in document_files(docs_dir):
        st = path.stat()
        units.append(InputUnit(path.stem, path, stable_hash([path.name, st.st_size, st.st_mtime_ns], 12)))
    return units


# ---------------------------------------------------------------------------------------------------- phase 1


@dataclass(frozen=True)
class SignalsTask:
    docs_path: str
    out_path: str
    config: FilterConfig


def signals_unit(task: SignalsTask) -> tuple[str, dict[str, int]]:
    table = signals_table(iter_documents(task.docs_path), task.config)
    write_parquet_atomic(table, task.out_path)
    return Path(task.out_path).name, {"documents": table.num_rows}


# ---------------------------------------------------------------------------------------------------- phase 3


@dataclass(frozen=True)
class DecideTask:
    unit: str
    docs_path: str
    signals_path: str
    decisions_dir: str
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
    return {
        "paragraphs": sum(1 for n in nodes if n["kind"] == NODE_TEXT),
        "images": sum(1 for n in nodes if n["kind"] == NODE_IMAGE),
        "words": sum(_node_words(n, node_stats) for n in nodes),
    }


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
    """Applies the steps and the dedup decisions to one document at a time, counting into a Funnel."""

    def __init__(
        self, config: FilterConfig, decisions: DedupDecisions, signals: pa.Table | None = None
    ) -> None:
        self.config = config
        self.decisions = decisions
        self.image_steps = image_steps(config)
        self.paragraph_steps = paragraph_steps(config)
        self.document_steps = document_steps(config)
        self.funnel = Funnel()
        # Paragraph thresholds of a whole unit decided in one numpy pass: (doc_id, node_index) → index of the
        # first paragraph step that drops the node (-1: kept). Without a table, nodes are decided one by one.
        self.paragraph_verdicts: dict[tuple[str, int], int] | None = None
        if signals is not None:
            rows, node_index, stats = stats_columns(signals)
            first = first_drops(self.paragraph_steps, stats, len(node_index))
            doc_ids = signals["doc_id"].to_pylist()
            self.paragraph_verdicts = {
                (doc_ids[r], i): f for r, i, f in zip(rows.tolist(), node_index.tolist(), first.tolist())
            }

    def steps(self) -> list[Step]:
        return [*self.image_steps, *self.paragraph_steps, *self.document_steps]

    def _paragraph_drop(self, doc_id: str, node_stats: dict[str, Any]) -> tuple[str, str] | None:
        if self.paragraph_verdicts is None:
            return run_steps(self.paragraph_steps, stats_of(node_stats))
        first = self.paragraph_verdicts[(doc_id, node_stats["node_index"])]
        if first < 0:
            return None
        step = self.paragraph_steps[first]
        return step.name, step.keep(stats_of(node_stats))[1]

    def _node_drop(
        self, doc_id: str, node: dict[str, Any], stats: dict[int, dict[str, Any]], domain: str
    ) -> tuple[str, str] | None:
        if node["kind"] == NODE_IMAGE:
            url = node.get("url") or ""
            item = ImageItem(url, node.get("alt"), node.get("width"), node.get("height"))
            dropped = run_steps(self.image_steps, item)
            if dropped is None and url in self.decisions.image_urls:
                limit = self.config.dedup.image_url_max_docs
                return IMAGE_FREQUENCY, f"URL in {self.decisions.image_urls[url]} documents > {limit}"
            return dropped
        if node["kind"] == NODE_TEXT:
            node_stats = stats[node["node_index"]]
            dropped = self._paragraph_drop(doc_id, node_stats)
            repeats = self.decisions.paragraphs.get((domain, node_stats["hash"]))
            if dropped is None and repeats is not None:
                limit = self.config.dedup.paragraph_max_docs_per_domain
                return DOMAIN_PARAGRAPH, f"in {repeats} documents of {domain} > {limit}"
            return dropped
        return None  # video nodes are judged by the video pipeline

    def __call__(
        self, doc: dict[str, Any], signals: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, list[dict]]:
        nodes = doc.get("nodes") or []
        stats = {s["node_index"]: s for s in signals["nodes"]}
        self.funnel.add("in", documents=1, **_sizes(nodes, stats))
        doc_drop = self.decisions.documents.get(doc["doc_id"])
        if doc_drop is not None:
            self.funnel.add(f"drop.{doc_drop[0]}", documents=1, **_sizes(nodes, stats))
            return None, [_excluded(doc, "document", None, *doc_drop)]

        excluded, kept = [], []
        domain = signals["domain"] or domain_of(doc)
        for node in nodes:
            dropped = self._node_drop(doc["doc_id"], node, stats, domain)
            if dropped is None:
                kept.append(node)
                continue
            if node["kind"] == NODE_IMAGE:
                self.funnel.add(f"drop.{dropped[0]}", images=1)
                excluded.append(_excluded(doc, "image", node, *dropped))
            else:
                self.funnel.add(f"drop.{dropped[0]}", paragraphs=1, words=_node_words(node, stats))
                excluded.append(_excluded(doc, "paragraph", node, *dropped))

        dropped = run_steps(self.document_steps, document_item(kept, stats, self.config))
        if dropped is not None:
            self.funnel.add(f"drop.{dropped[0]}", documents=1, **_sizes(kept, stats))
            excluded.append(_excluded(doc, "document", None, *dropped))
            return None, excluded
        self.funnel.add("out", documents=1, **_sizes(kept, stats))
        return {**doc, "nodes": kept}, excluded


def decide_unit(task: DecideTask) -> tuple[str, dict[str, int]]:
    table = pq.read_table(task.signals_path, columns=["doc_id", "domain", "nodes"])
    signals = {row["doc_id"]: row for row in table.to_pylist()}
    decisions = load_decisions(Path(task.decisions_dir))
    if decisions is None:
        raise RuntimeError(f"dedup decisions missing in {task.decisions_dir}")
    doc_filter = DocumentFilter(task.config, decisions, table)
    out_dir = Path(task.out_dir)
    output = f"{task.unit}.parquet"
    excluded: list[dict[str, Any]] = []
    # Kept documents stream out in row groups. Each file is renamed into place only when whole, and the
    # manifest records the unit only after both exist, so a killed unit is simply redone.
    with atomic_path(out_dir / output) as tmp, DocumentWriter(tmp, ROWS_PER_GROUP) as writer:
        for doc in iter_documents(task.docs_path):
            out, dropped = doc_filter(doc, signals[doc["doc_id"]])
            excluded.extend(dropped)
            if out is not None:
                writer.write(out)
    with atomic_path(out_dir / EXCLUDED_DIR / output) as tmp:
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
    out_dir = Path(out_dir)
    units = discover_units(docs_dir)
    if not units:
        raise FileNotFoundError(f"no documents (*.parquet) in {docs_dir}")
    init_ray(ray_address)

    signals_hash = stable_hash({"version": SIGNALS_VERSION, **config.signals_part()})
    signals_dir = out_dir / CACHE_DIR / "signals"
    signals_path = {u.name: signals_dir / f"{u.name}.{u.fingerprint}.{signals_hash}.parquet" for u in units}
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

    decisions_files = [str(signals_path[u.name]) for u in ready]
    _, decisions_dir, dedup_cached = run_dedup(decisions_files, config.dedup, out_dir / CACHE_DIR / "dedup")

    config_hash = stable_hash({"config": to_dict(config), "dedup": decisions_dir.name})
    manifest = Manifest(out_dir, STAGE, config_hash)
    for name, error in failed.items():
        manifest.failed(name, f"signals: {error}")
    tasks = [
        Unit(
            u.name,
            DecideTask(
                u.name, str(u.path), str(signals_path[u.name]), str(decisions_dir), str(out_dir), config
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
        "dedup_cached": dedup_cached,
        "config_hash": config_hash,
        "counts": dict(manifest.totals()),
        "seconds": signals.seconds + decided.seconds,
    }


@click.command("filter")
@click.argument("docs_dir", type=click.Path(exists=True, file_okay=False))
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
