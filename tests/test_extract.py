"""`m3w extract` end to end: every webcorpus WARC through a loopback Common Crawl-like server on a real Ray,
quality floors on the trafilatura ground truth, kill-and-resume, input resolution, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from m3w.pipeline.docs import to_jsonl_record
from m3w.pipeline.extract import ExtractConfig, iter_warc_documents, run_extract, unit_id
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.warc import Skip, WarcError, resolve_inputs
from m3w.schemas.documents import METADATA_KEY, SCHEMA_VERSION, iter_documents
from m3w.schemas.skips import iter_skips, skip_log_path

ROOT = Path(__file__).resolve().parents[1]
WEBCORPUS_PAGES = 1329  # HTML responses (any status) in webcorpus/warc/*.warc.gz
WEBCORPUS_RESPONSES = 1560  # response records (fastwarc agrees)


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
    out = tmp_path_factory.mktemp("crawl") / "documents"
    proc = subprocess.run(
        crawl_args(cc_crawl, out, ray_address), env=cli_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "stderr.txt").write_text(proc.stderr)
    return out


def test_progress_counts_pages_and_megabytes(crawl_out, webcorpus):
    """The progress bar counts the HTML pages and the WARC bytes read inside each WARC (a Common Crawl WARC is
    ~1 GB: minutes per unit), not only finished WARCs; its last state adds up to the whole crawl."""
    stderr = (crawl_out.parent / "stderr.txt").read_text()
    pages = re.findall(r"([\d,]+) pages \(\d+/s\)", stderr)
    megabytes = re.findall(r"([\d,.]+) MB \([\d.]+ MB/s\)", stderr)
    assert pages and megabytes and "documents/s" in stderr, stderr[-2000:]
    assert int(pages[-1].replace(",", "")) == WEBCORPUS_PAGES
    warc_bytes = sum(p.stat().st_size for p in (webcorpus / "warc").glob("*.warc.gz"))
    assert megabytes[-1] == f"{warc_bytes / 1e6:,.1f}"


def test_all_webcorpus_pages_over_http_with_counts(crawl_out, cc_crawl):
    _, _, n_warcs = cc_crawl
    manifest = Manifest(crawl_out, "extract")
    entries = manifest.entries()
    assert len(entries) == n_warcs and all(e["status"] == "done" for e in entries.values())
    totals = manifest.totals()
    print("\nextract totals:", dict(sorted(totals.items())))
    assert totals["html"] == WEBCORPUS_PAGES and totals["responses"] == WEBCORPUS_RESPONSES
    # Every response record is a document or a logged skip (webcorpus has no damage).
    skips = {k: v for k, v in totals.items() if k.startswith("skip.")}
    assert totals["documents"] + sum(skips.values()) == WEBCORPUS_RESPONSES
    logged = Counter(row["reason"] for row in iter_skips(sorted((crawl_out / "_skips").glob("*.parquet"))))
    assert {f"skip.{k}": v for k, v in logged.items()} == skips
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


# ---------------------------------------------------------------------------------------------- damaged WARCs
# Built from real webcorpus records (located through manifest.jsonl.gz): A, damaged X, B. Whatever X's damage,
# A and B come out as documents and X as a document or a logged skip with its reason.

SMALL_PAGES = (  # four small trafilatura_eval pages that extract to several paragraphs
    "<urn:uuid:6b955982-4639-5202-a658-d9fabe28253c>",
    "<urn:uuid:75185099-47ac-59f0-816c-188e7e781ac0>",
    "<urn:uuid:5d2c56c8-c584-5e64-9b8c-c59e3747c07a>",
    "<urn:uuid:10406e54-d6ea-5d94-8fe9-0798d6fd3b52>",
)


@dataclass
class Record:
    """A WARC response record, split so a test can damage one part and rebuild it."""

    fields: list[tuple[str, str]]
    http_head: list[bytes]  # status line and header lines
    body: bytes

    @property
    def url(self) -> str:
        return dict(self.fields)["WARC-Target-URI"]

    @property
    def record_id(self) -> str:
        return dict(self.fields)["WARC-Record-ID"]

    def block(self) -> bytes:
        return b"\r\n".join(self.http_head) + b"\r\n\r\n" + self.body

    def warc(
        self, content_length: int | None = None, lower: bool = False, block: bytes | None = None
    ) -> bytes:
        block = self.block() if block is None else block
        fields = [(k.lower() if lower else k, v) for k, v in self.fields if k != "Content-Length"]
        fields.append(
            (
                "content-length" if lower else "Content-Length",
                str(len(block) if content_length is None else content_length),
            )
        )
        head = "WARC/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
        return head.encode() + block + b"\r\n\r\n"

    def with_http(self, body: bytes, *headers: bytes) -> Record:
        kept = [
            h for h in self.http_head if not h.lower().startswith((b"content-length", b"content-encoding"))
        ]
        return Record(self.fields, [*kept, *headers], body)


@pytest.fixture(scope="module")
def small_records(webcorpus) -> list[Record]:
    manifest = {}
    for line in gzip.open(webcorpus / "manifest.jsonl.gz"):
        entry = json.loads(line)
        manifest[entry["warc_record_id"]] = entry
    records = []
    for record_id in SMALL_PAGES:
        entry = manifest[record_id]
        with open(webcorpus / entry["warc_file"], "rb") as f:
            f.seek(entry["warc_offset"])
            raw = gzip.decompress(f.read(entry["warc_length"]))
        head, http_head, body = raw.split(b"\r\n\r\n", 2)
        fields = [tuple(line.split(": ", 1)) for line in head.decode().split("\r\n")[1:]]
        records.append(Record(fields, http_head.split(b"\r\n"), body.removesuffix(b"\r\n\r\n")))
    return records


def extract_file(path: Path) -> tuple[list[dict], list[Skip], Counter]:
    counts: Counter = Counter()
    skips: list[Skip] = []
    docs = list(iter_warc_documents(str(path), ExtractConfig(), counts, skips.append))
    response_skips = sum(1 for s in skips if s.record_type == "response")
    assert counts["responses"] == counts["documents"] + response_skips, "a response record went unaccounted"
    assert sum(v for k, v in counts.items() if k.startswith("skip.")) == len(skips)
    return docs, skips, counts


def deflate(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(wbits=wbits)
    return packer.compress(data) + packer.flush()


def chunked(data: bytes, size: int = 300) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def zeros_gzip(n: int) -> bytes:
    packer = zlib.compressobj(wbits=31)
    return b"".join(packer.compress(bytes(1 << 20)) for _ in range(n >> 20)) + packer.flush()


# Damage that costs the damaged record: (name, build X's member or plain bytes, expected skip reason).
def _oversized_http_header(r: Record) -> bytes:
    return r.with_http(r.body, b"X-Junk: " + b"j" * 1_000_000).warc()


def _many_http_header_lines(r: Record) -> bytes:
    return r.with_http(r.body, *(b"X-%d: y" % i for i in range(10_000))).warc()


def _oversized_target_uri(r: Record) -> bytes:
    fields = [(k, v + "?" + "q" * 100_000 if k == "WARC-Target-URI" else v) for k, v in r.fields]
    return Record(fields, r.http_head, r.body).warc()


def _garbage_http_head(r: Record) -> bytes:
    return r.warc(block=bytes(range(256)) * 4 + b"\r\n\r\n" + r.body)


def _content_length_short(r: Record) -> bytes:
    return r.warc(content_length=len(r.block()) // 2)


def _content_length_long(r: Record) -> bytes:
    return r.warc(content_length=len(r.block()) + 5000)


def _tiny_binary_body(r: Record) -> bytes:
    return r.with_http(b"\x00\x13\xfe\x9aBINARY\x00\x01\x02\x03\x04\x05", b"Content-Type: text/html").warc()


def _tiny_random_text_body(r: Record) -> bytes:
    # 16 bytes with no NUL or control byte: not "binary", not UTF-8, no markup. Detection would call it UTF-16.
    return r.with_http(bytes([0xC3, 0x28, 0xA0, 0xA1, 0xE2, 0x28, 0xA1, 0xF0, 0x28, 0x8C, 0xBC, 0xF8, 0xA1,
                              0xA1, 0xA1, 0xA1]), b"Content-Type: text/html").warc()  # fmt: skip


def _decompression_bomb(r: Record) -> bytes:
    return r.with_http(zeros_gzip(8 << 20), b"Content-Encoding: gzip").warc()


def _gzip_that_does_not_inflate(r: Record) -> bytes:
    return r.with_http(b"\x1f\x8b\x08\x00" + bytes(range(200)), b"Content-Encoding: gzip").warc()


RECORD_DAMAGE = [
    ("oversized_http_header", _oversized_http_header, "http_header_too_large"),
    ("10k_http_header_lines", _many_http_header_lines, "http_header_too_large"),
    ("oversized_target_uri", _oversized_target_uri, "warc_header_too_large"),
    ("garbage_http_head", _garbage_http_head, "bad_http"),
    ("content_length_short", _content_length_short, "bad_content_length"),
    ("content_length_long", _content_length_long, "bad_content_length"),
    ("tiny_binary_body", _tiny_binary_body, "binary"),
    ("tiny_random_text_body", _tiny_random_text_body, "undecodable"),
    ("decompression_bomb", _decompression_bomb, "too_large"),
    ("gzip_that_does_not_inflate", _gzip_that_does_not_inflate, "bad_encoding"),
]


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize(("name", "damage", "reason"), RECORD_DAMAGE, ids=[d[0] for d in RECORD_DAMAGE])
def test_a_damaged_record_costs_that_record_only(tmp_path, small_records, compressed, name, damage, reason):
    a, x, b = small_records[:3]
    pack = gzip.compress if compressed else bytes
    path = tmp_path / ("x.warc.gz" if compressed else "x.warc")
    path.write_bytes(pack(a.warc()) + pack(damage(x)) + pack(b.warc()))
    docs, skips, counts = extract_file(path)
    assert [d["url"] for d in docs] == [a.url, b.url], (name, skips)
    assert [(s.reason, s.record_id) for s in skips] == [(reason, x.record_id)], skips
    assert counts["responses"] == 3 and skips[0].offset is not None


def test_framing_damage_resyncs_at_the_next_gzip_member(tmp_path, small_records):
    """A corrupt member, a member cut short and followed by the next, garbage between members, and garbage
    before the first: each costs what it hid, and the record after it is a document."""
    a, x, b, c = (gzip.compress(r.warc()) for r in small_records)
    corrupt = bytearray(x)
    corrupt[len(x) // 2 : len(x) // 2 + 40] = bytes(40)
    path = tmp_path / "framing.warc.gz"
    path.write_bytes(
        os.urandom(300) + a + bytes(corrupt) + b + x[: len(x) // 2] + c + b"\x00garbage" * 50 + x
    )
    docs, skips, _ = extract_file(path)
    urls = [r.url for r in small_records]
    assert [d["url"] for d in docs] == [urls[0], urls[2], urls[3], urls[1]]
    assert [s.reason for s in skips] == ["garbage", "corrupt_gzip", "corrupt_gzip", "garbage"]
    assert skips[1].offset == 300 + len(a) and skips[1].length == len(x)
    assert skips[3].offset == 300 + len(a) + len(x) + len(b) + len(x) // 2 + len(c)
    # Documents point at their gzip member: seek there and inflate.
    for doc in docs:
        with open(path, "rb") as f:
            f.seek(doc["warc_offset"])
            assert doc["warc_record_id"].encode() in gzip.decompress(f.read(doc["warc_length"]))


def test_plain_warc_resyncs_at_the_next_version_line(tmp_path, small_records):
    a, x, b, c = small_records
    # A Content-Length 20 kB too long swallows B's header: B is found again inside X's block.
    path = tmp_path / "plain.warc"
    path.write_bytes(a.warc() + b"garbage\r\n" * 30 + x.warc(content_length=len(x.block()) + 20_000)
                     + b.warc() + c.warc())  # fmt: skip
    docs, skips, _ = extract_file(path)
    assert [d["url"] for d in docs] == [a.url, b.url, c.url]
    assert [(s.reason, s.record_id) for s in skips] == [
        ("bad_warc_header", None),
        ("bad_content_length", x.record_id),
    ]


def test_case_insensitive_headers_and_every_body_coding(tmp_path, small_records):
    """Lower-case WARC header names; chunked, gzip, deflate (zlib-wrapped and raw) and their combinations decode
    to the same document as the plain body."""
    a, x = small_records[:2]
    body = x.body
    variants = [
        x.warc(lower=True),
        x.with_http(chunked(body), b"Transfer-Encoding: chunked").warc(),
        x.with_http(
            chunked(gzip.compress(body)), b"Transfer-Encoding: chunked", b"Content-Encoding: gzip"
        ).warc(),
        x.with_http(deflate(body, 15), b"Content-Encoding: deflate").warc(),
        x.with_http(deflate(body, -15), b"Content-Encoding: deflate").warc(),
        x.with_http(deflate(gzip.compress(body), 15), b"Content-Encoding: gzip, deflate").warc(),
        x.with_http(
            chunked(deflate(body, -15)), b"transfer-encoding: Chunked", b"content-encoding: DEFLATE"
        ).warc(),
        x.with_http(body, b"Content-Encoding: gzip").warc(),  # the crawler stored it decoded, kept the header
    ]
    path = tmp_path / "codings.warc.gz"
    path.write_bytes(gzip.compress(a.warc()) + b"".join(gzip.compress(v) for v in variants))
    docs, skips, _ = extract_file(path)
    assert not skips and len(docs) == 1 + len(variants)
    reference = docs[1]["nodes"]
    assert "12c" not in " ".join(n.get("text") or "" for n in reference).split()  # no chunk-size line leaked
    for doc in docs[2:]:
        assert doc["nodes"] == reference and doc["url"] == x.url


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"just a text file\nwith lines\n" * 100, "not a WARC"),
        (os.urandom(50_000), "not a WARC"),
        (b"", "not a WARC: the file is empty"),
        (gzip.compress(b"a gzipped text file, not a WARC\n" * 100), "not a WARC"),
    ],
    ids=["text", "random_bytes", "empty", "gzipped_text"],
)
def test_a_file_that_is_not_a_warc_raises(tmp_path, content, error):
    path = tmp_path / "thing.warc.gz"
    path.write_bytes(content)
    with pytest.raises(WarcError, match=error):
        list(iter_warc_documents(str(path), ExtractConfig(), Counter()))


def test_bad_input_fails_or_is_logged_never_silent(tmp_path, small_records, ray_address):
    """Through `run_extract` on Ray: a damaged WARC is done with every record a document or a logged skip (that
    `m3w stats --skips` lists); a file that is not a WARC, one that ends inside a record, and a missing one
    fail with the reason and are retried on the next run."""
    a, x, b = small_records[:3]
    damaged = tmp_path / "damaged.warc.gz"
    not_found = Record(x.fields, [b"HTTP/1.1 404 Not Found", *x.http_head[1:]], x.body)
    damaged.write_bytes(b"".join(gzip.compress(r) for r in (a.warc(), _oversized_target_uri(x), b.warc(),
                                                            not_found.warc())))  # fmt: skip
    members = gzip.compress(a.warc()) + gzip.compress(b.warc())
    truncated = tmp_path / "truncated.warc.gz"
    truncated.write_bytes(members[: len(members) - 100])
    not_warc = tmp_path / "random.warc.gz"
    not_warc.write_bytes(os.urandom(10_000))
    missing = tmp_path / "missing.warc.gz"
    inputs = [str(p) for p in (damaged, truncated, not_warc, missing)]
    out = tmp_path / "out"
    summary = run_extract(inputs, out, workers=2, ray_address=ray_address)
    entries = Manifest(out, "extract").entries()
    assert (summary.done, summary.failed) == (1, 3)
    assert "WarcError: the file ends inside a gzip member" in entries[unit_id(str(truncated))]["error"]
    assert "WarcError: not a WARC" in entries[unit_id(str(not_warc))]["error"]
    assert "missing.warc.gz" in entries[unit_id(str(missing))]["error"]
    assert not list(out.glob(f"{unit_id(str(truncated))}*")), "a failed unit leaves no output"

    counts = entries[unit_id(str(damaged))]["counts"]
    assert counts["documents"] == 2 and counts["responses"] == 4
    assert counts["skip.warc_header_too_large"] == 1 and counts["skip.http_status"] == 1
    rows = list(iter_skips([skip_log_path(out, unit_id(str(damaged)))]))
    assert [(r["reason"], r["record_id"], r["warc_path"]) for r in rows] == [
        ("warc_header_too_large", x.record_id, str(damaged)), ("http_status", x.record_id, str(damaged))]  # fmt: skip
    listing = subprocess.run(m3w("stats", str(out), "--skips", "--reason", "http_status"), env=cli_env(),
                             capture_output=True, text=True)  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    assert "2 skipped records in 1 of 1 done extract units" in listing.stdout
    assert "HTTP 404" in listing.stdout and listing.stdout.count(x.record_id) == 1

    # Failed units are retried on the next run; done units are not redone.
    missing.write_bytes(gzip.compress(a.warc()))
    summary = run_extract(inputs, out, ray_address=ray_address)
    assert (summary.done, summary.skipped, summary.failed) == (1, 1, 2)


def test_single_process_generator_matches_schema_fields(webcorpus):
    counts: Counter = Counter()
    warc = str(webcorpus / "warc" / "commoncrawl__whirlwind-python__whirlwind.warc.gz")
    docs = list(iter_warc_documents(warc, ExtractConfig(), counts))
    assert len(docs) == counts["documents"] == 1
    doc = docs[0]
    assert doc["url"] == "https://an.wikipedia.org/wiki/Escopete" and doc["domain"] == "an.wikipedia.org"
    assert doc["fetch_date"].startswith("2024-05-18") and doc["warc_offset"] > 0 and doc["warc_length"] > 0
    assert doc["lang_html"] == "an" and doc["charset"] == "utf-8" and doc["title"]
