"""Unit bookkeeping for every stage: which inputs are done (with counts), which failed (with the error).

Format in `schemas/manifest.py`: one small object per unit under `<out>/_manifest/<stage>/`, so that it works on
object storage (no append, no rename, no lock) as on a local disk.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from m3w.pipeline import io
from m3w.schemas import manifest as spec


class Manifest:
    """The entries of one stage in an output directory (a local path or a URL). The latest entry per unit wins."""

    def __init__(self, out_dir: str | Path, stage: str, config_hash: str = "") -> None:
        self.dir = str(out_dir)
        self.stage = stage
        self.config_hash = config_hash
        self.entries_dir = io.join(self.dir, spec.DIRNAME, stage)
        io.makedirs(self.dir)

    @staticmethod
    def stages(out_dir: str | Path) -> list[str]:
        """Stages with entries in `out_dir`, ordered by their first entry's time."""
        first: dict[str, str] = {}
        for entry in _legacy_entries(str(out_dir)):
            first.setdefault(entry.get("stage", ""), entry.get("time", ""))
        for stage in io.list_dir(io.join(str(out_dir), spec.DIRNAME), dirs=True):
            times = [e.get("time", "") for e in Manifest(out_dir, stage).entries().values()]
            if times:
                first[stage] = min([first.get(stage, min(times)), *times])
        return sorted((s for s in first if s), key=lambda s: (first[s], s))

    def entries(self) -> dict[str, dict[str, Any]]:
        """The latest entry per unit. An entry that cannot be read (a torn legacy line) is skipped."""
        latest = {e["unit"]: e for e in _legacy_entries(self.dir) if e.get("stage") == self.stage}
        names = [n for n in io.list_dir(self.entries_dir) if n.endswith(".json")]
        urls = [io.join(self.entries_dir, n) for n in names]
        with ThreadPoolExecutor(16 if urls and io.is_remote(urls[0]) else 1) as pool:
            for data in pool.map(_read_or_none, urls):
                try:
                    entry = json.loads(data) if data is not None else None
                except (UnicodeDecodeError, json.JSONDecodeError):
                    entry = None
                if isinstance(entry, dict) and entry.get("stage") == self.stage and "unit" in entry:
                    latest[entry["unit"]] = entry
        return latest

    def done_units(self, config_hash: str | None = None) -> set[str]:
        """Units finished successfully (under `config_hash`, when given)."""
        return {
            unit
            for unit, e in self.entries().items()
            if e["status"] == spec.STATUS_DONE
            and (config_hash is None or e.get("config_hash") == config_hash)
        }

    def record(
        self,
        unit: str,
        status: str,
        output: Any = None,
        counts: dict[str, int] | None = None,
        error: str | None = None,
    ) -> None:
        entry = {
            "schema": spec.SCHEMA_VERSION,
            "stage": self.stage,
            "unit": unit,
            "status": status,
            "output": output,
            "counts": dict(counts or {}),
            "error": error,
            "config_hash": self.config_hash,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        io.write_json(io.join(self.entries_dir, spec.entry_name(unit)), entry)

    def done(self, unit: str, output: Any, counts: dict[str, int]) -> None:
        self.record(unit, spec.STATUS_DONE, output=output, counts=counts)

    def failed(self, unit: str, error: str) -> None:
        self.record(unit, spec.STATUS_FAILED, error=error)

    def totals(self) -> Counter:
        """Counts summed over the done units."""
        total: Counter = Counter()
        for e in self.entries().values():
            if e["status"] == spec.STATUS_DONE:
                total.update(e["counts"])
        return total


def _read_or_none(url: str) -> bytes | None:
    try:
        return io.read_bytes(url)
    except FileNotFoundError:  # removed between listing and reading
        return None


def _legacy_entries(out_dir: str) -> list[dict[str, Any]]:
    """Lines of a `_manifest.jsonl` written by earlier versions, in order; torn lines skipped."""
    path = io.join(out_dir, spec.LEGACY_FILENAME)
    if not io.exists(path):
        return []
    entries = []
    for line in io.read_text(path).splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "unit" in entry:
            entries.append(entry)
    return entries
