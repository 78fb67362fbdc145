"""The published interleaved corpora m3w reads and writes: OBELICS (export and import) and MMC4 (import).

OBELICS (Laurençon et al. 2023, HF `HuggingFaceM4/OBELICS`): one row per document, `texts[i]` and `images[i]`
aligned (exactly one of the two is null at each position), `metadata` (a JSON string: one entry per position,
image metadata or null) and `general_metadata` (a JSON string: url, warc_filename, warc_record_offset,
warc_record_length). m3w writes exactly these four columns; its own provenance goes into `general_metadata`.

MMC4 (Zhu et al. 2023): `text_list` (sentences) and `image_info` (one dict per image with `raw_url` and
`matched_text_index`, the sentence the image was assigned to), plus `url`.
"""

from __future__ import annotations

import pyarrow as pa

OBELICS = "obelics"
MMC4 = "mmc4"
FORMATS = (OBELICS, MMC4)

# An export directory: data/train-00000.parquet ... (OBELICS_SCHEMA) and README.md, the dataset card whose YAML
# header tells `datasets.load_dataset` (and the Hub) where the data files are.
OBELICS_DATA_DIR = "data"
OBELICS_CARD = "README.md"
OBELICS_SCHEMA = pa.schema(
    [
        pa.field("images", pa.list_(pa.string())),
        pa.field("metadata", pa.string()),
        pa.field("general_metadata", pa.string()),
        pa.field("texts", pa.list_(pa.string())),
    ]
)

# The columns a row must have to be read as that format (what `m3w interop import` checks before any work).
REQUIRED_COLUMNS = {OBELICS: ("texts", "images"), MMC4: ("text_list", "image_info")}
