"""`m3w docs to-jsonl`: documents for people (the stages read them with m3w.schemas.documents.iter_documents).

`to-jsonl` prints one JSON object per document, a stable format people grep:
`url`, `warc_record_id`, `text` (plain text, the literal `<image>` where each image stands, paragraphs separated
by blank lines), `images` (absolute image URLs in order), then the remaining document columns, with `nodes` as
stored.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from m3w.errors import UserError
from m3w.schemas.documents import NODE_IMAGE, NODE_TEXT, document_files, iter_documents

IMAGE_MARKER = "<image>"


def document_text(nodes: list[dict[str, Any]]) -> str:
    """Plain text of a document: text nodes separated by blank lines, `<image>` where each image stands."""
    parts = []
    for node in nodes:
        if node["kind"] == NODE_TEXT and node.get("text"):
            parts.append(node["text"])
        elif node["kind"] == NODE_IMAGE:
            parts.append(IMAGE_MARKER)
    return "\n\n".join(parts)


def to_jsonl_record(doc: dict[str, Any]) -> dict[str, Any]:
    nodes = doc.get("nodes") or []
    record = {
        "url": doc.get("url"),
        "warc_record_id": doc.get("warc_record_id"),
        "text": document_text(nodes),
        "images": [n["url"] for n in nodes if n["kind"] == NODE_IMAGE],
    }
    record.update({k: v for k, v in doc.items() if k not in record})
    record["nodes"] = [{k: v for k, v in n.items() if v is not None} for n in nodes]
    return record


@click.group("docs")
def docs_group() -> None:
    """Look at documents (extract / filter output)."""


@click.command("to-jsonl")
@click.argument("path", type=click.Path(exists=True))
@click.option("--limit", type=int, default=None, help="Print at most N documents.")
def to_jsonl_cmd(path: str, limit: int | None) -> None:
    """Print the documents in PATH (a parquet file or a directory of them) as JSON lines."""
    if not document_files(path):
        raise UserError(f"no documents (*.parquet) in {path}")
    out = sys.stdout
    for i, doc in enumerate(iter_documents(path)):
        if limit is not None and i >= limit:
            break
        out.write(json.dumps(to_jsonl_record(doc), ensure_ascii=False) + "\n")


docs_group.add_command(to_jsonl_cmd)
