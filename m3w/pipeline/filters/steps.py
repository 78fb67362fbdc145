"""Filter steps in the manner of datatrove: each is `keep(item) -> (bool, reason)` with its own counters.

A step's `name` ("paragraph.min_words", "image.size", ...) is what `excluded/` and the funnel report; a reason
names the rule and the measured value, so a person can see why a paragraph or image went.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from m3w.pipeline.filters.config import (
    CaptionFilterConfig,
    DocumentFilterConfig,
    FilterConfig,
    ImageFilterConfig,
    ParagraphFilterConfig,
    StatsConfig,
)
from m3w.pipeline.filters.text import TextStats, text_stats

_EXTENSION_ALIASES = {
    "jpe": "jpeg",
    "jfif": "jpeg",
    "pjpeg": "jpeg",
    "tif": "tiff",
    "svgz": "svg",
    "svg+xml": "svg",
}
# Only these name an image format; any other extension (.php, .aspx) says nothing about the bytes served.
IMAGE_FORMATS = {
    "jpg",
    "jpeg",
    "png",
    "webp",
    "gif",
    "svg",
    "bmp",
    "tiff",
    "ico",
    "avif",
    "heic",
    "heif",
    "jxl",
    "apng",
}


class Step:
    """One filter rule. Calling the step records the decision in `counters` ("kept" / "dropped")."""

    name: str = "step"

    def __init__(self) -> None:
        self.counters: Counter = Counter()

    def keep(self, item: Any) -> tuple[bool, str]:
        raise NotImplementedError

    def __call__(self, item: Any) -> tuple[bool, str]:
        ok, reason = self.keep(item)
        self.counters["kept" if ok else "dropped"] += 1
        return ok, reason


class Bounds(Step):
    """`low <= measure(item) <= high`; a bound of None is not checked."""

    def __init__(
        self,
        name: str,
        measure: Callable[[Any], float],
        low: float | None = None,
        high: float | None = None,
        label: str = "",
    ) -> None:
        super().__init__()
        self.name = name
        self.measure = measure
        self.low = low
        self.high = high
        self.label = label or name.rsplit(".", 1)[-1]

    def keep(self, item: Any) -> tuple[bool, str]:
        value = self.measure(item)
        if self.low is not None and value < self.low:
            return False, f"{self.label}={self._show(value)} < {self.low}"
        if self.high is not None and value > self.high:
            return False, f"{self.label}={self._show(value)} > {self.high}"
        return True, ""

    @staticmethod
    def _show(value: float) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    def keep_all(self, items: Any) -> np.ndarray:
        """`keep` for a batch at once: `items` holds arrays where an item holds scalars (a TextStats of arrays)."""
        values = np.asarray(self.measure(items))
        ok = np.ones(values.shape, dtype=bool)
        if self.low is not None:
            ok &= values >= self.low
        if self.high is not None:
            ok &= values <= self.high
        return ok


def run_steps(steps: Sequence[Step], item: Any) -> tuple[str, str] | None:
    """The first step that drops `item` as (step name, reason), or None when every step keeps it."""
    for step in steps:
        ok, reason = step(item)
        if not ok:
            return step.name, reason
    return None


def first_drops(steps: Sequence[Bounds], items: Any, n: int) -> np.ndarray:
    """`run_steps` over a batch of `n` items: per item, the index of the first step that drops it (-1: kept).

    Counts into each step's counters exactly as calling the steps one item at a time would.
    """
    first = np.full(n, -1, dtype=np.int64)
    pending = np.ones(n, dtype=bool)
    for i, step in enumerate(steps):
        ok = step.keep_all(items)
        dropped = pending & ~ok
        step.counters["kept"] += int(np.count_nonzero(pending & ok))
        step.counters["dropped"] += int(np.count_nonzero(dropped))
        first[dropped] = i
        pending &= ok
    return first


# ---------------------------------------------------------------------------------------------------- images


def image_format(url_or_format: str | None) -> str | None:
    """Normalised format from a format name ("JPEG", "image/png") or from a URL's extension; None if unknown."""
    if not url_or_format:
        return None
    text = url_or_format.strip().lower()
    if text.startswith("data:"):
        text = text[len("data:") :].split(";", 1)[0].split(",", 1)[0]
    elif "/" in text and not text.startswith("image/"):
        last = urlsplit(text).path.rsplit("/", 1)[-1]
        if "." not in last:
            return None
        text = last.rsplit(".", 1)[-1]
    text = _EXTENSION_ALIASES.get(text.removeprefix("image/"), text.removeprefix("image/"))
    return text if text in IMAGE_FORMATS else None


@functools.lru_cache(maxsize=16)
def _allowed_formats(formats: tuple[str, ...]) -> frozenset[str | None]:
    return frozenset(image_format(f) for f in formats)


def check_image_size(
    width: int | None, height: int | None, fmt: str | None, cfg: ImageFilterConfig
) -> tuple[bool, str]:
    """OBELICS image rules on format, side lengths and aspect ratio.

    Unknown values (None: no declared size, no extension) pass their rule: before download only what the page
    declares is judged; the images stage calls this again with the decoded size and format.
    """
    fmt_norm = image_format(fmt)
    if fmt_norm is not None and fmt_norm not in _allowed_formats(tuple(cfg.formats)):
        return False, f"image.format: {fmt_norm} not in {cfg.formats}"
    if fmt_norm is None and fmt and not cfg.allow_unknown_format:
        return False, f"image.format: unknown format {fmt!r}"
    sides = [s for s in (width, height) if s is not None]
    for side in sides:
        if side < cfg.min_side:
            return False, f"image.min_side: {width}x{height} has a side < {cfg.min_side} px"
        if side > cfg.max_side:
            return False, f"image.max_side: {width}x{height} has a side > {cfg.max_side} px"
    if width and height:
        aspect = max(width, height) / min(width, height)
        if aspect > cfg.max_aspect_ratio:
            return False, f"image.aspect_ratio: {width}x{height} ratio {aspect:.2f} > {cfg.max_aspect_ratio}"
    return True, ""


@dataclass(frozen=True)
class ImageItem:
    url: str
    alt: str | None = None
    width: int | None = None
    height: int | None = None


class ImageFormat(Step):
    name = "image.format"

    def __init__(self, config: FilterConfig) -> None:
        super().__init__()
        self.config = config

    def keep(self, item: ImageItem) -> tuple[bool, str]:
        if not item.url:
            return False, "image.format: no URL"
        if item.url.startswith("data:") and not item.url.startswith("data:image/"):
            return False, "image.format: data URI that is not an image"
        fmt = image_format(item.url)
        if fmt is None and not self.config.image.allow_unknown_format:
            return False, f"image.format: no known extension in {item.url[:200]}"
        return check_image_size(None, None, fmt, self.config.image)


class ImageDeclaredSize(Step):
    name = "image.size"

    def __init__(self, config: FilterConfig) -> None:
        super().__init__()
        self.config = config

    def keep(self, item: ImageItem) -> tuple[bool, str]:
        return check_image_size(item.width, item.height, None, self.config.image)


class ImagePattern(Step):
    """Drops logos, icons, buttons, sprites, avatars, ads and pixels, recognised by URL path or alt text."""

    name = "image.url_pattern"

    def __init__(self, cfg: ImageFilterConfig) -> None:
        super().__init__()
        self.pattern = (
            re.compile("|".join(f"(?:{p})" for p in cfg.url_patterns), re.I) if cfg.url_patterns else None
        )

    def keep(self, item: ImageItem) -> tuple[bool, str]:
        if self.pattern is None:
            return True, ""
        # The host is left out: "icons.example.com" serves photos too, and "ads" often is a path segment.
        parts = urlsplit(item.url)
        for where, text in (("url", parts.path + "?" + parts.query), ("alt", item.alt or "")):
            match = self.pattern.search(text)
            if match:
                return False, f"image.url_pattern: {where} matches {match.group(0)!r}"
        return True, ""


def image_steps(config: FilterConfig) -> list[Step]:
    if not config.image.enabled:
        return []
    return [ImageFormat(config), ImageDeclaredSize(config), ImagePattern(config.image)]


# ------------------------------------------------------------------------------------------ paragraphs, captions


def text_steps(level: str, cfg: ParagraphFilterConfig | CaptionFilterConfig) -> list[Step]:
    """The OBELICS paragraph rules on TextStats; captions use the same rules with their own limits."""
    return [
        Bounds(f"{level}.min_words", lambda s: s.words, low=cfg.min_words, label="words"),
        Bounds(f"{level}.max_words", lambda s: s.words, high=cfg.max_words, label="words"),
        Bounds(f"{level}.char_repetition", lambda s: s.char_repetition, high=cfg.max_char_repetition_ratio),
        Bounds(f"{level}.word_repetition", lambda s: s.word_repetition, high=cfg.max_word_repetition_ratio),
        Bounds(f"{level}.special_chars", lambda s: s.special_chars, high=cfg.max_special_char_ratio),
        Bounds(f"{level}.stopwords", lambda s: s.stopwords, low=cfg.min_stopword_ratio),
        Bounds(f"{level}.flagged_words", lambda s: s.flagged_words, high=cfg.max_flagged_word_ratio),
    ]


def paragraph_steps(config: FilterConfig) -> list[Step]:
    return text_steps("paragraph", config.paragraph) if config.paragraph.enabled else []


class CaptionPattern(Step):
    name = "caption.placeholder"

    def __init__(self, cfg: CaptionFilterConfig) -> None:
        super().__init__()
        self.patterns = [re.compile(p, re.I) for p in cfg.reject_patterns]

    def keep(self, item: str) -> tuple[bool, str]:
        text = item.strip()
        for pattern in self.patterns:
            if pattern.search(text):
                return False, f"{text[:80]!r} matches {pattern.pattern!r}"
        return True, ""


def check_caption_text(text: str, config: CaptionFilterConfig) -> tuple[bool, str]:
    """Alt text / caption filter for image-text pairs: paragraph statistics with caption limits.

    Returns (keep, "caption.<rule>: <measured value>").
    """
    placeholder = CaptionPattern(config)
    ok, reason = placeholder(text or "")
    if not ok:
        return False, f"{placeholder.name}: {reason}"
    ngrams = StatsConfig()  # the n-grams of the paragraph statistics
    stats = text_stats(
        text or "", config.language, ngrams.char_repetition_ngram, ngrams.word_repetition_ngram
    )
    dropped = run_steps(text_steps("caption", config), stats)
    if dropped:
        return False, f"{dropped[0]}: {dropped[1]}"
    return True, ""


# ---------------------------------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class DocumentItem:
    """A document after its nodes were filtered: what the document rules decide on."""

    images: int
    text: TextStats
    lang: str
    lang_score: float


class Language(Step):
    name = "document.language"

    def __init__(self, cfg: DocumentFilterConfig) -> None:
        super().__init__()
        self.languages = set(cfg.languages)
        self.min_score = cfg.min_lang_score

    def keep(self, item: DocumentItem) -> tuple[bool, str]:
        if not self.languages:
            return True, ""
        if item.lang not in self.languages:
            return (
                False,
                f"lang={item.lang or 'none'} ({item.lang_score:.2f}) not in {sorted(self.languages)}",
            )
        if item.lang_score < self.min_score:
            return False, f"lang={item.lang} score={item.lang_score:.3f} < {self.min_score}"
        return True, ""


def document_steps(config: FilterConfig) -> list[Step]:
    cfg = config.document
    if not cfg.enabled:
        return []
    return [
        Bounds("document.min_images", lambda d: d.images, low=cfg.min_images, label="images"),
        Bounds("document.max_images", lambda d: d.images, high=cfg.max_images, label="images"),
        Bounds("document.min_words", lambda d: d.text.words, low=cfg.min_words, label="words"),
        Bounds("document.max_words", lambda d: d.text.words, high=cfg.max_words, label="words"),
        Language(cfg),
        Bounds(
            "document.word_repetition", lambda d: d.text.word_repetition, high=cfg.max_word_repetition_ratio
        ),
        Bounds("document.special_chars", lambda d: d.text.special_chars, high=cfg.max_special_char_ratio),
        Bounds("document.stopwords", lambda d: d.text.stopwords, low=cfg.min_stopword_ratio),
        Bounds("document.flagged_words", lambda d: d.text.flagged_words, high=cfg.max_flagged_word_ratio),
    ]


# ------------------------------------------------------------------------------------------------- the funnel

# Corpus-wide dedup rules (pipeline/dedup/): on whole documents first, then on nodes after the quality filters.
DOC_DEDUP_RULES = ("dedup.same_url", "dedup.exact_text", "dedup.same_image_set", "dedup.near_duplicate")
IMAGE_FREQUENCY = "dedup.image_url_frequency"
DOMAIN_PARAGRAPH = "dedup.domain_paragraph"


def filter_names(config: FilterConfig | None = None) -> list[str]:
    """Every filter name in the order a document meets them (the funnel's order, for `m3w stats`)."""
    config = config or FilterConfig()
    return [
        *DOC_DEDUP_RULES,
        *(s.name for s in image_steps(config)),
        IMAGE_FREQUENCY,
        *(s.name for s in paragraph_steps(config)),
        DOMAIN_PARAGRAPH,
        *(s.name for s in document_steps(config)),
    ]
