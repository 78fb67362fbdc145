"""The `m3w` command line: one group, one subcommand per stage.

Subcommands are imported only when run, so `m3w --help` is fast and a stage's heavy imports (torch, ray)
load only for the stage that needs them.
"""

from __future__ import annotations

import importlib
import os

import click

# name → "module:attribute" of a click command or group
COMMANDS = {
    "extract": "pipeline.extract:extract_cmd",
    "docs": "pipeline.docs:docs_group",
    "filter": "pipeline.filter:filter_cmd",
    "stats": "pipeline.stats:stats_cmd",
    "images": "pipeline.images:images_cmd",
    "tokenizer": "pipeline.tokenizer:tokenizer_group",
    "shards": "pipeline.shards:shards_group",
    "interop": "pipeline.interop:interop_group",
    "inspect": "pipeline.inspect:inspect_cmd",
    "build": "pipeline.build:build_cmd",
    "model": "model.cli:model_group",
    "train": "trainer.cli:train_cmd",
    "eval": "trainer.evaluate:eval_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """m3w: build M3W-style interleaved image-text corpora and train Flamingo-style models on them."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    main()
