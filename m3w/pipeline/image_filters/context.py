"""The text an image is compared with for image-text relevance: what the page says about that image.

In order: its alt text, figcaption or title (what the author wrote for it), else the nearest text node before or
after it in the document (the paragraph it illustrates; the following one when both are as near, as captions
follow images). Whitespace is collapsed and the text cut to `max_chars`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from m3w.schemas.documents import NODE_IMAGE, NODE_TEXT


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
