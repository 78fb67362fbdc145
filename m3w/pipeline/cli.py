"""The `m3w` command line: one group, one subcommand per stage.

Subcommands are imported only when run, so `m3w --help` is fast and a stage's heavy imports (torch, ray)
load only for the stage that needs them.
"""

from __future__ import annotations

import importlib
import os

import click

# name → ("module:attribute" of a click command or group, one-line help shown by `m3w --help`)
COMMANDS = {
    "extract": ("m3w.pipeline.extract:extract_cmd", "WARC files → documents/ (interleaved text and images)."),
    "docs": ("m3w.pipeline.docs:docs_group", "Look at documents: `m3w docs to-jsonl PATH`."),
    "filter": (
        "m3w.pipeline.filter:filter_cmd",
        "documents/ → filtered/ + excluded/ (quality filters, dedup).",
    ),
    "stats": ("m3w.pipeline.stats:stats_cmd", "Funnel table and chart from stage manifests."),
    "images": (
        "m3w.pipeline.images:images_cmd",
        "Fetch, validate and resize images into the content-addressed store.",
    ),
    "tokenizer": ("m3w.pipeline.tokenizer_cli:tokenizer_group", "Train the default tokenizer."),
    "shards": (
        "m3w.pipeline.shards:shards_group",
        "filtered/ + images/ → WebDataset shards (M3W windows, pairs, video).",
    ),
    "interop": (
        "m3w.pipeline.interop:interop_group",
        "Import OBELICS/MMC4 documents; export to Hugging Face datasets.",
    ),
    "inspect": (
        "m3w.pipeline.inspect:inspect_cmd",
        "Render shards or documents as a self-contained HTML page.",
    ),
    "build": ("m3w.pipeline.build:build_cmd", "Run every stage in order from one YAML config."),
    "model": ("m3w.model.cli:model_group", "Model utilities: `m3w model info`."),
    "train": ("m3w.trainer.cli:train_cmd", "Train the Flamingo model on mixed shard streams."),
    "eval": ("m3w.trainer.evaluate:eval_cmd", "Few-shot evaluation: captioning, VQA, classification."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[cmd_name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """m3w: build M3W-style interleaved image-text corpora and train Flamingo-style models on them."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    main()
