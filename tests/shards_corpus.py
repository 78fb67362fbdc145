"""A small real corpus for the shards/interop/inspect tests: webcorpus WARCs → extract → filter → images.

Image URLs on the webcorpus pages point to the live web, so after filtering we point each image node at a
loopback server instead (same URL → same path) that serves real photographs (the webcorpus `photos/`), and
answers 404 for about one URL in nine, so the shard stage also sees images that never made it into the store.
"""

from __future__ import annotations

import hashlib
import http.server
import io
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

WARCS = ("postlight_parser.warc.gz", "cleaneval_dev.warc.gz")


@dataclass
class Corpus:
    documents: Path  # extract output
    filtered: Path  # filter output (kept documents), image URLs rewritten to the loopback server
    store: Path  # image store written by `m3w images`


def photo_jpegs(webcorpus: Path) -> list[bytes]:
    """The webcorpus photos as modest JPEGs (fast to fetch and resize in tests)."""
    from PIL import Image

    out = []
    for path in sorted((webcorpus / "photos").iterdir()):
        if path.suffix not in (".png", ".jpg"):
            continue
        img = Image.open(path).convert("RGB")
        img.thumbnail((480, 480))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def image_handler(photos: list[bytes]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            digest = int(hashlib.sha1(self.path.encode()).hexdigest()[:8], 16)
            if not self.path.startswith("/img/") or digest % 9 == 0:
                self.send_error(404)
                return
            body = photos[digest % len(photos)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass

    return Handler


def rewrite_image_urls(src_dir: str | Path, dst_dir: str | Path, base_url: str) -> None:
    """Copy every documents file (a local folder or a URL), pointing each image node at
    `base_url/img/<sha1 of the original URL>.jpg`."""
    from m3w.pipeline import io
    from m3w.schemas.documents import document_files

    for url in document_files(src_dir):
        table = io.read_parquet(url)
        rows = table.to_pylist()
        for row in rows:
            for node in row["nodes"]:
                if node["kind"] == "image" and node["url"]:
                    node["url"] = f"{base_url}/img/{hashlib.sha1(node['url'].encode()).hexdigest()}.jpg"
        io.write_parquet_atomic(
            pa.Table.from_pylist(rows, schema=table.schema), io.join(dst_dir, io.name_of(url))
        )


def build_corpus(root: Path, webcorpus: Path, start_http_server) -> Corpus:
    from m3w.pipeline.extract import run_extract
    from m3w.pipeline.filter import run_filter
    from m3w.pipeline.images import run_images

    documents = root / "documents"
    run_extract([str(webcorpus / "warc" / name) for name in WARCS], documents)
    run_filter(documents, root / "filter_out")
    base_url, server = start_http_server(root, image_handler(photo_jpegs(webcorpus)))
    try:
        filtered = root / "filtered"
        rewrite_image_urls(root / "filter_out", filtered, base_url)
        store = root / "images"
        run_images([filtered], store, allow_hosts=[base_url.removeprefix("http://")])
    finally:
        server.shutdown()
        server.server_close()
    return Corpus(documents, filtered, store)
