"""The `documents/` format (extract output) and `filtered/` format (filter output, same schema): schema, reader
and writer, the only code that opens these files.

One parquet file per input unit. One row per HTML page. A page is an ordered list of nodes: text, image or video,
in DOM order. Filtering removes nodes and rows but never reorders or rewrites nodes, so `node_index` (the node's
position in the *extracted* document) stays a stable reference across stages.

A documents directory's own `*.parquet` files are its documents; `excluded/` (EXCLUDED_SCHEMA) and `_cache/`
(schemas/filter_cache.py) beside them are other formats, and `.tmp-*` files are a killed writer's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from m3w.errors import FormatError

SCHEMA_VERSION = "m3w.documents/1"
METADATA_KEY = b"m3w.schema_version"

NODE_TEXT = "text"
NODE_IMAGE = "image"
NODE_VIDEO = "video"
NODE_KINDS = (NODE_TEXT, NODE_IMAGE, NODE_VIDEO)

# Block kinds a text node comes from.
BLOCK_KINDS = ("heading", "paragraph", "list_item", "caption", "table_cell", "quote", "code")

NODE_TYPE = pa.struct(
    [
        pa.field("kind", pa.string(), nullable=False),  # text | image | video
        pa.field(
            "node_index", pa.int32(), nullable=False
        ),  # position in the extracted document, never renumbered
        pa.field("dom_index", pa.int32()),  # pre-order index of the source element in the DOM
        # text nodes
        pa.field("text", pa.string()),
        pa.field("block", pa.string()),  # one of BLOCK_KINDS
        # image / video nodes
        pa.field("url", pa.string()),  # resolved absolute URL (RFC 3986, <base href> then page URL)
        pa.field("alt", pa.string()),
        pa.field("title", pa.string()),
        pa.field("figcaption", pa.string()),
        pa.field("width", pa.int32()),  # declared in the HTML (attribute or inline style); null if absent
        pa.field("height", pa.int32()),
    ]
)

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),  # sha1 hex of (warc_path, warc_record_id): stable
        pa.field("url", pa.string(), nullable=False),
        pa.field("domain", pa.string()),
        pa.field("fetch_date", pa.string()),  # WARC-Date, ISO 8601
        pa.field("warc_path", pa.string()),
        pa.field("warc_record_id", pa.string()),
        pa.field("warc_offset", pa.int64()),
        pa.field("warc_length", pa.int64()),
        pa.field("title", pa.string()),
        pa.field("lang_html", pa.string()),  # <html lang>, raw signal
        pa.field("charset", pa.string()),  # how the bytes were decoded
        pa.field("og_image", pa.string()),  # og:image / twitter:image, resolved
        pa.field("html_bytes", pa.int64()),
        pa.field("nodes", pa.list_(NODE_TYPE), nullable=False),
    ],
    metadata={METADATA_KEY: SCHEMA_VERSION.encode()},
)

# excluded/: one row per dropped document, paragraph or image, with the filter that dropped it.
EXCLUDED_SCHEMA_VERSION = "m3w.excluded/1"
EXCLUDED_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("level", pa.string(), nullable=False),  # document | paragraph | image
        pa.field("node_index", pa.int32()),  # null for level=document
        pa.field("filter", pa.string(), nullable=False),  # filter step name, e.g. "paragraph.word_count"
        pa.field("reason", pa.string(), nullable=False),  # human-readable, with the measured value
        pa.field("content", pa.string()),  # the paragraph text or image URL, truncated, so it can be read
    ],
    metadata={METADATA_KEY: EXCLUDED_SCHEMA_VERSION.encode()},
)


def check_version(schema: pa.Schema, expected: str) -> None:
    """Raise a clear error when a parquet file was written with another schema version."""
    found = (schema.metadata or {}).get(METADATA_KEY, b"").decode() or "<none>"
    if found != expected:
        raise FormatError(f"schema version mismatch: file has {found!r}, this m3w reads {expected!r}")


# ------------------------------------------------------------------------------------------------- reading


def document_files(path: str | Path) -> list[str]:
    """The document files of a documents/ or filtered/ directory in name order (not its subdirectories, nor
    temp files), or the one file given; a local path or any fsspec URL (`s3://bucket/filtered`)."""
    from m3w.pipeline import io

    path = str(path)
    if io.is_dir(path):
        names = io.list_dir(path)
        return [io.join(path, n) for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))]
    if io.is_file(path):
        return [path]
    raise FileNotFoundError(f"no documents at {path}")


def open_documents(file: str | Path):
    """One documents file as a pyarrow ParquetFile (local or URL), refused if written in another schema version."""
    from m3w.pipeline import io

    try:
        parquet = io.parquet_file(file)
        check_version(parquet.schema_arrow, SCHEMA_VERSION)
    except (pa.ArrowInvalid, FormatError) as exc:  # ArrowInvalid: not parquet (no magic bytes, a torn footer)
        raise FormatError(f"{file}: not a documents file ({exc})") from exc
    return parquet


def iter_documents(
    path_or_dir: str | Path, columns: list[str] | None = None, batch_size: int = 256
) -> Iterator[dict[str, Any]]:
    """Documents as dicts, file by file and in row order, streaming row groups (never a whole file at once)."""
    for file in document_files(path_or_dir):
        for batch in open_documents(file).iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def document_texts(path_or_dir: str | Path) -> list[str]:
    """The text of each document that has any (its text nodes in order, one per line)."""
    texts = []
    for doc in iter_documents(path_or_dir, columns=["nodes"]):
        text = "\n".join(n["text"] for n in doc["nodes"] if n["kind"] == NODE_TEXT and n["text"])
        if text:
            texts.append(text)
    if not texts:
        raise ValueError(f"no document text in {path_or_dir}")
    return texts


def iter_image_urls(path_or_dir: str | Path) -> Iterator[str]:
    """The URL of every image node, in document order, read as columns (no document becomes a dict)."""
    import pyarrow.compute as pc

    for file in document_files(path_or_dir):
        for batch in open_documents(file).iter_batches(batch_size=4096, columns=["nodes"]):
            nodes = pc.list_flatten(batch.column("nodes"))
            urls = pc.struct_field(nodes, "url")
            is_image = pc.and_(pc.equal(pc.struct_field(nodes, "kind"), NODE_IMAGE), pc.is_valid(urls))
            yield from urls.filter(is_image).to_pylist()


# ------------------------------------------------------------------------------------------------- writing


class RowGroupWriter:
    """Rows (dicts of `schema`) into one parquet file, a row group per `rows_per_group` rows so memory stays flat
    whatever the file's size. Atomicity is the caller's: write to a temp path, rename it when the writer is closed."""

    def __init__(self, path: str | Path, schema: pa.Schema, rows_per_group: int) -> None:
        import pyarrow.parquet as pq

        self.schema = schema
        self.rows_per_group = rows_per_group
        self.rows: list[dict[str, Any]] = []
        self.written = 0
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        self._writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.written += len(self.rows)
        self.rows = []

    def close(self) -> None:
        if self.rows or not self.written:  # a file with no row still carries the schema and its version
            self._flush()
        self._writer.close()

    def __enter__(self) -> RowGroupWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the temp file is abandoned: close it without writing what is buffered
            self._writer.close()


class DocumentWriter(RowGroupWriter):
    """Documents (dicts of DOCUMENT_SCHEMA) into one parquet file."""

    def __init__(self, path: str | Path, rows_per_group: int = 256) -> None:
        super().__init__(path, DOCUMENT_SCHEMA, rows_per_group)


def write_documents(documents: Iterable[dict[str, Any]], path: str | Path) -> None:
    with DocumentWriter(path) as writer:
        for document in documents:
            writer.write(document)


def write_excluded(rows: list[dict[str, Any]], path: str | Path) -> None:
    """The excluded/ rows of one unit (EXCLUDED_SCHEMA) into one parquet file; atomicity is the caller's."""
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=EXCLUDED_SCHEMA), path, compression="zstd")
