"""The unit manifest every stage resumes from: the last entry per unit wins, and a torn line never loses one."""

from __future__ import annotations

from m3w.pipeline.manifest import Manifest


def test_torn_last_line_from_a_killed_writer_loses_no_later_entry(tmp_path):
    manifest = Manifest(tmp_path, "extract", config_hash="abc")
    manifest.done("unit-a", "a.parquet", {"documents": 3})
    with open(manifest.path, "ab") as f:  # a writer killed mid-line: no newline at the end
        f.write(b'{"stage": "extract", "unit": "unit-b", "sta')
    manifest.failed("unit-c", "boom")
    manifest.done("unit-a", "a.parquet", {"documents": 4})  # a rerun: the last entry wins

    entries = Manifest(tmp_path, "extract").entries()
    assert set(entries) == {"unit-a", "unit-c"}
    assert entries["unit-a"]["counts"] == {"documents": 4} and entries["unit-c"]["error"] == "boom"
    assert manifest.done_units("abc") == {"unit-a"} and manifest.done_units("other") == set()
    assert manifest.totals() == {"documents": 4}
