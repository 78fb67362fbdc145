"""Unit bookkeeping for every stage: which inputs are done (with counts), which failed (with the error)."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from m3w.schemas import manifest as spec


class Manifest:
    """Append-only `_manifest.jsonl` in a stage output directory. The last line for a unit wins."""

    def __init__(self, out_dir: str | Path, stage: str, config_hash: str = "") -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / spec.FILENAME
        self.stage = stage
        self.config_hash = config_hash

    def entries(self) -> dict[str, dict[str, Any]]:
        """The latest entry per unit. A torn last line from a killed writer is ignored."""
        latest: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return latest
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry.get("stage") == self.stage:
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
        output: str | None = None,
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
        line = json.dumps(entry, sort_keys=True) + "\n"
        # One write + fsync per line: a crash leaves at most one torn line, which entries() skips. A torn line has
        # no newline, so start on a fresh line or the torn bytes would swallow this entry too.
        with open(self.path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def done(self, unit: str, output: str | None, counts: dict[str, int]) -> None:
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
