"""Image-text pairs: alt-text (ALIGN-like) and captions (LTIP-like), `<image>text<EOC>`, one unit per input file."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from m3w.pipeline import io
from m3w.pipeline.shards.config import ShardsConfig
from m3w.pipeline.shards.interleaved import (
    document_units,
    planned_store,
    stored_images,
    unit_store,
    units_hash,
)
from m3w.pipeline.shards.samples import (
    cached_tokenizer,
    pair_ids,
    provenance,
    sample_json,
    sample_key,
)
from m3w.pipeline.shards.writing import Dataset, open_datasets, run_stage, unit_config
from m3w.pipeline.windows import decode, sanitize, special_strings
from m3w.schemas.documents import iter_documents

PAIR_DATASETS = ("alt_pairs", "caption_pairs")


def adjacent_caption(nodes: list[dict], position: int) -> dict | None:
    """The text node of block "caption" right after (else right before) the image at `position`."""
    for j in (position + 1, position - 1):
        if 0 <= j < len(nodes) and nodes[j]["kind"] == "text" and nodes[j].get("block") == "caption":
            return nodes[j]
    return None


def pairs_unit(args: dict) -> tuple[dict[str, list], dict[str, int]]:
    """One filtered parquet file → alt-text pair shards and caption pair shards."""
    from m3w.pipeline.filters import check_caption_text

    config = unit_config(args)
    tok, tok_info = cached_tokenizer(config.tokenizer)
    specials = special_strings(tok)
    counts: Counter = Counter()
    store, state = unit_store(args)
    docs = list(iter_documents(args["input"]))
    refs = stored_images(store, docs, state)
    outs = open_datasets(args, counts)
    with outs["alt_pairs"], outs["caption_pairs"]:
        for doc in docs:
            counts["documents"] += 1
            nodes = doc["nodes"]
            for position, node in enumerate(nodes):
                if node["kind"] != "image":
                    continue
                ref = refs.get(node.get("url") or "")
                if ref is None:
                    counts["skip.image_not_stored"] += 1
                    continue
                caption_node = None
                caption = node.get("figcaption")
                if not caption and config.pairs.caption_blocks:
                    caption_node = adjacent_caption(nodes, position)
                    caption = caption_node["text"] if caption_node else None
                candidates = [
                    ("alt_pairs", node.get("alt"), config.pairs.alt_max_tokens, [node["node_index"]]),
                    ("caption_pairs", caption, config.pairs.caption_max_tokens,
                     sorted({node["node_index"], *([caption_node["node_index"]] if caption_node else [])})),
                ]  # fmt: skip
                image: bytes | None = None
                for dataset, text, max_tokens, node_indices in candidates:
                    text = " ".join(sanitize(text or "", specials).split())
                    if not text:
                        counts[f"{dataset}.skip.no_text"] += 1
                        continue
                    keep, reason = check_caption_text(text, config.pairs.caption)
                    if not keep:
                        counts[f"{dataset}.skip.{reason.split(':')[0]}"] += 1  # the rule, not the value
                        continue
                    ids, truncated = pair_ids(tok, text, max_tokens)
                    counts[f"{dataset}.truncated"] += truncated
                    prov = provenance(doc, node_indices, 0, image_url=node["url"])
                    sample = sample_json(dataset, ids, decode(tok, ids), 1, tok_info, prov)
                    image = image if image is not None else store.read_blobs([ref], state)[0]
                    if outs[dataset].add(sample_key(doc["doc_id"], node["node_index"]), sample, [image]):
                        counts[f"{dataset}.samples"] += 1
                        counts[f"{dataset}.tokens"] += len(ids)
    return {d: outs[d].shards() for d in PAIR_DATASETS}, dict(counts)


def run_pair_shards(
    inputs: Iterable[str | Path],
    store: str | Path,
    out: str | Path,
    config: ShardsConfig | None = None,
    *,
    store_generation: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, dict]:
    """filtered/ + image store (at `store_generation`, default the current one) → `out/alt_pairs/` and
    `out/caption_pairs/` shard sets."""
    config = config or ShardsConfig()
    store = io.absolute(store)
    state = planned_store(store, store_generation)
    datasets = [Dataset(d, d, config.pairs.dedup) for d in PAIR_DATASETS]
    config_hash = units_hash(config, "pairs", "pairs", state.content_generation)
    return run_stage("pairs", pairs_unit, document_units(inputs, store, state.generation), datasets,
                     io.absolute(out), config, config_hash, workers=workers, ray_address=ray_address)  # fmt: skip
