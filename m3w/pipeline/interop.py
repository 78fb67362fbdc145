"""Interop with the published interleaved corpora: OBELICS (export and import) and MMC4 (import); their columns
are described in m3w/schemas/interop.py.

Export streams filtered documents into parquet shards with OBELICS's columns plus a dataset card (README.md), a
directory `datasets.load_dataset` reads and the Hub takes as is. Imports write `documents/` parquet (one output
file per input file, through `run_units`), so imported corpora flow through filter → images → shards like
extracted ones.
"""

from __future__ import annotations

import contextlib
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
from m3w.errors import FormatError, UserError
from m3w.pipeline.io import atomic_open, atomic_path, stable_hash
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.ray_runner import Unit, run_units
from m3w.schemas.documents import (
    NODE_IMAGE,
    NODE_TEXT,
    SCHEMA_VERSION,
    DocumentWriter,
    document_files,
    open_documents,
)
from m3w.schemas.interop import FORMATS, OBELICS_CARD, OBELICS_DATA_DIR, OBELICS_SCHEMA, REQUIRED_COLUMNS

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


class ShardedParquet:
    """Rows into `<directory>/<prefix>-00000.parquet`, `-00001`, ...: a new file every `rows_per_shard` rows, a row
    group every `rows_per_group`. Each file is written under a temp name and renamed when complete."""

    def __init__(
        self, directory: Path, prefix: str, schema: pa.Schema, rows_per_shard: int, rows_per_group: int = 1000
    ) -> None:
        self.directory, self.prefix, self.schema = directory, prefix, schema
        self.rows_per_shard, self.rows_per_group = rows_per_shard, rows_per_group
        self.shards: list[str] = []
        self.rows: list[dict] = []
        self.in_shard = 0
        self._stack = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def write(self, row: dict) -> None:
        if self._writer is None:
            name = f"{self.prefix}-{len(self.shards):05d}.parquet"
            tmp = self._stack.enter_context(atomic_path(self.directory / name))
            self._writer = self._stack.enter_context(pq.ParquetWriter(tmp, self.schema, compression="zstd"))
            self.shards.append(name)
        self.rows.append(row)
        self.in_shard += 1
        if len(self.rows) >= self.rows_per_group or self.in_shard >= self.rows_per_shard:
            self._writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []
        if self.in_shard >= self.rows_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._stack.close()  # closes the writer, then renames the temp file into place
        self._stack, self._writer, self.in_shard = contextlib.ExitStack(), None, 0

    def __enter__(self) -> ShardedParquet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._stack.__exit__(exc_type, *exc)  # the temp file of the shard being written is removed
            return
        if self._writer is not None and self.rows:
            self._writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        if self._writer is not None:
            self._finish_shard()


def export_obelics(
    inputs: Iterable[str | Path],
    out: str | Path,
    store: str | Path | None = None,
    rows_per_shard: int = 100_000,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Filtered documents → parquet shards with OBELICS's columns in `out/data/` and a dataset card
    `out/README.md`: `datasets.load_dataset(out)` reads it, and it can be pushed to the Hugging Face Hub as is.

    Streams: one batch of documents in memory at a time, whatever the corpus size. Only a directory's own
    documents are read (not excluded/ nor _cache/). With `store`, an image node is kept only if the store holds
    its image with status ok (looked up batch by batch)."""
    from m3w.pipeline.imagestore import ImageStore

    inputs = [str(p) for p in inputs]
    files = [f for path in inputs for f in document_files(path)]
    if not files:
        raise UserError(f"no documents (*.parquet) in {', '.join(inputs)}")
    out = Path(out)
    images = ImageStore(store) if store is not None else None
    counts: Counter = Counter()
    with ShardedParquet(out / OBELICS_DATA_DIR, "train", OBELICS_SCHEMA, rows_per_shard) as shards:
        for file in files:
            for batch in open_documents(file).iter_batches(batch_size=batch_size):
                docs = batch.to_pylist()
                image_ok = None
                if images is not None:
                    urls = {
                        n["url"] for d in docs for n in d["nodes"] if n["kind"] == NODE_IMAGE and n.get("url")
                    }
                    image_ok = set(images.usable(urls))
                for doc in docs:
                    row = to_obelics(doc, image_ok)
                    shards.write(row)
                    counts["documents"] += 1
                    counts["images"] += sum(i is not None for i in row["images"])
                    counts["texts"] += sum(t is not None for t in row["texts"])
    card = out / OBELICS_CARD
    with atomic_open(card, "w") as f:
        f.write(dataset_card(dict(counts), len(shards.shards), inputs, store))
    return {
        **counts,
        "shards": [str(out / OBELICS_DATA_DIR / name) for name in shards.shards],
        "card": str(card),
    }


def dataset_card(counts: dict[str, int], shards: int, inputs: list[str], store: str | Path | None) -> str:
    """README.md of an export: the Hub's YAML header (data files, features, size) and what the corpus is."""
    from m3w import __version__

    images = (
        f"only images the store at `{store}` holds (status ok)"
        if store
        else "every image node, fetched or not"
    )
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {OBELICS_DATA_DIR}/train-*.parquet
dataset_info:
  features:
  - name: images
    sequence: string
  - name: metadata
    dtype: string
  - name: general_metadata
    dtype: string
  - name: texts
    sequence: string
  splits:
  - name: train
    num_examples: {counts.get("documents", 0)}
---

# Interleaved image-text documents (OBELICS format)

Web documents built with [m3w](https://github.com/m3w/m3w) {__version__}: text and images in page order, after
m3w's quality filters and corpus-wide dedup, in the columns of
[OBELICS](https://huggingface.co/datasets/HuggingFaceM4/OBELICS).

| documents | images | text chunks | parquet files |
| ---: | ---: | ---: | ---: |
| {counts.get("documents", 0):,} | {counts.get("images", 0):,} | {counts.get("texts", 0):,} | {shards} |

## Columns

- `texts`, `images`: aligned lists, one entry per position in the document; at each position exactly one of the
  two is null. `images` holds image URLs ({images}).
- `metadata`: a JSON string, one entry per position: null for text, for an image its `src`, `alt_text`,
  `title`, `figcaption` and declared `original_width` / `original_height`.
- `general_metadata`: a JSON string: the page `url`, `warc_filename`, `warc_record_offset`, `warc_record_length`,
  and m3w's `warc_record_id`, `fetch_date`, `title`, `domain`, `m3w_doc_id`.

## Load

```python
import datasets
ds = datasets.load_dataset("path/to/this/directory", split="train")
```

Built from: {", ".join(f"`{p}`" for p in inputs)}.
"""


# ---------------------------------------------------------------------------------------------------------
# m3w shards → Hugging Face datasets


def webdataset_features(media_files: int):
    """`datasets.Features` for m3w's WebDataset shards, for HF's "webdataset" builder:

        datasets.load_dataset("webdataset", data_files={"train": tars}, features=webdataset_features(5))

    Samples of a shard set carry 1 to N media files (`0.jpg` ...), which the builder cannot infer from its first
    examples (it wants one set of files per sample): with these features a sample's missing files are None.
    `media_files` is max_media × num_frames from the set's shards.json (M3W: 5; pairs: 1; video: T). The sample
    JSON is a struct of m3w.schemas.shards' fields; provenance has the union of every dataset's keys."""
    import datasets

    string, int64 = datasets.Value("string"), datasets.Value("int64")
    provenance = {
        **{k: string for k in ("doc_id", "url", "warc_path", "warc_record_id", "image_url", "fill")},
        **{k: int64 for k in ("warc_offset", "window_index", "token_start", "table_row", "distinct_frames")},
        "node_indices": datasets.Sequence(int64),
        "frame_times": datasets.Sequence(datasets.Value("float64")),
        "duration": datasets.Value("float64"),
    }
    sample = {
        **{k: string for k in ("schema", "dataset", "text", "media_kind")},
        "input_ids": datasets.Sequence(int64),
        "images": datasets.Sequence(string),
        "num_frames": int64,
        "tokenizer": {"name": string, "fingerprint": string},
        "provenance": provenance,
    }
    media = {f"{i}.jpg": datasets.Image() for i in range(media_files)}
    return datasets.Features({"__key__": string, "__url__": string, "json": sample, **media})


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
        try:
            return pq.read_schema(path).names
        except pa.ArrowInvalid as exc:  # no parquet magic bytes, a torn footer
            raise FormatError(f"{path}: not a parquet file ({exc})") from exc
    try:
        row = next(read_rows(path), None)
    except (ValueError, OSError) as exc:  # not JSON lines, not gzip
        raise FormatError(f"{path}: not a JSON-lines file ({exc})") from exc
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
    relpath = f"{args['unit']}.parquet"
    with (
        atomic_path(out / relpath) as tmp,
        DocumentWriter(tmp) as writer,
    ):  # streamed: one row group in memory
        for index, row in enumerate(read_rows(path)):
            counts["rows"] += 1
            doc = convert(row, path.name, index, counts)
            if doc is None:
                continue
            writer.write(doc)
            counts["documents"] += 1
            counts["images"] += sum(n["kind"] == NODE_IMAGE for n in doc["nodes"])
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
@click.option("--out", required=True, type=OutputDir(), help="Directory for data/*.parquet and README.md.")
@click.option(
    "--images", "store", type=click.Path(exists=True), help="Keep only images stored with status ok."
)
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Documents per parquet file.")  # fmt: skip
def export_cmd(inputs, out, store, rows_per_shard) -> None:
    """Filtered documents (INPUTS: filtered/ dirs or files) → parquet with OBELICS's columns + a dataset card."""
    result = export_obelics(inputs, out, store, rows_per_shard)
    click.echo(
        f"{result['documents']} documents, {result['images']} images in {len(result['shards'])} parquet files; "
        f"card: {result['card']}"
    )


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
