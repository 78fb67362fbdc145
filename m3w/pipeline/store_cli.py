"""`m3w store info|compact|vacuum|migrate`: the command line that looks after an image store
(`pipeline.imagestore`, `pipeline.compaction`)."""

from __future__ import annotations

from collections import Counter

import click

from m3w.cli import ray_options
from m3w.pipeline import io
from m3w.pipeline.compaction import compact_store
from m3w.pipeline.imagestore import (
    ImageStore,
    NoStoreError,
    migrate_legacy,
    migrate_unmovable,
    readable_generations,
    vacuum,
)
from m3w.pipeline.lease import Lease
from m3w.schemas import images as spec
from m3w.schemas.images import LegacyStoreError


@click.group("store")
def store_group() -> None:
    """Look after an image store: `info`, `compact` (each image stored once), `vacuum` (superseded files),
    `migrate` (from an old layout)."""


@store_group.command("info")
@click.argument("store")
def info_cmd(store: str) -> None:
    """Generation, URLs and files of the image store STORE (a folder or a URL)."""
    image_store = ImageStore(store)
    try:
        state = image_store.state()
    except (NoStoreError, LegacyStoreError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    files = image_store.files()
    kinds = Counter(f.split("/", 1)[0] if "/" in f else "top" for f in files)
    click.echo(f"{image_store.root}: generation {state.generation}, {state.buckets} buckets, "
               f"{sum(state.index_rows)} URLs, {len(files)} files ({dict(sorted(kinds.items()))}), "
               f"compactions {state.compactions}, {len(state.superseded_paths())} superseded files and folders kept "
               f"for readers of generations from {readable_generations(image_store)[0]} on")  # fmt: skip


@store_group.command("migrate")
@click.argument("store")
@click.option("--buckets", type=int, default=spec.DEFAULT_BUCKETS, show_default=True, help="Index buckets.")
def migrate_cmd(store: str, buckets: int) -> None:
    """Convert the image store STORE from an earlier layout: one file per image (to blob shards and --buckets
    buckets), or index records without a blob shard of their own."""
    try:
        store_file = ImageStore(store).url(spec.STORE_FILE)
        if io.exists(store_file) and io.read_json(store_file).get("schema") == spec.UNMOVABLE_SCHEMA_VERSION:
            counts = migrate_unmovable(store)
        else:
            counts = migrate_legacy(store, buckets)
    except (NoStoreError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"migrated {counts.get('urls', 0)} URLs, {counts.get('images', 0)} images "
               f"({counts.get('missing_blob', 0)} blobs missing) → {ImageStore(store).root}")  # fmt: skip


@store_group.command("vacuum")
@click.argument("store")
@click.option("--older-than", type=click.IntRange(min=0), default=spec.RETAIN_GENERATIONS, show_default=True,
              help="Remove files superseded at least this many generations ago (0: every superseded file, which "
                   "fails any reader of an earlier generation).")  # fmt: skip
def vacuum_cmd(store: str, older_than: int) -> None:
    """Remove the files of STORE that no recent generation points at (index files rewritten, blob shards moved
    by `m3w store compact`). Writers vacuum after each commit; this does it now, with another retention."""
    image_store = ImageStore(store)
    image_store.state()  # no store, or an old layout: one clear error, and nothing written
    with Lease(image_store.root):
        counts = vacuum(image_store, older_than)
    click.echo(f"{image_store.root}: {counts['paths']:,} superseded files and folders and {counts['snapshots']:,} "
               f"generation snapshots removed; generations from {counts['oldest_readable_generation']} on are "
               "readable")  # fmt: skip


@store_group.command("compact")
@click.argument("store")
@ray_options
def compact_cmd(store: str, workers: int | None, ray_address: str | None) -> None:
    """Store each image of STORE once: the images in the fetch units' blob shards move, one copy per sha256,
    into compaction shards (identical bytes that several units fetched are kept once), as a new generation."""
    counts = compact_store(store, workers=workers, ray_address=ray_address)
    click.echo(f"{ImageStore(store).root}: {counts.get('copied_images', 0):,} images moved into compaction shards, "
               f"{counts.get('duplicate_copies', 0):,} duplicate copies dropped ({counts.get('duplicate_bytes', 0):,} "
               f"bytes); blob shards {counts['bytes_before']:,} → {counts['bytes_after']:,} bytes, "
               f"{counts['bytes_saved']:,} bytes saved")  # fmt: skip
