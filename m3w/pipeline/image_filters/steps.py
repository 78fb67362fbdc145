"""The image filter steps of the images stage, in the manner of datatrove: each computes a score into the image
index, and a threshold on that stored score keeps or drops the image with a reason.

    per image (fetch threads)    luma of the stored JPEG → pHash, blur, text share
    per batch (the task's thread) the stored JPEGs (+ their page text) → CLIP relevance, NSFW score
    per index row (any time)      verdict(row): the first step whose threshold the row fails, with the value

Scores are computed once, when the image is stored; thresholds apply to the stored scores, so changing one only
re-reads the index. An image stored before a step was enabled has no score for it: it is kept and counted as
`unscored.<step>`. The pHash duplicate rule needs a corpus-wide count (`duplicates.py`): the pHashes it drops
come with the ImageFilters, and the verdict is then a row verdict like the others.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image

from m3w.pipeline.image_filters import signals
from m3w.pipeline.image_filters.config import ImageFiltersConfig

STEP_NSFW = "image.nsfw"
STEP_CLIP = "image.clip_relevance"
STEP_BLUR = "image.blur"
STEP_TEXT = "image.text_share"
STEP_PHASH = "image.phash_duplicates"
# The order a row meets the thresholds in (the funnel's order): the costliest signal of harm first.
ROW_STEPS = (STEP_NSFW, STEP_CLIP, STEP_BLUR, STEP_TEXT, STEP_PHASH)


class ImageFilters:
    """The enabled steps of one `ImageFiltersConfig`. Thread-safe; the model steps load on first use.
    `overused` (pHash → stored images with it) are the pHashes the duplicate rule drops: more than
    `phash.max_duplicates` stored images have them (`duplicates.duplicate_counts`)."""

    def __init__(self, config: ImageFiltersConfig, overused: Mapping[int, int] | None = None) -> None:
        self.config = config
        self.overused = overused or {}

    # -- scoring ---------------------------------------------------------------------------------------------

    @property
    def uses_models(self) -> bool:
        return self.config.clip.enabled or self.config.nsfw.enabled

    @property
    def batch_size(self) -> int:
        """Images to collect before running the model steps (each then batches by its own size)."""
        return (
            max(c.batch_size for c in (self.config.clip, self.config.nsfw) if c.enabled)
            if self.uses_models
            else 1
        )

    @property
    def uses_signals(self) -> bool:
        return self.config.phash.enabled or self.config.blur.enabled or self.config.text.enabled

    def signals(self, jpeg: bytes) -> dict[str, Any]:
        """The cheap scores of one stored image (index columns → values)."""
        if not self.uses_signals:
            return {}
        gray = signals.luma(jpeg)
        out: dict[str, Any] = {}
        if self.config.phash.enabled:
            out["phash"] = signals.perceptual_hash(gray)
        if self.config.blur.enabled:
            out["blur"] = signals.laplacian_variance(gray)
        if self.config.text.enabled:
            out["text_share"] = signals.text_share(gray)
        return out

    def score_models(
        self, rows: Sequence[dict[str, Any]], jpegs: Sequence[bytes], texts: Sequence[str | None]
    ) -> None:
        """Fill the model scores of `rows` (stored images `jpegs`, page texts `texts`) in place, batched."""
        if not rows or not self.uses_models:
            return
        from m3w.pipeline.image_filters.models import ClipRelevance, NsfwClassifier

        images = [Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in jpegs]
        if self.config.clip.enabled:
            scores = ClipRelevance.load(self.config.clip).score(images, texts)
            for row, score in zip(rows, scores):
                row["clip_similarity"] = None if math.isnan(score) else float(score)
                row["clip_model"] = self.config.clip.model
        if self.config.nsfw.enabled:
            scores = NsfwClassifier.load(self.config.nsfw).score(images)
            for row, score in zip(rows, scores):
                row["nsfw_score"], row["nsfw_model"] = float(score), self.config.nsfw.model

    # -- deciding --------------------------------------------------------------------------------------------

    def _checks(self) -> list[tuple[str, str, Any, bool]]:
        """(step, column, threshold, drop when above) of the thresholds in force, in ROW_STEPS order."""
        c = self.config
        checks = [
            (STEP_NSFW, "nsfw_score", c.nsfw.max_score if c.nsfw.enabled else None, True),
            (STEP_CLIP, "clip_similarity", c.clip.min_similarity if c.clip.enabled else None, False),
            (STEP_BLUR, "blur", c.blur.min_laplacian_variance if c.blur.enabled else None, False),
            (STEP_TEXT, "text_share", c.text.max_text_share if c.text.enabled else None, True),
        ]
        return [check for check in checks if check[2] is not None]

    def verdict(self, row: dict[str, Any]) -> tuple[str, str] | None:
        """(step, reason) of the first threshold a stored image fails, or None when it is kept. Rows without a
        stored image (any status but ok) are not this function's business: they have no scores."""
        for step, column, threshold, above in self._checks():
            value = row.get(column)
            if value is None:
                continue
            if (value > threshold) if above else (value < threshold):
                sign = ">" if above else "<"
                model = row.get(f"{column.split('_')[0]}_model")
                by = f" ({model})" if model and step in (STEP_NSFW, STEP_CLIP) else ""
                return step, f"{step}: {column} {value:.4g} {sign} {threshold}{by}"
        used = self.overused.get(row.get("phash"))  # type: ignore[arg-type]
        if used is not None and self._duplicates_rule:
            return STEP_PHASH, (f"{STEP_PHASH}: pHash {row['phash'] & (2**64 - 1):016x} used by {used} stored images "
                                f"> {self.config.phash.max_duplicates}")  # fmt: skip
        return None

    @property
    def _duplicates_rule(self) -> bool:
        return self.config.phash.enabled and self.config.phash.max_duplicates is not None

    def funnel(self, rows: Iterable[dict[str, Any]]) -> Counter:
        """Counts for a manifest / `m3w stats`: `in.images` (stored images), `drop.<step>.images` (first
        failing step), `out.images`, and `unscored.<step>` (kept for lack of a score)."""
        counts: Counter = Counter({"in.images": 0, "out.images": 0})
        checks = self._checks()
        for row in rows:
            counts["in.images"] += 1
            failed = self.verdict(row)
            if failed:
                counts[f"drop.{failed[0]}.images"] += 1
                continue
            counts["out.images"] += 1
            counts.update(f"unscored.{step}" for step, column, _, _ in checks if row.get(column) is None)
            if self._duplicates_rule and row.get("phash") is None:
                counts[f"unscored.{STEP_PHASH}"] += 1
        return counts
