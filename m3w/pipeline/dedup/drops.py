"""Per-unit drop lists: what dedup removes from each unit, with rule and reason, and all that decide reads.

The reducers know dropped documents by integer only. `names` (one task per group of kept documents) writes the
reason, naming the kept copy by doc_id and fetch date from its own signals; `collect` (one task per group of
dropped documents) gathers those and the node drops of its units and writes one `drops/<unit>.parquet` each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from m3w.pipeline.dedup.keys import (
    DOMAIN_PARAGRAPH,
    EXACT_RULES,
    NEAR_DUPLICATE,
    RULE_CODE,
    RULES,
    row_of,
    unit_of,
)
from m3w.pipeline.dedup.layout import IMAGES, PARAGRAPHS, Layout, SignalsUnit
from m3w.pipeline.dedup.pairs import cluster_file, read_rows
from m3w.pipeline.dedup.reduce import node_drops_file
from m3w.schemas.filter_cache import (
    LOSERS_SCHEMA,
    NAMED_DROPS_SCHEMA,
    NODE_DROPS_SCHEMA,
    read_drops,
    read_parts,
    write_drops,
)

_WHAT = {RULE_CODE[r.name]: r.what for r in EXACT_RULES}


def kept_reason(rule_code: int, kept_id: str, kept_date: str | None, threshold: float) -> str:
    kept = f"{kept_id} (fetched {kept_date or '?'}, kept)"
    if rule_code == RULE_CODE[NEAR_DUPLICATE.name]:
        return f"MinHash Jaccard ≥ {threshold} with {kept}"
    return f"{_WHAT[rule_code]} as {kept}"


def names(layout: Layout, group: int, units: dict[int, SignalsUnit], last_round: int) -> dict[str, Any]:
    """Reasons for the documents dropped in favour of a document of `group`, sent to the dropped one's group.
    `last_round`: the clustering round whose labels are final (-1: no near-duplicate rule)."""
    files = [
        layout.reduce_file(rule, k, "kept") for rule in layout.exact for k in range(layout.partitions[rule])
    ]
    if last_round >= 0:
        files += [cluster_file(layout, g, last_round, "kept") for g in range(layout.groups)]
    losers = read_parts(files, group, layout.groups, LOSERS_SCHEMA)
    gid, kept, rule = (losers[c].to_numpy() for c in ("gid", "kept", "rule"))
    distinct, index = np.unique(kept, return_inverse=True)
    values = read_rows(units, distinct, ["doc_id", "fetch_date"])
    threshold = layout.config.minhash_threshold
    reasons = [
        kept_reason(r, values["doc_id"][i], values["fetch_date"][i], threshold)
        for r, i in zip(rule.tolist(), index.tolist())
    ]
    table = pa.Table.from_arrays([gid, rule, pa.array(reasons, pa.string())], schema=NAMED_DROPS_SCHEMA)
    written = layout.write_by_group(layout.group_file("names", group), table, gid)
    return {"rows_in": len(gid), "rows_out": len(gid), "bytes_out": written}


def collect(
    layout: Layout, group: int, units: dict[int, SignalsUnit], chunks: dict[str, list[int]]
) -> dict[str, Any]:
    """One drop list per unit of `group`. `chunks[kind][k]`: how many node-drop files reducer k of kind wrote."""
    named = read_parts(
        [layout.group_file("names", g) for g in range(layout.groups)],
        group,
        layout.groups,
        NAMED_DROPS_SCHEMA,
    )
    node_files = [
        node_drops_file(layout, kind, k, c)
        for kind in (IMAGES, PARAGRAPHS)
        for k, n in enumerate(chunks[kind])
        for c in range(n)
    ]
    nodes = read_parts(node_files, group, layout.groups, NODE_DROPS_SCHEMA)
    node_gid = nodes["gid"].to_numpy()
    node_rule = nodes["rule"].to_numpy()
    paragraph = node_rule == RULE_CODE[DOMAIN_PARAGRAPH.name]
    domains = read_rows(units, node_gid[paragraph], ["domain"])["domain"]
    config = layout.config
    node_reasons = np.empty(len(node_gid), dtype=object)
    node_reasons[paragraph] = [
        f"in {n} documents of {d} > {config.paragraph_max_docs_per_domain}"
        for n, d in zip(nodes["count"].to_numpy()[paragraph].tolist(), domains.tolist())
    ]
    node_reasons[~paragraph] = [
        f"URL in {n} documents > {config.image_url_max_docs}"
        for n in nodes["count"].to_numpy()[~paragraph].tolist()
    ]
    gid = np.concatenate([named["gid"].to_numpy(), node_gid])
    table = pa.table(
        {
            "row": row_of(gid).astype(np.int32),
            "node_index": pa.array(
                np.concatenate([np.zeros(named.num_rows, np.int32), nodes["node"].to_numpy()]),
                mask=np.arange(len(gid)) < named.num_rows,
            ),
            "filter": [RULES[r].name for r in np.concatenate([named["rule"].to_numpy(), node_rule]).tolist()],
            "reason": [*named["reason"].to_pylist(), *node_reasons.tolist()],
        }
    )
    owner = unit_of(gid)
    written = 0
    for ordinal, unit in units.items():
        rows = table.filter(pa.array(owner == ordinal))
        order = np.lexsort((rows["node_index"].fill_null(-1).to_numpy(), rows["row"].to_numpy()))
        write_drops(rows.take(pa.array(order, pa.int64())), layout.drops_file(unit.name))
        written += rows.num_rows
    return {"rows_in": len(gid), "rows_out": written}


@dataclass
class UnitDrops:
    """What dedup drops from one unit: whole documents by row, nodes by (row, node_index); (filter, reason)."""

    documents: dict[int, tuple[str, str]] = field(default_factory=dict)
    nodes: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)


def load_unit_drops(url: str) -> UnitDrops:
    drops = UnitDrops()
    for row in read_drops(url).to_pylist():
        if row["node_index"] is None:
            drops.documents[row["row"]] = (row["filter"], row["reason"])
        else:
            drops.nodes[(row["row"], row["node_index"])] = (row["filter"], row["reason"])
    return drops
