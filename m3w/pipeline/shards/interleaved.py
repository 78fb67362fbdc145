"""M3W shards: filtered documents + the image store → token windows with their images, one unit per input file."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from m3w.config import to_dict
from m3w.errors import UserError
from m3w.pipeline import io
from m3w.pipeline.imagestore import BlobRef, ImageStore
from m3w.pipeline.io import stable_hash
from m3w.pipeline.shards.config import ShardsConfig
from m3w.pipeline.shards.samples import (
    cached_tokenizer,
    input_files,
    provenance,
    sample_json,
    sample_key,
)
from m3w.pipeline.shards.writing import Dataset, open_datasets, run_stage, unit_config
from m3w.pipeline.windows import decode, document_sequence, make_windows
from m3w.schemas import images as spec
from m3w.schemas.documents import iter_documents

DOCUMENTS_PER_READ = 64  # documents whose images are read from the store in one batch of range reads


def document_units(inputs: Iterable[str | Path], store: str, generation: int) -> list[tuple[str, dict]]:
    """One unit per input file, each reading the store as it was at `generation`."""
    files = input_files(inputs)
    if not files:
        raise UserError("no parquet input files found")
    return [(uid, {"input": f, "store": store, "store_generation": generation}) for f, uid in files]


def planned_store(store: str, generation: int | None) -> spec.StoreState:
    """The store generation a shards run reads, whole, whatever generations commit while it runs (their
    superseded files stay for it, `schemas.images`): `generation`, or the current one."""
    image_store = ImageStore(store)
    return image_store.state() if generation is None else image_store.state_at(generation)


def unit_store(args: dict) -> tuple[ImageStore, spec.StoreState]:
    """A unit's store and the state of the generation its run planned on."""
    store = ImageStore(args["store"])
    return store, store.state_at(args["store_generation"])


def stored_images(
    store: ImageStore, docs: list[dict], state: spec.StoreState | None = None
) -> dict[str, BlobRef]:
    """url → where its image lies, for every image of `docs` the store (at `state`) holds as usable."""
    urls = {n["url"] for d in docs for n in d["nodes"] if n["kind"] == "image" and n.get("url")}
    return store.usable(urls, state) if urls else {}


def m3w_unit(args: dict) -> tuple[dict[str, list], dict[str, int]]:
    """One filtered parquet file → its M3W window shards."""
    config = unit_config(args)
    tok, tok_info = cached_tokenizer(config.tokenizer)
    counts: Counter = Counter()
    store, state = unit_store(args)
    docs = list(iter_documents(args["input"]))
    refs = stored_images(store, docs, state)
    image_keys = {url: url for url in refs}  # windows carry the URL; its bytes are read when written
    (out,) = open_datasets(args, counts).values()
    with out:
        for start in range(0, len(docs), DOCUMENTS_PER_READ):
            batch: list[tuple[str, dict, list[str]]] = []
            for doc in docs[start : start + DOCUMENTS_PER_READ]:
                counts["documents"] += 1
                seq = document_sequence(doc["nodes"], image_keys, tok, counts)
                if not seq.images:
                    counts["skip.document_without_stored_image"] += 1
                    continue
                for window in make_windows(doc["doc_id"], seq, tok, config.windows, counts):
                    prov = provenance(doc, window.node_indices, window.index, token_start=window.start)
                    sample = sample_json(
                        "m3w", window.ids, decode(tok, window.ids), len(window.images), tok_info, prov
                    )
                    batch.append((sample_key(doc["doc_id"], window.index), sample, window.images))
            wanted = sorted({url for _, _, urls in batch for url in urls})
            media = dict(zip(wanted, store.read_blobs([refs[u] for u in wanted], state)))
            for key, sample, urls in batch:
                if out.add(key, sample, [media[u] for u in urls]):
                    counts["samples"] += 1
                    counts["tokens"] += len(sample["input_ids"])
                    counts["images"] += len(urls)
    return {"m3w": out.shards()}, dict(counts)


UNIT_SETTINGS = {"m3w": "windows", "pairs": "pairs", "video": "video"}


def units_hash(config: ShardsConfig, kind: str, name: str, *extra: Any) -> str:
    """The units' config hash: what their shards depend on (a unit writes its shards, sizes included)."""
    _, tok_info = cached_tokenizer(config.tokenizer)
    settings = to_dict(getattr(config, UNIT_SETTINGS[kind]))
    sizes = [config.shard_max_samples, config.shard_max_bytes]
    return stable_hash({"kind": kind, "name": name, "settings": settings, "sizes": sizes, "tokenizer": tok_info,
                        "extra": extra})  # fmt: skip


def run_m3w_shards(
    inputs: Iterable[str | Path],
    store: str | Path,
    out: str | Path,
    config: ShardsConfig | None = None,
    *,
    name: str = "m3w",
    store_generation: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict:
    """filtered/ parquet + image store (at `store_generation`, default the current one) →
    `out/m3w/<name>-<unit>-NNNNNN.tar` + `shards.json`. Returns the manifest (plus `unit_failures`)."""
    config = config or ShardsConfig()
    store = io.absolute(store)
    state = planned_store(store, store_generation)
    # Shards depend on what the store holds: rebuilt when new images arrived, not when a compaction moved them.
    config_hash = units_hash(config, "m3w", name, state.content_generation)
    return run_stage("m3w", m3w_unit, document_units(inputs, store, state.generation), [Dataset("m3w", name)],
                     io.absolute(out), config, config_hash, workers=workers, ray_address=ray_address)["m3w"]  # fmt: skip
