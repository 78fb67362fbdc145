"""`m3w filter` end to end on every webcorpus page (extracted once per session by `run_extract`).

Proves: the funnel adds up and every dropped document, paragraph and image is in excluded/ with its reason;
kept documents keep their nodes' order and node_index; filtering cuts the trafilatura boilerplate snippets and
keeps the main-text ones; a threshold change replays from the cache and equals a fresh run; bad input is a
counted decision; the CLI and `m3w stats` (table + PNG) work.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m3w.config import load_config
from m3w.pipeline.docs import document_text
from m3w.pipeline.filter import EXCLUDED_DIR, MEASURES, run_filter
from m3w.pipeline.filters import FilterConfig
from m3w.pipeline.filters.lang import identify
from m3w.pipeline.stats import format_funnel, funnel
from m3w.schemas.documents import (
    DOCUMENT_SCHEMA,
    EXCLUDED_SCHEMA,
    SCHEMA_VERSION,
    check_version,
    iter_documents,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def filtered(webcorpus_documents, tmp_path_factory, ray_address):
    out = tmp_path_factory.mktemp("filtered")
    summary = run_filter(webcorpus_documents, out, ray_address=ray_address)
    return out, summary


def read_rows(directory: Path) -> list[dict]:
    files = sorted(directory.glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_funnel_adds_up_and_every_drop_is_explained(filtered, webcorpus_documents):
    out, summary = filtered
    units = sorted(p.name for p in webcorpus_documents.glob("*.parquet"))
    assert summary["failed"] == 0 and summary["done"] == len(units), summary["failures"]
    assert sorted(p.name for p in out.glob("*.parquet")) == units
    assert sorted(p.name for p in (out / EXCLUDED_DIR).glob("*.parquet")) == units
    counts = summary["counts"]
    for measure in MEASURES:
        dropped = sum(v for k, v in counts.items() if k.startswith("drop.") and k.endswith(f".{measure}"))
        assert counts[f"in.{measure}"] - dropped == counts[f"out.{measure}"], measure
    assert 0 < counts["out.documents"] < counts["in.documents"]

    inputs = {d["doc_id"]: d for d in iter_documents(webcorpus_documents)}
    kept = {d["doc_id"]: d for d in iter_documents(out)}
    schema = pq.read_schema(next(out.glob("*.parquet")))
    assert schema.equals(DOCUMENT_SCHEMA)
    check_version(schema, SCHEMA_VERSION)
    excluded = read_rows(out / EXCLUDED_DIR)
    assert pq.read_schema(next((out / EXCLUDED_DIR).glob("*.parquet"))).equals(EXCLUDED_SCHEMA)
    doc_drops = Counter(e["doc_id"] for e in excluded if e["level"] == "document")
    # Every input document is either kept or dropped exactly once, with a reason.
    assert set(kept) | set(doc_drops) == set(inputs) and not set(kept) & set(doc_drops)
    assert max(doc_drops.values()) == 1
    assert all(e["filter"] and e["reason"] for e in excluded)
    # Excluded rows per filter and level match the manifest counts of that filter.
    by_filter = Counter((e["filter"], e["level"]) for e in excluded)
    for (name, level), n in by_filter.items():
        measure = {"document": "documents", "paragraph": "paragraphs", "image": "images"}[level]
        assert counts[f"drop.{name}.{measure}"] == n, (name, level)
    # Kept documents: the surviving nodes in their original order, node_index and content unchanged.
    for doc_id, doc in kept.items():
        original = {n["node_index"]: n for n in inputs[doc_id]["nodes"]}
        indexes = [n["node_index"] for n in doc["nodes"]]
        assert indexes == sorted(indexes)
        assert all(original[n["node_index"]] == n for n in doc["nodes"])
    # Every node missing from a kept document is in excluded/ with its node_index.
    node_drops = {(e["doc_id"], e["node_index"]) for e in excluded if e["level"] != "document"}
    for doc_id, doc in kept.items():
        kept_idx = {n["node_index"] for n in doc["nodes"]}
        for node in inputs[doc_id]["nodes"]:
            if node["node_index"] not in kept_idx and node["kind"] != "video":
                assert (doc_id, node["node_index"]) in node_drops


def _snippet_share(docs: dict[str, str], truth: dict[str, dict], key: str) -> tuple[int, int]:
    found = total = 0
    for url, text in docs.items():
        for snippet in truth[url][key]:
            total += 1
            found += snippet in text
    return found, total


def test_trafilatura_boilerplate_share_falls_and_main_text_stays(filtered, webcorpus_documents, webcorpus):
    out, summary = filtered
    with gzip.open(webcorpus / "groundtruth" / "trafilatura_eval.jsonl.gz", "rt", encoding="utf-8") as f:
        truth = {row["url"]: row for row in map(json.loads, f)}

    def texts(directory: Path) -> dict[str, str]:
        return {
            d["url"]: " ".join(document_text(d["nodes"]).split())
            for d in iter_documents(directory)
            if d["url"] in truth
        }

    before, after = texts(webcorpus_documents), texts(out)
    english = {u for u, t in before.items() if identify(t)[0] == "en"}  # the configured language
    groups = {
        "all pages, extracted": before,
        "kept pages, extracted": {u: t for u, t in before.items() if u in after},
        "kept pages, filtered": after,
        "English pages, extracted": {u: before[u] for u in english},
        "English kept, extracted": {u: before[u] for u in english if u in after},
        "English kept, filtered": {u: after[u] for u in english if u in after},
    }
    shares = {}
    print("\n" + format_funnel(funnel([out])))
    print(f"trafilatura pages: {len(before)} extracted ({len(english)} English), {len(after)} kept")
    for name, docs in groups.items():
        for key in ("with", "without"):
            found, total = _snippet_share(docs, truth, key)
            shares[(name, key)] = found / max(total, 1)
            print(
                f"  {key:>7} snippets present, {name:<25} ({len(docs):>3} pages): {shares[(name, key)]:.1%}"
            )
    assert len(after) > 20
    # On the pages it keeps, filtering removes boilerplate nodes and keeps the main text.
    for prefix in ("kept pages", "English kept"):
        assert shares[(f"{prefix}, filtered", "without")] < shares[(f"{prefix}, extracted", "without")]
    # In the configured language, at least 80% of the main-text snippets stay (other languages' paragraphs
    # fail the English stopword ratio by design).
    assert shares[("English kept, filtered", "with")] >= 0.8 * shares[("English kept, extracted", "with")]
    assert shares[("English kept, filtered", "with")] > 3 * shares[("English kept, filtered", "without")]


def _small_docs(
    webcorpus_documents: Path, dest: Path, prefixes=("cleaneval_dev", "commoncrawl__whirlwind")
) -> Path:
    dest.mkdir()
    for prefix in prefixes:
        src = next(webcorpus_documents.glob(f"{prefix}*.parquet"))
        shutil.copy2(src, dest / src.name)
    return dest


def _outputs(directory: Path) -> dict[str, list]:
    files = sorted(directory.glob("*.parquet")) + sorted((directory / EXCLUDED_DIR).glob("*.parquet"))
    return {str(f.relative_to(directory)): pq.read_table(f).to_pylist() for f in files}


def test_threshold_change_replays_from_cache_and_equals_a_fresh_run(
    tmp_path, webcorpus_documents, ray_address
):
    docs = _small_docs(webcorpus_documents, tmp_path / "docs")
    replay_out, fresh_out = tmp_path / "replay", tmp_path / "fresh"
    first = run_filter(docs, replay_out, FilterConfig(), ray_address=ray_address)
    assert first["signals_computed"] == 2 and not first["dedup_cached"]
    again = run_filter(docs, replay_out, FilterConfig(), ray_address=ray_address)
    assert (again["done"], again["skipped"]) == (0, 2)  # nothing changed: nothing recomputed

    changed = load_config(FilterConfig, None, ["paragraph.min_words=8", "document.min_words=50"])
    replay = run_filter(docs, replay_out, changed, ray_address=ray_address)
    assert (replay["signals_cached"], replay["signals_computed"], replay["dedup_cached"]) == (2, 0, True)
    assert replay["done"] == 2 and replay["config_hash"] != first["config_hash"]
    fresh = run_filter(docs, fresh_out, changed, ray_address=ray_address)
    assert fresh["signals_computed"] == 2
    assert _outputs(replay_out) == _outputs(fresh_out)
    assert replay["counts"] == fresh["counts"]
    assert replay["counts"]["out.paragraphs"] < first["counts"]["out.paragraphs"]

    # A job killed after one unit (the last unit's manifest entry never written, its output gone) redoes
    # only that unit.
    last_entry = sorted((fresh_out / "_manifest" / "filter").glob("*.json"))[-1]
    last_unit = json.loads(last_entry.read_text())["unit"]
    last_entry.unlink()
    (fresh_out / f"{last_unit}.parquet").unlink()
    resumed = run_filter(docs, fresh_out, changed, ray_address=ray_address)
    assert (resumed["done"], resumed["skipped"], resumed["failed"]) == (1, 1, 0)
    assert _outputs(fresh_out) == _outputs(replay_out) and resumed["counts"] == replay["counts"]

    # A dedup change recomputes the dedup decisions but still not the signals.
    dedup_change = load_config(FilterConfig, None, ["dedup.image_url_max_docs=1"])
    redo = run_filter(docs, replay_out, dedup_change, ray_address=ray_address)
    assert (redo["signals_computed"], redo["dedup_cached"]) == (0, False)


def test_bad_input_is_a_counted_decision(tmp_path, ray_address):
    english = "The committee met on Tuesday and agreed that the new library will open in the spring. " * 3
    docs = [
        {"doc_id": "empty", "url": "https://example.org/empty", "nodes": []},
        {
            "doc_id": "only-images",
            "url": "https://example.org/gallery",
            "nodes": [
                {"kind": "image", "node_index": i, "url": f"https://example.org/p{i}.jpg"} for i in range(3)
            ],
        },
        {
            "doc_id": "huge-paragraph",
            "url": "https://example.org/huge",
            "nodes": [
                {"kind": "text", "node_index": 0, "text": "word " * 2_100_000},  # ~10 MB
                {"kind": "image", "node_index": 1, "url": "https://example.org/a.jpg"},
            ],
        },
        {
            "doc_id": "mixed-scripts",
            "url": "https://example.org/mixed",
            "nodes": [
                {
                    "kind": "text",
                    "node_index": 0,
                    "text": english + " 東京都の図書館は春に開館します。 مكتبة جديدة",
                },
                {"kind": "text", "node_index": 1, "text": None},
                {"kind": "image", "node_index": 2, "url": None},
                {"kind": "image", "node_index": 3, "url": "data:image/png;base64,iVBORw0KGgo="},
                {
                    "kind": "image",
                    "node_index": 4,
                    "url": "https://example.org/library.jpg",
                    "width": 800,
                    "height": 600,
                },
            ],
        },
    ]
    src = tmp_path / "docs"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(docs, schema=DOCUMENT_SCHEMA), src / "bad.parquet")
    pq.write_table(pa.table({"doc_id": ["x"]}), src / "wrong_schema.parquet")
    (src / "garbage.parquet").write_bytes(b"not a parquet file")

    summary = run_filter(src, tmp_path / "out", ray_address=ray_address)
    assert set(summary["failures"]) == {"wrong_schema", "garbage"}
    assert "schema version mismatch" in summary["failures"]["wrong_schema"]
    counts = summary["counts"]
    assert counts["in.documents"] == 4
    assert counts["drop.paragraph.max_words.paragraphs"] == 1
    assert counts["drop.paragraph.max_words.words"] == 2_100_000
    excluded = {(e["doc_id"], e["level"]): e for e in read_rows(tmp_path / "out" / EXCLUDED_DIR)}
    assert excluded[("empty", "document")]["filter"] == "document.min_images"
    assert excluded[("only-images", "document")]["filter"] == "document.min_words"
    assert excluded[("huge-paragraph", "paragraph")]["reason"] == "words=2100000 > 1000"
    assert len(excluded[("huge-paragraph", "paragraph")]["content"]) <= 1000
    kept = {d["doc_id"]: d for d in iter_documents(tmp_path / "out")}
    assert counts["out.documents"] == len(kept)
    for doc in docs:  # each document kept, or dropped with a document-level reason
        assert (doc["doc_id"] in kept) != ((doc["doc_id"], "document") in excluded)


def test_cli_filter_and_stats_table_and_png(tmp_path, webcorpus_documents, ray_address):
    docs = _small_docs(webcorpus_documents, tmp_path / "docs", prefixes=("cleaneval_dev",))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "m3w"]
    run = subprocess.run(
        [
            *cmd,
            "filter",
            str(docs),
            "--out",
            str(out),
            "--config",
            str(ROOT / "m3w" / "configs" / "filters.yaml"),
            "--set",
            "paragraph.min_words=5",
            "--workers",
            "2",
            "--ray-address",
            ray_address,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "paragraph.min_words" in run.stdout and "output" in run.stdout
    png = tmp_path / "funnel.png"
    stats = subprocess.run(
        [*cmd, "stats", str(out), "--png", str(png)], capture_output=True, text=True, cwd=ROOT
    )
    assert stats.returncode == 0, stats.stderr[-3000:]
    rows = funnel([out])
    assert rows[0]["step"] == "input" and rows[-1]["step"] == "output"
    assert [r["documents"] for r in rows] == sorted((r["documents"] for r in rows), reverse=True)
    output_line = next(line for line in stats.stdout.splitlines() if line.split()[1:2] == ["output"])
    assert [int(v.replace(",", "")) for v in output_line.split()[2:]] == [rows[-1][m] for m in MEASURES]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    bad = subprocess.run(
        [*cmd, "filter", str(docs), "--out", str(out), "--set", "paragraph.nope=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "paragraph.nope: unknown key" in bad.stderr
    missing = subprocess.run([*cmd, "stats", str(docs / "..")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "no stage manifest" in missing.stderr


def test_dedup_on_every_webcorpus_page_equals_the_rules_in_plain_python(
    filtered, webcorpus_documents, tmp_path
):
    """Dedup alone on all webcorpus pages (a lower image-URL limit, so that more images go), reusing the cached
    signals of the `filtered` run, against the rules stated in plain Python (tests/test_dedup.py)."""
    from test_dedup import DEDUP_ONLY, dedup_rows, reference_dedup

    out = tmp_path / "out"
    shutil.copytree(filtered[0] / "_cache" / "signals", out / "_cache" / "signals")
    config = load_config(FilterConfig, None, [*DEDUP_ONLY, "dedup.image_url_max_docs=2"])
    summary = run_filter(webcorpus_documents, out, config)
    assert summary["signals_computed"] == 0 and summary["failed"] == 0
    expected = reference_dedup(webcorpus_documents, out / "_cache" / "signals", config.dedup)
    rules = Counter(r[3] for r in expected)
    assert rules["dedup.same_url"] and rules["dedup.exact_text"] and rules["dedup.same_image_set"]
    assert rules["dedup.image_url_frequency"] > 20 and rules["dedup.domain_paragraph"] > 20
    assert dedup_rows(out) == expected
