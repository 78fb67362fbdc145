"""Trainer data streams on real tar shards: batches, labels, splitting, exact resume, bad data, fsspec URLs."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import toydata
from PIL import Image

from m3w.model.loss import IGNORE_INDEX
from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN, load_tokenizer, tokenizer_fingerprint
from m3w.trainer.config import DatasetConfig
from m3w.trainer.data import (
    ShardLimitsMismatchError,
    TokenizerMismatchError,
    build_streams,
    check_shard_sets,
    cut_to_limits,
    read_shard_set,
)

IMAGE_CONFIG = {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok) -> Path:
    root = tmp_path_factory.mktemp("shards")
    toydata.write_interleaved(root / "m3w", tok, 80, size=40, shard_size=20)  # 4 shards
    toydata.write_shapes(root / "one", tok, 32, size=32, shard_size=100)  # 1 shard
    toydata.write_video(root / "video", tok, 8, size=32, frames=4, shard_size=8)
    return root


def streams_for(tok, datasets: dict[str, DatasetConfig], **kw):
    return build_streams(
        datasets,
        IMAGE_CONFIG,
        tok,
        tokenizer_fingerprint(tok),
        tok.convert_tokens_to_ids(MEDIA_TOKEN),
        seed=1,
        **kw,
    )


def ds(path, **kw) -> DatasetConfig:
    return DatasetConfig(path=str(path), **{"num_workers": 0, "shuffle_buffer": 0, **kw})


def take(stream, n: int) -> list[tuple[list[str], dict]]:
    return [(stream.next_batch(), list(stream.last_keys))[::-1] for _ in range(n)]


def all_keys(path: Path) -> set[str]:
    from m3w.pipeline.tario import iter_tar_samples

    return {key for tar in sorted(path.glob("*.tar")) for key, _ in iter_tar_samples(tar)}


def test_batch_layout_labels_and_normalisation(shards, tok):
    media_id, eoc_id = tok.convert_tokens_to_ids([MEDIA_TOKEN, EOC_TOKEN])
    stream = streams_for(tok, {"m3w": ds(shards / "m3w", batch_size=6)})["m3w"]
    shard_set = read_shard_set(str(shards / "m3w"))  # L, N and T: the shards' own
    pre = stream.loader.dataset.spec.pre
    assert (pre.seq_len, pre.max_media) == (shard_set.seq_len, shard_set.max_media)
    batch = stream.next_batch()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    images, media_mask = batch["images"], batch["media_mask"]
    assert ids.shape[0] == 6 and ids.shape[1] <= shard_set.seq_len
    assert images.shape[:3] == (6, media_mask.shape[1], 1) and images.shape[3:] == (3, 32, 32)
    assert media_mask.shape[1] <= shard_set.max_media == 5
    # one real media slot per <image> token, in every row
    assert torch.equal((ids == media_id).logical_and(mask.bool()).sum(1), media_mask.sum(1))
    # labels: pad and <image> ignored, <EOC> and text are targets
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (labels[ids == media_id] == IGNORE_INDEX).all()
    text = mask.bool() & (ids != media_id)
    assert torch.equal(labels[text], ids[text]) and (labels == eoc_id).any()
    # padded media slots are zeros; real ones are normalised with the encoder's mean/std
    assert (images[~media_mask] == 0).all()
    background = np.array(toydata.BACKGROUND) / 255.0
    expected = (background - IMAGE_CONFIG["mean"]) / np.array(IMAGE_CONFIG["std"])
    corner = images[0, 0, 0, :, 0, 0].numpy()
    assert np.allclose(corner, expected, atol=0.3), (corner, expected)  # JPEG noise


def test_config_limits_must_match_the_shards(shards, tok):
    """Issue 13, defect 4: a window length, image cap or frame count other than the shards' is an error that says
    which, not a silent re-cut (and it is found before a model is built: check_shard_sets)."""
    shard_set = read_shard_set(str(shards / "m3w"))
    same = {"seq_len": shard_set.seq_len, "max_media": shard_set.max_media, "num_frames": 1}
    streams_for(tok, {"m3w": ds(shards / "m3w", **same)})  # the same numbers, spelled out: fine
    for key, value in (("seq_len", shard_set.seq_len - 8), ("max_media", 3), ("num_frames", 8)):
        config = {"m3w": ds(shards / "m3w", **{key: value})}
        with pytest.raises(
            ShardLimitsMismatchError, match=rf"datasets\.m3w\.{key} is {value}, but the shards"
        ):
            check_shard_sets(config)
        with pytest.raises(ShardLimitsMismatchError):
            streams_for(tok, config)
    video = read_shard_set(str(shards / "video"))
    assert (video.num_frames, video.max_media) == (4, 1)


def test_cut_to_limits_keeps_media_and_tokens_consistent():
    m = 7
    ids = [1, m, 2, 3, m, 4, m, 5, 6, m, 8]
    assert cut_to_limits(ids, m, seq_len=100, max_media=2) == [1, m, 2, 3, m, 4]
    assert cut_to_limits(ids, m, seq_len=5, max_media=5) == [1, m, 2, 3, m]
    assert cut_to_limits(ids, m, seq_len=100, max_media=0) == [1]


def test_video_batches_have_t_frames(shards, tok):
    cfg = ds(shards / "video", batch_size=4)
    batch = streams_for(tok, {"video": cfg})["video"].next_batch()
    assert batch["images"].shape == (4, 1, 4, 3, 32, 32)
    frames = batch["images"][0, 0]
    assert not torch.equal(frames[0], frames[-1])  # the shape moves between the first and the last frame


@pytest.mark.parametrize("path,workers", [("m3w", 2), ("one", 2)])  # by shard (4 shards), by sample (1 shard)
def test_epoch_mode_split_by_node_and_worker_covers_each_sample_once(shards, tok, path, workers):
    n_samples = read_shard_set(str(shards / path)).num_samples
    seen: Counter = Counter()
    for rank in range(2):
        cfg = ds(shards / path, batch_size=1, resampled=False, num_workers=workers, shuffle_buffer=8)
        stream = streams_for(tok, {"x": cfg}, rank=rank, world_size=2)["x"]
        for keys, _ in take(stream, n_samples // 2):
            seen.update(keys)
    assert set(seen) == all_keys(shards / path) and set(seen.values()) == {1}


def test_shuffle_is_seeded(shards, tok):
    def first_keys(seed_shift: int) -> list[str]:
        cfg = ds(shards / "m3w", batch_size=10, resampled=True, shuffle_buffer=30)
        streams = build_streams(
            {"m3w": cfg},
            IMAGE_CONFIG,
            tok,
            tokenizer_fingerprint(tok),
            tok.convert_tokens_to_ids(MEDIA_TOKEN),
            seed=seed_shift,
        )
        return [k for keys, _ in take(streams["m3w"], 3) for k in keys]

    assert first_keys(0) == first_keys(0)
    assert first_keys(0) != first_keys(1)


@pytest.mark.parametrize("resampled", [True, False])
def test_stream_resumes_exactly_from_its_state(shards, tok, resampled):
    """Consume 7 batches, checkpoint the stream, rebuild it from the state: the next batches are identical to
    those of the uninterrupted stream (2 workers, shuffle buffer on, across an epoch boundary)."""
    cfg = ds(shards / "m3w", batch_size=4, resampled=resampled, num_workers=2, shuffle_buffer=16)
    straight = streams_for(tok, {"m3w": cfg})["m3w"]
    expected = take(straight, 14)
    first = streams_for(tok, {"m3w": cfg})["m3w"]
    take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = streams_for(tok, {"m3w": cfg}, states={"m3w": state})["m3w"]
    for (keys, batch), (exp_keys, exp_batch) in zip(take(resumed, 7), expected[7:]):
        assert keys == exp_keys
        for name in ("input_ids", "labels", "images"):
            assert torch.equal(batch[name], exp_batch[name])
    assert resumed.batches == 14 and resumed.samples == 56


def corrupt_copy(src: Path, dst: Path) -> tuple[set[str], list[str]]:
    """Copy a shard set; break some JPEGs in the first shard and truncate the second shard mid-member.
    Returns (keys with a broken JPEG, keys of the truncated shard in order)."""
    import tarfile

    from m3w.pipeline.tario import iter_tar_samples

    shutil.copytree(src, dst)
    tars = sorted(dst.glob("*.tar"))
    with tarfile.open(tars[0]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken = set()
    with tarfile.open(tars[0], "w", format=tarfile.GNU_FORMAT) as tar:
        for i, (member, data) in enumerate(members):
            if member.name.endswith(".0.jpg") and i < 12:
                data = data[:40] + b"\x00garbage" * 20  # a JPEG header, then garbage
                broken.add(member.name.split(".")[0])
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    truncated = [key for key, _ in iter_tar_samples(tars[1])]
    raw = tars[1].read_bytes()
    tars[1].write_bytes(raw[: len(raw) // 2 + 100])
    return broken, truncated


def test_corrupt_jpeg_and_truncated_tar_are_skipped_and_counted(shards, tok, tmp_path):
    bad = tmp_path / "bad"
    broken, truncated = corrupt_copy(shards / "m3w", bad)
    assert broken
    cfg = ds(bad, batch_size=1, resampled=False)
    stream = streams_for(tok, {"m3w": cfg})["m3w"]
    keys = [k for ks, _ in take(stream, 80) for k in ks]  # 80 > one epoch's good samples: it wraps around
    assert stream.skipped["bad_shard"] >= 1
    assert stream.skipped["corrupt_image"] >= len(broken)
    assert not broken & set(keys)
    assert truncated[0] in keys, "samples of the truncated shard before the cut are still used"
    assert truncated[-1] not in keys
    state = stream.state_dict()
    assert state["skipped"]["corrupt_image"] == stream.skipped["corrupt_image"]  # counts go into checkpoints


def test_tokenizer_mismatch_is_a_clear_error(shards, tok, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(shards / "one", other)
    manifest = json.loads((other / "shards.json").read_text())
    manifest["tokenizer"] = {"name": "gpt2", "fingerprint": "0123abcd"}
    (other / "shards.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenizerMismatchError, match="gpt2.*0123abcd.*Re-run `m3w shards`"):
        streams_for(tok, {"x": ds(other)})


def test_sample_level_tokenizer_mismatch_stops_the_run(shards, tmp_path, tok):
    """shards.json agrees, but the samples were made by another tokenizer: refused, not silently skipped."""
    other = tmp_path / "mixed"
    shutil.copytree(shards / "one", other)
    manifest = json.loads((other / "shards.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "feedface"
    (other / "shards.json").write_text(json.dumps(manifest))
    fake = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    streams = build_streams(
        {"x": ds(other)}, fake, tok, "feedface", tok.convert_tokens_to_ids(MEDIA_TOKEN), seed=0
    )
    with pytest.raises(TokenizerMismatchError, match="sample"):
        streams["x"].next_batch()


def test_reads_shards_over_http(shards, tok, serve_dir):
    base = serve_dir(shards)
    stream = streams_for(tok, {"x": ds(f"{base}/m3w", batch_size=5, num_workers=1)})["x"]
    batch = stream.next_batch()
    assert batch["input_ids"].shape[0] == 5 and stream.wait_s > 0


def test_missing_manifest_names_the_fix(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="m3w shards"):
        streams_for(tok, {"x": ds(tmp_path / "empty")})


def test_image_decoding_matches_manual_normalisation(tmp_path, tok):
    from m3w.trainer.data import decode_image

    img = Image.new("RGB", (50, 20), (255, 0, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = decode_image(
        buf.getvalue(), 16, np.array([0.5, 0.5, 0.5], np.float32), np.array([0.5, 0.5, 0.5], np.float32)
    )
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    assert np.allclose(out[:, 8, 8], [1.0, -1.0, (128 / 255 - 0.5) / 0.5], atol=1e-5)
