"""`m3w shards m3w|pairs|video`: the command line of the shard stage."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from m3w.cli import OutputDir, stage_options
from m3w.pipeline.shards.config import ShardsConfig


def _shards_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--out, --tokenizer and the shared stage options; the command receives `config` with the tokenizer set."""

    @functools.wraps(fn)
    def wrapper(*args: Any, config: ShardsConfig, tokenizer: str | None, **kwargs: Any) -> Any:
        if tokenizer:
            config.tokenizer = tokenizer
        return fn(*args, config=config, **kwargs)

    wrapper = stage_options(ShardsConfig, set_help="Override one config value, e.g. windows.seq_len=512.")(
        wrapper
    )
    wrapper = click.option("--tokenizer", default=None, help="Hugging Face tokenizer name or path.")(wrapper)
    return click.option(
        "--out",
        required=True,
        type=OutputDir(),
        help="Output root (one folder per dataset; a path or a URL).",
    )(wrapper)


def _report(*results: dict) -> None:
    """One line per dataset; failed units are listed and make the exit status 1 (their shards are left out;
    a re-run retries them)."""
    failed = {}
    for result in results:
        totals = result["totals"]
        click.echo(
            f"{result['dataset']}: {totals['samples']} samples, {totals['tokens']} tokens, {totals['images']} "
            f"media files in {totals['shards']} shards ({totals['bytes'] / 1e6:.1f} MB)"
        )
        failed.update(result["unit_failures"])
    for unit, error in failed.items():
        click.echo(f"failed unit {unit}: {error.splitlines()[0]}", err=True)
    if failed:
        raise SystemExit(1)


@click.group("shards")
def shards_group() -> None:
    """Make WebDataset shards: M3W windows, image-text pairs, video-text pairs."""


@shards_group.command("m3w")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--images", "store", required=True, help="Image store (a folder or a URL).")
@click.option("--name", default="m3w", show_default=True, help="Shard file name prefix.")
@click.option("--store-generation", type=click.IntRange(min=0), default=None,
              help="Read this generation of the image store (default: the current one; an earlier one until it "
                   "is vacuumed, `m3w store info`).")  # fmt: skip
@_shards_options
def m3w_cmd(inputs, store, name, store_generation, config, workers, ray_address, out) -> None:
    """Filtered documents (INPUTS: parquet files or folders, local or URLs) → M3W window shards in OUT/m3w/."""
    from m3w.pipeline.shards.interleaved import run_m3w_shards

    _report(run_m3w_shards(inputs, store, out, config, name=name, store_generation=store_generation,
                           workers=workers, ray_address=ray_address))  # fmt: skip


@shards_group.command("pairs")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--images", "store", required=True, help="Image store (a folder or a URL).")
@click.option("--store-generation", type=click.IntRange(min=0), default=None,
              help="Read this generation of the image store (default: the current one; an earlier one until it "
                   "is vacuumed, `m3w store info`).")  # fmt: skip
@_shards_options
def pairs_cmd(inputs, store, store_generation, config, workers, ray_address, out) -> None:
    """Filtered documents → alt-text pairs (OUT/alt_pairs/) and caption pairs (OUT/caption_pairs/)."""
    from m3w.pipeline.shards.pairs import run_pair_shards

    results = run_pair_shards(inputs, store, out, config, store_generation=store_generation, workers=workers,
                              ray_address=ray_address)  # fmt: skip
    _report(*results.values())


@shards_group.command("video")
@click.argument("table")
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="IP[:PORT]|CIDR[:PORT]",
    help="Admit video URLs on this private address (repeatable), e.g. 127.0.0.1:8000.",
)
@_shards_options
def video_cmd(table, allow_hosts, config, workers, ray_address, out) -> None:
    """A CSV/JSONL table of (video URL or path, caption) → video-text pair shards in OUT/video_pairs/."""
    from m3w.pipeline.shards.video import run_video_shards

    result = run_video_shards(
        table, out, config, allow_hosts=allow_hosts, workers=workers, ray_address=ray_address
    )
    _report(result)
