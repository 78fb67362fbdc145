"""`m3w store compact` on a real store: webcorpus pages whose images (real photos, the same bytes under many
URLs) were fetched by several tasks of two `m3w images` runs from a loopback server; then compacted, killed
mid-way once, and compacted again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

from conftest import ROOT, start_http_server
from shards_corpus import image_handler, photo_jpegs, rewrite_image_urls

from m3w.pipeline.compaction import compact_store
from m3w.pipeline.images import ImagesConfig, run_images
from m3w.pipeline.imagestore import BlobRef, ImageStore
from m3w.pipeline.shards import ShardsConfig, run_m3w_shards
from m3w.pipeline.windows import WindowConfig
from m3w.schemas import images as spec

SHARDS = ShardsConfig(shard_max_samples=8, windows=WindowConfig(windows_per_doc=2))


def stored_members(store: Path) -> dict[str, list[str]]:
    """sha256 → the blob shards (relative paths) holding a member of it."""
    where = defaultdict(list)
    for tar_path in sorted((store / "blobs").rglob("*.tar")):
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
    blob_bytes = sum(p.stat().st_size for p in (store_dir / "blobs").rglob("*.tar"))
    assert counts["bytes_after"] == blob_bytes < counts["bytes_before"]
    assert counts["duplicate_copies"] == sum(len(s) for s in copies.values()) - len(copies) > 0
    assert counts["bytes_saved"] >= counts["duplicate_bytes"] > 0
    assert store.state().history[-1]["compaction"]["bytes_saved"] == counts["bytes_saved"]
    # The shards built from the compacted store are the shards built before.
    shards_after = tmp_path / "shards_after"
    run_m3w_shards([filtered], store_dir, shards_after, SHARDS, ray_address=ray_address)
    assert shard_files(shards_after / "m3w") == shard_files(shards_before / "m3w")

    # Nothing left to move: a second compaction commits nothing.
    assert compact_store(str(store_dir), ray_address=ray_address)["bytes_before"] == 0
    assert store.generation == generation + 1
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
    late = compact_store(str(store_dir), ray_address=ray_address)
    assert late["copied_images"] == 0 and late["bytes_after"] == 0 and late["records_moved"] > 0
    assert stored_members(store_dir) == after
    assert set(usable_bytes(ImageStore(store_dir)).values()) <= set(before.values())


def test_compacting_no_store_is_one_clear_error(tmp_path):
    missing = tmp_path / "nothing-here"
    done = subprocess.run([sys.executable, "-m", "m3w", "store", "compact", str(missing)], capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 2 and "no image store" in done.stderr and "Traceback" not in done.stderr
    assert not missing.exists()
