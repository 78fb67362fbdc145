"""Video → T frames for video-text pairs (Flamingo: T=8 frames sampled at 1 FPS), decoded with PyAV.

Frames are taken at t = 0, 1/fps, 2/fps, … (the first decoded frame at or after each time), resized to
size × size like the images stage resizes images (centre crop by default), and stored as JPEG. A clip shorter than T/fps seconds
gives fewer frames: `fill="loop"` repeats the clip from its start, `fill="pad"` repeats its last frame; which one
was used is recorded with the sample, so a user can filter such samples out.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

FILL_MODES = ("loop", "pad")


@dataclass
class Frames:
    jpegs: list[bytes]  # exactly num_frames JPEGs
    timestamps: list[float]  # seconds into the clip of each stored frame
    distinct: int  # frames really sampled before filling
    fill: str  # "none" | "loop" | "pad"
    duration: float | None  # of the video stream, when the container says


def to_jpeg(image, size: int, resize_mode: str, quality: int) -> bytes:
    """Resize a frame the way the images stage resizes images, then encode as JPEG (deterministic)."""
    from m3w.pipeline.images import resize

    out = io.BytesIO()
    resize(image.convert("RGB"), size, resize_mode).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def sample_frames(
    source: str | Path | bytes,
    *,
    num_frames: int = 8,
    fps: float = 1.0,
    size: int = 320,
    fill: str = "loop",
    resize_mode: str = "center_crop",
    quality: int = 90,
) -> Frames:
    """Decode `source` (a file path or the video's bytes) into `num_frames` square JPEG frames at `fps`.

    Raises ValueError for a file with no video stream or no decodable frame (the caller counts and skips it).
    """
    import av

    if fill not in FILL_MODES:
        raise ValueError(f"fill must be one of {FILL_MODES}, not {fill!r}")
    data = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    picked: list[tuple[float, object]] = []
    try:
        with av.open(data) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            duration = float(stream.duration * stream.time_base) if stream.duration else None
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else 0.0
                # The first frame at or after each sampling time (a small epsilon absorbs pts rounding).
                if t + 1e-3 >= len(picked) / fps:
                    picked.append((t, frame.to_image()))
                    if len(picked) == num_frames:
                        break
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot decode video: {exc}") from exc
    if not picked:
        raise ValueError("no decodable frame")
    distinct = len(picked)
    used = "none"
    if distinct < num_frames:
        used = fill
        picked = [picked[i % distinct] if fill == "loop" else picked[-1] if i >= distinct else picked[i]
                  for i in range(num_frames)]  # fmt: skip
    jpegs = [to_jpeg(image, size, resize_mode, quality) for _, image in picked]
    return Frames(jpegs, [round(t, 3) for t, _ in picked], distinct, used, duration)
