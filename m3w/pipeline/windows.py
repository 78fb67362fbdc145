"""M3W token windows (Flamingo, Alayrac et al. 2022, appendix A.3.3): document → token sequence → windows.

A document becomes one sequence: its text, `<EOC><image>` where each image stands, and `<EOC>` at the end.
Only images that are in the image store with status ok are placed, so every `<image>` has its image. From the
sequence we take a window of L=256 tokens at a random start (seeded by the global seed and the document id,
never by worker or time), keep the first N=5 images inside it and remove the `<image>` tokens of the rest.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN
from m3w.schemas.documents import NODE_IMAGE, NODE_TEXT

TEXT_SEPARATOR = "\n\n"  # between two consecutive text nodes (paragraphs, headings, list items)


@dataclass
class WindowConfig:
    seq_len: int = 256  # L: tokens per window (paper: 256)
    max_images: int = 5  # N: images kept per window (paper: 5)
    windows_per_doc: int = 1  # random windows sampled per document (paper: 1)
    non_overlapping: bool = False  # instead: consecutive windows covering the whole document
    # "uniform": any start (paper). "image": uniform over the starts whose window holds at least one image, so
    # long documents with few images still yield samples instead of skipped windows.
    start: str = "uniform"
    skip_imageless: bool = True  # drop windows that end up with no image
    seed: int = 0


@dataclass
class DocSequence:
    """A document as one token sequence, with where each node's tokens lie."""

    ids: list[int]
    images: list[tuple[int, int, str]]  # (token position of <image>, node_index, image key e.g. blob sha256)
    spans: list[tuple[int, int, int]]  # (start, end, node_index) of each node's tokens, images included


@dataclass
class Window:
    index: int  # window number within the document
    start: int  # token offset of the window in the document sequence
    ids: list[int]
    images: list[str]  # image keys of the kept images, in order; one per <image> in `ids`
    node_indices: list[int] = field(default_factory=list)  # nodes whose tokens (or image) are in the window


def special_strings(tok) -> list[str]:
    """Every string the tokenizer would turn into a special/added token (page text must never do that)."""
    added = getattr(tok, "added_tokens_encoder", {}) or {}
    return sorted({*tok.all_special_tokens, *added, MEDIA_TOKEN, EOC_TOKEN}, key=len, reverse=True)


def sanitize(text: str, specials: Iterable[str]) -> str:
    """Remove special-token strings from page text: a page that says "<image>" must not make an image slot."""
    for s in specials:
        if s in text:
            text = text.replace(s, "")
    return text


def document_sequence(
    nodes: list[dict], image_keys: dict[str, str], tok, counts: Counter, require_image: bool = True
) -> DocSequence:
    """Tokenize a document's nodes into `text … <EOC><image> … <EOC>`.

    `image_keys` maps the URL of each usable image (stored, status ok) to its key; other images are dropped
    here, before tokenisation, so no `<image>` dangles. Video nodes are not part of M3W and are skipped.
    With `require_image`, a document left without images comes back empty, untokenised.
    """
    specials = special_strings(tok)
    media_id = tok.convert_tokens_to_ids(MEDIA_TOKEN)
    eoc_id = tok.convert_tokens_to_ids(EOC_TOKEN)

    pieces: list[tuple[str, int, str]] = []  # (kind, node_index, text or image key)
    previous_text = False
    for node in nodes:
        if node["kind"] == NODE_TEXT:
            text = sanitize(node.get("text") or "", specials)
            if not text.strip():
                continue
            pieces.append((NODE_TEXT, node["node_index"], (TEXT_SEPARATOR if previous_text else "") + text))
            previous_text = True
        elif node["kind"] == NODE_IMAGE:
            key = image_keys.get(node.get("url") or "")
            if key is None:
                counts["drop.image_not_stored"] += 1
                continue
            pieces.append((NODE_IMAGE, node["node_index"], key))
            previous_text = False
        else:
            counts[f"drop.{node['kind']}_node"] += 1

    if require_image and not any(kind == NODE_IMAGE for kind, _, _ in pieces):
        return DocSequence([], [], [])  # no window can have an image: skip the tokenisation cost
    texts = [p[2] for p in pieces if p[0] == NODE_TEXT]
    # The Rust backend directly: the text is already free of special-token strings, and this skips the
    # Python-side wrapping of every encoding (a quarter of the stage's CPU time on web pages).
    encoded = iter(e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    ids: list[int] = []
    images: list[tuple[int, int, str]] = []
    spans: list[tuple[int, int, int]] = []
    for kind, node_index, value in pieces:
        start = len(ids)
        if kind == NODE_TEXT:
            ids.extend(next(encoded))
        else:
            ids.extend((eoc_id, media_id))
            images.append((len(ids) - 1, node_index, value))
        spans.append((start, len(ids), node_index))
    ids.append(eoc_id)
    return DocSequence(ids, images, spans)


def start_ranges(length: int, config: WindowConfig, image_positions: list[int]) -> list[tuple[int, int]]:
    """Inclusive ranges of allowed window starts."""
    last = max(0, length - config.seq_len)
    if config.start == "uniform" or not image_positions:
        return [(0, last)]
    if config.start != "image":
        raise ValueError(f"windows.start must be 'uniform' or 'image', not {config.start!r}")
    ranges: list[tuple[int, int]] = []
    for pos in sorted(image_positions):  # starts that put this image inside the window
        lo, hi = max(0, pos - config.seq_len + 1), min(pos, last)
        if ranges and lo <= ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], hi))
        else:
            ranges.append((lo, hi))
    return ranges


def window_starts(
    doc_id: str, length: int, config: WindowConfig, image_positions: list[int] = ()
) -> list[int]:
    """Where the windows of a document start. Random starts come from an RNG seeded by (seed, doc_id, window)
    only, so a document gets the same windows on any worker, in any order, on any run."""
    if config.non_overlapping:
        return list(range(0, max(length, 1), config.seq_len))
    ranges = start_ranges(length, config, list(image_positions))
    total = sum(hi - lo + 1 for lo, hi in ranges)
    starts: list[int] = []
    for w in range(config.windows_per_doc):
        r = random.Random(f"m3w-window:{config.seed}:{doc_id}:{w}").randrange(total)
        for lo, hi in ranges:
            if r <= hi - lo:
                start = lo + r
                break
            r -= hi - lo + 1
        if start not in starts:  # a short document has one possible window; do not emit it twice
            starts.append(start)
    return starts


def make_windows(
    doc_id: str, seq: DocSequence, tok, config: WindowConfig, counts: Counter
) -> Iterator[Window]:
    """Cut the windows of one document: ≤ L tokens, ≤ N images, one image per `<image>`, images in order."""
    media_id = tok.convert_tokens_to_ids(MEDIA_TOKEN)
    image_positions = [pos for pos, _, _ in seq.images]
    for index, start in enumerate(window_starts(doc_id, len(seq.ids), config, image_positions)):
        end = min(start + config.seq_len, len(seq.ids))
        inside = [img for img in seq.images if start <= img[0] < end]
        kept, dropped = inside[: config.max_images], inside[config.max_images :]
        drop_positions = {pos for pos, _, _ in dropped}
        ids = [t for i, t in enumerate(seq.ids[start:end], start) if i not in drop_positions]
        counts["drop.image_over_max"] += len(dropped)
        if not kept and config.skip_imageless:
            counts["skip.window_without_image"] += 1
            continue
        assert ids.count(media_id) == len(kept)  # the contract every reader relies on
        dropped_nodes = {node for _, node, _ in dropped}
        nodes = sorted(
            {node for s, e, node in seq.spans if s < end and e > start and node not in dropped_nodes}
        )
        yield Window(index, start, ids, [key for _, _, key in kept], nodes)


def decode(tok, ids: list[int]) -> str:
    """The exact text of a window: special tokens kept, no whitespace "clean-up"."""
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
