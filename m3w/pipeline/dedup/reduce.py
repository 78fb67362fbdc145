"""Reduce: one task per (kind of key, hash partition), reading only its partition of every map file.

- exact rules (same URL → same text → same image set): group by key among the documents the earlier rules
  kept, keep the newest of each group. The documents a rule drops are sent on ("forwarded") to the partition of
  their key in the next rule, so each rule knows which of its documents are already gone without a global set;
- MinHash bands: the candidate pairs of each LSH bucket (checked against the signatures later, per unit group);
- image URLs and domain paragraphs: keys found in more than a limit of distinct documents, in two passes over
  byte-bounded batches, so that a key found in millions of documents costs one counter, not millions of rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from m3w.pipeline.dedup.keys import NULL_KEY, RULE_CODE, hash_partition
from m3w.pipeline.dedup.layout import BANDS, Layout
from m3w.schemas.filter_cache import (
    BAND_KEYS_SCHEMA,
    DEAD_SCHEMA,
    LOSERS_SCHEMA,
    NODE_DROPS_SCHEMA,
    NODE_KEYS_SCHEMA,
    PAIRS_SCHEMA,
    exact_keys_schema,
    forward_schema,
    part_ranges,
    read_part_ranges,
    read_parts,
    write_parts,
)

MAX_BUCKET_PAIRS = 200  # an LSH bucket larger than this is compared against its first members only
BATCH_BYTES = 64 << 20  # partition bytes a counting reducer holds at once


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table[name].to_numpy() for name in table.column_names}


def run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Boolean mask of the first row of each run of equal keys."""
    first = np.ones(len(sorted_keys), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return first


def losers(gid: np.ndarray, kept: np.ndarray, rule: str) -> pa.Table:
    """Documents `gid` dropped by `rule` in favour of `kept`."""
    return pa.Table.from_arrays(
        [gid, kept, np.full(len(gid), RULE_CODE[rule], np.int8)], schema=LOSERS_SCHEMA
    )


def newest_of_runs(sorted_keys: np.ndarray, gid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by key, then oldest to newest: (mask of the rows that are not their run's last, the gid
    of their run's last row, for every row)."""
    first = run_starts(sorted_keys)
    last = np.zeros(len(first), dtype=bool)
    last[:-1] = first[1:]
    last[-1:] = True
    return ~last, gid[last][np.cumsum(first) - 1]


def reduce_exact(layout: Layout, name: str, partition: int) -> dict[str, Any]:
    """One partition of the exact rule `name`: the newest alive document of each key stays, the others go."""
    partitions = layout.partitions[name]
    later = layout.later(name)
    records = _columns(
        read_parts(layout.map_files(name), partition, partitions, exact_keys_schema(len(later)))
    )
    earlier = layout.exact[: layout.exact.index(name)]
    forwarded = _columns(
        read_parts(
            [layout.forward_file(e, k, name) for e in earlier for k in range(layout.partitions[e])],
            partition,
            partitions,
            forward_schema(len(later)),
        )
    )
    alive = {c: v[~np.isin(records["gid"], forwarded["gid"])] for c, v in records.items()}
    order = np.lexsort((alive["gid"], alive["idk"], alive["date"], alive["key"]))
    alive = {c: v[order] for c, v in alive.items()}
    lost, keeper = newest_of_runs(alive["key"], alive["gid"])
    gone_now = alive["gid"][lost]
    written = layout.write_by_group(
        layout.reduce_file(name, partition, "kept"), losers(gone_now, keeper[lost], name), keeper[lost]
    )
    written += layout.write_by_group(
        layout.reduce_file(name, partition, "dead"),
        pa.Table.from_arrays([gone_now], schema=DEAD_SCHEMA),
        gone_now,
    )
    # Every document gone so far goes on to the first later rule it has a key for.
    gone = {c: np.concatenate([forwarded[c], alive[c][lost]]) for c in forwarded}
    done = np.zeros(len(gone["gid"]), dtype=bool)
    for i, target in enumerate(later):
        sent = ~done & (gone[f"later{i}"] != NULL_KEY)
        done |= sent
        rest = [gone[f"later{j}"][sent] for j in range(i + 1, len(later))]
        keys = gone[f"later{i}"][sent]
        table = pa.Table.from_arrays([keys, gone["gid"][sent], *rest], schema=forward_schema(len(rest)))
        target_partitions = layout.partitions[target]
        written += write_parts(
            layout.forward_file(name, partition, target),
            table,
            hash_partition(keys, target_partitions),
            target_partitions,
        )
    return {
        "rows_in": len(records["gid"]) + len(forwarded["gid"]),
        "rows_out": int(lost.sum()),
        "bytes_out": written,
    }


def reduce_bands(layout: Layout, partition: int) -> dict[str, Any]:
    """Candidate pairs (a, b) of one partition of LSH band keys: in each bucket, ordered by document, every
    member among the first MAX_BUCKET_PAIRS is paired with every later member."""
    records = _columns(
        read_parts(layout.map_files(BANDS), partition, layout.partitions[BANDS], BAND_KEYS_SCHEMA)
    )
    order = np.lexsort((records["gid"], records["key"]))
    key, gid = records["key"][order], records["gid"][order]
    a, b = unique_pairs(*bucket_pairs(key, gid, MAX_BUCKET_PAIRS))
    table = pa.Table.from_arrays([a, b], schema=PAIRS_SCHEMA)
    written = layout.write_by_group(layout.reduce_file(BANDS, partition, "pairs"), table, a)
    return {"rows_in": len(gid), "rows_out": len(a), "bytes_out": written}


def unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (a, b) pairs, sorted."""
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    keep = np.ones(len(a), dtype=bool)
    keep[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[keep], b[keep]


def bucket_pairs(key: np.ndarray, gid: np.ndarray, head: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by (key, gid): pairs (i-th, j-th member) of each run of equal keys, i < min(head, run
    length), j > i."""
    first = np.flatnonzero(run_starts(key))
    length = np.diff(np.append(first, len(key)))
    shared = length >= 2
    first, length = first[shared], length[shared]
    heads = np.minimum(length, head)
    # Row index and run length of each head member, then the number of later members it pairs with.
    member = np.repeat(first, heads) + _ragged_arange(heads)
    run_length = np.repeat(length, heads)
    position = member - np.repeat(first, heads)
    later = run_length - 1 - position
    a = np.repeat(member, later)
    b = np.repeat(member + 1, later) + _ragged_arange(later)
    return gid[a], gid[b]


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..lengths[0]), [0..lengths[1]), …"""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - offsets


def reduce_counts(layout: Layout, kind: str, partition: int, rule: str, limit: int) -> dict[str, Any]:
    """Node drops of one partition of node keys (image URLs or domain paragraphs): every node whose key is in
    more than `limit` distinct documents, with that count. Pass 1 counts, pass 2 picks the nodes."""
    ranges = part_ranges(layout.map_files(kind), partition, layout.partitions[kind])
    batches = _batches(ranges, BATCH_BYTES)
    keys, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows_in = 0
    for batch in batches:
        records = read_part_ranges(batch, NODE_KEYS_SCHEMA)
        rows_in += records.num_rows
        key, _ = unique_pairs(records["key"].to_numpy(), records["gid"].to_numpy())
        batch_keys, batch_counts = np.unique(key, return_counts=True)  # distinct documents per key
        keys, inverse = np.unique(np.concatenate([keys, batch_keys]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([counts, batch_counts]), minlength=len(keys))
        counts = counts.astype(np.int64)
    frequent = counts > limit
    keys, counts = keys[frequent], counts[frequent]
    chunks, written, rows_out = 0, 0, 0
    pending: list[pa.Table] = []
    for batch in batches if len(keys) else []:
        records = read_part_ranges(batch, NODE_KEYS_SCHEMA)
        key = records["key"].to_numpy()
        hit = np.isin(key, keys)
        if hit.any():
            count = counts[np.searchsorted(keys, key[hit])]
            gid = records["gid"].to_numpy()[hit]
            node = records["node"].to_numpy()[hit]
            rule_code = np.full(len(gid), RULE_CODE[rule], np.int8)
            pending.append(pa.Table.from_arrays([gid, node, count, rule_code], schema=NODE_DROPS_SCHEMA))
        if sum(t.num_rows for t in pending) >= layout.config.reducer_rows:
            written += _write_node_drops(layout, kind, partition, chunks, pending)
            rows_out += sum(t.num_rows for t in pending)
            chunks, pending = chunks + 1, []
    if pending or chunks == 0:
        written += _write_node_drops(layout, kind, partition, chunks, pending)
        rows_out += sum(t.num_rows for t in pending)
        chunks += 1
    return {"rows_in": rows_in, "rows_out": rows_out, "bytes_out": written, "chunks": chunks}


def node_drops_file(layout: Layout, kind: str, partition: int, chunk: int) -> str:
    return layout.reduce_file(kind, partition, f"nodes{chunk}")


def _write_node_drops(layout: Layout, kind: str, partition: int, chunk: int, tables: list[pa.Table]) -> int:
    table = pa.concat_tables(tables) if tables else NODE_DROPS_SCHEMA.empty_table()
    return layout.write_by_group(
        node_drops_file(layout, kind, partition, chunk), table, table["gid"].to_numpy()
    )


def _batches(ranges: list[tuple[str, int, int]], limit: int) -> list[list[tuple[str, int, int]]]:
    batches: list[list[tuple[str, int, int]]] = [[]]
    size = 0
    for r in ranges:
        if batches[-1] and size + (r[2] - r[1]) > limit:
            batches.append([])
            size = 0
        batches[-1].append(r)
        size += r[2] - r[1]
    return batches if batches[0] else []
