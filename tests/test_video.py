"""Video-text pairs: clips encoded here with PyAV → T=8 frames at 1 FPS → `m3w shards video` shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m3w.pipeline.shards import ShardsConfig, run_video_shards
from m3w.pipeline.tario import iter_tar_samples
from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN, load_tokenizer
from m3w.pipeline.video import sample_frames

FPS = 10


def encode_clip(path: Path, seconds: float, size=(96, 64)) -> Path:
    """A clip whose frame k shows a flat colour that encodes its second, so frame picks can be checked."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(int(seconds * FPS)):
            second = k // FPS
            pixels = np.full((size[1], size[0], 3), (20 * second + 10, 255 - 20 * second, 128), np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def second_of(jpeg: bytes) -> int:
    """Which second of an `encode_clip` clip a stored frame shows (from its red level)."""
    red = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))[..., 0].mean()
    return round((red - 10) / 20)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {
        "long": encode_clip(root / "long.mp4", 10.0),
        "short": encode_clip(root / "short.mp4", 3.0),
        "broken": root / "broken.mp4",
    }


def test_long_clip_gives_8_frames_one_per_second(clips):
    frames = sample_frames(clips["long"])
    assert len(frames.jpegs) == 8 and frames.fill == "none" and frames.distinct == 8
    assert frames.timestamps == [float(s) for s in range(8)]
    assert [second_of(j) for j in frames.jpegs] == list(range(8))
    assert all(Image.open(io.BytesIO(j)).size == (320, 320) for j in frames.jpegs)


def test_short_clip_is_looped_or_padded_and_says_so(clips):
    looped = sample_frames(clips["short"].read_bytes(), fill="loop")  # from bytes, as fetched
    assert looped.fill == "loop" and looped.distinct == 3
    assert [second_of(j) for j in looped.jpegs] == [0, 1, 2, 0, 1, 2, 0, 1]
    padded = sample_frames(clips["short"], fill="pad")
    assert padded.fill == "pad"
    assert [second_of(j) for j in padded.jpegs] == [0, 1, 2, 2, 2, 2, 2, 2]


def test_undecodable_video_is_a_clear_error(clips):
    clips["broken"].write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(ValueError, match="decode|no video"):
        sample_frames(clips["broken"])


def test_video_shards_from_urls_and_paths(clips, tmp_path, serve_dir, ray_address):
    base = serve_dir(clips["long"].parent)
    table = tmp_path / "videos.jsonl"
    rows = [
        {"video": f"{base}/long.mp4", "caption": "A colour ramp, one second at a time, from red to green."},
        {"video": str(clips["short"]), "caption": "A short clip that loops. " * 20},  # long: truncated
        {"video": str(clips["broken"]), "caption": "broken"},
        {"video": f"{base}/missing.mp4", "caption": "a 404"},
        {"video": str(tmp_path / "nowhere.mp4"), "caption": "missing file"},
    ]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    config = ShardsConfig()
    config.video.rows_per_unit = 2
    allow = [base.removeprefix("http://")]
    result = run_video_shards(table, out, config, allow_hosts=allow, workers=2, ray_address=ray_address)
    assert result["totals"]["samples"] == 2 and result["totals"]["images"] == 16
    counts = result["unit_counts"]
    assert counts["skip.decode_error"] == 1 and counts["skip.missing_file"] == 1
    assert counts["skip.fetch_http_error"] == 1 and counts["fill.loop"] == 1 and counts["truncated"] == 1

    tok = load_tokenizer()
    samples = [s for tar in sorted((out / "video_pairs").glob("*.tar")) for s in iter_tar_samples(tar)]
    by_url = {json.loads(f["json"])["provenance"]["url"]: f for _, f in samples}
    for files in by_url.values():
        sample = json.loads(files["json"])
        assert sample["media_kind"] == "video" and sample["num_frames"] == 8
        assert sample["images"] == [f"{i}.jpg" for i in range(8)]
        assert all(Image.open(io.BytesIO(files[k])).size == (320, 320) for k in sample["images"])
        ids = sample["input_ids"]
        assert len(ids) <= 32 and ids.count(tok.convert_tokens_to_ids(MEDIA_TOKEN)) == 1
        assert sample["text"].startswith(MEDIA_TOKEN) and sample["text"].endswith(EOC_TOKEN)
    long_sample = by_url[f"{base}/long.mp4"]
    assert [second_of(long_sample[f"{i}.jpg"]) for i in range(8)] == list(range(8))
    assert json.loads(by_url[str(clips["short"])]["json"])["provenance"]["fill"] == "loop"

    # Same table, same config: byte-identical shards (one worker this time).
    again = tmp_path / "again"
    run_video_shards(table, again, config, allow_hosts=allow, workers=1, ray_address=ray_address)

    def tars(folder):
        return {p.name: p.read_bytes() for p in sorted((folder / "video_pairs").glob("*.tar"))}

    assert tars(out) == tars(again) and len(tars(out)) == len(result["shards"]) >= 1
