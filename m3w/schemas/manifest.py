"""The stage manifest: `_manifest.jsonl` in every stage output directory.

Append-only JSON lines, one per event on a unit (one input file → one output file). The last line for a unit
wins. A torn final line (a killed writer) is ignored. Each line:

    {"schema": "m3w.manifest/1", "stage": "extract", "unit": "<input id>", "status": "done" | "failed",
     "output": "<relative output path or null>", "counts": {"<name>": int, ...}, "error": "<str or null>",
     "config_hash": "<hex>", "time": "<ISO 8601 UTC>"}

`counts` holds every counter a unit produced, including drops as `skip.<reason>` / `drop.<filter>`.
"""

from __future__ import annotations

SCHEMA_VERSION = "m3w.manifest/1"
FILENAME = "_manifest.jsonl"
STATUS_DONE = "done"
STATUS_FAILED = "failed"
