"""Training configuration: dataclasses with Flamingo paper defaults, loadable from YAML with `--set` overrides.

    m3w train m3w/configs/train_tiny.yaml --set optim.lr=3e-4 --set datasets.m3w.batch_size=8

Datasets are keyed by name (not a list) so that one override can reach any field of any stream; a YAML
`datasets:` mapping replaces the paper's four streams. Loaded by m3w.config.load_config like every config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from m3w.config import check_fields
from m3w.errors import UserError
from m3w.model.config import FlamingoConfig, Precision


@dataclass
class DatasetConfig:
    """One weighted stream of WebDataset shards (a directory or URL holding `shards.json` and the tars). Its
    samples' length L, media count N and frames T are what `m3w shards` cut them to, from shards.json: set one
    here only to check it (a different value is an error, not a silent re-cut)."""

    path: str = ""  # shard directory or fsspec URL prefix; shards.json inside names the tars
    weight: float = 1.0  # λ_m in Σ_m λ_m · NLL_m
    batch_size: int = 4  # per process, per micro-batch
    seq_len: int | None = None  # L, tokens per sample; null: the shards' (a value must equal it)
    max_media: int | None = None  # N, media items per sample; null: the shards'
    num_frames: int | None = None  # T, frames per media item (8 for video); null: the shards'
    resampled: bool = True  # shards drawn with replacement (infinite stream) vs. epochs over a permutation
    shard_shuffle: bool = True
    shuffle_buffer: int = 1000  # samples; 0 disables sample shuffling
    num_workers: int = 2  # DataLoader worker processes (decoding happens there)
    prefetch_factor: int = 4


def paper_datasets() -> dict[str, DatasetConfig]:
    """The four Flamingo training mixtures with the paper's loss weights (Sec. 3); their sequence lengths (App. A)
    are the shards' (m3w.pipeline.shards.ShardsConfig)."""
    return {
        "m3w": DatasetConfig(path="shards/m3w", weight=1.0),
        "alt_pairs": DatasetConfig(path="shards/alt_pairs", weight=0.2),
        "caption_pairs": DatasetConfig(path="shards/caption_pairs", weight=0.2),
        "video_pairs": DatasetConfig(path="shards/video_pairs", weight=0.03),
    }


@dataclass
class ModelSection:
    """Which Flamingo to train: a preset built into `<output_dir>/preset`, a saved one, or explicit fields."""

    preset: str | None = "tiny"  # "tiny" | "bench" | "compact" | None (then `config` names lm and vision)
    pretrained: str | None = None  # a Flamingo.save_pretrained directory: continue from its weights
    tokenizer: str | None = None  # None: m3w's shipped tokenizer; must be the one the shards were made with
    family: str = "llama"  # LM architecture of the random-init presets (llama | gpt2 | qwen2 | gpt_neox)
    config: dict[str, Any] = field(default_factory=dict)  # FlamingoConfig field overrides

    def __post_init__(self) -> None:
        check_fields(
            FlamingoConfig, self.config, "model.config"
        )  # a typo fails on load, not after the preset


@dataclass
class OptimConfig:
    lr: float = 1e-4  # paper
    weight_decay: float = 0.1  # on matrices only; biases, norms, gates and 1-d params get none
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global L2 norm, once per optimizer step
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup
    warmup_steps: int = 5000  # paper: linear warmup over 5k steps
    min_lr_ratio: float = 0.0  # floor of the decay as a fraction of lr
    gate_lr: float | None = None  # the tanh gates' own lr (they start closed at 0); null: lr, as the paper


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    steps: int = 1000  # optimizer steps
    seed: int = 0
    datasets: dict[str, DatasetConfig] = field(default_factory=paper_datasets)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    accumulation: Literal["all", "round_robin"] = "all"  # all: a batch of every dataset per step (paper)
    grad_accum: int = 1  # extra accumulation: repeat the per-step batches this many times
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun
    checkpoint_every: int = 1000  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3
    log_every: int = 10
    tensorboard: bool = True
    tensorboard_dir: str | None = None  # TensorBoard's --logdir; None: <output_dir>/tensorboard
    run_name: str | None = None  # this run's own folder under tensorboard_dir; None: output_dir's name
    wandb_project: str | None = None  # log to W&B too, if wandb is installed

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("no datasets")
        for name, ds in self.datasets.items():
            if not ds.path:
                raise ValueError(f"datasets.{name}.path is empty")


def tensorboard_run_dir(cfg: TrainConfig) -> Path:
    """Where this run's TensorBoard events go: a folder named after the run, so runs sharing one --logdir show
    as separate runs (and `m3w eval --tensorboard` can add its scores next to the curves)."""
    from m3w.pipeline.io import is_remote, name_of

    root = cfg.tensorboard_dir or (
        None if is_remote(cfg.output_dir) else str(Path(cfg.output_dir) / "tensorboard")
    )
    if root is None or is_remote(root):
        raise UserError(f"TensorBoard writes to a local folder, not {root or cfg.output_dir}: set tensorboard_dir "
                        "to one, or tensorboard=false")  # fmt: skip
    name = name_of(cfg.output_dir) if is_remote(cfg.output_dir) else Path(cfg.output_dir).resolve().name
    return Path(root) / (cfg.run_name or name)
