"""The `images/` store: every image URL ever attempted → its status and, when usable, its resized JPEG.

Layout of a store folder (local or object storage; `pipeline.imagestore` reads and writes it):

    _image_filters.json               the image filter thresholds in force (readers apply them to the scores)
    _store.json                       the committed state: schema, bucket count H, store settings (geometry,
                                      encoding), generation, and per bucket the generation of its index file
                                      and its row count. Written last by a run: it is what commits the run
    rows/g000007/u000003.parquet      one file per fetch unit (~10 k URLs): the full row of every URL the unit
                                      attempted (IMAGE_ROW_SCHEMA), sorted by url hash. Never rewritten
    blobs/g000007/u000003.tar         that unit's resized JPEGs: a plain tar, one member `<sha256>.jpg` per
                                      distinct image (identical bytes stored once per shard); rows point at the
                                      member's bytes by (blob_shard, blob_offset, blob_length)
    blobs/g000009/u000000.tar         after `m3w store compact` (generation 9 is in `compactions`): every image
                                      once per store, members in sha256 order; the index records point here,
                                      the fetch units' tars of earlier generations are superseded (below)
    index/h=00042/g000007.idx         bucket 42's index after generation 7: one fixed-width record per URL
                                      (INDEX_RECORD), sorted by url hash, "most attempts wins" applied; a fence
                                      of every FENCE_STRIDE-th hash at its head for point lookups
    _generations/g000007.json         the state of generation 7 as it was committed (what `_store.json` said):
                                      a reader that planned on generation 7 reads it while later ones commit
    _manifest/images/g000007.json     one manifest entry per run (schemas.manifest)
    _lease.json                       held while a run writes (schemas.manifest)
    _runs/g000008/                    scratch of a run in progress (URL lists by bucket, pending URLs)

Files a generation no longer points at (index files it rewrote, blob tars compaction moved) are not removed
when it commits: `_store.json` lists them as superseded at that generation, and they go only once they were
superseded `RETAIN_GENERATIONS` generations ago (every writer vacuums after its commit; `m3w store vacuum`), with
the snapshots of the generations that needed them. So a reader that planned on generation G-1 (a shards run
under way) keeps reading it, whole and unchanged, while generation G commits (Delta Lake's and Iceberg's
retention of removed files until a vacuum).

The index record holds where a URL's image lies now; a rows file's blob columns say where its unit stored it
first (compaction moves images, rows files are never rewritten).

A URL's bucket is fixed by its hash: the top bits of a 64-bit hash split the hash space into H equal ranges,
so bucket files are contiguous slices of one global hash order. A URL is identified by 128 bits of hash
(`url_hash`, `url_hash2`): the index never holds URL strings, only the rows files do.

Statuses follow img2dataset's convention (status + error_message + sizes + sha256 per URL), with a closed set.
Layout version 1 (`index/*.parquet` + `blobs/ab/<sha256>.jpg`, one file per image) is converted by
`m3w store migrate`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from m3w.errors import UserError

SCHEMA_VERSION = "m3w.images/3"
LEGACY_SCHEMA_VERSION = "m3w.images/1"
UNMOVABLE_SCHEMA_VERSION = "m3w.images/2"  # layout 2, converted by `m3w store migrate` (end of this file)


class LegacyStoreError(UserError, ValueError):
    """A store in an earlier layout: it must be converted (`m3w store migrate`) before use."""


STORE_FILE = "_store.json"
RUNS_DIR = "_runs"
GENERATIONS_DIR = "_generations"
DEFAULT_BUCKETS = (
    128  # fixed when a store is created: 504 M URLs (353 M images) → 3.9 M per bucket, 315 MB files
)
# Generations a superseded file outlives the generation that superseded it: 1 lets a reader that planned on G-1
# finish while G commits (a shards run takes minutes to hours; writers commit at most once per run)
RETAIN_GENERATIONS = 1
FENCE_STRIDE = 256  # one fence hash per 256 index records: a point lookup reads one 12 KB block

STATUS_OK = "ok"
STATUSES = (
    "ok",
    "http_error",
    "timeout",
    "not_an_image",
    "too_small",
    "decode_error",
    "opted_out",
    "blocked_address",
    "too_large",
    "filtered",  # downloaded and decoded, but the filter stage's image rules (real size/aspect) refused it
    "bad_url",
)
# Statuses that may be transient: retried (bounded) on the next run. Every other status is final.
# "http_error_5xx" stands for http_error with a 5xx or 429 status, or none (connection refused/reset).
RETRYABLE_STATUSES = ("timeout", "http_error_5xx")

IMAGE_ROW_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False),
        pa.field("url_hash", pa.int64(), nullable=False),  # url_hashes(url)[0]: the sort and bucket key
        pa.field("url_hash2", pa.int64(), nullable=False),  # url_hashes(url)[1]: with url_hash, the URL's id
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("attempts", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("original_format", pa.string()),
        pa.field("original_bytes", pa.int64()),
        pa.field("sha256", pa.string()),  # of the original downloaded bytes
        pa.field("resized_sha256", pa.string()),  # of the stored resized JPEG
        pa.field("resized_width", pa.int32()),
        pa.field("resized_height", pa.int32()),
        pa.field("fetched_at", pa.string()),
        # Image filter scores of the stored image (pipeline.image_filters; null: the step was off).
        pa.field("phash", pa.int64()),  # 64-bit DCT perceptual hash of the luma, as a signed integer
        pa.field("blur", pa.float32()),  # variance of the Laplacian of the luma (low: blurred or flat)
        pa.field("text_share", pa.float32()),  # share of text/QR-code-like tiles, 0..1
        pa.field("clip_similarity", pa.float32()),  # cosine similarity to the image's text on its page
        pa.field("clip_model", pa.string()),
        pa.field("nsfw_score", pa.float32()),  # NSFW probability, 0..1
        pa.field("nsfw_model", pa.string()),
        pa.field("blob_shard", pa.int64()),  # shard id (generation, unit) of the blob tar; null: no image
        pa.field("blob_offset", pa.int64()),  # where the JPEG bytes start in that tar
        pa.field("blob_length", pa.int64()),
    ],
    metadata={b"m3w.schema_version": SCHEMA_VERSION.encode()},
)

# One index record per URL (little-endian, 80 bytes). `row` is the URL's row in the rows file of `shard`; its
# image lies at `blob_offset` of blob shard `blob_shard` (the unit's own shard until compaction moves it). The
# image filter scores the thresholds apply to are here too (NaN, or has_phash 0: no score), so a reader decides
# "usable" from the index alone, the pHash duplicate rule included.
INDEX_RECORD = np.dtype(
    [
        ("url_hash", "<i8"),
        ("url_hash2", "<i8"),
        ("shard", "<i8"),
        ("blob_shard", "<i8"),  # -1: no image
        ("blob_offset", "<i8"),
        ("blob_length", "<i4"),
        ("row", "<i4"),
        ("nsfw_score", "<f4"),
        ("clip_similarity", "<f4"),
        ("blur", "<f4"),
        ("text_share", "<f4"),
        ("phash", "<i8"),
        ("attempts", "<i2"),
        ("http_status", "<i2"),  # 0: none
        ("status", "u1"),  # index into STATUSES
        ("final", "u1"),  # 1: never fetched again (is_final)
        ("has_phash", "u1"),  # 0: phash is no score (the step was off)
        ("_pad", "V1"),
    ]
)
RECORD_SCORES = ("nsfw_score", "clip_similarity", "blur", "text_share")
INDEX_MAGIC = b"M3WIDX05"
_INDEX_HEAD = struct.Struct("<8sqqq")  # magic, records, fence stride, fence length
INDEX_HEAD_SIZE = _INDEX_HEAD.size


# ---------------------------------------------------------------------------------------------- identity


def url_hashes(url: str) -> tuple[int, int]:
    """Two independent signed 64-bit hashes of a URL (blake2b-128): its identity in the store."""
    digest = hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(
        digest[8:], "little", signed=True
    )


def bucket_of(url_hash: np.ndarray | int, buckets: int) -> np.ndarray | int:
    """Bucket of a hash: the top 32 bits of (hash + 2^63), scaled to [0, buckets). Monotone in the signed
    hash, so a bucket is one contiguous range of the sort order."""
    shifted = np.asarray(url_hash, dtype=np.int64).view(np.uint64) ^ np.uint64(1 << 63)
    out = ((shifted >> np.uint64(32)) * np.uint64(buckets)) >> np.uint64(32)
    return out.astype(np.int64) if out.ndim else int(out)


def bucket_hash_range(bucket: int, buckets: int) -> tuple[int, int]:
    """The signed hashes [low, high] of a bucket (inclusive)."""
    top_low = -(-(bucket << 32) // buckets)  # smallest top-32-bits value landing in `bucket`
    top_high = -(-((bucket + 1) << 32) // buckets) - 1
    return (top_low << 32) - (1 << 63), ((top_high << 32) | 0xFFFFFFFF) - (1 << 63)


# ---------------------------------------------------------------------------------------------- statuses


def status_code(status: str) -> int:
    return STATUSES.index(status)


def is_final(status: str, http_status: int | None) -> bool:
    """A final status is never fetched again. Timeouts, 5xx, 429 and connection failures (http_error without
    an HTTP status) may be transient and are retried, a bounded number of times."""
    if status == "timeout":
        return False
    if status == "http_error":
        return http_status is not None and http_status < 500 and http_status != 429
    return True


def is_usable(row: dict[str, Any]) -> bool:
    """The one rule for "this URL has an image the later stages may use": status ok and stored bytes."""
    return (
        row.get("status") == STATUS_OK and row.get("blob_shard") is not None and bool(row.get("blob_length"))
    )


# ---------------------------------------------------------------------------------------------- paths


def shard_id(generation: int, unit: int) -> int:
    return (generation << 32) | unit


def shard_parts(shard: int) -> tuple[int, int]:
    return shard >> 32, shard & 0xFFFFFFFF


def rows_relpath(shard: int) -> str:
    generation, unit = shard_parts(shard)
    return f"rows/g{generation:06d}/u{unit:06d}.parquet"


def rows_file_unit(rows_file: str) -> str:
    """A rows file's unit id, `g000007/u000003`, from its path or URL (file names repeat across generations)."""
    return "/".join(str(rows_file).rstrip("/").rsplit("/", 2)[-2:]).removesuffix(".parquet")


def blob_relpath(shard: int) -> str:
    generation, unit = shard_parts(shard)
    return f"blobs/g{generation:06d}/u{unit:06d}.tar"


def blob_member_name(resized_sha256: str) -> str:
    return f"{resized_sha256}.jpg"


def index_relpath(bucket: int, generation: int) -> str:
    return f"index/h={bucket:05d}/g{generation:06d}.idx"


def run_relpath(generation: int) -> str:
    return f"{RUNS_DIR}/g{generation:06d}"


def generation_relpath(generation: int) -> str:
    """The snapshot of a generation's committed state."""
    return f"{GENERATIONS_DIR}/g{generation:06d}.json"


def blob_generation_relpath(generation: int) -> str:
    """The folder of a generation's blob shards."""
    return blob_relpath(shard_id(generation, 0)).rsplit("/", 1)[0]


# The shuffle files of `m3w store compact` (partitioned files, `schemas.filter_cache.write_parts`), under the
# compaction's run folder, removed once it is committed. Index records with an image, with its image's sha256
# (from the rows files): "images" (every such record, partitioned by sha256 for the decision) and "copies" (the
# records of images to copy, partitioned by sha256 into the new blob shards):
COMPACT_IMAGE_SCHEMA = pa.schema(
    [
        pa.field("sha256", pa.binary(32), nullable=False),  # of the stored image
        pa.field("blob_shard", pa.int64(), nullable=False),  # where it lies now
        pa.field("blob_offset", pa.int64(), nullable=False),
        pa.field("blob_length", pa.int64(), nullable=False),
        pa.field("bucket", pa.int32(), nullable=False),  # the record: bucket and position in its index file
        pa.field("position", pa.int64(), nullable=False),
    ]
)
# "moves": a record's image's new place, partitioned by bucket group:
COMPACT_MOVE_SCHEMA = pa.schema([COMPACT_IMAGE_SCHEMA.field(n) for n in
                                 ("bucket", "position", "blob_shard", "blob_offset", "blob_length")])  # fmt: skip
COMPACT_SCRATCH = ("images", "copies", "moves")


def compact_scratch_relpath(generation: int, kind: str, task: str) -> str:
    if kind not in COMPACT_SCRATCH:
        raise ValueError(f"compaction scratch {kind!r} not in {COMPACT_SCRATCH}")
    return f"{run_relpath(generation)}/{kind}/{task}.parts"


# ---------------------------------------------------------------------------------------------- the state


@dataclass
class StoreState:
    """`_store.json`: what a reader needs to find every current file without listing a folder."""

    buckets: int
    settings: dict[str, Any]
    generation: int = 0
    index_generations: list[int] | None = None  # per bucket: generation of its .idx file (-1: none yet)
    index_rows: list[int] | None = None  # per bucket: records in that file
    history: list[dict[str, Any]] | None = None  # one line per committed generation (what it added)
    compactions: list[int] | None = None  # generations of `m3w store compact`: they moved images, added none
    # Files and folders (relative paths) no generation from `generation` on points at, kept for the readers
    # of earlier ones until vacuumed: [{"generation": G, "paths": [...]}], G the generation that superseded them
    superseded: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.index_generations is None:
            self.index_generations = [-1] * self.buckets
        if self.index_rows is None:
            self.index_rows = [0] * self.buckets
        if self.history is None:
            self.history = []
        if self.compactions is None:
            self.compactions = []
        if self.superseded is None:
            self.superseded = []

    @property
    def content_generation(self) -> int:
        """The last generation that changed what the store holds (a compaction only moves images): what
        outputs built from the store depend on."""
        moved = set(self.compactions)
        return max((g for g in range(self.generation + 1) if g not in moved), default=0)

    def superseded_paths(self) -> set[str]:
        return {path for entry in self.superseded for path in entry["paths"]}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "buckets": self.buckets,
            "settings": self.settings,
            "generation": self.generation,
            "index_generations": self.index_generations,
            "index_rows": self.index_rows,
            "history": self.history,
            "compactions": self.compactions,
            "superseded": self.superseded,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> StoreState:
        if data.get("schema") == UNMOVABLE_SCHEMA_VERSION:
            raise LegacyStoreError(
                f"{where}: an image store of {UNMOVABLE_SCHEMA_VERSION}, whose index cannot point at moved images: "
                f"convert it with `m3w store migrate {where.rsplit('/', 1)[0]}`"
            )
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(
                f"{where}: image store schema {data.get('schema')!r}, expected {SCHEMA_VERSION!r}"
            )
        return cls(
            buckets=int(data["buckets"]),
            settings=data.get("settings") or {},
            generation=int(data["generation"]),
            index_generations=[int(g) for g in data["index_generations"]],
            index_rows=[int(n) for n in data["index_rows"]],
            history=list(data.get("history") or []),
            compactions=[int(g) for g in data.get("compactions") or []],
            superseded=[
                {"generation": int(e["generation"]), "paths": [str(p) for p in e["paths"]]}
                for e in data.get("superseded") or []
            ],  # fmt: skip
        )

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------------------------------------- index files


def encode_index(records: np.ndarray, stride: int = FENCE_STRIDE) -> bytes:
    """An index file: head, fence (every `stride`-th url_hash), records (sorted by url_hash, url_hash2)."""
    records = np.ascontiguousarray(records, dtype=INDEX_RECORD)
    fence = np.ascontiguousarray(records["url_hash"][::stride]).astype("<i8")
    head = _INDEX_HEAD.pack(INDEX_MAGIC, len(records), stride, len(fence))
    return head + fence.tobytes() + records.tobytes()


def index_fence_size(records: int, stride: int = FENCE_STRIDE) -> int:
    """Bytes of head + fence for a file of `records` records: what a point lookup reads first."""
    return INDEX_HEAD_SIZE + 8 * -(-records // stride)


def decode_index_head(data: bytes, where: str, magic: bytes = INDEX_MAGIC) -> tuple[int, int, np.ndarray]:
    """(records, stride, fence) from the first index_fence_size(records) bytes of an index file."""
    found, records, stride, fence_len = _INDEX_HEAD.unpack_from(data)
    if found != magic:
        raise ValueError(f"{where}: not an m3w image index file of this layout (magic {found!r})")
    end = INDEX_HEAD_SIZE + 8 * fence_len
    if len(data) < end:
        raise ValueError(f"{where}: truncated index head ({len(data)} of {end} bytes)")
    return records, stride, np.frombuffer(data[INDEX_HEAD_SIZE:end], dtype="<i8")


def decode_index(
    data: bytes, where: str, record: np.dtype = INDEX_RECORD, magic: bytes = INDEX_MAGIC
) -> np.ndarray:
    """Every record of a whole index file (of an earlier layout with its `record` and `magic`)."""
    records, _, fence = decode_index_head(data, where, magic)
    start = INDEX_HEAD_SIZE + 8 * len(fence)
    body = data[start : start + records * record.itemsize]
    if len(body) != records * record.itemsize:
        raise ValueError(
            f"{where}: truncated index ({len(body)} bytes of records, expected {records} records)"
        )
    return np.frombuffer(body, dtype=record)


def records_offset(fence_len: int) -> int:
    return INDEX_HEAD_SIZE + 8 * fence_len


def empty_records(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=INDEX_RECORD)


def rows_to_records(table: pa.Table, shard: int) -> np.ndarray:
    """Index records of a rows file's table (row numbers are the table's positions)."""
    n = table.num_rows
    rec = empty_records(n)
    if not n:
        return rec
    rec["url_hash"] = table.column("url_hash").to_numpy()
    rec["url_hash2"] = table.column("url_hash2").to_numpy()
    rec["shard"] = shard
    has_blob = table.column("blob_shard").is_valid().to_numpy(zero_copy_only=False)
    rec["blob_shard"] = np.where(has_blob, table.column("blob_shard").fill_null(-1).to_numpy(), -1)
    rec["blob_offset"] = np.where(has_blob, table.column("blob_offset").fill_null(-1).to_numpy(), -1)
    rec["blob_length"] = np.where(has_blob, table.column("blob_length").fill_null(0).to_numpy(), 0)
    rec["row"] = np.arange(n, dtype=np.int32)
    for score in RECORD_SCORES:
        rec[score] = table.column(score).cast(pa.float32()).fill_null(np.nan).to_numpy()
    phash = table.column("phash")
    rec["phash"] = phash.fill_null(0).to_numpy()
    rec["has_phash"] = phash.is_valid().to_numpy(zero_copy_only=False)
    rec["attempts"] = table.column("attempts").fill_null(1).to_numpy()
    http = table.column("http_status").fill_null(0).to_numpy()
    rec["http_status"] = http
    statuses = table.column("status").to_pylist()
    rec["status"] = [status_code(s) for s in statuses]
    rec["final"] = [is_final(s, h or None) for s, h in zip(statuses, http.tolist())]
    return rec


def merge_records(parts: Iterable[np.ndarray]) -> np.ndarray:
    """One record per URL: the most attempts wins; on a tie, the later shard (the later generation/unit).
    Sorted by (url_hash, url_hash2)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_records()
    rec = np.concatenate(parts)
    # lexsort: last key is primary. Within a URL, the winner (most attempts, then latest shard) comes first.
    order = np.lexsort((-rec["shard"], -rec["attempts"].astype(np.int64), rec["url_hash2"], rec["url_hash"]))
    rec = rec[order]
    first = np.ones(len(rec), dtype=bool)
    first[1:] = (rec["url_hash"][1:] != rec["url_hash"][:-1]) | (
        rec["url_hash2"][1:] != rec["url_hash2"][:-1]
    )
    return rec[first]


def record_status(record: np.void) -> str:
    return STATUSES[int(record["status"])]


def record_row(record: np.void) -> dict[str, Any]:
    """What `is_usable` and the image filter thresholds read, from an index record."""
    row = {"status": record_status(record), "blob_length": int(record["blob_length"])}
    row["blob_shard"] = int(record["blob_shard"]) if row["blob_length"] > 0 else None
    for score in RECORD_SCORES:
        value = float(record[score])
        row[score] = None if np.isnan(value) else value
    row["phash"] = int(record["phash"]) if record["has_phash"] else None
    return row


# The image filter thresholds in force (an ImageFiltersConfig as JSON), written by each `m3w images` run; readers of
# the store apply them to the index's scores. With them, the key of the store's pHash duplicate counts
# (schemas.image_duplicates) that the duplicate rule reads, or null.
IMAGE_FILTERS_FILE = "_image_filters.json"


def write_image_filters(root: str, config: dict[str, Any], phash_counts: str | None = None) -> None:
    from m3w.pipeline import io

    record = {"schema": SCHEMA_VERSION, "image_filters": config, "phash_counts": phash_counts}
    io.write_json(io.join(root, IMAGE_FILTERS_FILE), record, indent=1)


def _read_record(root: str) -> dict[str, Any] | None:
    from m3w.pipeline import io

    try:
        return io.read_json(io.join(str(root), IMAGE_FILTERS_FILE))
    except FileNotFoundError:
        return None


def read_image_filters(root: str) -> dict[str, Any] | None:
    record = _read_record(root)
    return None if record is None else record["image_filters"]


def read_phash_counts(root: str) -> str | None:
    record = _read_record(root)
    return None if record is None else record.get("phash_counts")


# ---------------------------------------------------------------------------------------------- layout 1

# Layout version 1, read only by `m3w store migrate`: index/*.parquet (one row per URL attempt, the most
# attempts wins, ties: the later file), blobs/ab/<sha256>.jpg (one file per image), _store_config.json.
LEGACY_SETTINGS_FILE = "_store_config.json"


def legacy_blob_relpath(resized_sha256: str) -> str:
    return f"blobs/{resized_sha256[:2]}/{resized_sha256}.jpg"


# Layout version 2 (m3w.images/2), read only by `m3w store migrate`: index records without `blob_shard` (a URL's
# image lay in the blob shard of its rows file's unit), magic M3WIDX04.
UNMOVABLE_INDEX_RECORD = np.dtype([(name, INDEX_RECORD.fields[name][0]) for name in INDEX_RECORD.names
                                   if name != "blob_shard"])  # fmt: skip
UNMOVABLE_INDEX_MAGIC = b"M3WIDX04"


def movable_records(old: np.ndarray) -> np.ndarray:
    """Layout-2 index records as records of this layout: each image where its unit stored it."""
    records = empty_records(len(old))
    for name in UNMOVABLE_INDEX_RECORD.names:
        records[name] = old[name]
    records["blob_shard"] = np.where(old["blob_length"] > 0, old["shard"], -1)
    return records
