"""The unit manifest every stage resumes from: one object per unit (works on object storage), the latest
entry per unit wins, an unreadable entry never hides the others, and old `_manifest.jsonl` files still read."""

from __future__ import annotations

from m3w.pipeline.manifest import Manifest
from m3w.schemas import manifest as spec


def test_one_entry_per_unit_and_the_latest_wins(tmp_path):
    manifest = Manifest(tmp_path, "extract", config_hash="abc")
    manifest.done("unit-a", "a.parquet", {"documents": 3})
    manifest.failed("unit/c with spaces", "boom")
    manifest.done("unit-a", "a.parquet", {"documents": 4})  # a rerun: the last entry wins
    (tmp_path / spec.DIRNAME / "extract" / "torn.json").write_bytes(
        b'{"stage": "extract", "unit": "unit-b", "sta'
    )

    entries = Manifest(tmp_path, "extract").entries()
    assert set(entries) == {"unit-a", "unit/c with spaces"}
    assert (
        entries["unit-a"]["counts"] == {"documents": 4} and entries["unit/c with spaces"]["error"] == "boom"
    )
    assert manifest.done_units("abc") == {"unit-a"} and manifest.done_units("other") == set()
    assert manifest.totals() == {"documents": 4}
    assert sorted(p.name for p in (tmp_path / spec.DIRNAME / "extract").iterdir()) == sorted(
        [spec.entry_name("unit-a"), spec.entry_name("unit/c with spaces"), "torn.json"]
    )
    assert not (tmp_path / spec.LEGACY_FILENAME).exists()  # nothing is appended anywhere


def test_legacy_jsonl_is_read_and_new_entries_win(tmp_path):
    legacy = tmp_path / spec.LEGACY_FILENAME
    legacy.write_text(
        '{"stage": "filter", "unit": "u1", "status": "done", "counts": {"documents": 1}, "time": "2024-01-01"}\n'
        '{"stage": "filter", "unit": "u2", "status": "done", "counts": {"documents": 2}, "time": "2024-01-01"}\n'
        '{"stage": "filter", "unit": "u3", "sta'  # torn by a killed writer
    )
    manifest = Manifest(tmp_path, "filter")
    manifest.done("u2", None, {"documents": 5})
    assert manifest.totals() == {"documents": 6}
    assert Manifest.stages(tmp_path) == ["filter"]
