"""Atomic writes: output files get the umask's mode (as `open()` gives, not mkstemp's 0600), and a resumed run
removes the `.tmp-*` files a killed run left behind."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import Route

from m3w.pipeline.images import ImagesConfig, run_images
from m3w.pipeline.io import atomic_open, current_umask, remove_temp_files, write_parquet_atomic
from m3w.pipeline.tario import ShardWriter


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_outputs_follow_the_umask(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        assert current_umask() == mask
        with atomic_open(tmp_path / "a.json", "w") as f:
            f.write("{}")
        write_parquet_atomic(pa.table({"x": [1]}), tmp_path / "t.parquet")
        with ShardWriter(tmp_path / "shards", "s", max_samples=10) as writer:
            writer.write("k0", {"json": b"{}"})
        with open(tmp_path / "plain.txt", "w") as f:  # what open() gives: the reference
            f.write("x")
    want = mode(tmp_path / "plain.txt")
    assert want == 0o666 & ~mask
    assert {p.name: mode(p) for p in tmp_path.rglob("*") if p.is_file()} == {
        "a.json": want,
        "t.parquet": want,
        "s-000000.tar": want,
        "plain.txt": want,
    }


def test_remove_temp_files_takes_only_temp_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    left = [tmp_path / ".tmp-x.parquet.abc", tmp_path / "a" / "b" / ".tmp-blob.jpg.1"]
    kept = [tmp_path / "x.parquet", tmp_path / "a" / "tmp-not-ours", tmp_path / "a" / "b" / "y.jpg"]
    for path in left + kept:
        path.write_bytes(b"x")
    assert remove_temp_files(tmp_path) == 2
    assert [p for p in left if p.exists()] == [] and all(p.exists() for p in kept)


def test_images_store_files_are_readable_and_leftovers_go(
    serve_routes, ray_address, webcorpus, tmp_path
) -> None:
    """A real run through Ray: rows, blob shard and index files get the umask's mode (the Ray workers inherit
    this process's umask); the `.tmp-*` files of an earlier killed run are removed when the run starts."""
    photos = sorted((webcorpus / "photos").glob("*.jpg"))[:3]
    base, _ = serve_routes({f"/{p.name}": Route(p.read_bytes()) for p in photos})
    store = tmp_path / "store"
    leftovers = [
        store / "rows" / "g000001" / ".tmp-u000000.parquet.x1",
        store / "blobs" / "g000001" / ".tmp-u000000.tar.x2",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{base}/{p.name}\n" for p in photos))
    summary = run_images(
        [urls], store, ImagesConfig(), ray_address=ray_address, allow_hosts=[base.removeprefix("http://")]
    )
    assert summary.statuses.get("ok") == 3 and summary.units_failed == 0, summary
    assert not any(p.exists() for p in leftovers)
    written = [
        p for p in store.rglob("*") if p.is_file() and p.suffix in (".parquet", ".tar", ".idx", ".json")
    ]
    assert len(written) >= 4 and {mode(p) for p in written} == {0o666 & ~current_umask()}
    assert {p.suffix for p in written} >= {".parquet", ".tar", ".idx", ".json"}
