"""OBELICS export/import and MMC4 import, on webcorpus documents and files written to the published schemas."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from m3w.cli import main
from m3w.pipeline.filter import run_filter
from m3w.pipeline.imagestore import ImageStore
from m3w.pipeline.interop import export_obelics, run_import, webdataset_features
from m3w.pipeline.shards import ShardsConfig, run_m3w_shards
from m3w.pipeline.tario import iter_tar_samples
from m3w.schemas.documents import SCHEMA_VERSION, check_version, iter_documents

OBELICS_COLUMNS = {"images", "metadata", "general_metadata", "texts"}
NODE_FIELDS = ("kind", "text", "url", "alt", "title", "figcaption", "width", "height")


def read_docs(directory) -> list[dict]:
    docs = []
    for path in sorted(directory.glob("*.parquet")):
        table = pq.read_table(path)
        check_version(table.schema, SCHEMA_VERSION)
        docs.extend(table.to_pylist())
    return docs


def content(doc: dict) -> list[tuple]:
    return [tuple(n.get(f) for f in NODE_FIELDS) for n in doc["nodes"] if n["kind"] != "text" or n["text"]]


@pytest.fixture(scope="module")
def source_docs(shards_corpus) -> list[dict]:
    return [
        dict(d, nodes=[n for n in d["nodes"] if n["kind"] in ("text", "image")])
        for d in read_docs(shards_corpus.filtered)
    ]


def load_export(out):
    """An export as a user loads it: `datasets.load_dataset` on the directory (its card names the data files)."""
    import datasets

    return datasets.load_dataset(str(out), split="train", cache_dir=str(out.parent / "hf-cache"))


def test_export_has_obelics_columns_and_a_card(shards_corpus, source_docs, tmp_path):
    result = export_obelics([shards_corpus.filtered], tmp_path / "export", store=shards_corpus.store)
    ds = load_export(tmp_path / "export")
    assert set(ds.column_names) == OBELICS_COLUMNS
    assert len(ds) == len(source_docs) == result["documents"]
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"num_examples: {len(source_docs)}" in card and "path: data/train-*.parquet" in card
    store = ImageStore(shards_corpus.store)
    images = 0
    for row in ds:
        assert len(row["texts"]) == len(row["images"]) == len(json.loads(row["metadata"]))
        assert all((t is None) != (i is None) for t, i in zip(row["texts"], row["images"]))
        urls = [i for i in row["images"] if i is not None]
        rows = store.lookup(urls)
        assert set(rows) == set(urls) and all(r["status"] == "ok" for r in rows.values())
        images += len(urls)
        general = json.loads(row["general_metadata"])
        assert {"url", "warc_filename", "warc_record_offset", "warc_record_length"} <= set(general)
    assert images == result["images"] > 0


def test_export_reads_only_the_filter_outputs_documents(shards_corpus, tmp_path):
    """Issue 13, defect 1: a real filter output holds excluded/ and _cache/ parquet files of other schemas beside
    its documents; export reads the documents only (it used to search subfolders and stop at a version
    mismatch). Through the CLI, as a user runs it, with small shards: streamed, split, nothing lost."""
    filter_out = shards_corpus.documents.parent / "filter_out"
    assert (filter_out / "excluded").is_dir() and any((filter_out / "_cache").rglob("*.parquet"))
    kept = len(list(iter_documents(filter_out)))
    result = CliRunner().invoke(
        main,
        ["interop", "export", str(filter_out), "--out", str(tmp_path / "export"), "--rows-per-shard", "10"],
    )
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "export" / "data").glob("*.parquet"))
    assert [f.name for f in files] == [f"train-{i:05d}.parquet" for i in range(-(-kept // 10))]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files[:-1]] == [10] * (len(files) - 1)
    ds = load_export(tmp_path / "export")
    assert len(ds) == kept and f"{kept} documents" in result.output
    urls = [json.loads(row["general_metadata"])["url"] for row in ds]
    assert urls == [d["url"] for d in iter_documents(filter_out)]  # in document order


def test_obelics_round_trip(shards_corpus, source_docs, tmp_path, ray_address):
    result = export_obelics([shards_corpus.filtered], tmp_path / "export")
    summary = run_import(result["shards"], tmp_path / "documents", "obelics", ray_address=ray_address)
    assert summary.failed == 0
    imported = read_docs(tmp_path / "documents")
    assert len(imported) == len(source_docs)
    for before, after in zip(source_docs, imported):
        assert after["doc_id"] == before["doc_id"] and after["url"] == before["url"]
        assert (after["warc_path"], after["warc_offset"], after["warc_length"], after["warc_record_id"]) == (
            before["warc_path"], before["warc_offset"], before["warc_length"], before["warc_record_id"]
        )  # fmt: skip
        assert content(after) == content(before)
        assert [n["node_index"] for n in after["nodes"]] == list(range(len(after["nodes"])))


def test_imported_documents_flow_into_shards(shards_corpus, tmp_path, ray_address):
    result = export_obelics([shards_corpus.filtered], tmp_path / "export")
    run_import(result["shards"], tmp_path / "documents", "obelics", ray_address=ray_address)
    run_filter(tmp_path / "documents", tmp_path / "filtered", ray_address=ray_address)
    assert len(read_docs(tmp_path / "filtered")) > 20
    shards = run_m3w_shards([tmp_path / "filtered"], shards_corpus.store, tmp_path / "shards", ShardsConfig(),
                            ray_address=ray_address)  # fmt: skip
    assert shards["totals"]["samples"] > 10 and shards["failed_units"] == []


def test_obelics_file_in_the_published_schema(tmp_path, ray_address):
    """A row as OBELICS publishes it (metadata as JSON strings, null-aligned lists), plus a broken row."""
    rows = [
        {
            "images": [None, "https://example.org/cat.jpg", None],
            "metadata": json.dumps(
                [
                    None,
                    {
                        "document_url": "https://example.org/a",
                        "unformatted_src": "cat.jpg",
                        "src": "https://example.org/cat.jpg",
                        "formatted_filename": "cat",
                        "alt_text": "A cat",
                        "original_width": 640,
                        "original_height": 480,
                    },
                    None,
                ]
            ),  # fmt: skip
            "general_metadata": json.dumps(
                {
                    "url": "https://example.org/a",
                    "warc_filename": "crawl/x.warc.gz",
                    "warc_record_offset": 123,
                    "warc_record_length": 456,
                }
            ),  # fmt: skip
            "texts": ["Our cat.", None, "She likes boxes."],
        },
        {"images": [None], "metadata": "[null]", "general_metadata": "{}", "texts": ["a", "b"]},
    ]
    src = tmp_path / "obelics.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_import([src], tmp_path / "docs", "obelics", ray_address=ray_address)
    assert summary.counts["documents"] == 1 and summary.counts["skip.misaligned_texts_images"] == 1
    (doc,) = read_docs(tmp_path / "docs")
    assert content(doc) == [
        ("text", "Our cat.", None, None, None, None, None, None),
        ("image", None, "https://example.org/cat.jpg", "A cat", None, None, 640, 480),
        ("text", "She likes boxes.", None, None, None, None, None, None),
    ]
    assert (doc["warc_path"], doc["warc_offset"], doc["warc_length"]) == ("crawl/x.warc.gz", 123, 456)
    assert doc["domain"] == "example.org"


def test_mmc4_round_trip(source_docs, tmp_path, ray_address):
    """MMC4 rows built from webcorpus documents: sentences + images matched to sentence indices."""
    rows = []
    for doc in source_docs:
        text_list, image_info = [], []
        pending = []
        for node in doc["nodes"]:
            if node["kind"] == "image":
                pending.append(node["url"])
            elif node["text"]:
                for url in pending:
                    image_info.append({"image_name": f"{len(image_info)}.jpg", "raw_url": url,
                                       "matched_text_index": len(text_list), "matched_sim": 0.3,
                                       "face_detections": None})  # fmt: skip
                pending = []
                text_list.append(node["text"])
        if text_list:
            rows.append({"url": doc["url"], "text_list": text_list, "image_info": image_info,
                         "similarity_matrix": [], "could_have_url_duplicate": 0})  # fmt: skip
    rows.append({"url": "https://bad.example/", "text_list": ["x"],
                 "image_info": [{"raw_url": "https://bad.example/i.jpg", "matched_text_index": 5}]})  # fmt: skip
    src = tmp_path / "mmc4.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_import([src], tmp_path / "docs", "mmc4", ray_address=ray_address)
    assert summary.counts["skip.unmatched_image"] == 1
    imported = read_docs(tmp_path / "docs")
    assert len(imported) == len(rows)
    assert sum(n["kind"] == "image" for d in imported for n in d["nodes"]) > 20
    for row, doc in zip(rows[:-1], imported):
        # Rebuild the MMC4 row from the imported document: it must be the row we wrote.
        text_list, matched = [], []
        for node in doc["nodes"]:
            if node["kind"] == "image":
                matched.append((node["url"], len(text_list)))
            else:
                text_list.append(node["text"])
        assert doc["url"] == row["url"] and text_list == row["text_list"]
        assert matched == [(i["raw_url"], i["matched_text_index"]) for i in row["image_info"]]
    # Same file, same ids: a re-import is stable.
    again = run_import([src], tmp_path / "docs2", "mmc4", ray_address=ray_address)
    assert again.failed == 0
    assert [d["doc_id"] for d in read_docs(tmp_path / "docs2")] == [d["doc_id"] for d in imported]


def test_m3w_shards_load_with_hf_datasets_webdataset(shards_corpus, tmp_path, ray_address):
    """Hugging Face `datasets` reads m3w's WebDataset tars offline with its "webdataset" builder, given the
    features of a set whose samples carry 1 to 5 images (inferring them from the first samples fails)."""
    import datasets

    run_m3w_shards([shards_corpus.filtered], shards_corpus.store, tmp_path / "shards", ShardsConfig(shard_max_samples=20),
                   ray_address=ray_address)  # fmt: skip
    tars = sorted(str(p) for p in (tmp_path / "shards" / "m3w").glob("*.tar"))
    manifest = json.loads((tmp_path / "shards" / "m3w" / "shards.json").read_text())
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                               features=webdataset_features(manifest["max_media"] * manifest["num_frames"]),
                               cache_dir=str(tmp_path / "hf-cache"))  # fmt: skip
    ours = {key: files for tar in tars for key, files in iter_tar_samples(tar)}
    assert len(ds) == len(ours) == manifest["totals"]["samples"] > 20
    counts = set()
    for row in ds.cast_column("0.jpg", datasets.Image(decode=False)):
        files = ours[row["__key__"]]
        sample = json.loads(files["json"])
        assert row["json"]["input_ids"] == sample["input_ids"] and row["json"]["images"] == sample["images"]
        assert row["json"]["provenance"]["token_start"] == sample["provenance"]["token_start"]
        assert row["0.jpg"]["bytes"] == files["0.jpg"]
        present = [k for k in (f"{i}.jpg" for i in range(5)) if row[k] is not None]
        assert present == sample["images"]
        counts.add(len(present))
    assert len(counts) > 1  # samples with different numbers of images, in one dataset
