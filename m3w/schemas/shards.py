"""WebDataset shard samples and the shard-set manifest.

A sample in `shards/<dataset>/<name>-000000.tar`:
    <key>.json    SAMPLE_JSON_FIELDS below
    <key>.0.jpg … <key>.{n-1}.jpg   one file per media item (images), 320x320 JPEG
For video pairs, the one media item is T frames: <key>.0.jpg … <key>.{T-1}.jpg with "media": [{"frames": T}].

`__key__` is derived from the document id and window index, with no dots (webdataset splits keys on dots).
Each `<image>` token in `input_ids` has exactly one media item, in order.
"""

from __future__ import annotations

SCHEMA_VERSION = "m3w.shards/1"
# Per shard directory: {"schema", "dataset", "tokenizer", "seq_len", "max_media", "num_frames", "config_hash",
# "shards": [...]}; seq_len (L), max_media (N) and num_frames (T) bound every sample of the set (the trainer
# checks them against its config).
SHARD_MANIFEST = "shards.json"
SAMPLE_LIMITS = ("seq_len", "max_media", "num_frames")

DATASETS = ("m3w", "alt_pairs", "caption_pairs", "video_pairs")

SAMPLE_JSON_FIELDS = (
    "schema",  # SCHEMA_VERSION
    "dataset",  # one of DATASETS
    "input_ids",  # list[int], token ids including <image> and <EOC>
    "text",  # the window text, decodes from input_ids
    "images",  # list of media keys in order, e.g. ["0.jpg", "1.jpg"]; for video: frame keys of the one item
    "media_kind",  # "image" | "video"
    "num_frames",  # 1 for images, T for video
    "tokenizer",  # {"name": str, "fingerprint": str}
    "provenance",  # {"doc_id", "url", "warc_path", "warc_record_id", "warc_offset", "node_indices", "window_index"}
)
# Extra provenance keys per dataset (additive): m3w "token_start" (window offset in the document's token
# sequence); alt/caption pairs "image_url"; video pairs "table_row", "frame_times", "distinct_frames",
# "fill" ("none" | "loop" | "pad": how a clip shorter than T/fps seconds was filled), "duration".
