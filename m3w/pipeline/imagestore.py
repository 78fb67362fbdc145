"""The image store (layout and formats in `schemas/images.py`), on a local disk or object storage.

- Writers: a fetch unit stores its images in one tar (`BlobShardWriter`) and then its rows file
  (`write_rows`), which commits the unit. A run then compacts the index buckets its units touched
  (`compact_buckets`) and commits the generation by writing `_store.json` (`commit`), under a lease.
- Readers: `_store.json` names every current index file, so nothing is listed or globbed. A lookup hashes the
  URLs, reads each bucket's fence (a few KB) and then only the index blocks holding those hashes: its cost and
  memory depend on how many URLs are asked for, not on how many the store holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
import threading
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from m3w.errors import UserError
from m3w.pipeline import io
from m3w.pipeline.tario import TAR_FORMAT, add_member
from m3w.schemas import images as spec
from m3w.schemas.images import LegacyStoreError

LOOKUP_BATCH = 4096  # URLs resolved per round of block reads: bounds a lookup's memory (~50 MB of blocks)


class NoStoreError(UserError, FileNotFoundError):
    """No image store at the given place."""


class GenerationGoneError(UserError):
    """A reader's store generation was vacuumed: its files are gone (the reader must plan again)."""


@dataclass(frozen=True)
class BlobRef:
    """Where a URL's resized JPEG lies: `length` bytes at `offset` of blob shard `shard`."""

    shard: int
    offset: int
    length: int

    @classmethod
    def of(cls, row: dict[str, Any]) -> BlobRef:
        """The blob of a usable index row (`ImageStore.lookup`)."""
        if not spec.is_usable(row):
            raise ValueError(f"{row.get('url')}: no usable image (status {row.get('status')})")
        return cls(int(row["blob_shard"]), int(row["blob_offset"]), int(row["blob_length"]))


# root → fences by (bucket, generation): a process looking up many URL batches reads each fence once.
_FENCES: OrderedDict[tuple[str, int, int], tuple[int, np.ndarray]] = OrderedDict()
_FENCES_MAX = 1024


class ImageStore:
    """`ImageStore(root)`: a local path or a URL (`s3://bucket/images`)."""

    def __init__(self, root: str | Any) -> None:
        self.root = str(root).rstrip("/")
        self._state: spec.StoreState | None = None

    def url(self, relpath: str) -> str:
        return io.join(self.root, relpath)

    # -- state -----------------------------------------------------------------------------------------------

    def is_legacy(self) -> bool:
        """A layout-1 store: index parquet files directly in index/ and no _store.json."""
        return not io.exists(self.url(spec.STORE_FILE)) and any(
            n.endswith(".parquet") for n in io.list_dir(self.url("index"))
        )

    def state(self, refresh: bool = True) -> spec.StoreState:
        """The committed state: read afresh (one small object) unless `refresh` is False and it was read."""
        if self._state is None or refresh:
            try:
                data = io.read_json(self.url(spec.STORE_FILE))
            except FileNotFoundError:
                if self.is_legacy():
                    raise LegacyStoreError(
                        f"{self.root} is an image store in the old layout ({spec.LEGACY_SCHEMA_VERSION}, one file "
                        f"per image): convert it with `m3w store migrate {self.root}`"
                    ) from None
                raise NoStoreError(
                    f"no image store at {self.root} (no {spec.STORE_FILE}): run `m3w images`"
                ) from None
            self._state = spec.StoreState.from_json(data, self.url(spec.STORE_FILE))
        return self._state

    def state_at(self, generation: int) -> spec.StoreState:
        """The state of `generation` as committed: the current one, or an earlier one not yet vacuumed."""
        state = self.state()
        if generation == state.generation:
            return state
        if generation > state.generation:
            raise UserError(
                f"{self.root}: no store generation {generation} (the store is at {state.generation})"
            )
        try:
            data = io.read_json(self.url(spec.generation_relpath(generation)))
        except FileNotFoundError:
            raise self.gone(generation) from None
        return spec.StoreState.from_json(data, self.url(spec.generation_relpath(generation)))

    def gone(self, generation: int, missing: str | None = None) -> GenerationGoneError:
        """The error of a reader that planned on `generation` and finds it (or its file `missing`) vacuumed."""
        what = f"{missing} is gone: " if missing else ""
        if generation == self.state().generation:
            return GenerationGoneError(f"{what}it belongs to store generation {generation} of {self.root}, the "
                                       "current one: the store lost a file")  # fmt: skip
        return GenerationGoneError(
            f"{what}store generation {generation} of {self.root}, which this reader planned on, was vacuumed "
            f"(the store is at generation {self.state().generation}); run again to read the current one"
        )

    def exists(self) -> bool:
        return io.exists(self.url(spec.STORE_FILE))

    def create(self, settings: dict[str, Any], buckets: int = spec.DEFAULT_BUCKETS) -> spec.StoreState:
        """Create an empty store (generation 0)."""
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, not {buckets}")
        state = spec.StoreState(buckets=buckets, settings=settings)
        self.commit(state)
        return state

    def commit(self, state: spec.StoreState) -> None:
        """Write the generation's snapshot, then `_store.json`: from now on readers see `state` (its index files
        must all be written)."""
        io.write_bytes(self.url(spec.generation_relpath(state.generation)), state.dumps())
        io.write_bytes(self.url(spec.STORE_FILE), state.dumps())
        self._state = state

    @property
    def generation(self) -> int:
        return self.state().generation

    # -- point lookups ---------------------------------------------------------------------------------------

    def _fence(self, bucket: int, state: spec.StoreState) -> tuple[int, np.ndarray, str]:
        generation, rows = state.index_generations[bucket], state.index_rows[bucket]
        url = self.url(spec.index_relpath(bucket, generation))
        key = (self.root, bucket, generation)
        cached = _FENCES.get(key)
        if cached is None:
            (head,) = io.read_ranges([url], [0], [spec.index_fence_size(rows)])
            records, stride, fence = spec.decode_index_head(head, url)
            if records != rows:
                raise ValueError(f"{url}: {records} records, but {spec.STORE_FILE} says {rows}")
            cached = _FENCES[key] = (stride, fence)
            if len(_FENCES) > _FENCES_MAX:
                _FENCES.popitem(last=False)
        else:
            _FENCES.move_to_end(key)
        return cached[0], cached[1], url

    def locate(self, urls: Iterable[str], state: spec.StoreState | None = None) -> dict[str, np.void]:
        """url → its index record in `state` (default: the current generation), for the URLs the store has
        seen (others are absent)."""
        state = state or self.state()
        wanted = sorted(set(urls))
        found: dict[str, np.void] = {}
        with self.reading(state):
            for start in range(0, len(wanted), LOOKUP_BATCH):
                found.update(self._locate_batch(wanted[start : start + LOOKUP_BATCH], state))
        return found

    @contextlib.contextmanager
    def reading(self, state: spec.StoreState) -> Iterator[None]:
        """Reads of the files of `state`: a file that is gone (vacuumed) is the one clear GenerationGoneError."""
        try:
            yield
        except FileNotFoundError as exc:
            raise self.gone(state.generation, exc.filename or str(exc)) from None

    def _locate_batch(self, urls: list[str], state: spec.StoreState) -> dict[str, np.void]:
        hashes = np.array([spec.url_hashes(u) for u in urls], dtype=np.int64).reshape(-1, 2)
        buckets = spec.bucket_of(hashes[:, 0], state.buckets) if len(urls) else np.zeros(0, np.int64)
        reads: list[tuple[str, int, int]] = []  # (index url, first record, end record)
        wanted: list[tuple[int, int]] = []  # (query position, read number)
        body_start: dict[str, int] = {}  # index url → byte offset of its first record
        for bucket in np.unique(buckets).tolist():
            if state.index_generations[bucket] < 0 or state.index_rows[bucket] == 0:
                continue
            stride, fence, url = self._fence(bucket, state)
            body_start[url] = spec.records_offset(len(fence))
            rows = state.index_rows[bucket]
            for q in np.nonzero(buckets == bucket)[0].tolist():
                h = hashes[q, 0]
                # The record lies in the block whose fence value is the last <= h; equal hashes may straddle
                # a block boundary, so start one block early when the fence holds h itself.
                first = max(int(np.searchsorted(fence, h, "left")) - 1, 0)
                last = max(int(np.searchsorted(fence, h, "right")) - 1, 0)
                reads.append((url, first * stride, min((last + 1) * stride, rows)))
                wanted.append((q, len(reads) - 1))
        if not reads:
            return {}
        unique = sorted(set(reads))
        position = {r: i for i, r in enumerate(unique)}
        size = spec.INDEX_RECORD.itemsize
        blobs = io.read_ranges(
            [url for url, _, _ in unique],
            [body_start[url] + first * size for url, first, _ in unique],
            [body_start[url] + end * size for url, _, end in unique],
        )
        blocks = [np.frombuffer(b, dtype=spec.INDEX_RECORD) for b in blobs]
        found = {}
        for q, read in wanted:
            block = blocks[position[reads[read]]]
            h, h2 = hashes[q]
            i = int(np.searchsorted(block["url_hash"], h, "left"))
            while i < len(block) and block["url_hash"][i] == h:
                if block["url_hash2"][i] == h2:
                    found[urls[q]] = block[i]
                    break
                i += 1
        return found

    def usable(self, urls: Iterable[str], state: spec.StoreState | None = None) -> dict[str, BlobRef]:
        """url → where its image lies in `state` (default: the current generation), for each URL with a usable
        image (`schemas.images.is_usable`) that passes the image filter thresholds the store records
        (`image_filters`): what the later stages may use."""
        from m3w.pipeline.image_filters.replay import store_filters

        filters = store_filters(self.root)
        out = {}
        for url, rec in self.locate(urls, state).items():
            row = spec.record_row(rec)
            if spec.is_usable(row) and (filters is None or filters.verdict(row) is None):
                out[url] = BlobRef(int(rec["blob_shard"]), int(rec["blob_offset"]), int(rec["blob_length"]))
        return out

    def lookup(self, urls: Iterable[str]) -> dict[str, dict[str, Any]]:
        """url → its full row (IMAGE_ROW_SCHEMA, as a dict) for each of `urls` the store has seen, with where
        its image lies now."""
        by_shard: dict[int, list[tuple[str, np.void]]] = defaultdict(list)
        for url, rec in self.locate(urls).items():
            by_shard[int(rec["shard"])].append((url, rec))
        out = {}
        for shard, wanted in sorted(by_shard.items()):
            rows = self._rows(shard, [rec for _, rec in wanted])
            out.update({url: row for (url, _), row in zip(wanted, rows)})
        return out

    def _rows(self, shard: int, records: list[np.void]) -> list[dict[str, Any]]:
        """The rows of some index records of one rows file, their blob columns taken from the records (the
        rows file says where the unit stored the image; the index, where it lies now)."""
        table = io.read_parquet(self.url(spec.rows_relpath(shard)))
        rows = table.take(pa.array([int(rec["row"]) for rec in records], pa.int64())).to_pylist()
        for row, rec in zip(rows, records):
            if row["blob_length"]:
                row["blob_shard"], row["blob_offset"] = int(rec["blob_shard"]), int(rec["blob_offset"])
        return rows

    # -- whole-store reads (maintenance, tests, export) ------------------------------------------------------

    def bucket_records(self, bucket: int, state: spec.StoreState | None = None) -> np.ndarray:
        state = state or self.state()
        generation = state.index_generations[bucket]
        if generation < 0:
            return spec.empty_records()
        url = self.url(spec.index_relpath(bucket, generation))
        return spec.decode_index(io.read_bytes(url), url)

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """Every URL's current row, bucket by bucket (memory: one bucket)."""
        state = self.state()
        for bucket in range(state.buckets):
            records = self.bucket_records(bucket, state)
            by_shard: dict[int, list[np.void]] = defaultdict(list)
            for rec in records[np.lexsort((records["row"], records["shard"]))]:
                by_shard[int(rec["shard"])].append(rec)
            for shard, wanted in sorted(by_shard.items()):
                yield from self._rows(shard, wanted)

    def count(self) -> int:
        """URLs in the store (one per URL, whatever its attempts)."""
        return sum(self.state().index_rows)

    # -- blobs -----------------------------------------------------------------------------------------------

    def read_blobs(self, refs: list[BlobRef], state: spec.StoreState | None = None) -> list[bytes]:
        """The JPEG bytes of each ref (of `state`, default the current generation), in order (remote ranges
        fetched concurrently)."""
        with self.reading(state or self.state(refresh=False)):
            return io.read_ranges(
                [self.url(spec.blob_relpath(r.shard)) for r in refs],
                [r.offset for r in refs],
                [r.offset + r.length for r in refs],
            )

    def read_blob(self, ref: BlobRef) -> bytes:
        return self.read_blobs([ref])[0]

    def files(self) -> list[str]:
        """Every file of the store (relative paths), for accounting."""
        return sorted(io.find_files(self.root))


# ------------------------------------------------------------------------------------------------- writing


class BlobShardWriter:
    """One fetch unit's blob shard: a tar of `<sha256>.jpg` members, identical bytes stored once. Thread-safe.
    Images arrive in a local scratch file in any order; `close()` stores the shard whole, its members in sha256
    order, so the same images make the same bytes whatever order the fetches finished in (nothing is stored if
    the unit fails)."""

    def __init__(self, store: ImageStore, shard: int) -> None:
        self.url = store.url(spec.blob_relpath(shard))
        self.shard = shard
        self._scratch = tempfile.TemporaryFile(prefix="m3w-blobs-")  # noqa: SIM115 - closed by close/abort
        self._lock = threading.Lock()
        self._stored: dict[str, tuple[int, int]] = {}  # sha256 → (offset, length) in the scratch file

    def add(self, data: bytes) -> tuple[str, int]:
        """Take `data` (once per shard) and return (sha256, length); `close()` says where it lies."""
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            if sha not in self._stored:
                self._scratch.seek(0, os.SEEK_END)
                self._stored[sha] = (self._scratch.tell(), len(data))
                self._scratch.write(data)
        return sha, len(data)

    @property
    def images(self) -> int:
        return len(self._stored)

    def close(self) -> dict[str, int]:
        """Store the shard. Returns sha256 → offset of that image's bytes in it."""
        offsets = {}
        try:
            with io.atomic_path(self.url) as tmp, tarfile.open(tmp, mode="w", format=TAR_FORMAT) as tar:
                for sha in sorted(self._stored):
                    start, length = self._stored[sha]
                    self._scratch.seek(start)
                    offsets[sha] = add_member(tar, spec.blob_member_name(sha), self._scratch.read(length))
        finally:
            self._scratch.close()
        return offsets

    def abort(self, exc: BaseException) -> None:
        self._scratch.close()


def write_rows(
    store: ImageStore, shard: int, rows: list[dict[str, Any]], offsets: Mapping[str, int] | None = None
) -> pa.Table:
    """Write a fetch unit's rows file (sorted by URL hash): this commits the unit. A row with an image gets its
    offset from `offsets` (`BlobShardWriter.close()` of the unit's shard). Returns the table."""
    for row in rows:
        if "url_hash" not in row:
            row["url_hash"], row["url_hash2"] = spec.url_hashes(row["url"])
        if row.get("blob_length"):
            if offsets is None:
                raise ValueError(f"{row['url']}: a row with an image needs its blob shard's offsets")
            row["blob_offset"] = offsets[row["resized_sha256"]]
            if row.get("blob_shard") is None:
                row["blob_shard"] = shard
    rows = sorted(rows, key=lambda r: (r["url_hash"], r["url_hash2"]))
    table = pa.Table.from_pylist(rows, schema=spec.IMAGE_ROW_SCHEMA)
    io.write_parquet_atomic(table, store.url(spec.rows_relpath(shard)))
    return table


RECORD_COLUMNS = ["url_hash", "url_hash2", "status", "http_status", "attempts", "blob_shard", "blob_offset",
                  "blob_length", "phash", *spec.RECORD_SCORES]  # fmt: skip


def shard_records(store: ImageStore, shard: int) -> np.ndarray:
    """Index records of one rows file."""
    table = io.read_parquet(store.url(spec.rows_relpath(shard)), columns=RECORD_COLUMNS)
    return spec.rows_to_records(table, shard)


def shard_hash_range(store: ImageStore, shard: int) -> tuple[int, int] | None:
    """(min, max) url_hash of a rows file, from its footer statistics; None for an empty file."""
    meta = io.parquet_file(store.url(spec.rows_relpath(shard))).metadata
    column = meta.schema.to_arrow_schema().get_field_index("url_hash")
    lows, highs = [], []
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max:
            table = io.read_parquet(store.url(spec.rows_relpath(shard)), columns=["url_hash"])
            if not table.num_rows:
                return None
            bounds = pc.min_max(table.column("url_hash"))
            return bounds["min"].as_py(), bounds["max"].as_py()
        lows.append(stats.min)
        highs.append(stats.max)
    return (min(lows), max(highs)) if lows else None


def compact_buckets(
    store: ImageStore,
    buckets: range,
    shards: list[int],
    index_generations: dict[int, int],
    generation: int,
) -> dict[int, int]:
    """Fold the rows of `shards` into the index files of `buckets`: one sorted file per touched bucket, written
    as generation `generation`. Returns {bucket: records} for the buckets rewritten (others are unchanged)."""
    state = store.state()
    low, high = (
        spec.bucket_hash_range(buckets.start, state.buckets)[0],
        spec.bucket_hash_range(buckets.stop - 1, state.buckets)[1],
    )
    new = [r for r in (shard_records(store, s) for s in shards)]
    new = [r[(r["url_hash"] >= low) & (r["url_hash"] <= high)] for r in new]
    new_all = np.concatenate(new) if new else spec.empty_records()
    new_buckets = (
        spec.bucket_of(new_all["url_hash"], state.buckets) if len(new_all) else np.zeros(0, np.int64)
    )
    written = {}
    for bucket in sorted(set(new_buckets.tolist())):
        old_generation = index_generations.get(bucket, -1)
        old = spec.empty_records()
        if old_generation >= 0:
            url = store.url(spec.index_relpath(bucket, old_generation))
            old = spec.decode_index(io.read_bytes(url), url)
        merged = spec.merge_records([old, new_all[new_buckets == bucket]])
        io.write_bytes(store.url(spec.index_relpath(bucket, generation)), spec.encode_index(merged))
        written[bucket] = len(merged)
    return written


def index_generation(store: ImageStore, generation: int, shards: list[int], **note: Any) -> spec.StoreState:
    """Fold the rows of `shards` into the index in this process and commit `generation` (migration, tests,
    benchmarks; `m3w images` does the same with one task per bucket group)."""
    state = store.state()
    written = compact_buckets(store, range(state.buckets), shards, dict(enumerate(state.index_generations)),
                              generation)  # fmt: skip
    superseded = []
    for bucket, records in written.items():
        if state.index_generations[bucket] >= 0:
            superseded.append(spec.index_relpath(bucket, state.index_generations[bucket]))
        state.index_generations[bucket], state.index_rows[bucket] = generation, records
    state.generation = generation
    state.history.append({"generation": generation, "units": len(shards), **note})
    commit_generation(store, state, superseded)
    return state


def commit_generation(
    store: ImageStore, state: spec.StoreState, superseded: list[str], retain: int = spec.RETAIN_GENERATIONS
) -> None:
    """Commit `state`, a new generation, listing the files and folders it no longer points at as superseded by
    it (kept for readers of earlier generations); then vacuum what is `retain` generations old. Under the
    store's lease."""
    if superseded:
        state.superseded = [*state.superseded, {"generation": state.generation, "paths": sorted(superseded)}]
    store.commit(state)
    vacuum(store, retain)


def readable_generations(store: ImageStore) -> list[int]:
    """The generations a reader may plan on: the current one and those whose snapshot was not vacuumed."""
    names = io.list_dir(store.url(spec.GENERATIONS_DIR))
    current = store.state().generation
    return sorted({current} | {int(n[1:-5]) for n in names if n.startswith("g") and n.endswith(".json")})


def vacuum(store: ImageStore, older_than: int = spec.RETAIN_GENERATIONS) -> dict[str, int]:
    """Remove the files superseded at least `older_than` generations ago, and the snapshots of the generations
    that needed them: generations from current - older_than on stay readable. Under the store's lease.

    Order: the snapshots first (a reader planning on such a generation now gets the clear "vacuumed" error),
    then the files, then `_store.json` without them. A kill anywhere leaves the current generation whole; the
    next vacuum removes what is still listed (a path already gone is skipped)."""
    if older_than < 0:
        raise ValueError(f"older_than must be >= 0, not {older_than}")
    state = store.state()
    oldest_readable = state.generation - older_than
    due = [e for e in state.superseded if e["generation"] <= oldest_readable]
    snapshots = [g for g in readable_generations(store) if g < oldest_readable]
    for generation in snapshots:
        io.remove(store.url(spec.generation_relpath(generation)))
    for path in [p for entry in due for p in entry["paths"]]:
        io.remove_tree(store.url(path))
    if due:
        store.commit(replace(state, superseded=[e for e in state.superseded if e not in due]))
    return {"paths": sum(len(e["paths"]) for e in due), "snapshots": len(snapshots),
            "oldest_readable_generation": max(oldest_readable, 0)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ migration


def legacy_index_files(store: ImageStore) -> list[str]:
    return [store.url(f"index/{n}") for n in io.list_dir(store.url("index")) if n.endswith(".parquet")]


def _legacy_rows(store: ImageStore) -> list[dict[str, Any]]:
    """The layout-1 index: one row per URL, the most attempts winning (ties: the later file)."""
    from m3w.schemas import documents as doc_spec

    tables = []
    for position, url in enumerate(legacy_index_files(store)):
        table = io.read_parquet(url)
        doc_spec.check_version(table.schema, spec.LEGACY_SCHEMA_VERSION)
        tables.append(table.append_column("_file", pa.array([position] * table.num_rows, pa.int64())))
    if not tables:
        return []
    table = pa.concat_tables(tables, promote_options="default")
    table = table.sort_by([("url", "ascending"), ("attempts", "descending"), ("_file", "descending")])
    urls = table.column("url").to_pylist()
    keep = [i for i, url in enumerate(urls) if i == 0 or url != urls[i - 1]]
    return table.take(pa.array(keep, pa.int64())).drop_columns(["_file"]).to_pylist()


def migrate_legacy(
    root: str, buckets: int = spec.DEFAULT_BUCKETS, urls_per_shard: int = 10_000
) -> dict[str, int]:
    """Convert a layout-1 store in place: its blobs packed into blob shards, its index into buckets, committed
    as generation 1; then the layout-1 files are removed. Re-running after a kill finishes the job."""
    from m3w.pipeline.lease import Lease

    store = ImageStore(root)
    counts: Counter[str] = Counter()
    with Lease(store.root):
        committed = store.exists() and store.state().generation > 0
        if not committed:
            rows = _legacy_rows(store)
            if not rows and not legacy_index_files(store):
                raise NoStoreError(f"no image store in the old layout at {store.root}")
            settings_url = store.url(spec.LEGACY_SETTINGS_FILE)
            settings = io.read_json(settings_url) if io.exists(settings_url) else {}
            store.create(settings, buckets)
            for row in rows:
                row["url_hash"], row["url_hash2"] = spec.url_hashes(row["url"])
            rows.sort(key=lambda r: (r["url_hash"], r["url_hash2"]))
            shards = []
            for unit, start in enumerate(range(0, len(rows), urls_per_shard)):
                shard = spec.shard_id(1, unit)
                blobs = BlobShardWriter(store, shard)
                chunk = rows[start : start + urls_per_shard]
                for row in chunk:
                    counts["urls"] += 1
                    if row["status"] != spec.STATUS_OK or not row.get("resized_sha256"):
                        continue
                    try:
                        data = io.read_bytes(store.url(spec.legacy_blob_relpath(row["resized_sha256"])))
                    except FileNotFoundError:
                        counts["missing_blob"] += 1  # kept as a row, not usable
                        continue
                    row["resized_sha256"], row["blob_length"] = blobs.add(data)
                    counts["images"] += 1
                write_rows(store, shard, chunk, blobs.close())
                shards.append(shard)
            index_generation(store, 1, shards, migrated_from=spec.LEGACY_SCHEMA_VERSION)
        for url in legacy_index_files(store):  # layout-1 files go only once the new layout is committed
            io.remove(url)
        for name in io.list_dir(store.url("blobs"), dirs=True):
            if len(name) == 2:
                io.remove_tree(store.url(f"blobs/{name}"))
        io.remove(store.url(spec.LEGACY_SETTINGS_FILE))
    return dict(counts)


def migrate_unmovable(root: str) -> dict[str, int]:
    """Convert a layout-2 store (`schemas.images.UNMOVABLE_SCHEMA_VERSION`): its index files rewritten with each
    record's blob shard, committed as a new generation; then the old index files are removed."""
    from m3w.pipeline.lease import Lease

    store = ImageStore(root)
    with Lease(store.root):
        data = io.read_json(store.url(spec.STORE_FILE))
        if data.get("schema") != spec.UNMOVABLE_SCHEMA_VERSION:
            raise NoStoreError(f"{store.root} is not an image store of {spec.UNMOVABLE_SCHEMA_VERSION}")
        state = spec.StoreState.from_json({**data, "schema": spec.SCHEMA_VERSION}, store.url(spec.STORE_FILE))
        generation, superseded, images = state.generation + 1, [], 0
        for bucket, old_generation in enumerate(state.index_generations):
            if old_generation < 0:
                continue
            url = store.url(spec.index_relpath(bucket, old_generation))
            old = spec.decode_index(
                io.read_bytes(url), url, spec.UNMOVABLE_INDEX_RECORD, spec.UNMOVABLE_INDEX_MAGIC
            )
            io.write_bytes(store.url(spec.index_relpath(bucket, generation)),
                           spec.encode_index(spec.movable_records(old)))  # fmt: skip
            state.index_generations[bucket] = generation
            superseded.append(url)
            images += int((old["blob_length"] > 0).sum())
        state.generation = generation
        state.history.append({"generation": generation, "migrated_from": spec.UNMOVABLE_SCHEMA_VERSION})
        store.commit(state)
        for url in superseded:
            io.remove(url)
    return {"urls": sum(state.index_rows), "images": images}
