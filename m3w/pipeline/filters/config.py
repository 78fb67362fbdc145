"""Every filter and dedup threshold in one dataclass tree, defaulting to the published OBELICS choices.

Load it with `m3w.config.load_config(FilterConfig, "filters.yaml", ["paragraph.min_words=5"])`.
The config is split into what the cached statistics depend on (`signals_part`) and what only decides on them
(thresholds), so a threshold change re-runs the cheap decisions and reuses the cached statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from m3w.config import to_dict


def _default_formats() -> list[str]:
    return ["jpg", "jpeg", "png", "webp"]


def _default_image_patterns() -> list[str]:
    # Regexes searched (case-insensitively) in the image URL path and alt text: the page furniture that
    # OBELICS drops by URL (logos, icons, buttons, sprites, avatars, ads, tracking pixels, spacers).
    return [
        r"logo",
        r"icon",
        r"favicon",
        r"button",
        r"\bbtn\b",
        r"sprite",
        r"avatar",
        r"gravatar",
        r"badge",
        r"spacer",
        r"pixel",
        r"blank\.gif",
        r"placeholder",
        r"(^|[/_.-])ads?([/_.-]|$)",
        r"advert",
        r"banner",
        r"doubleclick",
        r"tracking",
        r"emoji",
        r"smiley",
        r"loading\.gif",
    ]


@dataclass
class ImageFilterConfig:
    """Image nodes (OBELICS): declared sizes judged before download, decoded sizes again by the images stage."""

    enabled: bool = True
    formats: list[str] = field(default_factory=_default_formats)  # by URL extension before download
    min_side: int = 150  # px, each side
    max_side: int = 20000
    max_aspect_ratio: float = 2.0  # max(w, h) / min(w, h)
    url_patterns: list[str] = field(default_factory=_default_image_patterns)
    # An image whose URL has no known extension (e.g. a CDN query URL) passes the format rule before
    # download; the images stage re-checks the decoded format.
    allow_unknown_format: bool = True


@dataclass
class ParagraphFilterConfig:
    """Text nodes (OBELICS paragraph filters); ratios are in [0, 1]."""

    enabled: bool = True
    min_words: int = 4
    max_words: int = 1000
    max_char_repetition_ratio: float = 0.1
    max_word_repetition_ratio: float = 0.1
    max_special_char_ratio: float = 0.3
    min_stopword_ratio: float = 0.3
    max_flagged_word_ratio: float = 0.01


@dataclass
class CaptionFilterConfig:
    """Alt text / caption rules for image-text pairs: the paragraph statistics with caption-sized limits. The
    shards stage applies them (`m3w shards pairs`, ShardsConfig.pairs.caption)."""

    min_words: int = 3
    max_words: int = 128
    max_char_repetition_ratio: float = 0.1
    max_word_repetition_ratio: float = 0.1
    max_special_char_ratio: float = 0.3
    # Captions are often noun phrases ("golden retriever on a beach"), so no stopword floor by default.
    min_stopword_ratio: float = 0.0
    max_flagged_word_ratio: float = 0.01
    language: str = "en"  # ISO 639-1: the stopword and flagged-word lists the ratios use
    # Alt text that is a file name or a placeholder says nothing about the image.
    reject_patterns: list[str] = field(
        default_factory=lambda: [
            r"\.(jpe?g|png|gif|webp|svg|bmp)$",
            r"^(img|dsc|dscn|pict|photo|image)[-_ ]?\d+",
            r"^(image|photo|picture|img|untitled|thumbnail|null|undefined|placeholder)$",
        ]
    )


@dataclass
class DocumentFilterConfig:
    """Documents after node filtering (OBELICS document filters)."""

    enabled: bool = True
    min_images: int = 1
    max_images: int = 30
    min_words: int = 10
    max_words: int = 2000
    max_word_repetition_ratio: float = 0.2
    max_special_char_ratio: float = 0.275
    min_stopword_ratio: float = 0.35
    max_flagged_word_ratio: float = 0.01
    languages: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1; empty = any language
    min_lang_score: float = 0.8


@dataclass
class DedupConfig:
    """Corpus-wide dedup on Ray; each rule keeps the newest fetch of a group of duplicates."""

    enabled: bool = True
    same_url: bool = True  # same page URL: keep the newest fetch
    exact_text: bool = True  # identical normalised text: keep the newest
    same_image_set: bool = True  # identical non-empty set of image URLs: keep the newest
    near_duplicates: bool = True  # MinHash LSH: keep the newest of each cluster
    minhash_shingle_words: int = 5
    minhash_bands: int = 14
    minhash_rows: int = 8  # num_perm = bands * rows
    minhash_threshold: float = 0.8  # estimated Jaccard a candidate pair must reach
    minhash_seed: int = 1
    # Image URLs found in more than K documents of the corpus are page furniture (OBELICS: K = 10). Only those
    # above K go, not every image (OBELICS's published code drops them all).
    image_url_max_docs: int = 10
    # A paragraph found in more than this many documents of one domain is boilerplate: every copy goes.
    paragraph_max_docs_per_domain: int = 2
    # Reduce tasks (hash partitions) per kind of key: URL, text, image set, MinHash bands, image URLs,
    # paragraphs. 0 = one per `reducer_rows` key rows of that kind, so tasks follow the corpus. This and the two
    # below cut the work, never what is decided: any setting gives the same decisions.
    num_partitions: int = 0
    reducer_rows: int = 2_000_000  # key rows per reduce task when num_partitions is 0 (~100 MB of keys)
    group_documents: int = 250_000  # documents per task of the per-document phases (MinHash check, reasons)


@dataclass
class StatsConfig:
    """What the cached per-node statistics depend on: change these and statistics are recomputed."""

    char_repetition_ngram: int = 10  # BigScience/OBELICS character repetition ratio
    word_repetition_ngram: int = 5  # Gopher duplicated n-gram character fraction (datatrove)


@dataclass
class FilterConfig:
    image: ImageFilterConfig = field(default_factory=ImageFilterConfig)
    paragraph: ParagraphFilterConfig = field(default_factory=ParagraphFilterConfig)
    document: DocumentFilterConfig = field(default_factory=DocumentFilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)

    def signals_part(self) -> dict[str, Any]:
        """The settings cached signals depend on: n-gram sizes, languages (word lists), MinHash shape."""
        d = self.dedup
        minhash = [d.minhash_shingle_words, d.minhash_bands, d.minhash_rows, d.minhash_seed]
        return {"stats": to_dict(self.stats), "languages": list(self.document.languages), "minhash": minhash}
