"""`m3w train CONFIG.yaml [--set key=value ...] [--resume]`; under torchrun, every rank runs the same command."""

from __future__ import annotations

import click


@click.command("train", context_settings={"show_default": True})
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config field, e.g. optim.lr=3e-4.",
)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output_dir (exactly).")
def train_cmd(config: str, overrides: tuple[str, ...], resume: bool) -> None:
    """Train the Flamingo model on mixed shard streams (one batch of every dataset per optimizer step).

    Multi-process: `torchrun --nproc_per_node N -m m3w.trainer.cli CONFIG.yaml` (DDP; `--set distributed=fsdp`).
    """
    from m3w.trainer.config import load_train_config
    from m3w.trainer.train import train

    train(load_train_config(config, list(overrides)), resume=resume)


if __name__ == "__main__":
    train_cmd()
