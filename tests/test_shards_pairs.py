"""`m3w shards pairs`: alt-text (ALIGN-like) and caption (LTIP-like) pairs from the webcorpus documents."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from m3w.config import load_config
from m3w.pipeline.filters import CaptionFilterConfig, check_caption_text
from m3w.pipeline.imagestore import BlobRef, ImageStore
from m3w.pipeline.shards import ShardsConfig, run_pair_shards
from m3w.pipeline.tario import iter_tar_samples
from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN, load_tokenizer
from m3w.schemas import shards as spec


@pytest.fixture(scope="module")
def pairs_out(shards_corpus, tmp_path_factory, ray_address):
    out = tmp_path_factory.mktemp("pairs")
    results = run_pair_shards([shards_corpus.filtered], shards_corpus.store, out, ShardsConfig(shard_max_samples=40),
                              workers=2, ray_address=ray_address)  # fmt: skip
    return out, results


def samples_of(shard_dir):
    return [s for tar in sorted(shard_dir.glob("*.tar")) for s in iter_tar_samples(tar)]


@pytest.mark.parametrize(
    ("dataset", "max_tokens", "field"), [("alt_pairs", 32, "alt"), ("caption_pairs", 64, None)]
)
def test_pairs_are_image_text_eoc_within_budget(pairs_out, shards_corpus, dataset, max_tokens, field):
    out, results = pairs_out
    tok = load_tokenizer()
    store = ImageStore(shards_corpus.store)
    docs = {
        r["doc_id"]: r for p in shards_corpus.filtered.glob("*.parquet") for r in pq.read_table(p).to_pylist()
    }
    samples = samples_of(out / dataset)
    assert len(samples) >= 20
    assert results[dataset]["totals"]["samples"] == len(samples)
    assert json.loads((out / dataset / spec.SHARD_MANIFEST).read_text())["dataset"] == dataset
    texts = set()
    for _, files in samples:
        sample = json.loads(files["json"])
        ids = sample["input_ids"]
        assert len(ids) <= max_tokens
        assert ids[0] == tok.convert_tokens_to_ids(MEDIA_TOKEN) and ids[-1] == tok.convert_tokens_to_ids(
            EOC_TOKEN
        )
        assert sample["images"] == ["0.jpg"] and sample["dataset"] == dataset
        body = sample["text"][len(MEDIA_TOKEN) : -len(EOC_TOKEN)]
        # The image is the stored blob of the image node the text belongs to.
        prov = sample["provenance"]
        nodes = {n["node_index"]: n for n in docs[prov["doc_id"]]["nodes"]}
        image_node = next(nodes[i] for i in prov["node_indices"] if nodes[i]["kind"] == "image")
        row = store.lookup([image_node["url"]])[image_node["url"]]
        assert files["0.jpg"] == store.read_blob(BlobRef.of(row))
        source = (
            image_node[field]
            if field
            else image_node["figcaption"]
            or next(nodes[i]["text"] for i in prov["node_indices"] if i != image_node["node_index"])
        )
        source = " ".join(source.split())
        assert source.startswith(body.rstrip("\ufffd"))  # truncated at the token budget, never rewritten
        assert check_caption_text(source, CaptionFilterConfig())[0]
        texts.add((files["0.jpg"], body))
    assert len(texts) == len(samples)  # deduplicated


def test_pair_counts_say_why_images_were_skipped(pairs_out):
    _, results = pairs_out
    counts = results["alt_pairs"]["unit_counts"]
    assert counts["alt_pairs.samples"] >= results["alt_pairs"]["totals"]["samples"]
    assert counts["skip.image_not_stored"] > 0
    assert any(k.startswith("alt_pairs.skip.caption.") for k in counts)  # the caption text filters ran
    assert counts["alt_pairs.truncated"] > 0 or counts["caption_pairs.truncated"] > 0


def test_caption_rules_come_from_the_shards_config(pairs_out, shards_corpus, tmp_path, ray_address):
    """Issue 13, defect 2: the pairs stage applied hard-coded caption rules whatever the config said. Its rules are
    ShardsConfig.pairs.caption (shards.yaml `pairs: caption:`, or --set pairs.caption.min_words=N)."""
    _, default = pairs_out
    config = load_config(ShardsConfig, overrides=["pairs.caption.min_words=6", "shard_max_samples=40"])
    stricter = run_pair_shards([shards_corpus.filtered], shards_corpus.store, tmp_path, config, workers=2,
                               ray_address=ray_address)  # fmt: skip
    for dataset in ("alt_pairs", "caption_pairs"):
        kept = stricter[dataset]["totals"]["samples"]
        assert 0 < kept < default[dataset]["totals"]["samples"], dataset
        for _, files in samples_of(tmp_path / dataset):
            body = json.loads(files["json"])["text"][len(MEDIA_TOKEN) : -len(EOC_TOKEN)]
            assert len(body.split()) >= 6
    counts = stricter["alt_pairs"]["unit_counts"]
    assert counts["alt_pairs.skip.caption.min_words"] > default["alt_pairs"]["unit_counts"].get(
        "alt_pairs.skip.caption.min_words", 0
    )
