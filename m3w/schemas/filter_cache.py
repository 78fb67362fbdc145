"""The filter stage's caches under `filtered/_cache/` (internal to `m3w filter`, rebuilt when missing).

- `signals/<unit>.<input fingerprint>.<signals hash>.parquet`: one row per document with what the filters and
  dedup decide on (per-text-node statistics, language, hashes, MinHash signature and LSH band keys);
- `dedup/<decisions key>/{documents,image_urls,paragraphs}.parquet` + `_done`: corpus-wide dedup decisions.
"""

from __future__ import annotations

import pyarrow as pa

from m3w.schemas.documents import METADATA_KEY

SIGNALS_VERSION = "m3w.filter-signals/2"

NODE_STATS_TYPE = pa.struct(
    [
        pa.field("node_index", pa.int32()),
        pa.field("hash", pa.int64()),  # normalised paragraph text, for per-domain paragraph dedup
        pa.field("chars", pa.int64()),
        pa.field("words", pa.int64()),
        pa.field("char_repetition", pa.float32()),
        pa.field("word_repetition", pa.float32()),
        pa.field("special_chars", pa.float32()),
        pa.field("stopwords", pa.float32()),
        pa.field("flagged_words", pa.float32()),
    ]
)

SIGNALS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("url_key", pa.string()),  # normalised page URL
        pa.field("domain", pa.string()),
        pa.field("fetch_date", pa.string()),
        pa.field("lang", pa.string()),  # of the whole extracted text: picks the word lists
        pa.field("lang_score", pa.float32()),
        pa.field("text_hash", pa.int64()),  # null when the document has no text
        pa.field("image_set_hash", pa.int64()),  # null when the document has no image
        pa.field("image_urls", pa.list_(pa.string())),  # distinct, sorted
        pa.field("bands", pa.list_(pa.int64())),  # MinHash LSH band keys; null when no text
        pa.field("signature", pa.list_(pa.uint32())),
        pa.field("nodes", pa.list_(NODE_STATS_TYPE)),  # text nodes only
    ],
    metadata={METADATA_KEY: SIGNALS_VERSION.encode()},
)

DEDUP_VERSION = "m3w.filter-dedup/1"
DEDUP_DOCUMENTS_SCHEMA = pa.schema(
    [pa.field("doc_id", pa.string()), pa.field("filter", pa.string()), pa.field("reason", pa.string())],
    metadata={METADATA_KEY: DEDUP_VERSION.encode()},
)
DEDUP_IMAGE_URLS_SCHEMA = pa.schema(
    [pa.field("url", pa.string()), pa.field("docs", pa.int64())],
    metadata={METADATA_KEY: DEDUP_VERSION.encode()},
)
DEDUP_PARAGRAPHS_SCHEMA = pa.schema(
    [pa.field("domain", pa.string()), pa.field("hash", pa.int64()), pa.field("docs", pa.int64())],
    metadata={METADATA_KEY: DEDUP_VERSION.encode()},
)
