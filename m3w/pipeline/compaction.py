"""`m3w store compact`: every image of the store stored once, however many fetch units fetched its bytes.

A fetch unit stores each distinct image once in its own blob shard, so the same picture fetched by two units
(two runs, or two tasks of one run, under different URLs) lies in two shards. Compaction moves every image still
in a fetch unit's shard into compaction shards, one copy per sha256 in the whole store, and points every index
record at that copy. It is a shuffle on the sha256, so that no task, and not the driver, holds the store's
hashes:

    map      one task per bucket group: its index records with an image, with their image's sha256 (read from
             the rows files), hash-partitioned on the sha256
    decide   one task per sha256 partition: a sha256 already in a compaction shard keeps that copy (every other
             record of it moves there); the records of a sha256 with no such copy go to be copied
    copy     one task per new blob shard (the images to copy, partitioned again by sha256): each image's bytes
             read once and written once, in sha256 order, into `blobs/g<C>/u<K>.tar`; every record of it moves
    index    one task per bucket group: its buckets' index files rewritten with the moved records
    commit   `_store.json` of generation C, which names C a compaction and lists the fetch units' blob shards
             and the rewritten index files as superseded at C: they stay, for readers that planned on an
             earlier generation (a shards run under way), until a writer's vacuum finds them old enough
             (`retain_generations`). A kill before the commit leaves the store as it was (the next compaction
             or `m3w images` run overwrites the partial files).

An image is copied once in its life: compaction shards are never rewritten, and a later compaction only moves
what later runs fetched. Images no current record points at (superseded by a retry) go with their unit's shard.
Compaction is safe with concurrent readers: it never removes a file the generation before it points at.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from m3w.pipeline import io
from m3w.pipeline.dedup.keys import hash_partition
from m3w.pipeline.images import ImagesConfig, bucket_groups, recover_interrupted_run
from m3w.pipeline.imagestore import BlobShardWriter, ImageStore, commit_generation, vacuum
from m3w.pipeline.lease import Lease
from m3w.pipeline.ray_runner import Unit, run_units
from m3w.schemas import images as spec
from m3w.schemas.filter_cache import read_parts, write_parts

SHARD_BYTES = 256 << 20  # images per compaction shard, in bytes: about img2dataset's 10 k images of ~25 KB
COPY_BATCH = 256  # images read per round of a copy task (ranges fetched concurrently)


def sha_keys(sha: np.ndarray) -> np.ndarray:
    """64-bit shuffle keys of sha256 digests (n × 32 bytes): their first 8 bytes, already uniform."""
    return np.ascontiguousarray(sha[:, :8]).view("<i8").ravel()


def sha_column(table: pa.Table) -> np.ndarray:
    """The sha256 column of a compaction scratch table as an n × 32 byte array."""
    column = table.column("sha256").combine_chunks()
    data = np.frombuffer(column.buffers()[1], np.uint8)[
        column.offset * 32 : (column.offset + len(column)) * 32
    ]
    return data.reshape(-1, 32)


def _table(schema: pa.Schema, columns: dict[str, Any]) -> pa.Table:
    arrays = []
    for field in schema:
        values = columns[field.name]
        if field.type == pa.binary(32):
            values = np.ascontiguousarray(values, dtype=np.uint8)
            arrays.append(
                pa.FixedSizeBinaryArray.from_buffers(
                    field.type, len(values), [None, pa.py_buffer(values.tobytes())]
                )
            )
        else:
            arrays.append(pa.array(np.asarray(values), field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _group_of(buckets: np.ndarray, group_starts: Sequence[int]) -> np.ndarray:
    return np.searchsorted(np.asarray(group_starts), buckets, side="right") - 1


def _moves(records: pa.Table, shard: np.ndarray, offset: np.ndarray, length: np.ndarray) -> pa.Table:
    """Moves of `records` (bucket, position) to (shard, offset, length)."""
    columns = {"bucket": records["bucket"], "position": records["position"], "blob_shard": shard,
               "blob_offset": offset, "blob_length": length}  # fmt: skip
    return _table(spec.COMPACT_MOVE_SCHEMA, columns)


# ------------------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class MapArgs:
    store: str
    buckets: tuple[int, int]
    partitions: int
    out: str


def map_images(args: MapArgs) -> tuple[None, dict[str, int]]:
    """Ray task: a bucket group's records with an image, with their sha256, partitioned by sha256."""
    store = ImageStore(args.store)
    state = store.state()
    buckets, positions, records = [], [], []
    for bucket in range(*args.buckets):
        rec = store.bucket_records(bucket, state)
        position = np.flatnonzero(rec["blob_length"] > 0)
        buckets.append(np.full(len(position), bucket, np.int32))
        positions.append(position)
        records.append(rec[position])
    rec = np.concatenate(records)
    sha = np.zeros((len(rec), 32), np.uint8)
    order = np.argsort(rec["shard"], kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(rec["shard"][order]) != 0]) if len(rec) else []
    for start, end in zip(starts, [*starts[1:], len(rec)]):
        mine = order[start:end]
        rows_url = store.url(spec.rows_relpath(int(rec["shard"][mine[0]])))
        column = io.read_parquet(rows_url, columns=["resized_sha256"]).column(0)
        digests = column.take(pa.array(rec["row"][mine].astype(np.int64))).to_pylist()
        if None in digests:
            raise ValueError(f"{rows_url}: a row with an image has no resized_sha256")
        sha[mine] = np.frombuffer(bytes.fromhex("".join(digests)), np.uint8).reshape(-1, 32)
    columns = {"sha256": sha, "blob_shard": rec["blob_shard"], "blob_offset": rec["blob_offset"],
               "blob_length": rec["blob_length"].astype(np.int64), "bucket": np.concatenate(buckets),
               "position": np.concatenate(positions)}  # fmt: skip
    table = _table(spec.COMPACT_IMAGE_SCHEMA, columns)
    write_parts(args.out, table, hash_partition(sha_keys(sha), args.partitions), args.partitions)
    return None, {"records_with_image": len(rec)}


def _by_sha(table: pa.Table, settled: Sequence[int]) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """Records sorted by sha256, each sha256's settled copy (in a compaction shard) first, then by location.
    Returns (table, sha, index of the first record of each sha256, whether each record is settled)."""
    sha = sha_column(table)
    shard = table.column("blob_shard").to_numpy()
    offset = table.column("blob_offset").to_numpy()
    is_settled = np.isin(shard >> 32, np.asarray(settled, np.int64))
    words = np.ascontiguousarray(sha).view(">u8")  # big-endian: their order is the digests' byte order
    keys = [offset, shard, ~is_settled, words[:, 3], words[:, 2], words[:, 1], words[:, 0]]
    order = np.lexsort(keys) if len(sha) else np.zeros(0, np.int64)
    table, sha, is_settled = table.take(pa.array(order)), sha[order], is_settled[order]
    first = (
        np.flatnonzero(np.r_[True, np.any(sha[1:] != sha[:-1], axis=1)])
        if len(sha)
        else np.zeros(0, np.int64)
    )
    return table, sha, first, is_settled


def _numbered(n: int, first: np.ndarray) -> np.ndarray:
    """Each of n sorted records' sha256, numbered from 0, given where each sha256's records start."""
    starts = np.zeros(n, np.int64)
    starts[first] = 1
    return np.cumsum(starts) - 1


@dataclass(frozen=True)
class DecideArgs:
    store: str
    partition: int
    partitions: int
    image_files: tuple[str, ...]
    settled: tuple[int, ...]  # generations of earlier compactions
    group_starts: tuple[int, ...]
    copy_partitions: int
    moves_out: str
    copies_out: str


def decide_images(args: DecideArgs) -> tuple[None, dict[str, int]]:
    """Ray task: one sha256 partition. Records of a sha256 with a settled copy move to it; the records of the
    others go to their copy task. Counts the copies the store holds of each image today."""
    table, sha, first, settled = _by_sha(read_parts(args.image_files, args.partition, args.partitions,
                                                    spec.COMPACT_IMAGE_SCHEMA), args.settled)  # fmt: skip
    n = table.num_rows
    shard, offset = table.column("blob_shard").to_numpy(), table.column("blob_offset").to_numpy()
    length = table.column("blob_length").to_numpy()
    group = _numbered(n, first)
    new_place = (
        np.r_[True, (shard[1:] != shard[:-1]) | (offset[1:] != offset[:-1])] if n else np.zeros(0, bool)
    )
    new_place[first] = True
    places = np.bincount(group, weights=new_place, minlength=len(first)).astype(np.int64)
    has_settled = settled[first]
    keep = has_settled[group]  # records whose sha256 keeps its settled copy
    lead = first[group]
    moving = keep & ((shard != shard[lead]) | (offset != offset[lead]))
    moved = table.filter(pa.array(moving))
    write_parts(args.moves_out, _moves(moved, shard[lead][moving], offset[lead][moving], length[lead][moving]),
                _group_of(moved.column("bucket").to_numpy(), args.group_starts), len(args.group_starts))  # fmt: skip
    copies = table.filter(pa.array(~keep))
    write_parts(args.copies_out, copies, hash_partition(sha_keys(sha[~keep]), args.copy_partitions),
                args.copy_partitions)  # fmt: skip
    return None, {"images": len(first), "records": n, "stored_copies": int(places.sum()),
                  "duplicate_copies": int((places - 1).sum()),
                  "duplicate_bytes": int(((places - 1) * length[first]).sum())}  # fmt: skip


@dataclass(frozen=True)
class CopyArgs:
    store: str
    shard: int  # the new blob shard
    copy_files: tuple[str, ...]
    partition: int
    partitions: int
    group_starts: tuple[int, ...]
    moves_out: str


def copy_images(args: CopyArgs) -> tuple[None, dict[str, int]]:
    """Ray task: one new blob shard: each image's bytes read once and written once, in sha256 order."""
    store = ImageStore(args.store)
    table, sha, first, _ = _by_sha(read_parts(args.copy_files, args.partition, args.partitions,
                                              spec.COMPACT_IMAGE_SCHEMA), ())  # fmt: skip
    n = table.num_rows
    shard, offset = table.column("blob_shard").to_numpy(), table.column("blob_offset").to_numpy()
    length = table.column("blob_length").to_numpy()
    new_offset = np.zeros(len(first), np.int64)
    copied = 0
    if len(first):
        blobs = BlobShardWriter(store, args.shard)
        try:
            for start in range(0, len(first), COPY_BATCH):
                lead = first[start : start + COPY_BATCH]
                refs = [spec.blob_relpath(int(s)) for s in shard[lead]]
                datas = io.read_ranges(
                    [store.url(r) for r in refs], offset[lead], offset[lead] + length[lead]
                )
                for i, data in zip(range(start, start + len(lead)), datas):
                    if blobs.add(data)[0] != sha[first[i]].tobytes().hex():
                        raise ValueError(f"{store.url(refs[i - start])}: the bytes at {offset[first[i]]} are not "
                                         f"the image {sha[first[i]].tobytes().hex()} the rows name")  # fmt: skip
                    copied += len(data)
        except BaseException as exc:
            blobs.abort(exc)
            raise
        offsets = blobs.close()
        new_offset = np.array([offsets[sha[i].tobytes().hex()] for i in first], np.int64)
    group = _numbered(n, first)
    moves = _moves(table, np.full(n, args.shard, np.int64), new_offset[group], length[first][group])
    write_parts(args.moves_out, moves, _group_of(table.column("bucket").to_numpy(), args.group_starts),
                len(args.group_starts))  # fmt: skip
    return None, {"copied_images": len(first), "copied_bytes": copied}


@dataclass(frozen=True)
class IndexArgs:
    store: str
    group: int
    groups: int
    move_files: tuple[str, ...]
    generation: int


def index_moves(args: IndexArgs) -> tuple[dict[int, int], dict[str, int]]:
    """Ray task: a bucket group's index files rewritten with its moved records. Returns {bucket: records}."""
    store = ImageStore(args.store)
    state = store.state()
    moves = read_parts(args.move_files, args.group, args.groups, spec.COMPACT_MOVE_SCHEMA)
    bucket = moves.column("bucket").to_numpy()
    written = {}
    for b in np.unique(bucket).tolist():
        mine = moves.filter(pa.array(bucket == b))
        rec = store.bucket_records(b, state).copy()
        position = mine.column("position").to_numpy()
        if len(np.unique(position)) != len(position):
            raise ValueError(f"bucket {b}: a record moved twice")
        for column in ("blob_shard", "blob_offset", "blob_length"):
            rec[column][position] = mine.column(column).to_numpy()
        io.write_bytes(store.url(spec.index_relpath(b, args.generation)), spec.encode_index(rec))
        written[b] = len(rec)
    return written, {"records_moved": moves.num_rows, "buckets_rewritten": len(written)}


# ----------------------------------------------------------------------------------------------------- driver


def unit_blob_folders(store: ImageStore, state: spec.StoreState) -> list[int]:
    """Generations up to the committed one whose blob folder holds fetch units' shards that the index may
    point at (not a compaction's, not one an earlier compaction superseded)."""
    generations = [
        int(name[1:]) for name in io.list_dir(store.url("blobs"), dirs=True) if name.startswith("g")
    ]
    superseded = state.superseded_paths()
    return sorted(g for g in generations if g <= state.generation and g not in state.compactions
                  and spec.blob_generation_relpath(g) not in superseded)  # fmt: skip


def _check(summary: Any, step: str) -> None:
    if summary.failed:
        raise RuntimeError(f"store compaction, {step}: {summary.failures}")


def compact_store(
    root: str,
    *,
    shard_bytes: int = SHARD_BYTES,
    rows_per_task: int = ImagesConfig.plan_rows_per_task,
    retain_generations: int = ImagesConfig.retain_generations,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, int]:
    """Move every image in a fetch unit's blob shard into compaction shards, once per sha256, and commit the
    new index as a generation of its own; then vacuum what was superseded `retain_generations` ago. Returns the
    counts (bytes saved among them)."""
    store = ImageStore(io.absolute(root))
    run = {"workers": workers, "ray_address": ray_address}
    store.state()  # no store, or one of an earlier layout: one clear error, and nothing written
    with Lease(store.root):
        io.remove_temp_files(store.root)
        state = recover_interrupted_run(store, store.state(), run, retain_generations)
        generation = state.generation + 1
        for relpath in (spec.blob_generation_relpath(generation), spec.run_relpath(generation)):
            io.remove_tree(store.url(relpath))  # a killed compaction's files: never committed
        folders = unit_blob_folders(store, state)
        counts = {
            "bytes_before": sum(
                sum(io.find_files(store.url(spec.blob_generation_relpath(g))).values()) for g in folders
            )
        }
        if not folders:
            vacuum(store, retain_generations)
            return {**counts, "bytes_after": 0, "bytes_saved": 0}

        def url(kind: str, task: str) -> str:
            return store.url(spec.compact_scratch_relpath(generation, kind, task))

        groups = bucket_groups(state.index_rows, rows_per_task)
        group_starts = tuple(first for first, _ in groups)
        partitions = max(1, math.ceil(sum(state.index_rows) / rows_per_task))
        copy_partitions = max(1, math.ceil(counts["bytes_before"] / shard_bytes))
        image_files = tuple(url("images", f"g{first:05d}") for first in group_starts)
        mapped = run_units(map_images, [Unit(f"map-{first:05d}", MapArgs(store.root, (first, stop), partitions, out))
                                        for (first, stop), out in zip(groups, image_files)],
                           None, desc="compact: map", **run)  # fmt: skip
        _check(mapped, "map")
        decide_units = [Unit(f"decide-{p:06d}", DecideArgs(store.root, p, partitions, image_files,
                                                           tuple(state.compactions), group_starts, copy_partitions,
                                                           url("moves", f"d{p:06d}"), url("copies", f"d{p:06d}")))
                        for p in range(partitions)]  # fmt: skip
        decided = run_units(decide_images, decide_units, None, desc="compact: decide", **run)
        _check(decided, "decide")
        copy_files = tuple(u.args.copies_out for u in decide_units)
        copy_units = [Unit(f"copy-{k:06d}", CopyArgs(store.root, spec.shard_id(generation, k), copy_files, k,
                                                     copy_partitions, group_starts, url("moves", f"c{k:06d}")))
                      for k in range(copy_partitions)]  # fmt: skip
        copied = run_units(
            copy_images, copy_units, None, desc="compact: copy", rate_key="copied_images", **run
        )
        _check(copied, "copy")
        move_files = tuple(u.args.moves_out for u in decide_units) + tuple(
            u.args.moves_out for u in copy_units
        )
        indexed = run_units(index_moves, [Unit(f"index-{g:05d}", IndexArgs(store.root, g, len(groups), move_files,
                                                                            generation))
                                          for g in range(len(groups))], None, desc="compact: index", **run)  # fmt: skip
        _check(indexed, "index")
        counts.update(decided.counts)
        counts.update(copied.counts)
        counts["records_moved"] = indexed.counts["records_moved"]
        counts["bytes_after"] = sum(
            io.find_files(store.url(spec.blob_generation_relpath(generation))).values()
        )
        counts["bytes_saved"] = counts["bytes_before"] - counts["bytes_after"]
        new = replace(state, generation=generation, index_generations=list(state.index_generations),
                      index_rows=list(state.index_rows), history=list(state.history),
                      compactions=[*state.compactions, generation])  # fmt: skip
        superseded = []
        for written in indexed.outputs.values():
            for bucket, records in written.items():
                superseded.append(spec.index_relpath(bucket, new.index_generations[bucket]))
                new.index_generations[bucket], new.index_rows[bucket] = generation, records
        new.history.append({"generation": generation, "compaction": dict(sorted(counts.items())),
                            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})  # fmt: skip
        superseded += [spec.blob_generation_relpath(g) for g in folders]
        # From here on no record points into the fetch units' shards; readers of earlier generations still may.
        commit_generation(store, new, superseded, retain_generations)
        io.remove_tree(store.url(spec.run_relpath(generation)))
    return counts
