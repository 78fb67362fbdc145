"""The filter stage's caches under `filtered/_cache/` (internal to `m3w filter`, rebuilt when missing).

- `signals/<unit>.<input fingerprint>.<signals hash>.parquet`: one row per document with what the filters and
  dedup decide on (per-text-node statistics, language, hashes, MinHash signature and LSH band keys);
- `dedup/<decisions key>/`: the corpus-wide dedup of those signals (see `m3w/pipeline/dedup/`): partitioned
  files (`*.parts`, below) that its phases hand to each other, and `drops/<unit>.parquet`, the rows and nodes
  that dedup drops from each unit, with rule and reason, which is all that a unit's decide step reads.

A partitioned file holds one table split into P partitions, written once by one task and read by P others,
each reading only its own byte range. Layout (little-endian):

    0   magic b"M3WPARTS"
    8   uint32 format version, uint32 P, uint64 rows
    24  uint64 byte offsets[P + 1]: partition k is bytes [offsets[k], offsets[k+1]) of the file
    …   one Arrow IPC stream per non-empty partition (zstd-compressed buffers)

One file per writing task (not one per partition) keeps the file count at tasks × phases, and a reader fetches
only 16 bytes of the offset table plus its own range, so no byte of a shuffle is read by more than one reader.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m3w.pipeline.io import parquet_file, read_ranges, write_bytes, write_parquet_atomic
from m3w.schemas.documents import METADATA_KEY, check_version

# Bytes read through this module in this process, by kind ("signals", "parts", "drops"): tasks report the
# difference across their run (the scale benchmark's read amplification).
BYTES_READ: Counter = Counter()

# ------------------------------------------------------------------------------------------------ signals

SIGNALS_VERSION = "m3w.filter-signals/3"

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
IMAGE_NODE_TYPE = pa.struct([pa.field("node_index", pa.int32()), pa.field("url_hash", pa.int64())])

SIGNALS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string()),
        pa.field("url_hash", pa.int64()),  # of the normalised page URL; null when the page has no URL
        pa.field("domain", pa.string()),
        pa.field("fetch_date", pa.string()),
        pa.field("lang", pa.string()),  # of the whole extracted text: picks the word lists
        pa.field("lang_score", pa.float32()),
        pa.field("text_hash", pa.int64()),  # null when the document has no text
        pa.field("image_set_hash", pa.int64()),  # of the distinct image URLs; null when the document has none
        pa.field("images", pa.list_(IMAGE_NODE_TYPE)),  # image nodes with a URL
        pa.field("bands", pa.list_(pa.int64())),  # MinHash LSH band keys; null when no text
        pa.field("signature", pa.list_(pa.uint32())),
        pa.field("nodes", pa.list_(NODE_STATS_TYPE)),  # text nodes only
    ],
    metadata={METADATA_KEY: SIGNALS_VERSION.encode()},
)
# Hashes and MinHash values are random: a dictionary only adds bytes to them.
_PLAIN_COLUMNS = (
    "url_hash",
    "text_hash",
    "image_set_hash",
    "images",
    "bands",
    "signature",
    "nodes.list.element.hash",
)


def write_signals(table: pa.Table, url: str) -> None:
    dictionary = [c for c in _dictionary_columns(table.schema) if c not in _PLAIN_COLUMNS]
    write_parquet_atomic(table, url, use_dictionary=dictionary)


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if not pa.types.is_list(f.type)] + [
        f"nodes.list.element.{f.name}" for f in NODE_STATS_TYPE
    ]


def read_signals(url: str, columns: Sequence[str]) -> pa.Table:
    """The given columns of a signals file. Leaf paths of nested columns select single fields
    (`nodes.list.element.hash`). Counts the bytes of the column chunks it reads."""
    file = parquet_file(url)
    check_version(file.schema_arrow, SIGNALS_VERSION)
    BYTES_READ["signals"] += _chunk_bytes(file, columns)
    return file.read(columns=list(columns))


def iter_signals(url: str, columns: Sequence[str], batch_size: int) -> Iterator[pa.Table]:
    """The given columns of a signals file, `batch_size` rows at a time."""
    file = parquet_file(url)
    check_version(file.schema_arrow, SIGNALS_VERSION)
    BYTES_READ["signals"] += _chunk_bytes(file, columns)
    for batch in file.iter_batches(batch_size=batch_size, columns=list(columns)):
        yield pa.Table.from_batches([batch])


def _chunk_bytes(file: pq.ParquetFile, columns: Sequence[str] | None = None) -> int:
    """Bytes a read of `columns` (all when None) fetches: their column chunks and the footer."""
    meta = file.metadata
    total = meta.serialized_size
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            path = chunk.path_in_schema
            if columns is None or path in columns or path.split(".", 1)[0] in columns:
                total += chunk.total_compressed_size
    return total


# ------------------------------------------------------------------------------------------------ partitioned files

PARTS_VERSION = 1
_MAGIC = b"M3WPARTS"
_HEADER = struct.Struct("<8sIIQ")
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def write_parts(url: str, table: pa.Table, partition: np.ndarray | None = None, partitions: int = 1) -> int:
    """Write `table` split by `partition` (one int per row, in [0, partitions); all in one when None); rows keep
    their order within a partition. Returns the bytes written."""
    if partition is None:
        partition = np.zeros(table.num_rows, dtype=np.int64)
    order = np.argsort(partition, kind="stable")
    counts = (
        np.bincount(partition, minlength=partitions) if len(partition) else np.zeros(partitions, np.int64)
    )
    if len(counts) > partitions:
        raise ValueError(f"partition index {len(counts) - 1} out of range for {partitions} partitions")
    table = table.take(pa.array(order)) if len(order) else table
    bodies: list[bytes] = []
    start = 0
    for n in counts.tolist():
        if n == 0:
            bodies.append(b"")
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema, options=_IPC_OPTIONS) as writer:
            writer.write_table(table.slice(start, n))
        bodies.append(sink.getvalue().to_pybytes())
        start += n
    offsets = np.empty(partitions + 1, dtype="<u8")
    offsets[0] = _HEADER.size + 8 * (partitions + 1)
    offsets[1:] = offsets[0] + np.cumsum([len(b) for b in bodies], dtype=np.uint64)
    data = b"".join(
        [_HEADER.pack(_MAGIC, PARTS_VERSION, partitions, table.num_rows), offsets.tobytes(), *bodies]
    )
    write_bytes(url, data)
    return len(data)


def read_parts(urls: Sequence[str], partition: int, partitions: int, schema: pa.Schema) -> pa.Table:
    """Partition `partition` of each file in `urls` (all written with `partitions` partitions), concatenated in
    the order of `urls`: two small reads per file for the header and offsets, one for the partition."""
    return read_part_ranges(part_ranges(urls, partition, partitions), schema)


def part_ranges(urls: Sequence[str], partition: int, partitions: int) -> list[tuple[str, int, int]]:
    """(url, start, end) of partition `partition` in each file that has rows in it, in the order of `urls`."""
    if not urls:
        return []
    entry = _HEADER.size + 8 * partition
    heads = read_ranges(
        [u for u in urls for _ in (0, 1)],
        [s for _ in urls for s in (0, entry)],
        [e for _ in urls for e in (_HEADER.size, entry + 16)],
    )
    BYTES_READ["parts"] += len(urls) * (_HEADER.size + 16)
    ranges = []
    for i, url in enumerate(urls):
        magic, version, count, _ = _HEADER.unpack(heads[2 * i])
        if magic != _MAGIC or version != PARTS_VERSION:
            raise ValueError(f"{url}: not an m3w partitioned file of version {PARTS_VERSION}")
        if count != partitions:
            raise ValueError(f"{url}: has {count} partitions, expected {partitions}")
        start, end = struct.unpack("<QQ", heads[2 * i + 1])
        if end > start:
            ranges.append((url, start, end))
    return ranges


def read_part_ranges(ranges: Sequence[tuple[str, int, int]], schema: pa.Schema) -> pa.Table:
    """The rows in `ranges` (from `part_ranges`), concatenated in order."""
    bodies = read_ranges([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges])
    tables = []
    for (url, _, _), body in zip(ranges, bodies):
        BYTES_READ["parts"] += len(body)
        table = pa.ipc.open_stream(body).read_all()
        if not table.schema.equals(schema):
            raise ValueError(f"{url}: partition schema {table.schema} is not {schema}")
        tables.append(table)
    return pa.concat_tables(tables) if tables else schema.empty_table()


# ------------------------------------------------------------------------------------------------ drop lists

DROPS_VERSION = "m3w.filter-drops/1"
DROPS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int32(), nullable=False),  # the document's row in its unit (documents and signals)
        pa.field("node_index", pa.int32()),  # null: the whole document goes
        pa.field("filter", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ],
    metadata={METADATA_KEY: DROPS_VERSION.encode()},
)


def write_drops(table: pa.Table, url: str) -> None:
    write_parquet_atomic(table.cast(DROPS_SCHEMA), url)


def read_drops(url: str) -> pa.Table:
    file = parquet_file(url)
    check_version(file.schema_arrow, DROPS_VERSION)
    BYTES_READ["drops"] += _chunk_bytes(file)
    return file.read()


# ------------------------------------------------------------------------------------------------ dedup records
# The tables the dedup phases pass each other in partitioned files (see `m3w/pipeline/dedup/`). `gid` names a
# document by its position (unit ordinal << 32 | row); `key` is a 64-bit hash; `date`/`idk` order copies.

_I64 = pa.int64()


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(name, kind, nullable=False) for name, kind in fields])


def exact_keys_schema(later: int) -> pa.Schema:
    """A document's key for one exact rule, its order, and its keys for the `later` rules after it."""
    return _schema(("key", _I64), ("gid", _I64), ("date", _I64), ("idk", _I64), *_later(later))


def forward_schema(later: int) -> pa.Schema:
    """A document an earlier exact rule dropped, sent to the next rule it has a key for."""
    return _schema(("key", _I64), ("gid", _I64), *_later(later))


def _later(n: int) -> list[tuple[str, pa.DataType]]:
    return [(f"later{i}", _I64) for i in range(n)]


BAND_KEYS_SCHEMA = _schema(("key", _I64), ("gid", _I64))
NODE_KEYS_SCHEMA = _schema(("key", _I64), ("gid", _I64), ("node", pa.int32()))
DEAD_SCHEMA = _schema(("gid", _I64))
LOSERS_SCHEMA = _schema(("gid", _I64), ("kept", _I64), ("rule", pa.int8()))
PAIRS_SCHEMA = _schema(("a", _I64), ("b", _I64))
# A near-duplicate edge from `node` to `neighbor`, with both documents' orders.
EDGES_SCHEMA = _schema(
    ("node", _I64), ("neighbor", _I64), ("date", _I64), ("idk", _I64), ("nb_date", _I64), ("nb_idk", _I64)
)
# The newest document (date, idk, gid `best`) known to be connected to `node`: a node's state, or a message.
LABELS_SCHEMA = _schema(("node", _I64), ("date", _I64), ("idk", _I64), ("best", _I64))
NAMED_DROPS_SCHEMA = _schema(("gid", _I64), ("rule", pa.int8()), ("reason", pa.string()))
NODE_DROPS_SCHEMA = _schema(("gid", _I64), ("node", pa.int32()), ("count", _I64), ("rule", pa.int8()))


def signed_pairs_schema(num_perm: int) -> pa.Schema:
    """A candidate pair with its first document's order and MinHash signature, on its way to the second's."""
    return _schema(
        ("a", _I64),
        ("b", _I64),
        ("date_a", _I64),
        ("idk_a", _I64),
        ("sig_a", pa.list_(pa.uint32(), num_perm)),
    )
