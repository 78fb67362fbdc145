"""Quality filters for documents, paragraphs, images and captions (OBELICS rules), as datatrove-style steps.

Other stages use `FilterConfig` with `check_image_size` (the images stage, on decoded sizes) and
`check_caption_text` (the shards stage, on alt text for image-text pairs).
"""

from m3w.pipeline.filters.config import (
    CaptionFilterConfig,
    DedupConfig,
    DocumentFilterConfig,
    FilterConfig,
    ImageFilterConfig,
    ParagraphFilterConfig,
    StatsConfig,
)
from m3w.pipeline.filters.steps import (
    DOC_DEDUP_RULES,
    DOMAIN_PARAGRAPH,
    IMAGE_FREQUENCY,
    Bounds,
    DocumentItem,
    ImageItem,
    Step,
    check_caption_text,
    check_image_size,
    document_steps,
    filter_names,
    first_drops,
    image_format,
    image_steps,
    paragraph_steps,
    run_steps,
)

__all__ = [
    "DOC_DEDUP_RULES",
    "DOMAIN_PARAGRAPH",
    "IMAGE_FREQUENCY",
    "Bounds",
    "CaptionFilterConfig",
    "DedupConfig",
    "DocumentFilterConfig",
    "DocumentItem",
    "FilterConfig",
    "ImageFilterConfig",
    "ImageItem",
    "ParagraphFilterConfig",
    "StatsConfig",
    "Step",
    "check_caption_text",
    "check_image_size",
    "document_steps",
    "filter_names",
    "first_drops",
    "image_format",
    "image_steps",
    "paragraph_steps",
    "run_steps",
]
