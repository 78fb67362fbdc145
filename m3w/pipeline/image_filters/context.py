"""The text an image is compared with for image-text relevance: what the page says about that image.

In order: its alt text, figcaption or title (what the author wrote for it), else the nearest text node before or
after it in the document (the paragraph it illustrates; the following one when both are as near, as captions
follow images). Whitespace is collapsed and the text cut to `max_chars`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from m3w.schemas.documents import NODE_IMAGE, NODE_TEXT, iter_documents


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def image_contexts(nodes: Sequence[dict[str, Any]], max_chars: int) -> Iterator[tuple[str, str]]:
    """(image URL, its context text) for each image node with a URL, in node order; "" when the page has none."""
    texts = [i for i, node in enumerate(nodes) if node.get("kind") == NODE_TEXT and _clean(node.get("text"))]
    for i, node in enumerate(nodes):
        if node.get("kind") != NODE_IMAGE or not node.get("url"):
            continue
        own = next(
            (c for c in map(_clean, (node.get("alt"), node.get("figcaption"), node.get("title"))) if c), ""
        )
        if not own and texts:
            nearest = min(texts, key=lambda t: (abs(t - i), t < i))  # ties: the text after the image
            own = _clean(nodes[nearest].get("text"))
        yield node["url"], own[:max_chars]


def first_contexts(documents: str | Path, max_chars: int) -> dict[str, str]:
    """url → its context on the first page (in file order) of the documents file `documents` that says something
    about it. An image used on many pages is stored and scored once, so one page's text stands for all of them:
    the first non-empty one in input order (the images stage keeps the earliest file's), which makes the score
    deterministic for a given input."""
    found: dict[str, str] = {}
    for doc in iter_documents(documents, columns=["nodes"]):
        for url, text in image_contexts(doc["nodes"], max_chars):
            if text and url not in found:
                found[url] = text
    return found
