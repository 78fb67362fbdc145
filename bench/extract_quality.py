"""Benchmark what `m3w extract` keeps: main text and content images against every ground truth we have.

    .venv/bin/python bench/extract_quality.py [--verbose]

Figures (targets from issue 16 in brackets):
- trafilatura snippets (webcorpus trafilatura_eval, 988 pages): share of `with` snippets found in the main text
  [>= 0.95] and of `without` (boilerplate) snippets absent from it [>= 0.90].
- text F1 (CleanEval dev, human-cleaned text): bag-of-words F1 of the document's text against the gold text,
  averaged over the 57 pages whose gold text is not empty [>= 0.93].
- postlight (164 article pages): the hand-written first words of the content found at the start of the text, and
  the lead image among the document's images or its og:image.
- content images (tests/data/content_images.json, hand-checked from webcorpus pages): recall and precision of
  the image nodes against the expected main-content images [>= 0.95 / >= 0.85], two URLs of one picture
  (`image_identity`) counting as one, and order: the share of expected image pairs kept in page order [>= 0.98].
- pages with no output: HTTP 200 HTML pages of these sets that yield no document [<= 5].

The trafilatura snippets are scored for trafilatura 2.3.1 too (the anchor, same pages and scorer; it runs in
`.venv-extract-anchors`, see bench/extract_anchors.py).

The last line: `with=<f> without=<f> text_f1=<f> image_recall=<f> image_precision=<f> order=<f> no_output=<n>
trafilatura_with=<f> trafilatura_without=<f>`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.extract_anchors import run_anchor  # noqa: E402
from m3w.pipeline.extract import ExtractConfig, iter_warc_documents  # noqa: E402
from m3w.pipeline.html_extract import image_identity  # noqa: E402

WEBCORPUS = Path(os.environ.get("M3W_WEBCORPUS", ROOT.parent / "shared" / "webcorpus"))
IMAGE_TRUTH = ROOT / "tests" / "data" / "content_images.json"
SETS = ("trafilatura_eval", "cleaneval_dev", "postlight_parser")
_WORD = re.compile(r"\w+")
_CLEANEVAL_MARKUP = re.compile(r"^URL: .*$|<[phl]>", re.M)


def document_text(doc: dict[str, Any]) -> str:
    return " ".join(n["text"] for n in doc["nodes"] if n["kind"] == "text")


def extract_set(name: str) -> tuple[dict[str, dict[str, Any]], Counter]:
    """Documents of one webcorpus WARC by URL, and the extract counts."""
    counts: Counter = Counter()
    docs = iter_warc_documents(str(WEBCORPUS / "warc" / f"{name}.warc.gz"), ExtractConfig(), counts)
    return {d["url"].strip(): d for d in docs}, counts


def load_truth(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.open(WEBCORPUS / "groundtruth" / f"{name}.jsonl.gz")]


def snippet_rates(texts: dict[str, str], verbose: bool) -> tuple[float, float]:
    """Share of `with` snippets found in each page's main text (`texts` by URL) and of `without` snippets absent."""
    found = absent = n_with = n_without = 0
    for page in load_truth("trafilatura_eval"):
        text = " ".join(texts.get(page["url"].strip(), "").split())
        for snippet in page["with"]:
            n_with += 1
            hit = " ".join(snippet.split()) in text
            found += hit
            if verbose and not hit:
                print(f"  missing  {page['url'][:70]}  {snippet[:60]!r}")
        for snippet in page["without"]:
            n_without += 1
            hit = " ".join(snippet.split()) in text
            absent += not hit
            if verbose and hit:
                print(f"  kept     {page['url'][:70]}  {snippet[:60]!r}")
    return found / n_with, absent / n_without


def bag_f1(predicted: str, gold: str) -> float:
    p, g = Counter(_WORD.findall(predicted.lower())), Counter(_WORD.findall(gold.lower()))
    common = sum((p & g).values())
    if not common:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def cleaneval_f1(docs: dict[str, dict[str, Any]], verbose: bool) -> float:
    """Mean bag-of-words F1 over the pages whose gold text is not empty (one dev page, a blog archive index,
    was cleaned to nothing: F1 is undefined there)."""
    scores = []
    for page in load_truth("cleaneval_dev"):
        gold = _CLEANEVAL_MARKUP.sub(" ", page["gold_text"])
        if not _WORD.search(gold):
            continue
        doc = docs.get(page["url"].strip())
        score = bag_f1(document_text(doc) if doc else "", gold)
        scores.append(score)
        if verbose and score < 0.8:
            print(f"  f1={score:.2f} {page['url'][:90]}")
    return sum(scores) / len(scores)


def postlight_rates(docs: dict[str, dict[str, Any]]) -> tuple[float, float]:
    first = n_first = lead = n_lead = 0
    for page in load_truth("postlight_parser"):
        doc = docs.get(page["url"].strip())
        text = " ".join(_WORD.findall(document_text(doc).lower())) if doc else ""
        images = (
            {n["url"] for n in doc["nodes"] if n["kind"] == "image"} | {doc["og_image"]} if doc else set()
        )
        for assertion in page["assertions"]:
            if assertion.get("content_first_words"):
                n_first += 1
                words = " ".join(_WORD.findall(assertion["content_first_words"].lower()))
                first += words in text[: len(words) + 2000]
            if assertion.get("lead_image_url"):
                n_lead += 1
                lead += assertion["lead_image_url"] in images
    return first / n_first, lead / n_lead


def image_scores(docs: dict[str, dict[str, Any]], verbose: bool) -> tuple[float, float, float, int]:
    """(recall, precision, order, pages) over the hand-checked content images."""
    truth = json.loads(IMAGE_TRUTH.read_text())
    tp = fp = fn = pairs = ordered = 0
    for page in truth["pages"]:
        doc = docs.get(page["url"])
        # Two URLs of one picture (another size, a CDN variant) are the same image.
        got = [image_identity(n["url"]) for n in doc["nodes"] if n["kind"] == "image"] if doc else []
        expected = [image_identity(u) for u in page["images"]]
        hits = [u for u in got if u in expected]
        tp += len(set(hits))
        fp += len(set(got) - set(expected))
        fn += len(set(expected) - set(got))
        position = {u: got.index(u) for u in hits}
        kept = [u for u in expected if u in position]
        for i in range(len(kept) - 1):
            pairs += 1
            ordered += position[kept[i]] < position[kept[i + 1]]
        if verbose and (set(got) != set(expected)):
            print(f"  {page['url'][:80]}")
            for u in sorted(set(expected) - set(got)):
                print(f"     missing {u[:110]}")
            for u in sorted(set(got) - set(expected)):
                print(f"     extra   {u[:110]}")
    return tp / max(tp + fn, 1), tp / max(tp + fp, 1), ordered / max(pairs, 1), len(truth["pages"])


def main() -> None:
    verbose = "--verbose" in sys.argv
    docs: dict[str, dict[str, Any]] = {}
    no_output = 0
    for name in SETS:
        found, counts = extract_set(name)
        docs.update(found)
        missing = counts["html"] - counts["skip.http_status"] - counts["documents"]
        no_output += missing
        print(f"{name}: {counts['documents']} documents of {counts['html']} HTML pages, no output: {missing} "
              f"({', '.join(f'{k}={v}' for k, v in sorted(counts.items()) if k.startswith('skip.'))})")  # fmt: skip
    with_rate, without_rate = snippet_rates({url: document_text(doc) for url, doc in docs.items()}, verbose)
    # The anchor, same pages and scorer: trafilatura 2.3.1's main text (bench/extract_anchors.py, own venv).
    with tempfile.TemporaryDirectory() as tmp:
        run_anchor("texts", str(WEBCORPUS / "warc" / "trafilatura_eval.warc.gz"), f"{tmp}/texts.json")
        anchor = {
            url.strip(): text for url, text in json.loads(Path(f"{tmp}/texts.json").read_text()).items()
        }
    anchor_with, anchor_without = snippet_rates(anchor, verbose=False)
    f1 = cleaneval_f1(docs, verbose)
    first_words, lead_image = postlight_rates(docs)
    recall, precision, order, pages = image_scores(docs, verbose)
    print(f"trafilatura snippets: with {with_rate:.3f} (>= 0.95), without {without_rate:.3f} (>= 0.90); "
          f"trafilatura 2.3.1 itself: with {anchor_with:.3f}, without {anchor_without:.3f}")  # fmt: skip
    print(f"CleanEval text F1: {f1:.3f} (>= 0.93)")
    print(f"postlight: first words {first_words:.3f}, lead image {lead_image:.3f}")
    print(f"content images ({pages} hand-checked pages): recall {recall:.3f} (>= 0.95), precision {precision:.3f} "
          f"(>= 0.85), order {order:.3f} (>= 0.98)")  # fmt: skip
    print(f"pages with no output: {no_output} (<= 5)")
    print(f"with={with_rate:.3f} without={without_rate:.3f} text_f1={f1:.3f} image_recall={recall:.3f} "
          f"image_precision={precision:.3f} order={order:.3f} no_output={no_output} "
          f"trafilatura_with={anchor_with:.3f} trafilatura_without={anchor_without:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
