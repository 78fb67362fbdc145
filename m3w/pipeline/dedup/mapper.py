"""Map: one task per unit turns its cached signals into every rule's keys, already hash-partitioned."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from m3w.pipeline.dedup.keys import NULL_KEY, gids, hash_partition, mix64, order_keys
from m3w.pipeline.dedup.layout import BANDS, IMAGES, PARAGRAPHS, Layout, SignalsUnit
from m3w.pipeline.filters.signals import hash64
from m3w.schemas.filter_cache import (
    BAND_KEYS_SCHEMA,
    NODE_KEYS_SCHEMA,
    exact_keys_schema,
    read_signals,
    write_parts,
)

_NODE_COLUMNS = ["nodes.list.element.node_index", "nodes.list.element.hash"]


def key_column(table: pa.Table, column: str) -> np.ndarray:
    """An int64 hash column as numpy, NULL_KEY where null (a real hash equal to NULL_KEY moves by one)."""
    values = table[column].combine_chunks()
    filled = pc.fill_null(pc.if_else(pc.equal(values, NULL_KEY), NULL_KEY + 1, values), NULL_KEY)
    return filled.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def map_unit(layout: Layout, ordinal: int, unit: SignalsUnit) -> dict[str, Any]:
    """Write `map/<ordinal>.<kind>.parts` for every enabled kind of key. Returns rows and bytes written."""
    config = layout.config
    columns = ["doc_id", "fetch_date", "domain", *(layout.exact_rule(n).column for n in layout.exact)]
    columns += ([BANDS] if config.near_duplicates else []) + ["images", *_NODE_COLUMNS]
    table = read_signals(unit.signals, columns)
    gid = gids(ordinal, table.num_rows)
    written = {"rows_out": 0, "bytes_out": 0}

    def write(kind: str, keys: pa.Table, key: np.ndarray) -> None:
        partitions = layout.partitions[kind]
        written["bytes_out"] += write_parts(
            layout.map_file(ordinal, kind), keys, hash_partition(key, partitions), partitions
        )
        written["rows_out"] += keys.num_rows

    if layout.exact:
        date, idk = order_keys(table["doc_id"].to_pylist(), table["fetch_date"].to_pylist())
        keys = {name: key_column(table, layout.exact_rule(name).column) for name in layout.exact}
        for name in layout.exact:
            has = keys[name] != NULL_KEY
            later = [keys[n][has] for n in layout.later(name)]
            columns_out = [keys[name][has], gid[has], date[has], idk[has], *later]
            write(
                name, pa.Table.from_arrays(columns_out, schema=exact_keys_schema(len(later))), keys[name][has]
            )

    if config.near_duplicates:
        bands = table[BANDS].combine_chunks()
        band_keys = pc.list_flatten(bands).to_numpy().astype(np.int64, copy=False)
        owner = gid[pc.list_parent_indices(bands).to_numpy()]
        write(BANDS, pa.Table.from_arrays([band_keys, owner], schema=BAND_KEYS_SCHEMA), band_keys)

    images = table["images"].combine_chunks()
    flat = pc.list_flatten(images)
    url_keys = pc.struct_field(flat, "url_hash").to_numpy().astype(np.int64, copy=False)
    write(IMAGES, _node_keys(url_keys, gid[pc.list_parent_indices(images).to_numpy()], flat), url_keys)

    nodes = table["nodes"].combine_chunks()
    flat = pc.list_flatten(nodes)
    domains = np.array([hash64(d or "") for d in table["domain"].to_pylist()], dtype=np.int64)
    parent = pc.list_parent_indices(nodes).to_numpy()
    paragraph_keys = mix64(domains[parent], pc.struct_field(flat, "hash").to_numpy().astype(np.int64))
    write(PARAGRAPHS, _node_keys(paragraph_keys, gid[parent], flat), paragraph_keys)
    return {"rows_in": table.num_rows, **written}


def _node_keys(keys: np.ndarray, owner: np.ndarray, flat: pa.Array) -> pa.Table:
    node = pc.struct_field(flat, "node_index").to_numpy().astype(np.int32, copy=False)
    return pa.Table.from_arrays([keys, owner, node], schema=NODE_KEYS_SCHEMA)
