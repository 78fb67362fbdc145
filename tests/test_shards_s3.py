"""Every stage on object storage: extract → filter → images → shards with each stage's output on s3:// (an S3
API server on 127.0.0.1, started by the test session), against the same run on a local disk. The shards must be
byte-identical, and the trainer must read them from s3:// as from a folder."""

from __future__ import annotations

import uuid
from pathlib import Path

from conftest import start_http_server
from shards_corpus import image_handler, photo_jpegs, rewrite_image_urls

from m3w.pipeline import io
from m3w.pipeline.compaction import compact_store
from m3w.pipeline.extract import run_extract
from m3w.pipeline.filter import run_filter
from m3w.pipeline.images import ImagesConfig, run_images
from m3w.pipeline.imagestore import ImageStore
from m3w.pipeline.shards import ShardsConfig, run_m3w_shards, run_pair_shards
from m3w.pipeline.tario import iter_tar_samples
from m3w.pipeline.windows import WindowConfig
from m3w.schemas import shards as spec
from m3w.trainer.data import read_shard_set

WARC = "cleaneval_dev.warc.gz"
CONFIG = ShardsConfig(shard_max_samples=8, windows=WindowConfig(windows_per_doc=2))


def run_pipeline(root: str, warc: Path, base_url: str, ray_address: str) -> dict[str, str]:
    """The four stages, every output under `root` (a folder or an s3:// prefix)."""
    out = {name: io.join(root, name) for name in ("documents", "filter_out", "filtered", "images", "shards")}
    assert run_extract([str(warc)], out["documents"], ray_address=ray_address).failed == 0
    assert run_filter(out["documents"], out["filter_out"], ray_address=ray_address)["failed"] == 0
    rewrite_image_urls(out["filter_out"], out["filtered"], base_url)
    images = run_images([out["filtered"]], out["images"], ImagesConfig(urls_per_unit=40), ray_address=ray_address,
                        allow_hosts=[base_url.removeprefix("http://")])  # fmt: skip
    assert images.units_failed == 0 and images.fetched > 20
    assert (
        run_m3w_shards([out["filtered"]], out["images"], out["shards"], CONFIG, ray_address=ray_address)[
            "failed_units"
        ]
        == []
    )
    run_pair_shards([out["filtered"]], out["images"], out["shards"], CONFIG, ray_address=ray_address)
    return out


def shard_bytes(folder: str) -> dict[str, bytes]:
    """Every file of a shard folder but the manifest entries: the tars and shards.json."""
    return {name: io.read_bytes(io.join(folder, name)) for name in io.list_dir(folder)}


def blob_bytes(store: ImageStore) -> dict[str, bytes]:
    return {name: io.read_bytes(store.url(name)) for name in store.files() if name.startswith("blobs/")}


def test_pipeline_on_s3_gives_the_local_shards(s3_bucket, webcorpus, tmp_path, ray_address):
    base_url, server = start_http_server(tmp_path, image_handler(photo_jpegs(webcorpus)))
    try:
        warc = webcorpus / "warc" / WARC
        local = run_pipeline(str(tmp_path / "local"), warc, base_url, ray_address)
        remote = run_pipeline(f"{s3_bucket}/{uuid.uuid4().hex}", warc, base_url, ray_address)
    finally:
        server.shutdown()
        server.server_close()

    assert not list((tmp_path / "local").rglob(".tmp-*"))
    for dataset in ("m3w", "alt_pairs", "caption_pairs"):
        here, there = (
            shard_bytes(io.join(local["shards"], dataset)),
            shard_bytes(io.join(remote["shards"], dataset)),
        )
        assert spec.SHARD_MANIFEST in there and (dataset != "m3w" or any(n.endswith(".tar") for n in there))
        assert here == there, dataset
    # Every stage left its manifest on s3:// and nothing on the local disk.
    for stage, folder in (("extract", "documents"), ("filter", "filter_out"), ("m3w", "shards/m3w")):
        assert io.list_dir(io.join(remote[folder.split("/")[0]], *folder.split("/")[1:], "_manifest", stage))
    store = ImageStore(remote["images"])
    assert store.count() == ImageStore(local["images"]).count() > 20
    assert not any(name.endswith(".jpg") for name in store.files())  # images live in blob shards
    # Two runs of the same input store the same blob shards, byte for byte, whatever order the fetches ended in.
    assert blob_bytes(store) == blob_bytes(ImageStore(local["images"])) != {}

    # The store compacted on s3:// (each image once): the shards built from it are still the local ones.
    counts = compact_store(remote["images"], ray_address=ray_address)
    assert counts["copied_images"] > 0 and ImageStore(remote["images"]).state().compactions == [2]
    again = io.join(remote["shards"], "after-compaction")
    assert (
        run_m3w_shards([remote["filtered"]], remote["images"], again, CONFIG, ray_address=ray_address)[
            "failed_units"
        ]
        == []
    )
    assert shard_bytes(io.join(again, "m3w")) == shard_bytes(io.join(local["shards"], "m3w"))

    # The trainer lists and reads the shards straight from s3://.
    shard_set = read_shard_set(io.join(remote["shards"], "m3w"))
    assert all(u.startswith("s3://") for u in shard_set.urls)
    samples = [s for url in shard_set.urls for s in iter_tar_samples(url)]
    assert len(samples) == shard_set.num_samples > 0
