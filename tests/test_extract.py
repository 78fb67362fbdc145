"""`m3w extract` end to end: every webcorpus WARC through a loopback Common Crawl-like server on a real Ray,
quality floors on the trafilatura ground truth, kill-and-resume, input resolution, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from m3w.pipeline.docs import to_jsonl_record
from m3w.pipeline.extract import ExtractConfig, iter_warc_documents, run_extract, unit_id
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.warc import resolve_inputs
from m3w.schemas.documents import METADATA_KEY, SCHEMA_VERSION, iter_documents

ROOT = Path(__file__).resolve().parents[1]
WEBCORPUS_PAGES = 1329  # HTML responses (any status) in webcorpus/warc/*.warc.gz
PAGE_SKIPS = ("skip.http_status", "skip.empty", "skip.too_large", "skip.undecodable", "skip.nesting")


def m3w(*args: str) -> list[str]:
    return [sys.executable, "-m", "m3w", *args]


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def crawl_args(cc_crawl, out: Path, ray_address: str) -> list[str]:
    base_url, crawl_id, _ = cc_crawl
    return m3w(
        "extract", "--crawl", crawl_id, "--cc-base-url", base_url, "--out", str(out), "--workers", "2",
        "--ray-address", ray_address,
    )  # fmt: skip


@pytest.fixture(scope="module")
def crawl_out(tmp_path_factory, cc_crawl, ray_address) -> Path:
    """All webcorpus WARCs extracted over HTTP by the CLI, joined to the test session's Ray."""
    out = tmp_path_factory.mktemp("documents")
    proc = subprocess.run(
        crawl_args(cc_crawl, out, ray_address), env=cli_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "documents/s" in proc.stderr  # the progress bar shows a page rate
    return out


def test_all_webcorpus_pages_over_http_with_counts(crawl_out, cc_crawl):
    _, _, n_warcs = cc_crawl
    manifest = Manifest(crawl_out, "extract")
    entries = manifest.entries()
    assert len(entries) == n_warcs and all(e["status"] == "done" for e in entries.values())
    totals = manifest.totals()
    print("\nextract totals:", dict(sorted(totals.items())))
    assert totals["html"] == WEBCORPUS_PAGES
    assert totals["documents"] + sum(totals[k] for k in PAGE_SKIPS) == WEBCORPUS_PAGES
    assert totals["skip.http_status"] == 13  # the 301/302 HTML responses of the old crawls
    assert totals["documents"] >= 1290
    assert totals["skip.not_html"] > 100  # CSS, JS and images of the full-site crawls
    assert totals["text_nodes"] > 20 * totals["documents"] and totals["image_nodes"] > 2000

    files = sorted(crawl_out.glob("*.parquet"))
    assert len(files) == n_warcs
    seen: set[str] = set()
    n_docs = 0
    for file in files:
        assert pq.read_schema(file).metadata[METADATA_KEY].decode() == SCHEMA_VERSION
        for doc in iter_documents(file):
            n_docs += 1
            assert doc["doc_id"] not in seen
            seen.add(doc["doc_id"])
            assert doc["warc_path"].startswith("http://127.0.0.1:") and doc["warc_record_id"].startswith(
                "<urn:"
            )
            assert [n["node_index"] for n in doc["nodes"]] == list(range(len(doc["nodes"])))
            for n in doc["nodes"]:
                if n["kind"] == "text":
                    assert n["text"] and n["block"] in ("heading", "paragraph", "list_item", "caption",
                                                        "table_cell", "quote", "code")  # fmt: skip
                else:
                    assert n["url"].startswith(("http://", "https://"))
    assert n_docs == totals["documents"]


def _trafilatura_rates(documents: Path, webcorpus: Path) -> tuple[float, float]:
    norm = " ".join
    truth = [json.loads(line) for line in gzip.open(webcorpus / "groundtruth" / "trafilatura_eval.jsonl.gz")]
    texts = {}
    for doc in iter_documents(documents):
        texts[doc["url"].strip()] = norm(
            " ".join(n["text"] for n in doc["nodes"] if n["kind"] == "text").split()
        )
    found = absent = n_with = n_without = 0
    for page in truth:
        text = texts.get(page["url"].strip(), "")
        for snippet in page["with"]:
            n_with += 1
            found += norm(snippet.split()) in text
        for snippet in page["without"]:
            n_without += 1
            absent += norm(snippet.split()) not in text
    return found / n_with, absent / n_without


def test_trafilatura_ground_truth_floors(crawl_out, webcorpus):
    (file,) = [f for f in crawl_out.glob("trafilatura_eval-*.parquet")]
    with_rate, without_rate = _trafilatura_rates(file, webcorpus)
    print(f"\ntrafilatura eval: with (found) = {with_rate:.3f}, without (absent) = {without_rate:.3f}")
    assert with_rate >= 0.93
    assert without_rate >= 0.85


def test_og_image_matches_postlight_lead_image(crawl_out, webcorpus):
    truth = {}
    for line in gzip.open(webcorpus / "groundtruth" / "postlight_parser.jsonl.gz"):
        page = json.loads(line)
        for a in page.get("assertions", []):
            if a.get("lead_image_url"):
                truth[page["url"].strip()] = a["lead_image_url"]
    (file,) = [f for f in crawl_out.glob("postlight_parser-*.parquet")]
    docs = {d["url"].strip(): d for d in iter_documents(file)}
    pages = [u for u in truth if u in docs]
    same = sum(docs[u]["og_image"] == truth[u] for u in pages)
    print(f"\npostlight lead image == og_image: {same}/{len(pages)}")
    assert len(pages) >= 120 and same / len(pages) >= 0.6


def test_clueweb_japanese_pages_decode(crawl_out):
    (file,) = [f for f in crawl_out.glob("*clueweb-quirk*.parquet")]
    docs = list(iter_documents(file))
    assert len(docs) == 29
    for doc in docs:
        assert doc["charset"].startswith("euc")
        text = doc["title"] + " ".join(n["text"] or "" for n in doc["nodes"])
        assert "\ufffd" not in text and "ヘッドポーター" in text


def test_docs_to_jsonl_cli(crawl_out):
    (file,) = [f for f in crawl_out.glob("postlight_parser-*.parquet")]
    proc = subprocess.run(m3w("docs", "to-jsonl", str(file)), env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    docs = list(iter_documents(file))
    assert len(lines) == len(docs)
    for line, doc in zip(lines, docs, strict=True):
        assert line == json.loads(json.dumps(to_jsonl_record(doc)))
        assert line["url"] == doc["url"] and line["warc_record_id"] == doc["warc_record_id"]
        assert line["text"].count("<image>") == len(line["images"])
        assert line["images"] == [n["url"] for n in doc["nodes"] if n["kind"] == "image"]
        assert line["doc_id"] == doc["doc_id"] and line["nodes"][0]["node_index"] == 0


def test_killed_job_resumes_with_every_page_exactly_once(tmp_path, cc_crawl, ray_address, crawl_out):
    out = tmp_path / "documents"
    proc = subprocess.Popen(crawl_args(cc_crawl, out, ray_address), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    manifest = Manifest(out, "extract")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not manifest.done_units():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    n_done_at_kill = len(manifest.done_units())
    assert 1 <= n_done_at_kill < cc_crawl[2], "the kill must land mid-run"

    rerun = subprocess.run(
        crawl_args(cc_crawl, out, ray_address), env=cli_env(), capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{n_done_at_kill} already done" in rerun.stdout
    ids = Counter(doc["doc_id"] for doc in iter_documents(out, columns=["doc_id"]))
    reference = Counter(doc["doc_id"] for doc in iter_documents(crawl_out, columns=["doc_id"]))
    assert max(ids.values()) == 1
    assert ids == reference
    assert Manifest(out, "extract").totals()["documents"] == sum(reference.values())


def test_resolve_inputs_globs_paths_files_urls(tmp_path, webcorpus, cc_crawl):
    warcs = sorted(str(p) for p in (webcorpus / "warc").glob("*.warc.gz"))
    assert resolve_inputs([str(webcorpus / "warc" / "*.warc.gz")]) == warcs
    assert resolve_inputs([warcs[0], warcs[0], warcs[1]]) == warcs[:2]
    paths_file = tmp_path / "my.warc.paths.gz"
    with gzip.open(paths_file, "wt") as f:
        f.write("crawl-data/X/a.warc.gz\n\nhttps://elsewhere.example/b.warc.gz\n")
    assert resolve_inputs([str(paths_file)], cc_base_url="https://cc.example/") == [
        "https://cc.example/crawl-data/X/a.warc.gz",
        "https://elsewhere.example/b.warc.gz",
    ]
    base_url, crawl_id, n = cc_crawl
    crawl = resolve_inputs(crawl=crawl_id, cc_base_url=base_url)
    assert len(crawl) == n and all(u.startswith(base_url + "/crawl-data/") for u in crawl)
    assert resolve_inputs(crawl=crawl_id, cc_base_url=base_url, limit=3) == crawl[:3]
    with pytest.raises(FileNotFoundError):
        resolve_inputs([str(tmp_path / "nothing-*.warc.gz")])
    with pytest.raises(ValueError):
        resolve_inputs(crawl="CC-MAIN-bad")
    assert unit_id(warcs[0]) != unit_id("/elsewhere/" + Path(warcs[0]).name)
    assert unit_id(warcs[0]) == unit_id(warcs[0])


# ---------------------------------------------------------------------------------------------- bad input


def warc_record(url: str, http: bytes, record_type: str = "response") -> bytes:
    rid = uuid.uuid5(uuid.NAMESPACE_URL, url + record_type)
    head = (
        f"WARC/1.0\r\nWARC-Type: {record_type}\r\nWARC-Record-ID: <urn:uuid:{rid}>\r\n"
        f"WARC-Date: 2024-05-01T00:00:00Z\r\nWARC-Target-URI: {url}\r\n"
        f"Content-Type: application/http; msgtype={record_type}\r\nContent-Length: {len(http)}\r\n\r\n"
    )
    return gzip.compress(head.encode() + http + b"\r\n\r\n")


def http_response(body: bytes, content_type: str = "text/html", status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


GOOD = (
    b"<html><body><article><p>"
    + b"A perfectly ordinary paragraph of prose, with commas, words. " * 4
    + b"</p></article></body></html>"
)


def test_bad_input_is_counted_never_fatal(tmp_path, ray_address):
    records = [
        warc_record("http://a.example/ok", http_response(GOOD)),
        warc_record("http://a.example/pdf", http_response(b"%PDF-1.4 binary", "application/pdf")),
        warc_record("http://a.example/404", http_response(b"<html><body>Not found</body></html>", status="404 Not Found")),
        warc_record("http://a.example/huge", http_response(b"<html><body>" + b"<p>big page</p>" * 20000)),
        warc_record("http://a.example/deep", http_response(b"<html><body>" + b"<div>" * 3000 + b"x" + b"</div>" * 3000)),
        warc_record("http://a.example/bytes", http_response(bytes(range(128, 256)) * 100, "text/html; charset=utf-8")),
        warc_record("http://a.example/ok2", http_response(GOOD.replace(b"ordinary", b"regular"))),
    ]  # fmt: skip
    good = tmp_path / "bad-records.warc.gz"
    good.write_bytes(b"".join(records))
    truncated = tmp_path / "truncated.warc.gz"
    truncated.write_bytes(b"".join(records[:1]) + records[6][: len(records[6]) // 2])
    garbage = tmp_path / "garbage.warc.gz"
    garbage.write_bytes(records[0] + os.urandom(4096) + records[6])
    missing = tmp_path / "missing.warc.gz"

    config = ExtractConfig()
    config.page.max_html_bytes = 100_000
    out = tmp_path / "out"
    summary = run_extract([str(good), str(truncated), str(garbage), str(missing)], out, workers=2,
                          ray_address=ray_address, config=config)  # fmt: skip
    entries = Manifest(out, "extract").entries()
    assert summary.failed == 1 and entries[unit_id(str(missing))]["status"] == "failed"
    assert "missing.warc.gz" in entries[unit_id(str(missing))]["error"]

    counts = entries[unit_id(str(good))]["counts"]
    assert counts["documents"] == 2 and counts["html"] == 6
    for reason in ("not_html", "http_status", "too_large", "nesting", "undecodable"):
        assert counts[f"skip.{reason}"] == 1, reason
    for path in (truncated, garbage):
        counts = entries[unit_id(str(path))]["counts"]
        assert counts["documents"] == 1, (path.name, counts)
    assert entries[unit_id(str(truncated))]["counts"]["skip.truncated"] == 1
    assert entries[unit_id(str(garbage))]["counts"]["skip.read_error"] == 1

    # The failed unit is retried on the next run; done units are not redone.
    missing.write_bytes(records[0])
    summary = run_extract([str(good), str(truncated), str(garbage), str(missing)], out, ray_address=ray_address,
                          config=config)  # fmt: skip
    assert (summary.done, summary.skipped, summary.failed) == (1, 3, 0)


def test_single_process_generator_matches_schema_fields(webcorpus):
    counts: Counter = Counter()
    warc = str(webcorpus / "warc" / "commoncrawl__whirlwind-python__whirlwind.warc.gz")
    docs = list(iter_warc_documents(warc, ExtractConfig(), counts))
    assert len(docs) == counts["documents"] == 1
    doc = docs[0]
    assert doc["url"] == "https://an.wikipedia.org/wiki/Escopete" and doc["domain"] == "an.wikipedia.org"
    assert doc["fetch_date"].startswith("2024-05-18") and doc["warc_offset"] > 0 and doc["warc_length"] > 0
    assert doc["lang_html"] == "an" and doc["charset"] == "utf-8" and doc["title"]
