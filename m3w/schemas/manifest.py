"""The stage manifest, and the lease that keeps two writers off one image store.

Manifest: in every stage output directory (local or object storage), one small JSON object per unit, holding
that unit's latest entry. Object storage cannot append, so there is no shared log: a unit's entry is written
in one PUT (a rename locally) after its output is complete, which is what commits the unit, and a re-run of
the unit overwrites it. Readers list the folder and skip an entry they cannot parse.

    <out>/_manifest/<stage>/<unit file name>.json

    {"schema": "m3w.manifest/2", "stage": "extract", "unit": "<input id>", "status": "done" | "failed",
     "output": <relative output path, a JSON description of the unit's outputs, or null>,
     "counts": {"<name>": int, ...}, "error": "<str or null>", "config_hash": "<hex>", "time": "<ISO 8601 UTC>"}

`counts` holds every counter a unit produced, including drops as `skip.<reason>` / `drop.<filter>`.

The manifest of earlier versions, `<out>/_manifest.jsonl` (append-only lines, the last line for a unit wins, a
torn line ignored), is still read; an entry under `_manifest/` wins over it.

Lease (`<dir>/_lease.json`): {"schema", "owner": uuid, "host", "pid", "expires": unix seconds, "command"}. A
writer takes it by creating the object (O_EXCL locally, If-None-Match on object storage), renews it while it
runs and deletes it when done. An expired lease, or one whose process is gone on this host, may be taken over.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

SCHEMA_VERSION = "m3w.manifest/2"
DIRNAME = "_manifest"
LEGACY_FILENAME = "_manifest.jsonl"
STATUS_DONE = "done"
STATUS_FAILED = "failed"

LEASE_SCHEMA_VERSION = "m3w.lease/1"
LEASE_FILENAME = "_lease.json"


def entry_name(unit: str) -> str:
    """The object name of a unit's entry: the unit id, quoted, or a hash when that would be too long."""
    name = quote(unit, safe="-_.@=+")
    if len(name) > 180:
        name = f"{name[:100]}~{hashlib.sha256(unit.encode()).hexdigest()[:24]}"
    return f"{name}.json"
