"""`m3w shards m3w` end to end on webcorpus pages (extract → filter → images from a loopback server → shards)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from m3w.pipeline.imagestore import BlobRef, ImageStore
from m3w.pipeline.shards import ShardsConfig, run_m3w_shards
from m3w.pipeline.tario import iter_tar_samples
from m3w.pipeline.tokenizer import MEDIA_TOKEN, load_tokenizer, tokenizer_fingerprint
from m3w.pipeline.windows import WindowConfig, decode
from m3w.schemas import shards as spec

ROOT = Path(__file__).resolve().parents[1]
# Several shards from a small corpus; two random windows per document (paper: one) for more samples.
CONFIG = ShardsConfig(shard_max_samples=8, windows=WindowConfig(windows_per_doc=2))


def tar_samples(shard_dir: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for tar in sorted(shard_dir.glob("*.tar")) for s in iter_tar_samples(tar)]


def all_bytes(shard_dir: Path) -> dict[str, bytes]:
    """Every shard and the shard manifest, by name: what 'byte-identical' compares."""
    return {p.name: p.read_bytes() for p in sorted(shard_dir.glob("*.tar"))} | {
        spec.SHARD_MANIFEST: (shard_dir / spec.SHARD_MANIFEST).read_bytes()
    }


@pytest.fixture(scope="module")
def m3w_out(shards_corpus, tmp_path_factory, ray_address) -> Path:
    out = tmp_path_factory.mktemp("m3w_one_worker")
    run_m3w_shards(
        [shards_corpus.filtered], shards_corpus.store, out, CONFIG, workers=1, ray_address=ray_address
    )
    return out / "m3w"


@pytest.fixture(scope="module")
def documents(shards_corpus) -> dict[str, dict]:
    return {
        row["doc_id"]: row for path in sorted(shards_corpus.filtered.glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    }  # fmt: skip


def test_every_image_token_has_its_stored_image_in_order(m3w_out, documents, shards_corpus):
    tok = load_tokenizer()
    media_id = tok.convert_tokens_to_ids(MEDIA_TOKEN)
    store = ImageStore(shards_corpus.store)
    samples = tar_samples(m3w_out)
    assert len(samples) >= 20
    for key, files in samples:
        sample = json.loads(files["json"])
        jpgs = sorted((k for k in files if k.endswith(".jpg")), key=lambda k: int(k.split(".")[0]))
        assert sample["images"] == jpgs and jpgs == [f"{i}.jpg" for i in range(len(jpgs))]
        assert sample["input_ids"].count(media_id) == len(jpgs) >= 1
        # The images are the stored blobs of the document's image nodes in the window, in document order.
        doc = documents[sample["provenance"]["doc_id"]]
        nodes = {n["node_index"]: n for n in doc["nodes"]}
        image_urls = [
            nodes[i]["url"] for i in sample["provenance"]["node_indices"] if nodes[i]["kind"] == "image"
        ]
        rows = store.lookup(image_urls)
        assert [store.read_blob(BlobRef.of(rows[u])) for u in image_urls] == [files[k] for k in jpgs]
        assert all(rows[u]["status"] == "ok" for u in image_urls)
        assert key.startswith(sample["provenance"]["doc_id"]) and "." not in key


def test_windows_respect_length_and_image_limits_and_decode_to_their_text(m3w_out, documents):
    tok = load_tokenizer()
    for _, files in tar_samples(m3w_out):
        sample = json.loads(files["json"])
        assert len(sample["input_ids"]) <= 256
        assert 1 <= len(sample["images"]) <= 5
        assert decode(tok, sample["input_ids"]) == sample["text"]
        assert sample["text"].count(MEDIA_TOKEN) == len(sample["images"])
        # Text nodes strictly inside the window appear verbatim in the window text.
        doc = documents[sample["provenance"]["doc_id"]]
        nodes = {n["node_index"]: n for n in doc["nodes"]}
        inner_text_nodes = [
            nodes[i] for i in sample["provenance"]["node_indices"][1:-1] if nodes[i]["kind"] == "text"
        ]
        for node in inner_text_nodes:
            assert node["text"].strip() in sample["text"]
        assert sample["tokenizer"] == {"name": "m3w-default", "fingerprint": tokenizer_fingerprint(tok)}
        assert sample["media_kind"] == "image" and sample["num_frames"] == 1
        assert sample["schema"] == spec.SCHEMA_VERSION and sample["dataset"] == "m3w"
        assert set(spec.SAMPLE_JSON_FIELDS) == set(sample)
        prov = sample["provenance"]
        assert prov["url"] == doc["url"] and prov["warc_record_id"] == doc["warc_record_id"]
        assert prov["warc_offset"] == doc["warc_offset"] and prov["warc_path"] == doc["warc_path"]


def test_manifest_lists_every_shard_with_its_counts(m3w_out):
    manifest = json.loads((m3w_out / spec.SHARD_MANIFEST).read_text())
    assert manifest["schema"] == spec.SCHEMA_VERSION and manifest["dataset"] == "m3w"
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(load_tokenizer())
    assert [s["name"] for s in manifest["shards"]] == sorted(p.name for p in m3w_out.glob("*.tar"))
    assert len(manifest["shards"]) >= 3
    for shard in manifest["shards"]:
        samples = list(iter_tar_samples(m3w_out / shard["name"]))
        assert shard["samples"] == len(samples) <= CONFIG.shard_max_samples
        assert shard["tokens"] == sum(len(json.loads(f["json"])["input_ids"]) for _, f in samples)
        assert shard["bytes"] == (m3w_out / shard["name"]).stat().st_size
    counts = manifest["unit_counts"]
    assert counts["samples"] == manifest["totals"]["samples"]
    assert counts["drop.image_not_stored"] > 0  # the loopback server 404s some images: dropped, counted
    assert manifest["failed_units"] == []


def test_one_and_two_workers_give_byte_identical_shards(m3w_out, shards_corpus, tmp_path, ray_address):
    """The second run goes through the CLI in a subprocess that joins the same Ray with 2 workers."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "m3w", "shards", "m3w", str(shards_corpus.filtered),
           "--images", str(shards_corpus.store), "--out", str(out), "--workers", "2",
           "--ray-address", ray_address, "--config", str(ROOT / "m3w" / "configs" / "shards.yaml"),
           "--set", f"shard_max_samples={CONFIG.shard_max_samples}", "--set", "windows.windows_per_doc=2"]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "m3w:" in result.stdout and "samples" in result.stdout
    assert all_bytes(out / "m3w") == all_bytes(m3w_out)


def test_webdataset_and_ray_data_read_the_shards(m3w_out, ray_address):
    import ray
    import webdataset as wds

    manifest = json.loads((m3w_out / spec.SHARD_MANIFEST).read_text())
    urls = [str(m3w_out / s["name"]) for s in manifest["shards"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        assert [sample[k].size for k in meta["images"]] == [(320, 320)] * len(meta["images"])
        seen += 1
    assert seen == manifest["totals"]["samples"]

    ds = ray.data.read_webdataset(urls, decoder=None)
    rows = ds.take_all()
    assert len(rows) == manifest["totals"]["samples"]
    assert sum(len(json.loads(r["json"])["images"]) for r in rows) == manifest["totals"]["images"]


def split_inputs(filtered: Path, out: Path, docs_per_file: int = 12) -> Path:
    """The filtered documents in many small files: many units, so a job can be killed between them."""
    out.mkdir()
    for path in sorted(filtered.glob("*.parquet")):
        table = pq.read_table(path)
        for i, start in enumerate(range(0, table.num_rows, docs_per_file)):
            pq.write_table(table.slice(start, docs_per_file), out / f"{path.stem}-{i:03d}.parquet")
    return out


def test_killed_run_resumes_without_loss_or_duplicates(shards_corpus, tmp_path, ray_address):
    """kill -9 of `m3w shards m3w` after its first units, then the same command again: the shards are
    byte-identical to an uninterrupted run, and only the units without an entry ran again."""
    inputs = split_inputs(shards_corpus.filtered, tmp_path / "inputs")
    reference = run_m3w_shards([inputs], shards_corpus.store, tmp_path / "reference", CONFIG, workers=2,
                               ray_address=ray_address)  # fmt: skip
    assert reference["failed_units"] == [] and len(reference["inputs"]) >= 6
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "m3w", "shards", "m3w", str(inputs), "--images",
           str(shards_corpus.store), "--out", str(out), "--workers", "1", "--ray-address", ray_address,
           "--set", f"shard_max_samples={CONFIG.shard_max_samples}", "--set", "windows.windows_per_doc=2"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    entries = out / "m3w" / "_manifest" / "m3w"
    deadline = time.monotonic() + 120
    while len(list(entries.glob("*.json"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in entries.glob("*.json")}
    assert 2 <= len(finished) < len(reference["inputs"]) and not (out / "m3w" / spec.SHARD_MANIFEST).exists()
    before = {p.name: p.stat().st_mtime_ns for p in entries.glob("*.json")}

    result = run_m3w_shards([inputs], shards_corpus.store, out, CONFIG, workers=2, ray_address=ray_address)
    assert all_bytes(out / "m3w") == all_bytes(tmp_path / "reference" / "m3w")
    assert not list((out / "m3w").glob(".tmp-*"))
    after = {p.name: p.stat().st_mtime_ns for p in entries.glob("*.json")}
    assert {n for n in before if after[n] == before[n]} == finished  # finished units did not run again
    keys = [k for k, _ in tar_samples(out / "m3w")]
    assert len(keys) == len(set(keys)) == result["totals"]["samples"]  # nothing lost, nothing twice


def test_bad_input_fails_its_unit_only(shards_corpus, tmp_path, ray_address):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    first = sorted(shards_corpus.filtered.glob("*.parquet"))[0]
    (inputs / first.name).write_bytes(first.read_bytes())
    (inputs / "broken.parquet").write_bytes(b"this is not parquet")
    result = run_m3w_shards(
        [inputs], shards_corpus.store, tmp_path / "out", CONFIG, workers=2, ray_address=ray_address
    )
    assert len(result["failed_units"]) == 1 and result["failed_units"][0].startswith("broken-")
    assert "broken" in next(iter(result["unit_failures"]))
    assert result["totals"]["samples"] > 0


def test_shard_size_in_bytes_and_seed_change(shards_corpus, m3w_out, tmp_path, ray_address):
    config = ShardsConfig(shard_max_samples=None, shard_max_bytes=300_000)
    config.windows.seed = 1
    result = run_m3w_shards(
        [shards_corpus.filtered], shards_corpus.store, tmp_path, config, ray_address=ray_address
    )
    shards = result["shards"]
    assert len(shards) > 3
    for shard in shards:
        assert shard["bytes"] <= 300_000 or shard["samples"] == 1
    # Another seed samples other windows of the same documents.
    before = {json.loads(f["json"])["provenance"]["token_start"] for _, f in tar_samples(m3w_out)}
    after = {json.loads(f["json"])["provenance"]["token_start"] for _, f in tar_samples(tmp_path / "m3w")}
    assert before != after


def test_any_tokenizer_is_recorded_in_samples_and_manifest(shards_corpus, tmp_path, ray_address):
    from m3w.pipeline.tokenizer_cli import train_tokenizer

    texts = [n["text"] for p in sorted(shards_corpus.filtered.glob("*.parquet"))
             for d in pq.read_table(p).to_pylist() for n in d["nodes"] if n["kind"] == "text"]  # fmt: skip
    train_tokenizer(texts, tmp_path / "tok", vocab_size=700)
    other = load_tokenizer(str(tmp_path / "tok"))
    config = ShardsConfig(tokenizer=str(tmp_path / "tok"))
    result = run_m3w_shards([shards_corpus.filtered], shards_corpus.store, tmp_path / "out", config,
                            ray_address=ray_address)  # fmt: skip
    expected = {"name": str(tmp_path / "tok"), "fingerprint": tokenizer_fingerprint(other)}
    assert (
        result["tokenizer"]
        == expected
        != {"name": "m3w-default", "fingerprint": tokenizer_fingerprint(load_tokenizer())}
    )
    samples = tar_samples(tmp_path / "out" / "m3w")
    assert samples
    for _, files in samples:
        sample = json.loads(files["json"])
        assert sample["tokenizer"] == expected
        assert decode(other, sample["input_ids"]) == sample["text"]
        assert sample["input_ids"].count(other.convert_tokens_to_ids(MEDIA_TOKEN)) == len(sample["images"])


def test_resharding_with_another_size_rewrites_the_shards(m3w_out, shards_corpus, tmp_path, ray_address):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(m3w_out.parent, out)
    config = ShardsConfig(shard_max_samples=3, windows=WindowConfig(windows_per_doc=2))
    result = run_m3w_shards(
        [shards_corpus.filtered], shards_corpus.store, out, config, ray_address=ray_address
    )
    assert all(s["samples"] <= 3 for s in result["shards"])
    # exactly the new shards are left (the old ones are removed), holding the same samples in the same order
    assert [s["name"] for s in result["shards"]] == sorted(p.name for p in (out / "m3w").glob("*.tar"))
    assert [(k, f) for k, f in tar_samples(out / "m3w")] == tar_samples(m3w_out)
