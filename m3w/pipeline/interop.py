"""Interop with the published interleaved corpora: OBELICS (export and import) and MMC4 (import).

OBELICS (Laurençon et al. 2023, HF `HuggingFaceM4/OBELICS`) stores a document as aligned lists: `texts[i]` and
`images[i]` (exactly one of the two is null at each position), `metadata` (a JSON string: one entry per
position, image metadata or null) and `general_metadata` (a JSON string: url, warc_filename, warc_record_offset,
warc_record_length). MMC4 (Zhu et al. 2023) stores `text_list` (sentences) and `image_info` (one dict per image
with `raw_url` and `matched_text_index`, the sentence the image was assigned to).

Imports write `documents/` parquet in DOCUMENT_SCHEMA (one output file per input file, through `run_units`), so
imported corpora flow through filter → images → shards like extracted ones.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
import pyarrow.parquet as pq

from m3w.cli import OutputDir, ray_options
from m3w.errors import UserError
from m3w.pipeline.io import stable_hash, write_parquet_atomic
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.ray_runner import Unit, run_units
from m3w.schemas.documents import DOCUMENT_SCHEMA, NODE_IMAGE, NODE_TEXT, SCHEMA_VERSION, check_version
from m3w.schemas.interop import FORMATS, REQUIRED_COLUMNS

IMAGE_FIELDS = ("url", "alt", "title", "figcaption", "width", "height")


# ---------------------------------------------------------------------------------------------------------
# m3w documents → OBELICS


def to_obelics(doc: dict, image_ok: set[str] | None = None) -> dict:
    """One m3w document as an OBELICS row. With `image_ok`, images not in that set are left out."""
    texts: list[str | None] = []
    images: list[str | None] = []
    metadata: list[dict | None] = []
    for node in doc["nodes"]:
        if node["kind"] == NODE_TEXT and node.get("text"):
            texts.append(node["text"])
            images.append(None)
            metadata.append(None)
        elif node["kind"] == NODE_IMAGE and node.get("url") and (image_ok is None or node["url"] in image_ok):
            texts.append(None)
            images.append(node["url"])
            metadata.append(
                {
                    "document_url": doc["url"],
                    "unformatted_src": node["url"],
                    "src": node["url"],
                    "formatted_filename": None,
                    "alt_text": node.get("alt"),
                    "title": node.get("title"),
                    "figcaption": node.get("figcaption"),
                    "original_width": node.get("width"),
                    "original_height": node.get("height"),
                }
            )
    general = {
        "url": doc["url"],
        "warc_filename": doc.get("warc_path"),
        "warc_record_offset": doc.get("warc_offset"),
        "warc_record_length": doc.get("warc_length"),
        "warc_record_id": doc.get("warc_record_id"),
        "fetch_date": doc.get("fetch_date"),
        "title": doc.get("title"),
        "domain": doc.get("domain"),
        "m3w_doc_id": doc["doc_id"],
    }
    return {
        "images": images,
        "metadata": json.dumps(metadata, ensure_ascii=False),
        "general_metadata": json.dumps(general, ensure_ascii=False),
        "texts": texts,
    }


def read_document_files(inputs: Iterable[str | Path]) -> Iterator[dict]:
    for path in sorted_inputs(inputs, (".parquet",)):
        pf = pq.ParquetFile(path)
        check_version(pf.schema_arrow, SCHEMA_VERSION)
        for batch in pf.iter_batches(batch_size=512):
            yield from batch.to_pylist()


def export_obelics(
    inputs: Iterable[str | Path], out: str | Path, store: str | Path | None = None, formats=("hf", "parquet")
) -> dict[str, Any]:
    """Filtered documents → a `datasets.Dataset` with OBELICS's columns, saved with `save_to_disk` (out/hf) and
    as parquet (out/parquet/obelics.parquet). With `store`, only images stored with status ok are kept."""
    import datasets

    from m3w.pipeline.imagestore import ImageStore

    docs = list(read_document_files(inputs))
    image_ok = None
    if store is not None:
        urls = {n["url"] for d in docs for n in d["nodes"] if n["kind"] == NODE_IMAGE and n.get("url")}
        image_ok = {u for u, row in ImageStore(store).lookup(urls).items() if row["status"] == "ok"}
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Value("string")),
            "metadata": datasets.Value("string"),
            "general_metadata": datasets.Value("string"),
            "texts": datasets.Sequence(datasets.Value("string")),
        }
    )
    rows = [to_obelics(d, image_ok) for d in docs]
    ds = datasets.Dataset.from_list(rows, features=features)
    out = Path(out)
    written = {}
    if "hf" in formats:
        ds.save_to_disk(str(out / "hf"))
        written["hf"] = str(out / "hf")
    if "parquet" in formats:
        (out / "parquet").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out / "parquet" / "obelics.parquet"))
        written["parquet"] = str(out / "parquet" / "obelics.parquet")
    return {
        "documents": len(rows),
        "images": sum(i is not None for r in rows for i in r["images"]),
        **written,
    }


# ---------------------------------------------------------------------------------------------------------
# OBELICS / MMC4 → m3w documents


def _json_field(value: Any) -> Any:
    """OBELICS stores metadata as JSON strings; some copies (jsonl dumps) hold the decoded objects."""
    return json.loads(value) if isinstance(value, str) else value


def _document(url: str, doc_id: str, nodes: list[dict], general: dict | None = None) -> dict:
    from urllib.parse import urlsplit

    general = general or {}
    for i, node in enumerate(nodes):
        node["node_index"] = i
    return {
        "doc_id": doc_id,
        "url": url,
        "domain": urlsplit(url).hostname,
        "fetch_date": general.get("fetch_date"),
        "warc_path": general.get("warc_filename"),
        "warc_record_id": general.get("warc_record_id"),
        "warc_offset": general.get("warc_record_offset"),
        "warc_length": general.get("warc_record_length"),
        "title": general.get("title"),
        "lang_html": None,
        "charset": None,
        "og_image": None,
        "html_bytes": None,
        "nodes": nodes,
    }


def _text_node(text: str, block: str = "paragraph") -> dict:
    return {"kind": NODE_TEXT, "text": text, "block": block}


def _image_node(url: str, meta: dict | None = None) -> dict:
    meta = meta or {}
    return {
        "kind": NODE_IMAGE,
        "url": url,
        "alt": meta.get("alt_text"),
        "title": meta.get("title"),
        "figcaption": meta.get("figcaption"),
        "width": meta.get("original_width"),
        "height": meta.get("original_height"),
    }


def doc_id_for(source: str, index: int, url: str) -> str:
    """Stable id of an imported document: the same file imported twice gives the same ids."""
    return hashlib.sha1(f"{source}\x00{index}\x00{url}".encode()).hexdigest()


def from_obelics(row: dict, source: str, index: int, counts: Counter) -> dict | None:
    texts, images = row.get("texts") or [], row.get("images") or []
    if len(texts) != len(images):
        counts["skip.misaligned_texts_images"] += 1
        return None
    metadata = _json_field(row.get("metadata")) or [None] * len(texts)
    general = _json_field(row.get("general_metadata")) or {}
    nodes = []
    for text, image, meta in zip(texts, images, metadata):
        if text is not None and image is None:
            nodes.append(_text_node(text))
        elif image is not None and text is None:
            if not isinstance(image, str):  # image bytes/structs: m3w fetches by URL into its own store
                url = (meta or {}).get("src")
                if not url:
                    counts["skip.image_without_url"] += 1
                    continue
                image = url
            nodes.append(_image_node(image, meta))
        else:
            counts["skip.bad_position"] += 1
    url = general.get("url") or ""
    doc_id = general.get("m3w_doc_id") or doc_id_for(source, index, url)
    return _document(url, doc_id, nodes, general)


def from_mmc4(row: dict, source: str, index: int, counts: Counter) -> dict | None:
    """MMC4: each image goes right before the sentence it was matched to (OpenFlamingo's convention)."""
    text_list = row.get("text_list") or []
    by_text: dict[int, list[dict]] = {}
    for info in row.get("image_info") or []:
        url = info.get("raw_url") or info.get("url")
        position = info.get("matched_text_index")
        if not url or position is None or not 0 <= position < len(text_list):
            counts["skip.unmatched_image"] += 1
            continue
        by_text.setdefault(position, []).append(_image_node(url))
    nodes = []
    for i, sentence in enumerate(text_list):
        nodes.extend(by_text.get(i, []))
        nodes.append(_text_node(sentence))
    url = row.get("url") or ""
    return _document(url, doc_id_for(source, index, url), nodes)


CONVERTERS = {"obelics": from_obelics, "mmc4": from_mmc4}


def read_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=512):
            yield from batch.to_pylist()
        return
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def first_row_columns(path: Path) -> list[str] | None:
    """The columns of a parquet file, or the keys of the first row of a JSON-lines file (None: no rows)."""
    if path.suffix == ".parquet":
        return pq.read_schema(path).names
    try:
        row = next(read_rows(path), None)
    except (ValueError, OSError) as exc:  # not JSON lines, not gzip
        raise UserError(f"{path}: not a JSON-lines file ({exc})") from exc
    if row is not None and not isinstance(row, dict):
        raise UserError(f"{path}: rows must be JSON objects, the first one is {type(row).__name__}")
    return None if row is None else list(row)


def check_input_format(path: Path, fmt: str) -> None:
    """Refuse, before any work, a file whose rows lack the format's columns (an OBELICS file given as MMC4
    would otherwise import as empty documents)."""
    columns = first_row_columns(path)
    if columns is None:
        return
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in columns]
    if missing:
        other = [
            f for f, needed in REQUIRED_COLUMNS.items() if f != fmt and all(c in columns for c in needed)
        ]
        guess = f"; it looks like {other[0]}: use --format {other[0]}" if other else ""
        raise UserError(f"{path} is not {fmt}: its rows have no {' or '.join(missing)}{guess}")


def import_unit(args: dict) -> tuple[str, dict[str, int]]:
    """One OBELICS/MMC4 file → one documents parquet file."""
    path, fmt, out = Path(args["input"]), args["format"], Path(args["out"])
    convert = CONVERTERS[fmt]
    counts: Counter = Counter()
    docs = []
    for index, row in enumerate(read_rows(path)):
        counts["rows"] += 1
        doc = convert(row, path.name, index, counts)
        if doc is None:
            continue
        docs.append(doc)
        counts["documents"] += 1
        counts["images"] += sum(n["kind"] == NODE_IMAGE for n in doc["nodes"])
    relpath = f"{args['unit']}.parquet"
    write_parquet_atomic(pa.Table.from_pylist(docs, schema=DOCUMENT_SCHEMA), out / relpath)
    return relpath, dict(counts)


def sorted_inputs(inputs: Iterable[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            files.extend(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        else:
            files.append(path)
    return sorted(set(files))


def run_import(
    inputs: Iterable[str | Path],
    out: str | Path,
    fmt: str,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
):
    """OBELICS or MMC4 files (parquet, jsonl, jsonl.gz) → `out/` documents parquet, one file per input."""
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    files = sorted_inputs(inputs, (".parquet", ".jsonl", ".jsonl.gz", ".json"))
    if not files:
        raise UserError(f"no .parquet, .jsonl or .jsonl.gz files in {', '.join(map(str, inputs))}")
    for path in files:
        check_input_format(path, fmt)
    manifest = Manifest(out, f"import.{fmt}", stable_hash({"format": fmt, "schema": SCHEMA_VERSION}))
    units = []
    for path in files:
        unit = f"{path.name.split('.')[0]}-{stable_hash(str(path.resolve()), 8)}"
        units.append(Unit(unit, {"input": str(path), "format": fmt, "out": str(out), "unit": unit}))
    return run_units(import_unit, units, manifest, workers=workers, ray_address=ray_address,
                     desc=f"import {fmt}", rate_key="documents")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# CLI


@click.group("interop")
def interop_group() -> None:
    """Import OBELICS/MMC4 documents; export m3w documents in OBELICS's format."""


@interop_group.command("export")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path())
@click.option(
    "--images", "store", type=click.Path(exists=True), help="Keep only images stored with status ok."
)
@click.option("--format", "formats", multiple=True, type=click.Choice(["hf", "parquet"]), default=("hf", "parquet"),
              show_default=True, help="save_to_disk directory and/or a parquet file.")  # fmt: skip
def export_cmd(inputs, out, store, formats) -> None:
    """Filtered documents (INPUTS) → a Hugging Face dataset with OBELICS's columns."""
    result = export_obelics(inputs, out, store, formats)
    click.echo(json.dumps(result))


@interop_group.command("import")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS))
@click.option("--out", required=True, type=OutputDir(), help="documents/ directory to write.")
@ray_options
def import_cmd(inputs, fmt, out, workers, ray_address) -> None:
    """OBELICS or MMC4 files (parquet/jsonl) → documents/ parquet, ready for `m3w filter`."""
    summary = run_import(inputs, out, fmt, workers=workers, ray_address=ray_address)
    click.echo(f"{summary.done} files imported, {summary.failed} failed, {summary.skipped} already done; "
               f"{summary.counts.get('documents', 0)} documents")  # fmt: skip
    for unit, error in summary.failures.items():
        click.echo(f"failed {unit}: {error.splitlines()[0]}", err=True)
