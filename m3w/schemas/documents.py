"""The `documents/` format (extract output) and `filtered/` format (filter output, same schema).

One parquet file per input unit. One row per HTML page. A page is an ordered list of nodes: text, image or video,
in DOM order. Filtering removes nodes and rows but never reorders or rewrites nodes, so `node_index` (the node's
position in the *extracted* document) stays a stable reference across stages.
"""

from __future__ import annotations

import pyarrow as pa

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
        raise ValueError(f"schema version mismatch: file has {found!r}, this m3w reads {expected!r}")
