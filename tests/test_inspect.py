"""`m3w inspect`: the HTML page shows every image of the samples it shows, at their `<image>` positions."""

from __future__ import annotations

import base64
import html
import json
import re
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from m3w.pipeline.imagestore import BlobRef, ImageStore
from m3w.pipeline.inspect import inspect_cmd, render_inspect
from m3w.pipeline.shards import ShardsConfig, run_m3w_shards
from m3w.pipeline.tario import iter_tar_samples
from m3w.pipeline.tokenizer import EOC_TOKEN


class PageParser(HTMLParser):
    """Collects, per sample block, the images (decoded data URIs) and the <EOC> marks, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[dict] = []
        self.external: list[str] = []
        self._in_eoc = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "sample":
            self.samples.append({"images": [], "eoc": 0, "links": []})
        elif tag == "img":
            src = attrs["src"]
            if not src.startswith("data:image/jpeg;base64,"):
                self.external.append(src)
            self.samples[-1]["images"].append(base64.b64decode(src.split(",", 1)[1]))
        elif tag == "span" and attrs.get("class") == "eoc" and self.samples:  # not the legend on top
            self.samples[-1]["eoc"] += 1
        elif tag == "a":
            self.samples[-1]["links"].append(attrs["href"])
        elif tag in ("script", "link"):
            self.external.append(tag)


def parse(path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def shard_dir(shards_corpus, tmp_path_factory, ray_address):
    out = tmp_path_factory.mktemp("inspect_shards")
    run_m3w_shards([shards_corpus.filtered], shards_corpus.store, out, ShardsConfig(shard_max_samples=5),
                   ray_address=ray_address)  # fmt: skip
    return out / "m3w"


def test_page_has_every_image_of_the_shown_samples_in_order(shard_dir, tmp_path):
    out = tmp_path / "page.html"
    shown = render_inspect(shard_dir, out, limit=12)
    assert shown == 12
    expected = [s for tar in sorted(shard_dir.glob("*.tar")) for s in iter_tar_samples(tar)][:12]
    page = parse(out)
    assert page.external == []  # self-contained: no remote images, scripts or stylesheets
    assert len(page.samples) == 12
    for block, (_key, files) in zip(page.samples, expected):
        sample = json.loads(files["json"])
        assert block["images"] == [files[k] for k in sample["images"]]
        assert block["eoc"] == sample["text"].count(EOC_TOKEN)
        assert block["links"] == [sample["provenance"]["url"]]
    text = out.read_text()
    for _key, files in expected:
        sample = json.loads(files["json"])
        assert f"{len(sample['input_ids'])} tokens" in text
        # Some words of the text (HTML-escaped) appear on the page.
        words = [w for w in re.split(r"<image>|<EOC>|\s+", sample["text"]) if len(w) > 3][:5]
        assert all(html.escape(w) in text for w in words)


def test_single_shard_and_cli(shard_dir, tmp_path):
    tar = sorted(shard_dir.glob("*.tar"))[1]
    out = tmp_path / "one.html"
    result = CliRunner().invoke(inspect_cmd, [str(tar), "--out", str(out), "--limit", "100"])
    assert result.exit_code == 0, result.output
    samples = list(iter_tar_samples(tar))
    page = parse(out)
    assert len(page.samples) == len(samples)
    assert [img for b in page.samples for img in b["images"]] == [
        files[k] for _, files in samples for k in json.loads(files["json"])["images"]
    ]


def test_documents_file_with_store(shards_corpus, tmp_path):
    import pyarrow.parquet as pq

    path = max(shards_corpus.filtered.glob("*.parquet"), key=lambda p: pq.ParquetFile(p).metadata.num_rows)
    out = tmp_path / "docs.html"
    shown = render_inspect(path, out, limit=30, store=shards_corpus.store)
    assert shown == min(30, pq.ParquetFile(path).metadata.num_rows) > 10
    page = parse(out)
    assert page.external == []
    store = ImageStore(shards_corpus.store)
    docs = pq.read_table(path).to_pylist()[:30]
    for block, doc in zip(page.samples, docs):
        urls = [n["url"] for n in doc["nodes"] if n["kind"] == "image"]
        rows = store.lookup(urls)
        stored = [
            store.read_blob(BlobRef.of(rows[u])) for u in urls if u in rows and rows[u]["status"] == "ok"
        ]
        assert block["images"] == stored
    assert "not in store" in out.read_text() or "http_error" in out.read_text()
