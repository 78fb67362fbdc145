"""Settings of `m3w shards` (defaults match the paper: L=256, N=5, T=8 frames at 1 FPS)."""

from __future__ import annotations

from dataclasses import dataclass, field

from m3w.pipeline.filters.config import CaptionFilterConfig
from m3w.pipeline.windows import WindowConfig


@dataclass
class PairsConfig:
    alt_max_tokens: int = 32  # ALIGN-like alt-text pairs: <image>alt<EOC>, at most 32 tokens
    caption_max_tokens: int = 64  # LTIP-like caption pairs: <image>caption<EOC>, at most 64 tokens
    caption_blocks: bool = True  # also take a text node of block "caption" right after/before the image
    dedup: bool = True  # one pair per (image bytes, text) in a unit; corpus-wide repeats: the filter stage
    caption: CaptionFilterConfig = field(default_factory=CaptionFilterConfig)  # the text rules of a pair


@dataclass
class VideoConfig:
    fps: float = 1.0  # frames sampled per second of video (paper: 1 FPS)
    num_frames: int = 8  # T (paper: 8)
    size: int = 320  # frames are resized to size × size …
    resize_mode: str = "center_crop"  # … with the images stage's resize: center_crop | pad | keep_ratio
    fill: str = "loop"  # short clips: "loop" repeats the clip, "pad" repeats the last frame
    max_tokens: int = 32  # <image>caption<EOC>, at most 32 tokens
    jpeg_quality: int = 90
    rows_per_unit: int = 64  # table rows per Ray task
    max_video_bytes: int = 200 * 1024 * 1024


@dataclass
class ShardsConfig:
    windows: WindowConfig = field(default_factory=WindowConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    tokenizer: str | None = None  # any Hugging Face tokenizer name or path; None = the shipped default
    shard_max_samples: int | None = 1000  # per shard; each unit (input file) writes its own shards
    shard_max_bytes: int | None = None  # e.g. 500_000_000; whichever limit comes first closes a shard
