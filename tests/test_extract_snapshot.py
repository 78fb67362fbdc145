"""Extraction's output on real pages is pinned: every document of three webcorpus WARCs (CleanEval, postlight,
a Common Crawl sample from dolma's tests) is compared, by a digest of its row, with `data/extract_snapshot.json`.

Speed work on the walk and the main-content choice must leave every document as it was; a change that is meant to
alter documents (a quality fix) regenerates the snapshot, and its diff says how many documents moved:

    M3W_UPDATE_SNAPSHOT=1 .venv/bin/python -m pytest -q tests/test_extract_snapshot.py
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from m3w.pipeline.extract import ExtractConfig, iter_warc_documents

SNAPSHOT = Path(__file__).parent / "data" / "extract_snapshot.json"
WARCS = ("cleaneval_dev", "postlight_parser", "allenai__dolma__tests__data__warc__sample-0000")
PATH_FIELDS = ("doc_id", "warc_path")  # depend on where the WARC lies, not on extraction


def digests(warc: Path) -> dict[str, object]:
    """{record id: digest of its document row}, and the skip counts, of one WARC."""
    counts: Counter = Counter()
    docs = {}
    for row in iter_warc_documents(str(warc), ExtractConfig(), counts):
        content = {k: v for k, v in row.items() if k not in PATH_FIELDS}
        digest = hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()
        docs[row["warc_record_id"]] = digest[:16]
    return {"skips": {k: v for k, v in sorted(counts.items()) if k.startswith("skip.")}, "documents": docs}


def test_documents_of_webcorpus_warcs_are_unchanged(webcorpus):
    now = {name: digests(webcorpus / "warc" / f"{name}.warc.gz") for name in WARCS}
    if os.environ.get("M3W_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    pinned = json.loads(SNAPSHOT.read_text())
    for name in WARCS:
        before, after = pinned[name]["documents"], now[name]["documents"]
        changed = sorted(r for r in before.keys() | after.keys() if before.get(r) != after.get(r))
        assert not changed, f"{name}: {len(changed)} of {len(before)} documents changed, e.g. {changed[:3]}"
        assert now[name]["skips"] == pinned[name]["skips"], name
