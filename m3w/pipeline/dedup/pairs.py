"""Near duplicates: candidate pairs checked against the MinHash signatures, then clustered.

A candidate pair (a, b) needs both signatures, which live in the signals of a's and b's units. Two passes of
one task per unit group fetch them with sequential reads: `verify_a` (pairs by a's group) drops pairs whose a
an exact rule already removed and attaches a's order and signature; `verify_b` (by b's group) does the same for
b and keeps the pairs whose estimated Jaccard similarity reaches the threshold. `cluster_round` then finds the
connected components over these integer pairs in rounds of one task per unit group (no task holds them all),
and each component keeps its newest document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from m3w.pipeline.dedup.keys import NEAR_DUPLICATE, order_keys, row_of, unit_of
from m3w.pipeline.dedup.layout import BANDS, Layout, SignalsUnit
from m3w.pipeline.dedup.reduce import losers, unique_pairs
from m3w.schemas.filter_cache import (
    DEAD_SCHEMA,
    EDGES_SCHEMA,
    LABELS_SCHEMA,
    PAIRS_SCHEMA,
    read_parts,
    read_signals,
    signed_pairs_schema,
    write_parts,
)


def read_rows(
    units: dict[int, SignalsUnit], gid: np.ndarray, columns: Sequence[str], num_perm: int = 0
) -> dict[str, np.ndarray]:
    """Columns of the signals rows `gid` (all in `units`), in the order of `gid`; each unit's file read once.
    "signature" comes back as an (n, num_perm) uint32 array, string columns as object arrays."""
    out: dict[str, np.ndarray] = {
        c: np.zeros((len(gid), num_perm), np.uint32) if c == "signature" else np.empty(len(gid), object)
        for c in columns
    }
    owner = unit_of(gid)
    for ordinal in np.unique(owner).tolist():
        where = np.flatnonzero(owner == ordinal)
        rows = row_of(gid[where])
        table = read_signals(units[ordinal].signals, list(columns))
        for column in columns:
            if column == "signature":
                out[column][where] = _signatures(table[column].combine_chunks(), rows, num_perm)
            else:
                out[column][where] = np.asarray(table[column].to_pylist(), dtype=object)[rows]
    return out


def _signatures(column: pa.ListArray, rows: np.ndarray, num_perm: int) -> np.ndarray:
    starts = column.offsets.to_numpy()[:-1][rows] if len(column) else np.zeros(0, np.int64)
    values = column.values.to_numpy()
    return values[starts[:, None] + np.arange(num_perm)]


def _dead(layout: Layout, group: int) -> np.ndarray:
    files = [
        layout.reduce_file(rule, k, "dead") for rule in layout.exact for k in range(layout.partitions[rule])
    ]
    return read_parts(files, group, layout.groups, DEAD_SCHEMA)["gid"].to_numpy()


def _orders(values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return order_keys(values["doc_id"].tolist(), values["fetch_date"].tolist())


def verify_a(layout: Layout, group: int, units: dict[int, SignalsUnit]) -> dict[str, Any]:
    files = [layout.reduce_file(BANDS, k, "pairs") for k in range(layout.partitions[BANDS])]
    pairs = read_parts(files, group, layout.groups, PAIRS_SCHEMA)
    a, b = unique_pairs(pairs["a"].to_numpy(), pairs["b"].to_numpy())
    alive = ~np.isin(a, _dead(layout, group))
    a, b = a[alive], b[alive]
    num_perm = layout.config.minhash_bands * layout.config.minhash_rows
    values = read_rows(units, a, ["doc_id", "fetch_date", "signature"], num_perm)
    date, idk = _orders(values)
    signature = pa.FixedSizeListArray.from_arrays(pa.array(values["signature"].reshape(-1)), num_perm)
    table = pa.Table.from_arrays([a, b, date, idk, signature], schema=signed_pairs_schema(num_perm))
    written = layout.write_by_group(layout.group_file("verify_a", group), table, b)
    return {"rows_in": pairs.num_rows, "rows_out": len(a), "bytes_out": written}


def verify_b(layout: Layout, group: int, units: dict[int, SignalsUnit]) -> dict[str, Any]:
    config = layout.config
    num_perm = config.minhash_bands * config.minhash_rows
    files = [layout.group_file("verify_a", g) for g in range(layout.groups)]
    pairs = read_parts(files, group, layout.groups, signed_pairs_schema(num_perm))
    b = pairs["b"].to_numpy()
    alive = ~np.isin(b, _dead(layout, group))
    pairs = pairs.filter(pa.array(alive))
    b = b[alive]
    values = read_rows(units, b, ["doc_id", "fetch_date", "signature"], num_perm)
    sig_a = pc.list_flatten(pairs["sig_a"].combine_chunks()).to_numpy().reshape(-1, num_perm)
    # As the Jaccard estimate: the share of equal MinHash values, compared in float64 like np.mean would.
    similar = (sig_a == values["signature"]).sum(axis=1) / num_perm >= config.minhash_threshold
    date_b, idk_b = _orders(values)
    a, b = pairs["a"].to_numpy()[similar], b[similar]
    date_a, idk_a = pairs["date_a"].to_numpy()[similar], pairs["idk_a"].to_numpy()[similar]
    date_b, idk_b = date_b[similar], idk_b[similar]
    # Each edge in both directions, by the group of its first end: every node's group gets all its edges.
    edges = pa.Table.from_arrays(
        [
            np.concatenate([a, b]),
            np.concatenate([b, a]),
            np.concatenate([date_a, date_b]),
            np.concatenate([idk_a, idk_b]),
            np.concatenate([date_b, date_a]),
            np.concatenate([idk_b, idk_a]),
        ],
        schema=EDGES_SCHEMA,
    )
    node = edges["node"].to_numpy()
    written = layout.write_by_group(layout.group_file("verify_b", group), edges, node)
    return {"rows_in": len(alive), "rows_out": len(a), "bytes_out": written}


def cluster_file(layout: Layout, group: int, round_: int, output: str) -> str:
    return layout.group_file("cluster", group, f"r{round_}.{output}")


def cluster_round(layout: Layout, group: int, round_: int) -> dict[str, Any]:
    """One round of connected components over the similar pairs, for the nodes of one unit group.

    Every node keeps the newest document (by date, id key, gid) it knows to be connected to it: at round 0 the
    newest of itself and its neighbours; at each later round, the newest of what it knew and what its neighbours
    sent. A node whose label changed sends it to its neighbours (in their groups); when a round sends nothing,
    every node's label is the newest document of its component, the one that stays. Memory per task: the
    group's nodes and their edges; rounds: about the diameter of the largest component.
    """
    edges = read_parts(
        [layout.group_file("verify_b", g) for g in range(layout.groups)], group, layout.groups, EDGES_SCHEMA
    )
    e = {c: edges[c].to_numpy() for c in edges.column_names}
    if round_ == 0:
        label = _newest_per_node(e["node"], e["date"], e["idk"], e["node"])
        heard = _newest_per_node(e["node"], e["nb_date"], e["nb_idk"], e["neighbor"])
    else:
        state = read_parts([cluster_file(layout, group, round_ - 1, "state")], 0, 1, LABELS_SCHEMA)
        label = {c: state[c].to_numpy().copy() for c in state.column_names}
        messages = read_parts(
            [cluster_file(layout, g, round_ - 1, "messages") for g in range(layout.groups)],
            group,
            layout.groups,
            LABELS_SCHEMA,
        )
        m = {c: messages[c].to_numpy() for c in messages.column_names}
        heard = _newest_per_node(m["node"], m["date"], m["idk"], m["best"])
    # Merge what was heard into the labels (both sorted by node; every node heard of is a labelled node).
    at = np.searchsorted(label["node"], heard["node"])
    newer = _newer(heard, label, at)
    changed = at[newer]
    for column in ("date", "idk", "best"):
        label[column][changed] = heard[column][newer]
    state = pa.Table.from_arrays([label[c] for c in ("node", "date", "idk", "best")], schema=LABELS_SCHEMA)
    written = write_parts(cluster_file(layout, group, round_, "state"), state)
    # Changed labels go to every neighbour of the changed node.
    sender = np.isin(e["node"], label["node"][changed])
    where = np.searchsorted(label["node"], e["node"][sender])
    messages = pa.Table.from_arrays(
        [e["neighbor"][sender], label["date"][where], label["idk"][where], label["best"][where]],
        schema=LABELS_SCHEMA,
    )
    written += layout.write_by_group(
        cluster_file(layout, group, round_, "messages"), messages, e["neighbor"][sender]
    )
    lost = label["best"] != label["node"]
    table = losers(label["node"][lost], label["best"][lost], NEAR_DUPLICATE.name)
    written += layout.write_by_group(cluster_file(layout, group, round_, "kept"), table, label["best"][lost])
    return {
        "rows_in": edges.num_rows,
        "rows_out": int(lost.sum()),
        "bytes_out": written,
        "messages": messages.num_rows,
    }


def _newest_per_node(
    node: np.ndarray, date: np.ndarray, idk: np.ndarray, best: np.ndarray
) -> dict[str, np.ndarray]:
    """For each distinct node (sorted), the newest (date, idk, best) among its rows."""
    order = np.lexsort((best, idk, date, node))
    node, date, idk, best = node[order], date[order], idk[order], best[order]
    last = np.ones(len(node), dtype=bool)
    last[:-1] = node[1:] != node[:-1]
    return {"node": node[last], "date": date[last], "idk": idk[last], "best": best[last]}


def _newer(a: dict[str, np.ndarray], b: dict[str, np.ndarray], at: np.ndarray) -> np.ndarray:
    """Whether each row of `a` is newer than row `at` of `b`, comparing (date, idk, best)."""
    bd, bi, bb = b["date"][at], b["idk"][at], b["best"][at]
    return (a["date"] > bd) | ((a["date"] == bd) & ((a["idk"] > bi) | ((a["idk"] == bi) & (a["best"] > bb))))
