"""`m3w shards`: filtered documents + the image store → WebDataset shards (M3W windows, pairs, video).

config.py       ShardsConfig (windows, pairs, video, shard sizes)
samples.py      what every dataset shares: tokenizer, sample keys and JSON, inputs, unit ids
interleaved.py  M3W token windows with their images
pairs.py        alt-text and caption pairs
video.py        video-text pairs from a table
writing.py      units write their own tars; shards.json is the final step
cli.py          the commands
"""

from m3w.pipeline.shards.cli import shards_group
from m3w.pipeline.shards.config import PairsConfig, ShardsConfig, VideoConfig
from m3w.pipeline.shards.interleaved import run_m3w_shards
from m3w.pipeline.shards.pairs import run_pair_shards
from m3w.pipeline.shards.samples import sample_json
from m3w.pipeline.shards.video import run_video_shards

__all__ = ["PairsConfig", "ShardsConfig", "VideoConfig", "run_m3w_shards", "run_pair_shards", "run_video_shards",
           "sample_json", "shards_group"]  # fmt: skip
