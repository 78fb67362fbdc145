"""`m3w train CONFIG.yaml [--set key=value ...] [--resume]`; under torchrun, every rank runs the same command."""

from __future__ import annotations

import sys

import click

from m3w.cli import stage_options
from m3w.trainer.config import TrainConfig


@click.command("train", context_settings={"show_default": True})
@stage_options(
    TrainConfig, config_argument=True, ray=False, set_help="Override one config value, e.g. optim.lr=3e-4."
)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output_dir (exactly).")
def train_cmd(config: TrainConfig, resume: bool) -> None:
    """Train the Flamingo model on mixed shard streams (one batch of every dataset per optimizer step).

    Multi-process: `torchrun --nproc_per_node N -m m3w.trainer.cli CONFIG.yaml` (DDP; `--set distributed=fsdp`).
    """
    from m3w.trainer.train import train

    train(config, resume=resume)


if __name__ == "__main__":
    from m3w.cli import main

    main(["train", *sys.argv[1:]])
