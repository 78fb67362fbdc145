"""`m3w extract`: WARC files → `documents/` (one parquet file per WARC, DOCUMENT_SCHEMA) + `_manifest/`.

One Ray task per WARC. Each task streams the WARC's HTML responses, turns every page into a document
(`m3w.pipeline.html_extract`), and writes row groups as it goes into a temp file renamed into place at the end, so
memory stays flat whatever the WARC size and a killed job leaves no partial output. Every response record that
yields no document, and every damaged stretch of the WARC, is counted under `skip.<reason>` and logged with its
offset and record id in `_skips/<unit>.parquet` (`m3w.schemas.skips`). A file that is not a WARC, or that ends
inside a record, fails its unit with the reason (retried on the next run), never "done".
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from m3w.cli import OutputDir, stage_options
from m3w.config import from_dict, to_dict
from m3w.errors import UserError
from m3w.pipeline import io
from m3w.pipeline.html_extract import PageOptions, PageSkip, decode_html, extract_page
from m3w.pipeline.io import atomic_path, stable_hash
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.ray_runner import RunSummary, Unit, report_progress, run_units
from m3w.pipeline.warc import (
    DEFAULT_CC_BASE_URL,
    HtmlRecord,
    Skip,
    WarcOptions,
    iter_html_records,
    open_input,
    resolve_inputs,
)

STAGE = "extract"


@dataclass
class ExtractConfig:
    page: PageOptions = field(default_factory=PageOptions)
    warc: WarcOptions = field(default_factory=WarcOptions)
    rows_per_group: int = 500  # documents buffered before a parquet row group is written (bounds memory)


def unit_id(warc_path: str) -> str:
    """Stable, collision-free unit name: the WARC's basename plus a short hash of the path as given."""
    name = re.sub(r"\.(warc|arc)(\.gz|\.zst|\.lz4)?$", "", warc_path.rstrip("/").rsplit("/", 1)[-1])
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] or "warc"
    return f"{name}-{hashlib.sha1(warc_path.encode()).hexdigest()[:8]}"


def doc_id(warc_path: str, record_id: str) -> str:
    return hashlib.sha1(f"{warc_path}\n{record_id}".encode()).hexdigest()


def iter_warc_documents(
    warc_path: str, config: ExtractConfig, counts: Counter, on_skip: Callable[[Skip], None] | None = None
) -> Iterator[dict[str, Any]]:
    """Documents (DOCUMENT_SCHEMA rows) of one WARC, in record order. Every response record that yields none
    (and every damaged stretch of the file) is counted into `counts` as `skip.<reason>` and passed to `on_skip`.

    Raises if the WARC cannot be opened, is not a WARC, or ends inside a record (the unit then fails and is
    retried on the next run).
    """
    options = config.page

    def skipped(skip: Skip) -> None:
        counts[f"skip.{skip.reason}"] += 1
        if on_skip is not None:
            on_skip(skip)

    def page_skip(record: HtmlRecord, reason: str, detail: str) -> Skip:
        return Skip(reason, record.offset, record.length, record.record_id, "response", record.url, detail)

    with open_input(warc_path) as stream:
        # Live progress: HTML pages (the reader's `html` count) and bytes of the file behind us, reported as
        # they go by (a Common Crawl WARC is ~1 GB and takes minutes).
        reported = {"pages": counts["html"], "warc_bytes": 0}

        def progress() -> None:
            now = {"pages": counts["html"], "warc_bytes": stream.tell()}
            report_progress(**{key: value - reported[key] for key, value in now.items()})
            reported.update(now)

        for record in iter_html_records(stream, counts, options.max_html_bytes, config.warc):
            progress()
            if isinstance(record, Skip):
                skipped(record)
                continue
            try:
                html, charset = decode_html(
                    record.body, record.charset, options.max_replacement_ratio, utf8_as_bytes=True
                )
                page = extract_page(html, record.url, options)
            except PageSkip as skip:
                skipped(page_skip(record, skip.reason, str(skip)))
                continue
            except Exception as exc:  # noqa: BLE001 - one unparseable page must not cost the other pages of the WARC
                skipped(page_skip(record, "extract_error", f"{type(exc).__name__}: {exc}"))
                continue
            counts.update({f"image_drop.{k}": v for k, v in page.image_drops.items()})
            if not page.nodes:
                skipped(page_skip(record, "empty", "no text or media in the page's content"))
                continue
            kinds = Counter(n["kind"] for n in page.nodes)
            counts["documents"] += 1
            counts["text_nodes"] += kinds["text"]
            counts["image_nodes"] += kinds["image"]
            counts["video_nodes"] += kinds["video"]
            counts["html_bytes"] += len(record.body)
            yield {
                "doc_id": doc_id(warc_path, record.record_id),
                "url": record.url,
                "domain": urlsplit(record.url).hostname,
                "fetch_date": record.date,
                "warc_path": warc_path,
                "warc_record_id": record.record_id,
                "warc_offset": record.offset,
                "warc_length": record.length,
                "title": page.title,
                "lang_html": page.lang,
                "charset": charset,
                "og_image": page.og_image,
                "html_bytes": len(record.body),
                "nodes": page.nodes,
            }
        progress()  # the records after the last one yielded


def extract_unit(args: tuple[str, str, dict[str, Any]]) -> tuple[str, dict[str, int]]:
    """Ray task: one WARC → `<out_dir>/<unit>.parquet` and its skip log `<out_dir>/_skips/<unit>.parquet`, both
    written atomically. Returns (relpath, counts)."""
    from m3w.schemas.documents import DocumentWriter
    from m3w.schemas.skips import SkipLogWriter, skip_log_path

    warc_path, out_dir, config_dict = args
    config = from_dict(ExtractConfig, config_dict)
    unit = unit_id(warc_path)
    relpath = f"{unit}.parquet"
    counts: Counter = Counter()
    with (
        atomic_path(skip_log_path(out_dir, unit)) as skips_tmp,
        atomic_path(io.join(out_dir, relpath)) as tmp,
    ):
        with SkipLogWriter(skips_tmp) as skips, DocumentWriter(tmp, config.rows_per_group) as writer:

            def log(skip: Skip) -> None:
                skips.write({"warc_path": warc_path, **asdict(skip)})

            for row in iter_warc_documents(warc_path, config, counts, log):
                writer.write(row)
    return relpath, dict(counts)


def run_extract(
    inputs: Sequence[str],
    out_dir: str | Path,
    workers: int | None = None,
    ray_address: str | None = None,
    *,
    crawl: str | None = None,
    limit: int | None = None,
    cc_base_url: str = DEFAULT_CC_BASE_URL,
    config: ExtractConfig | None = None,
) -> RunSummary:
    """Extract every WARC named by `inputs` / `crawl` into `out_dir`. Done WARCs are skipped, failed ones retried."""
    config = config or ExtractConfig()
    try:
        warcs = resolve_inputs(inputs, crawl=crawl, limit=limit, cc_base_url=cc_base_url)
    except FileNotFoundError as exc:  # a glob that matches nothing
        raise UserError(str(exc)) from exc
    if not warcs:
        raise UserError("no input WARCs (give paths, globs, URLs, a paths file, or --crawl)")
    folders = [w for w in warcs if "://" not in w and Path(w).is_dir()]
    if folders:
        raise UserError(
            f"{folders[0]} is a directory: give WARC files, a glob such as 'DIR/*.warc.gz', or a paths file"
        )
    config_dict = to_dict(config)
    manifest = Manifest(out_dir, STAGE, stable_hash(config_dict))
    units = [Unit(unit_id(w), (w, io.absolute(out_dir), config_dict)) for w in warcs]
    if len({u.id for u in units}) != len(units):
        raise ValueError("two inputs map to the same unit name")  # only possible with a hash collision
    return run_units(
        extract_unit,
        units,
        manifest,
        workers=workers,
        ray_address=ray_address,
        desc=STAGE,
        rate_key="documents",
    )


def _print_summary(summary: RunSummary, out_dir: str) -> None:
    counts = summary.counts
    click.echo(
        f"extract: {summary.done} WARCs done, {summary.skipped} already done, {summary.failed} failed "
        f"in {summary.seconds:.1f}s → {out_dir}"
    )
    for key in sorted(counts):
        click.echo(f"  {key:<28} {counts[key]:>12,}")
    for unit, error in summary.failures.items():
        click.echo(f"  FAILED {unit}: {error.splitlines()[0]}", err=True)


@click.command("extract")
@click.argument("inputs", nargs=-1)
@click.option("--out", "out_dir", required=True, type=OutputDir(), help="Output documents/ dir.")
@click.option("--crawl", default=None, help="Common Crawl id, e.g. CC-MAIN-2024-22: read its warc.paths.gz.")
@click.option("--limit", type=int, default=None, help="Only the first N WARCs.")
@click.option("--cc-base-url", default=DEFAULT_CC_BASE_URL, show_default=True, envvar="M3W_CC_BASE_URL")
@stage_options(ExtractConfig, set_help="Override one config value, e.g. page.max_html_bytes=2000000.")
def extract_cmd(
    inputs: tuple[str, ...],
    out_dir: str,
    crawl: str | None,
    limit: int | None,
    cc_base_url: str,
    config: ExtractConfig,
    workers: int | None,
    ray_address: str | None,
) -> None:
    """Extract interleaved documents from WARC files (paths, globs, URLs, warc.paths.gz files, or --crawl)."""
    summary = run_extract(
        inputs,
        out_dir,
        workers,
        ray_address,
        crawl=crawl,
        limit=limit,
        cc_base_url=cc_base_url,
        config=config,
    )
    _print_summary(summary, out_dir)
    if summary.failed:
        sys.exit(1)
