"""`m3w store compact` on a real store: webcorpus pages whose images (real photos, the same bytes under many
URLs) were fetched by several tasks of two `m3w images` runs from a loopback server; then compacted, killed
mid-way once, and compacted again; readers of the generation before it keep reading it until it is vacuumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import ROOT, start_http_server
from shards_corpus import image_handler, photo_jpegs, rewrite_image_urls

from m3w.pipeline.compaction import compact_store
from m3w.pipeline.images import ImagesConfig, run_images
from m3w.pipeline.imagestore import (
    BlobRef,
    BlobShardWriter,
    GenerationGoneError,
    ImageStore,
    index_generation,
    readable_generations,
    write_rows,
)
from m3w.pipeline.shards import ShardsConfig, run_m3w_shards
from m3w.pipeline.shards.interleaved import document_units, m3w_unit, units_hash
from m3w.pipeline.shards.writing import Dataset, run_stage
from m3w.pipeline.windows import WindowConfig
from m3w.schemas import images as spec

SHARDS = ShardsConfig(shard_max_samples=8, windows=WindowConfig(windows_per_doc=2))


def stored_members(store: Path) -> dict[str, list[str]]:
    """sha256 → the blob shards (relative paths) of the current generation holding a member of it (not those
    kept, superseded, for readers of earlier generations)."""
    superseded = ImageStore(store).state().superseded_paths()
    where = defaultdict(list)
    for tar_path in sorted((store / "blobs").rglob("*.tar")):
        if str(tar_path.parent.relative_to(store)) in superseded:
            continue
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                where[name.removesuffix(".jpg")].append(str(tar_path.relative_to(store)))
    return where


def usable_bytes(store: ImageStore) -> dict[str, bytes]:
    """url → image bytes of every usable URL, read through the index."""
    rows = [row for row in store.iter_rows() if spec.is_usable(row)]
    return dict(zip([r["url"] for r in rows], store.read_blobs([BlobRef.of(r) for r in rows])))


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_compaction_stores_each_image_once_and_changes_no_shard(
    webcorpus, shards_corpus, ray_address, tmp_path
):
    base_url, server = start_http_server(tmp_path, image_handler(photo_jpegs(webcorpus)))
    try:
        filtered = tmp_path / "filtered"
        rewrite_image_urls(shards_corpus.filtered, filtered, base_url)
        parts = sorted(filtered.glob("*.parquet"))
        assert len(parts) >= 2
        store_dir = tmp_path / "images"
        config = ImagesConfig(urls_per_unit=15)
        allow = [base_url.removeprefix("http://")]
        # Two runs, several fetch tasks each: the ~20 photos are served under ~150 URLs.
        for part in (parts[:1], parts[1:]):
            summary = run_images(part, store_dir, config, ray_address=ray_address, allow_hosts=allow)
            assert summary.units_failed == 0 and summary.fetched > 0
    finally:
        server.shutdown()
        server.server_close()
    store = ImageStore(store_dir)
    before = usable_bytes(store)
    urls_by_image = defaultdict(set)
    for url, data in before.items():
        urls_by_image[data].add(url)
    assert len(before) > 100 and max(map(len, urls_by_image.values())) > 3
    copies = stored_members(store_dir)
    assert any(len(shards) > 1 for shards in copies.values())  # the same bytes in several blob shards
    shards_before = tmp_path / "shards_before"
    run_m3w_shards([filtered], store_dir, shards_before, SHARDS, ray_address=ray_address)
    generation = store.generation
    # A reader under way: it found where the images lie before the compaction, and reads them after it.
    planned = store.state()
    planned_refs = store.usable(list(before), planned)
    assert len(planned_refs) == len(before)

    # Killed mid-way (once the images are copied): the store is as it was, every image read from where it was.
    cmd = [sys.executable, "-m", "m3w", "store", "compact", str(store_dir), "--ray-address", ray_address]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    moves = store_dir / spec.run_relpath(generation + 1) / "moves"
    deadline = time.monotonic() + 120
    while not any(moves.glob("c*.parts")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ImageStore(store_dir).generation == generation, "the kill came after the commit"
    assert usable_bytes(ImageStore(store_dir)) == before

    counts = compact_store(str(store_dir), shard_bytes=400_000, ray_address=ray_address)
    store = ImageStore(store_dir)
    assert store.generation == generation + 1 and store.state().compactions == [generation + 1]
    # The fetch units' shards and the rewritten index files are superseded, not removed: a reader that planned
    # on the generation before reads it whole, the shards run byte-identical to the one before the compaction.
    superseded = store.state().superseded
    unit_folders = {f"blobs/g{g:06d}" for g in range(1, generation + 1)}
    assert [e["generation"] for e in superseded] == [generation + 1]
    assert unit_folders <= set(superseded[0]["paths"])
    assert all((store_dir / path).exists() for path in superseded[0]["paths"])
    assert store.read_blobs(list(planned_refs.values()), planned) == [before[url] for url in planned_refs]
    shards_planned = tmp_path / "shards_planned"
    run_m3w_shards([filtered], store_dir, shards_planned, SHARDS, store_generation=generation,
                   ray_address=ray_address)  # fmt: skip
    assert shard_files(shards_planned / "m3w") == shard_files(shards_before / "m3w")
    # One copy of each image in the whole store, in compaction shards only; every URL reads the same bytes.
    after = stored_members(store_dir)
    assert all(len(shards) == 1 for shards in after.values())
    assert {shard.split("/")[1] for shards in after.values() for shard in shards} == {
        f"g{generation + 1:06d}"
    }
    assert len({shards[0] for shards in after.values()}) > 1  # several compaction shards
    assert usable_bytes(store) == before
    assert set(after) == {r["resized_sha256"] for r in store.iter_rows() if spec.is_usable(r)}
    same = sorted(max(urls_by_image.values(), key=len))
    refs = store.usable(same)
    assert len(set(refs.values())) == 1 and len(store.read_blobs(list(refs.values()))) == len(same)
    # The bytes saved are counted, and recorded in the store's history.
    blob_bytes = sum(p.stat().st_size for p in (store_dir / f"blobs/g{generation + 1:06d}").glob("*.tar"))
    assert counts["bytes_after"] == blob_bytes < counts["bytes_before"]
    assert counts["duplicate_copies"] == sum(len(s) for s in copies.values()) - len(copies) > 0
    assert counts["bytes_saved"] >= counts["duplicate_bytes"] > 0
    assert store.state().history[-1]["compaction"]["bytes_saved"] == counts["bytes_saved"]
    # The shards built from the compacted store are the shards built before.
    shards_after = tmp_path / "shards_after"
    run_m3w_shards([filtered], store_dir, shards_after, SHARDS, ray_address=ray_address)
    assert shard_files(shards_after / "m3w") == shard_files(shards_before / "m3w")

    # Nothing left to move: a second compaction commits nothing, and keeps what the first one superseded (a
    # generation ago: not old enough) for the readers of the generation before.
    assert compact_store(str(store_dir), ray_address=ray_address)["bytes_before"] == 0
    assert store.generation == generation + 1 and store.state().superseded == superseded
    assert all((store_dir / path).exists() for path in superseded[0]["paths"])
    # A later run fetches known bytes under new URLs; its compaction points them at the stored copies.
    base_url, server = start_http_server(tmp_path, image_handler(photo_jpegs(webcorpus)))
    try:
        late_urls = tmp_path / "late.txt"
        late_urls.write_text("".join(f"{base_url}/img/late-{i}.jpg\n" for i in range(12)))
        run_images([late_urls], store_dir, config, ray_address=ray_address,
                   allow_hosts=[base_url.removeprefix("http://")])  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    # Its commit (generation + 2) vacuums what was superseded a generation ago: the fetch units' shards and the
    # generation before the compaction go; what it superseded itself stays.
    state = ImageStore(store_dir).state()
    assert state.generation == generation + 2 and [e["generation"] for e in state.superseded] == [
        generation + 2
    ]
    assert not any((store_dir / path).exists() for path in superseded[0]["paths"])
    assert all((store_dir / path).exists() for path in state.superseded[0]["paths"])
    assert readable_generations(store) == [generation + 1, generation + 2]
    # The reader of the vacuumed generation fails with one clear reason: the generation it planned on is gone.
    with pytest.raises(GenerationGoneError, match=f"store generation {generation} of .* was vacuumed"):
        store.read_blobs(list(planned_refs.values()), planned)
    late = compact_store(str(store_dir), ray_address=ray_address)
    assert late["copied_images"] == 0 and late["bytes_after"] == 0 and late["records_moved"] > 0
    assert stored_members(store_dir) == after
    assert set(usable_bytes(ImageStore(store_dir)).values()) <= set(before.values())

    # A shards run planned on a generation that is vacuumed before its units run: every unit fails with the
    # reason, no shard is written; one planned on the vacuumed generation is refused at once, in one line.
    compacted = ImageStore(store_dir).generation
    units = document_units([filtered], str(store_dir), compacted - 1)
    vacuumed = subprocess.run([sys.executable, "-m", "m3w", "store", "vacuum", str(store_dir), "--older-than", "0"],
                              capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert vacuumed.returncode == 0 and "generations from" in vacuumed.stdout, vacuumed.stderr
    assert ImageStore(store_dir).state().superseded == [] and readable_generations(store) == [compacted]
    gone = tmp_path / "shards_gone"
    (result,) = run_stage("m3w", m3w_unit, units, [Dataset("m3w", "m3w")], str(gone), SHARDS,
                          units_hash(SHARDS, "m3w", "m3w", compacted), workers=None,
                          ray_address=ray_address).values()  # fmt: skip
    assert result["failed_units"] == [uid for uid, _ in units] and result["shards"] == []
    for reason in result["unit_failures"].values():
        assert reason.startswith("GenerationGoneError: ") and f"store generation {compacted - 1} " in reason
        assert "was vacuumed" in reason and "Traceback" not in reason
    assert not list((gone / "m3w").glob("*.tar"))
    refused = subprocess.run([sys.executable, "-m", "m3w", "shards", "m3w", str(filtered), "--images", str(store_dir),
                              "--store-generation", str(generation), "--out", str(gone)],
                             capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"store generation {generation} of" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_compacting_no_store_is_one_clear_error(tmp_path):
    missing = tmp_path / "nothing-here"
    done = subprocess.run([sys.executable, "-m", "m3w", "store", "compact", str(missing)], capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 2 and "no image store" in done.stderr and "Traceback" not in done.stderr
    assert not missing.exists()


def test_a_vacuum_killed_midway_leaves_a_consistent_store(tmp_path):
    """Two generations written by the store's own writers, the second rewriting about every index file of 512
    buckets; `m3w store vacuum --older-than 0` is killed -9 once it has removed some of those it superseded."""
    root = tmp_path / "images"
    store = ImageStore(root)
    store.create(ImagesConfig().store_settings(), buckets=512)
    for generation in (1, 2):  # the second run's rows win (more attempts): every URL has new bytes
        shard = spec.shard_id(generation, 0)
        blobs = BlobShardWriter(store, shard)
        rows = []
        for i in range(2000):
            sha, length = blobs.add(f"jpeg {generation} {i % 50}".encode())
            rows.append({"url": f"http://h.example/{i}.jpg", "status": "ok", "attempts": generation,
                         "resized_sha256": sha, "blob_length": length})  # fmt: skip
        write_rows(store, shard, rows, blobs.close())
        index_generation(store, generation, [shard])
    expected = {f"http://h.example/{i}.jpg": f"jpeg 2 {i % 50}".encode() for i in range(2000)}
    assert usable_bytes(store) == expected
    (entry,) = store.state().superseded
    assert entry["generation"] == 2 and len(entry["paths"]) > 450 and readable_generations(store) == [1, 2]
    first = root / entry["paths"][0]

    cmd = [sys.executable, "-m", "m3w", "store", "vacuum", str(root), "--older-than", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while first.exists() and proc.poll() is None and time.monotonic() < deadline:
        pass  # no sleep: the kill must land while the files go
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [path for path in entry["paths"] if (root / path).exists()]
    assert 0 < len(left) < len(entry["paths"]), "the kill did not come while the vacuum removed files"
    # The current generation is whole; the earlier one is refused in one clear line; the files still listed
    # as superseded are the ones left, and the next vacuum removes them.
    store = ImageStore(root)
    assert store.generation == 2 and store.state().superseded == [entry] and usable_bytes(store) == expected
    with pytest.raises(GenerationGoneError, match="store generation 1 of .* was vacuumed"):
        store.state_at(1)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and f"{len(entry['paths']):,} superseded" in again.stdout, again.stderr
    assert not any((root / path).exists() for path in entry["paths"])
    assert ImageStore(root).state().superseded == [] and usable_bytes(ImageStore(root)) == expected
