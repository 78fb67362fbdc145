"""The anchors issue 16 names for `m3w extract`, run in their own venv (`.venv-extract-anchors`, made by
`ensure_anchor_venv`; they pin lxml and fastwarc versions of their own, kept out of .venv):

    .venv-extract-anchors/bin/python bench/extract_anchors.py speed WARC [--limit N]
    .venv-extract-anchors/bin/python bench/extract_anchors.py texts WARC OUT.json

`speed`: pages per CPU-second of resiliparse's main-content extraction (text only) and of trafilatura's
`extract`, each over the HTTP 200 HTML responses of WARC read with fastwarc (WARC reading included, as in
bench/extract.py), best of `--repeats`; trafilatura over the first `--limit` pages (it is ~10x slower). Prints one
JSON object. `texts`: trafilatura's main text of every page, as {url: text}, for bench/extract_quality.py to
score with the scorer it uses for m3w.

This file imports nothing from m3w: it runs where m3w is not installed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR_VENV = ROOT / ".venv-extract-anchors"
ANCHOR_PACKAGES = ("resiliparse==2.0.1", "trafilatura==2.3.1", "lxml_html_clean")


def ensure_anchor_venv() -> Path:
    """The anchor venv's python, creating the venv on first use (from the package index, as `make setup` does)."""
    python = ANCHOR_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {ANCHOR_VENV.name} ({', '.join(ANCHOR_PACKAGES)})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(ANCHOR_VENV)], check=True)
        subprocess.run([str(ANCHOR_VENV / "bin" / "pip"), "install", "-q", *ANCHOR_PACKAGES], check=True)
    return python


def run_anchor(*args: str) -> str:
    """Run this script in the anchor venv; its stdout."""
    command = [str(ensure_anchor_venv()), str(Path(__file__).resolve()), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def html_pages(warc: str, limit: int | None = None) -> Iterator[tuple[str, bytes]]:
    """(url, HTTP body) of the HTTP 200 HTML responses of a WARC, read with fastwarc."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    with open(warc, "rb") as stream:
        n = 0
        for record in ArchiveIterator(stream, record_types=WarcRecordType.response, parse_http=True):
            content_type = (record.http_headers.get("Content-Type") or "").lower()
            if record.http_headers.status_code != 200 or "html" not in content_type:
                continue
            yield record.headers.get("WARC-Target-URI", ""), record.reader.read()
            n += 1
            if limit is not None and n >= limit:
                return


def resiliparse_pass(warc: str) -> tuple[int, float]:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding
    from resiliparse.parse.html import HTMLTree

    pages, cpu = 0, time.process_time()
    for _, body in html_pages(warc):
        tree = HTMLTree.parse(bytes_to_str(body, detect_encoding(body)))
        extract_plain_text(tree, main_content=True)
        pages += 1
    return pages, time.process_time() - cpu


def trafilatura_pass(warc: str, limit: int) -> tuple[int, float]:
    import trafilatura

    pages, cpu = 0, time.process_time()
    for _, body in html_pages(warc, limit):
        trafilatura.extract(body)
        pages += 1
    return pages, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("speed", "texts"))
    parser.add_argument("warc")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--limit", type=int, default=300, help="speed: pages trafilatura extracts")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.mode == "texts":
        import trafilatura

        texts = {url: trafilatura.extract(body) or "" for url, body in html_pages(args.warc)}
        Path(args.out).write_text(json.dumps(texts))
        return
    resiliparse = min((resiliparse_pass(args.warc) for _ in range(args.repeats)), key=lambda r: r[1])
    trafilatura = min(
        (trafilatura_pass(args.warc, args.limit) for _ in range(args.repeats)), key=lambda r: r[1]
    )
    print(json.dumps({"resiliparse_pages_per_cpu_s": resiliparse[0] / resiliparse[1],
                      "trafilatura_pages_per_cpu_s": trafilatura[0] / trafilatura[1],
                      "resiliparse_pages": resiliparse[0], "trafilatura_pages": trafilatura[0]}))  # fmt: skip


if __name__ == "__main__":
    main()
