"""The demo web: deterministic, Common Crawl-shaped, and its pictures show what its text says."""

from __future__ import annotations

import gzip
import io
import json
import re
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fastwarc.warc import ArchiveIterator, WarcRecordType
from PIL import Image

from m3w.demo.web import COLOURS, CRAWL, build_web

BASE = "http://127.0.0.1:8765"


@pytest.fixture(scope="module")
def web(tmp_path_factory, webcorpus) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("web")
    return out, build_web(out, BASE, pages=60, seed=3, webcorpus=webcorpus)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def gzip_members(data: bytes) -> list[bytes]:
    members = []
    while data:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        members.append(d.decompress(data))
        data = d.unused_data
    return members


def test_same_arguments_give_identical_bytes(web, tmp_path, webcorpus):
    out, _ = web
    build_web(tmp_path, BASE, pages=60, seed=3, webcorpus=webcorpus)
    assert files_of(out) == files_of(tmp_path)
    other = tmp_path / "other-seed"
    build_web(other, BASE, pages=60, seed=4, webcorpus=webcorpus)
    assert (
        files_of(out / "site")["crawl-data/" + CRAWL + "/warc.paths.gz"]
        == (other / "site/crawl-data" / CRAWL / "warc.paths.gz").read_bytes()
    )
    assert files_of(out / "site") != files_of(other / "site")


def test_common_crawl_layout_one_record_per_gzip_member(web):
    out, summary = web
    site = out / "site"
    listed = gzip.decompress((site / summary["warc_paths"]).read_bytes()).decode().split()
    assert listed == summary["warcs"] and len(listed) == 4
    responses = []
    for rel in listed:
        assert re.fullmatch(
            rf"crawl-data/{CRAWL}/segments/[\d.]+/warc/CC-MAIN-\d+-\d+-\d{{5}}\.warc\.gz", rel
        )
        data = (site / rel).read_bytes()
        members = gzip_members(data)
        types = []
        for rec in ArchiveIterator(io.BytesIO(data), parse_http=True):
            types.append(rec.record_type)
            if rec.record_type == WarcRecordType.response:
                assert rec.http_headers.status_code == 200
                responses.append((rec.headers["WARC-Target-URI"], rec.reader.read()))
        assert len(members) == len(types)  # each gzip member holds exactly one record
        assert types[0] == WarcRecordType.warcinfo
    assert len(responses) == summary["counts"]["pages"] == 60
    assert len({uri for uri, _ in responses}) == 60
    assert all(uri.startswith(BASE + "/") for uri, _ in responses)


def test_pages_look_like_the_web(web):
    out, summary = web
    pages = [p.read_text() for p in (out / "site").glob("*/study-*.html")]
    html = "\n".join(pages)
    for marker in ("<nav", "<footer", "cookie", "Advertisement", "Related articles", "<figcaption>"):
        assert marker in html, marker
    for marker in ("srcset=", "data-src=", "<picture>", "/img/gone/", "/img/photos/"):
        assert marker in html, marker
    counts = summary["counts"]
    assert counts["pages.shapes"] > counts["pages.photos"] > 0
    assert counts["broken_images"] > 0 and counts["pages.duplicate"] > 0


def dominant_colour(path: Path) -> str:
    """The palette colour nearest to the most frequent saturated pixel."""
    pixels = Counter(tuple(p) for p in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).tolist())
    pixels = Counter({p: n for p, n in pixels.items() if max(p) - min(p) > 60})
    rgb = pixels.most_common(1)[0][0]
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb)))


def test_pictures_show_what_the_text_says(web):
    out, _ = web
    site = out / "site"
    checked = 0
    for page in site.glob("shapes/study-*.html"):
        for src, alt in re.findall(r'<img src="(/img/shapes/[^"]+)"[^>]*alt="([^"]+)"', page.read_text()):
            colour = alt.split()[1]
            assert dominant_colour(site / src.lstrip("/")) == colour, (src, alt)
            assert f"{alt[0].upper()}{alt[1:]}." in page.read_text() or alt in page.read_text()
            checked += 1
    assert checked > 20


def test_served_over_http(web, serve_dir):
    out, summary = web
    base = serve_dir(out / "site")
    with urllib.request.urlopen(f"{base}/{summary['warc_paths']}", timeout=5) as r:
        assert gzip.decompress(r.read()).decode().split() == summary["warcs"]
    page = next((out / "site" / "shapes").glob("study-*.html")).read_text()
    src = re.search(r'src="(/img/shapes/[^"]+)"', page).group(1)
    with urllib.request.urlopen(base + src, timeout=5) as r:
        assert Image.open(io.BytesIO(r.read())).size == (256, 256)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/img/gone/0000-0.png", timeout=5)
    assert err.value.code == 404


def test_videos_decode(web):
    import av

    out, summary = web
    rows = [json.loads(line) for line in (out / summary["videos"]).read_text().splitlines()]
    assert len(rows) == summary["counts"]["videos"] and all(r["caption"].split()[1] in COLOURS for r in rows)
    path = out / "site" / rows[0]["url"].removeprefix(BASE + "/")
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 24 and frames[0].width == 128


def test_eval_sets_in_public_formats(web):
    out, summary = web
    root = out / summary["eval"]
    assert len(json.loads(next((root / "binding").glob("*all_questions.json")).read_text())) == 200
    for split in ("support", "query"):
        coco = json.loads((root / "captioning" / split / "captions.json").read_text())
        assert len(coco["images"]) == 36 and len(coco["annotations"]) == 5 * 36
        questions = json.loads((root / "vqa" / split / "questions.json").read_text())["questions"]
        annotations = json.loads((root / "vqa" / split / "annotations.json").read_text())["annotations"]
        assert len(questions) == len(annotations) == 3 * 36
        assert all(len(a["answers"]) == 10 for a in annotations)
        classes = sorted(p.name for p in (root / "classification" / split).iterdir())
        assert classes == sorted(COLOURS)
        for colour in classes:
            for image in (root / "classification" / split / colour).glob("*.png"):
                assert dominant_colour(image) == colour
    # Held out: no eval picture is one of the web's pictures.
    web_images = {p.read_bytes() for p in (out / "site" / "img" / "shapes").glob("*.png")}
    assert not web_images & {p.read_bytes() for p in (root / "captioning").rglob("*.png")}


def test_demo_lm_pretrains_on_kept_document_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from m3w.demo.lm import pretrain_lm
    from m3w.schemas.documents import DOCUMENT_SCHEMA, document_texts

    text = "The picture shows three red circles on the left. The shapes are red."
    node = {"kind": "text", "node_index": 0, "text": text, "block": "paragraph"}
    image = {"kind": "image", "node_index": 1, "url": "http://127.0.0.1/x.png"}
    rows = [{"doc_id": str(i), "url": f"http://127.0.0.1/{i}", "nodes": [node, image]} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA), tmp_path / "unit.parquet")
    (tmp_path / "excluded").mkdir()  # the filter's other outputs sit in subdirectories and are not read
    pq.write_table(pa.table({"doc_id": ["x"]}), tmp_path / "excluded" / "unit.parquet")
    assert document_texts(tmp_path) == [text] * 4
    lm_dir = pretrain_lm(tmp_path, tmp_path / "lm-out", steps=30, seq_len=16, batch=4, drills=2, lr=1e-2)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    from m3w.pipeline.tokenizer import load_tokenizer

    ids = torch.tensor([load_tokenizer()(text, add_special_tokens=False)["input_ids"]])
    assert lm(input_ids=ids, labels=ids).loss.item() < 2.0  # it learned the text (random init: ~9)


def test_bundled_lm_names_pictures_it_never_saw():
    """The frozen LM the package ships (`make demo-lm`) reads m3w's tokenizer, is what its record says, and gives
    the name whose picture-vector matches in drills it never saw, as its record says."""
    from transformers import AutoModelForCausalLM

    from m3w.demo import BUNDLED_LM, LM_RECORD
    from m3w.demo.lm import first_name_accuracy
    from m3w.pipeline.tokenizer import load_tokenizer

    record = json.loads((BUNDLED_LM / LM_RECORD).read_text())
    lm = AutoModelForCausalLM.from_pretrained(BUNDLED_LM, dtype=torch.float32)
    tok = load_tokenizer()
    assert lm.config.vocab_size == len(tok) and lm.config.hidden_size == record["settings"]["dim"]
    assert lm.config.num_hidden_layers == record["settings"]["layers"]
    accuracy = first_name_accuracy(lm, tok, seed=2026, drills=60)
    # a guess among the drill's two or three names is right 0.4 of the time
    assert accuracy >= 0.8 and abs(accuracy - record["first_name_accuracy"]) < 0.05


def test_naming_drills_show_each_name_after_its_picture_vector():
    from m3w.demo.lm import NamingDrills
    from m3w.pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer()
    drills = NamingDrills(tok, dim=16, seed=0, pictures=6, noise=0.0)
    for _ in range(5):
        drill = drills()
        text = tok.decode(drill.input_ids)
        names = re.findall(r"This is a (\w+)\.", text)
        assert len(names) == 6 and 2 <= len(set(names)) <= 3 and text.count("<image>") == 6
        starts = [i for i, t in enumerate(drill.input_ids) if t == drills.media]
        vectors = {name: drill.pictures[start] for name, start in zip(names, starts)}
        for name, start in zip(names, starts):  # one vector per kind of picture, on every token of its chunk
            end = starts[starts.index(start) + 1] if start != starts[-1] else len(drill.input_ids)
            assert torch.equal(drill.pictures[start:end], vectors[name].expand(end - start, -1))
        assert len({tuple(v.tolist()) for v in vectors.values()}) == len(set(names))
        # the loss is on the names shown a second time: the tokens right after the targets spell them
        again = [n for k, n in enumerate(names) if n in names[:k]]
        shown = tok.decode([drill.input_ids[p + 1] for p in drill.targets]).replace(" ", "")
        assert shown == "".join(again)


def game_names(page: str) -> list[str]:
    return re.findall(r"<p>This is a (\w+)\.</p>", page)


def test_naming_games_bind_fresh_names_and_the_eval_names_are_held_out(web):
    out, summary = web
    games = [p.read_text() for p in sorted((out / "site" / "games").glob("study-*.html"))]
    assert len(games) == summary["counts"]["pages.binding"] > 5
    seen: dict[str, int] = {}
    for i, page in enumerate(games):
        names = game_names(page)
        assert len(names) == 5 and 2 <= len(set(names)) <= 3  # every picture named, a name used again
        assert len(set(re.findall(r"/img/names/[\w-]+\.jpg", page))) == 5
        for name in set(names):
            assert seen.setdefault(name, i) == i, f"{name} names pictures on two pages"
    questions = json.loads(next((out / summary["eval"] / "binding").glob("*all_questions.json")).read_text())
    eval_names = {q[f"caption_{i}"].split()[-1] for q in questions for i in range(1, 9)}
    # 100 episodes of two fresh names, each asked about both of its kinds
    assert len(questions) == 200 and len(eval_names) == 200 and not eval_names & set(seen)
    web_pictures = {p.read_bytes() for p in (out / "site" / "img" / "names").glob("*.jpg")}
    eval_pictures = {p.read_bytes() for p in (out / summary["eval"] / "binding" / "images").glob("*.jpg")}
    assert len(eval_pictures) == 100 * 8 + 200 and not web_pictures & eval_pictures


def test_quiz_answers_are_what_the_picture_shows(web):
    out, summary = web
    site = out / "site"
    checked = 0
    for page in site.glob("shapes/study-*.html"):
        pattern = r'src="(/img/shapes/[^"]+)"[^>]*>(?:</p>)?\s*<p>Question: What colour are the shapes\? Short answer: (\w+)\.'
        for src, colour in re.findall(pattern, page.read_text()):
            assert dominant_colour(site / src.lstrip("/")) == colour, (src, colour)
            checked += 1
    assert checked >= 3 and summary["counts"]["quiz_questions"] > checked
