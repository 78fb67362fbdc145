"""Image filters that corpus builders expect (OBELICS, MMC4, OmniCorpus, MINT-1T): perceptual-hash near
duplicates, image-text relevance, NSFW, blur and text share. Each step stores its score in the image index;
thresholds apply to stored scores (see `steps.py`)."""

from m3w.pipeline.image_filters.config import (
    BlurConfig,
    ClipRelevanceConfig,
    ImageFiltersConfig,
    NsfwConfig,
    PerceptualHashConfig,
    TextShareConfig,
)
from m3w.pipeline.image_filters.steps import (
    ROW_STEPS,
    STEP_BLUR,
    STEP_CLIP,
    STEP_NSFW,
    STEP_PHASH,
    STEP_TEXT,
    ImageFilters,
)

__all__ = [
    "ROW_STEPS",
    "STEP_BLUR",
    "STEP_CLIP",
    "STEP_NSFW",
    "STEP_PHASH",
    "STEP_TEXT",
    "BlurConfig",
    "ClipRelevanceConfig",
    "ImageFilters",
    "ImageFiltersConfig",
    "NsfwConfig",
    "PerceptualHashConfig",
    "TextShareConfig",
]
