"""Training configuration: dataclasses with Flamingo paper defaults, loadable from YAML with `--set` overrides.

    m3w train m3w/configs/train_tiny.yaml --set optim.lr=3e-4 --set datasets.m3w.batch_size=8

Datasets are keyed by name (not a list) so that one override can reach any field of any stream.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3w.pipeline.config import from_dict, load_config


def coerce_numbers(config) -> None:
    """YAML reads `3e-4` (no dot) as a string; turn strings/ints in float fields into floats (and int fields'
    strings into ints), so `--set optim.lr=3e-4` means what it says."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if hint is float and isinstance(value, str | int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
        elif hint is int and isinstance(value, str):
            setattr(config, f.name, int(value))


@dataclass
class DatasetConfig:
    """One weighted stream of WebDataset shards (a directory or URL holding `shards.json` and the tars)."""

    path: str = ""  # shard directory or fsspec URL prefix; shards.json inside names the tars
    weight: float = 1.0  # λ_m in Σ_m λ_m · NLL_m
    batch_size: int = 4  # per process, per micro-batch
    seq_len: int = 256  # tokens; longer samples are cut (their media beyond the cut are dropped)
    max_media: int = 5  # media items per sample; a sample with more is cut at the (max_media+1)-th <image>
    num_frames: int = 1  # T: frames per media item (8 for video)
    resampled: bool = True  # shards drawn with replacement (infinite stream) vs. epochs over a permutation
    shard_shuffle: bool = True
    shuffle_buffer: int = 1000  # samples; 0 disables sample shuffling
    num_workers: int = 2  # DataLoader worker processes (decoding happens there)
    prefetch_factor: int = 4

    def __post_init__(self) -> None:
        coerce_numbers(self)


def paper_datasets() -> dict[str, DatasetConfig]:
    """The four Flamingo training mixtures with the paper's loss weights and sequence lengths (Sec. 3, App. A)."""
    return {
        "m3w": DatasetConfig(path="shards/m3w", weight=1.0, seq_len=256, max_media=5),
        "alt_pairs": DatasetConfig(path="shards/alt_pairs", weight=0.2, seq_len=32, max_media=1),
        "caption_pairs": DatasetConfig(path="shards/caption_pairs", weight=0.2, seq_len=64, max_media=1),
        "video_pairs": DatasetConfig(
            path="shards/video_pairs", weight=0.03, seq_len=32, max_media=1, num_frames=8
        ),
    }


@dataclass
class ModelSection:
    """Which Flamingo to train: a preset built into `<output_dir>/preset`, a saved one, or explicit fields."""

    preset: str | None = "tiny"  # "tiny" | "bench" | "compact" | None (then `config` names lm and vision)
    pretrained: str | None = None  # a Flamingo.save_pretrained directory: continue from its weights
    tokenizer: str | None = None  # None: m3w's shipped tokenizer; must be the one the shards were made with
    family: str = "llama"  # LM architecture of the random-init presets (llama | gpt2 | qwen2 | gpt_neox)
    config: dict[str, Any] = field(default_factory=dict)  # FlamingoConfig field overrides


@dataclass
class OptimConfig:
    lr: float = 1e-4  # paper
    weight_decay: float = 0.1  # on matrices only; biases, norms, gates and 1-d params get none
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global L2 norm, once per optimizer step
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    warmup_steps: int = 5000  # paper: linear warmup over 5k steps
    min_lr_ratio: float = 0.0  # floor of the decay as a fraction of lr

    def __post_init__(self) -> None:
        coerce_numbers(self)
        self.betas = tuple(float(b) for b in self.betas)


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    steps: int = 1000  # optimizer steps
    seed: int = 0
    datasets: dict[str, DatasetConfig] = field(default_factory=paper_datasets)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    accumulation: str = "all"  # "all": a batch of every dataset per step (paper); "round_robin": ablation
    grad_accum: int = 1  # extra accumulation: repeat the per-step batches this many times
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    gradient_checkpointing: bool = False
    distributed: str = "ddp"  # under torchrun: "ddp" | "fsdp"
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3
    log_every: int = 10
    tensorboard: bool = True
    wandb_project: str | None = None  # log to W&B too, if wandb is installed

    def __post_init__(self) -> None:
        # from_dict builds nested dataclasses but not dicts of them; YAML gives plain dicts here.
        self.datasets = {
            name: ds if isinstance(ds, DatasetConfig) else from_dict(DatasetConfig, ds)
            for name, ds in self.datasets.items()
        }
        if isinstance(self.model, dict):
            self.model = from_dict(ModelSection, self.model)
        if isinstance(self.optim, dict):
            self.optim = from_dict(OptimConfig, self.optim)
        coerce_numbers(self)
        if not self.datasets:
            raise ValueError("TrainConfig: no datasets")
        if self.accumulation not in ("all", "round_robin"):
            raise ValueError(f"accumulation must be 'all' or 'round_robin', not {self.accumulation!r}")
        if self.optim.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule must be cosine|linear|constant, not {self.optim.schedule!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be 'ddp' or 'fsdp', not {self.distributed!r}")
        for name, ds in self.datasets.items():
            if not ds.path:
                raise ValueError(f"datasets.{name}.path is empty")


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML + overrides → TrainConfig. A YAML `datasets:` mapping replaces the paper's four streams."""
    return load_config(TrainConfig, path, overrides)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
