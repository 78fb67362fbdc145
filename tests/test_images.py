"""`m3w images` end to end on a real Ray and a real HTTP server on 127.0.0.1 serving the webcorpus photos, the
162 image records of the webcorpus crawl WARCs, and every failure the issue lists."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, Route
from fastwarc.warc import ArchiveIterator, WarcRecordType
from PIL import Image

from m3w.pipeline.filters import FilterConfig, check_image_size
from m3w.pipeline.images import ImagesConfig, decode_and_resize, iter_input_urls, resize, run_images
from m3w.pipeline.imagestore import ImageStore
from m3w.pipeline.manifest import Manifest
from m3w.schemas import documents as doc_spec
from m3w.schemas import images as spec


def photo_files(webcorpus: Path) -> list[Path]:
    return sorted(p for p in (webcorpus / "photos").iterdir() if p.suffix in (".jpg", ".png"))


def warc_images(webcorpus: Path) -> list[tuple[dict, bytes]]:
    """(index record, HTTP body) of every image response record listed in warc_image_index.jsonl."""
    out = []
    with open(webcorpus / "warc_image_index.jsonl") as f:
        records = [json.loads(line) for line in f]
    for record in records:
        with open(webcorpus / record["warc_file"], "rb") as warc:
            warc.seek(record["warc_offset"])
            response = next(
                iter(ArchiveIterator(warc, record_types=WarcRecordType.response, parse_http=True))
            )
            assert response.headers["WARC-Record-ID"] == record["warc_record_id"]
            out.append((record, response.reader.read()))
    return out


@functools.lru_cache(maxsize=1)
def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit PNG of width×height pixels: ~110 KB on the wire, 900 megapixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def small_config(**overrides) -> ImagesConfig:
    config = ImagesConfig(max_attempts=2, urls_per_unit=100, threads_per_task=8)
    config.fetch.connect_timeout, config.fetch.read_timeout, config.fetch.total_timeout = 2.0, 1.0, 10.0
    config.fetch.max_bytes = 2_000_000
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def admit(base: str) -> list[str]:
    """The allow-list entry of a test server: its own address and port, nothing else."""
    return [base.removeprefix("http://")]


def write_urls(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(f"{u}\n" for u in urls))
    return path


def index_rows(store: Path) -> list[dict]:
    return [row for f in sorted((store / "index").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


# ------------------------------------------------------------------------------------------ decode / resize


def test_resize_modes_on_a_real_photo(webcorpus: Path) -> None:
    img = Image.open(webcorpus / "photos" / "sklearn_china.jpg").convert("RGB")  # 640×427
    assert resize(img, 320, "center_crop").size == (320, 320)
    kept = resize(img, 320, "keep_ratio")
    assert kept.height == 320 and abs(kept.width / kept.height - 640 / 427) < 0.01
    padded = resize(img, 320, "pad", (0, 0, 0))
    assert padded.size == (320, 320)
    assert padded.getpixel((160, 2)) == (0, 0, 0) and padded.getpixel((160, 317)) == (0, 0, 0)  # letterbox
    assert padded.getpixel((160, 160)) != (0, 0, 0)
    with pytest.raises(ValueError, match="resize_mode"):
        ImagesConfig(resize_mode="stretch")
    # every resampling filter gives the geometry; they differ only in the pixels
    by_filter = {f: resize(img, 320, "center_crop", resample=f) for f in ("bicubic", "lanczos", "bilinear")}
    assert {out.size for out in by_filter.values()} == {(320, 320)}
    assert by_filter["bicubic"].tobytes() != by_filter["lanczos"].tobytes()
    with pytest.raises(ValueError, match="resample"):
        ImagesConfig(resample="nearest")


def test_decode_uses_real_size_and_jpeg_draft(webcorpus: Path) -> None:
    data = (webcorpus / "photos" / "skimage_retina.jpg").read_bytes()  # 1411×1411: decoded at 1/4 scale
    for mode, size in (("center_crop", (320, 320)), ("keep_ratio", (320, 320)), ("pad", (320, 320))):
        decoded = decode_and_resize(data, ImagesConfig(resize_mode=mode))
        assert (decoded.width, decoded.height, decoded.format) == (1411, 1411, "jpeg")
        out = Image.open(io.BytesIO(decoded.jpeg))
        assert out.format == "JPEG" and out.mode == "RGB" and out.size == size
    # Same bytes, same blob: the encoder is deterministic.
    assert decode_and_resize(data, ImagesConfig()).jpeg == decode_and_resize(data, ImagesConfig()).jpeg


def test_store_merges_attempts_and_dedupes_blobs(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    assert store.lookup(["http://a/x.jpg"]) == {} and store.final_urls() == set()
    key = store.write_blob(b"jpeg bytes")
    assert store.write_blob(b"jpeg bytes") == key and len(list(tmp_path.rglob("*.jpg"))) == 1
    assert store.read_blob(key) == b"jpeg bytes" and store.blob_path(key).relative_to(tmp_path) == Path(
        spec.blob_relpath(key)
    )
    # The retry lands in a file that sorts *before* the first attempt: the attempt count decides, not names.
    store.write_index("b-first", [{"url": "http://a/x.jpg", "status": "timeout", "attempts": 1},
                                  {"url": "http://a/404.jpg", "status": "http_error", "http_status": 404, "attempts": 1},
                                  {"url": "http://a/503.jpg", "status": "http_error", "http_status": 503, "attempts": 1},
                                  {"url": "http://a/reset.jpg", "status": "http_error", "attempts": 1}])  # fmt: skip
    assert store.final_urls() == {"http://a/404.jpg"}  # 5xx, timeouts, connection failures: retryable
    store.write_index(
        "a-retry", [{"url": "http://a/x.jpg", "status": "ok", "attempts": 2, "resized_sha256": key}]
    )
    rows = store.lookup(["http://a/x.jpg", "http://unknown/"])
    assert list(rows) == ["http://a/x.jpg"] and rows["http://a/x.jpg"]["status"] == "ok"
    assert store.final_urls() == {"http://a/404.jpg", "http://a/x.jpg"} and len(store.table()) == 4
    with pytest.raises(FileNotFoundError):
        store.read_blob("0" * 64)


# --------------------------------------------------------------------------------------- the whole stage


@pytest.fixture
def corpus_server(webcorpus: Path, serve_routes):
    """Every case of the issue's list on one loopback server. Returns (base, hits, expected status by path)."""
    photo = (webcorpus / "photos" / "sklearn_china.jpg").read_bytes()
    routes: dict[str, Route] = {}
    expected: dict[str, str] = {}
    for path in photo_files(webcorpus):
        routes[f"/photos/{path.name}"] = Route(path.read_bytes(), headers={"Content-Type": "image/*"})
    routes["/dup/same-bytes.jpg"] = Route(photo)  # the same bytes as /photos/sklearn_china.jpg
    expected["/dup/same-bytes.jpg"] = "ok"
    cases = {
        "/404.jpg": (Route(b"gone", 404), "http_error"),
        "/500.jpg": (Route(b"oops", 500), "http_error"),
        "/slow.jpg": (Route(photo, delay=3.0), "timeout"),
        "/truncated.jpg": (Route(photo[: len(photo) // 2]), "decode_error"),
        "/html.jpg": (
            Route(b"<html><body>Not found</body></html>", headers={"Content-Type": "image/jpeg"}),
            "not_an_image",
        ),  # fmt: skip
        "/bomb.png": (Route(png_bomb(), headers={"Content-Type": "image/png"}), "too_large"),
        "/huge.jpg": (Route(b"\xff\xd8" + b"\0" * 2_500_000), "too_large"),
        "/to-metadata.jpg": (
            Route(status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}),
            "blocked_address",
        ),  # fmt: skip
        "/to-file.jpg": (Route(status=302, headers={"Location": "file:///etc/passwd"}), "blocked_address"),
        "/noai.jpg": (Route(photo, headers={"X-Robots-Tag": "noai"}), "opted_out"),
        "/pixel.gif": (
            Route(
                bytes.fromhex(
                    "47494638396101000100800000ffffff00000021f90401000000002c00000000010001000002024401003b"
                )
            ),
            "too_small",
        ),  # fmt: skip
        "/wide.jpg": (Route(_jpeg(900, 200)), "filtered"),  # aspect ratio 4.5 > the filter's 2.0
    }
    for path, (route, status) in cases.items():
        routes[path], expected[path] = route, status
    records = warc_images(webcorpus)
    for i, (record, body) in enumerate(records):
        routes[f"/warc/{i}"] = Route(body, headers={"Content-Type": record["content_type"]})
    base, hits = serve_routes(routes)
    return base, hits, expected, records


def _jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


def test_every_case_ends_in_the_right_status(webcorpus, corpus_server, ray_address, tmp_path) -> None:
    base, hits, expected, records = corpus_server
    photos = photo_files(webcorpus)
    urls = [f"{base}/photos/{p.name}" for p in photos] + [f"{base}{p}" for p in expected]
    urls += [f"{base}/warc/{i}" for i in range(len(records))]
    png = (webcorpus / "photos" / "skimage_coins.png").read_bytes()
    data_uris = {f"data:image/png;base64,{base64.b64encode(png).decode()}": "ok",
                 "data:text/html,<b>hi</b>": "bad_url", f"data:image/png;base64,{base64.b64encode(png[:2000]).decode()}": "decode_error"}  # fmt: skip
    urls += list(data_uris)
    url_file = write_urls(tmp_path / "urls.txt", urls + urls[:5])  # duplicates in the input count once
    store_dir = tmp_path / "store"
    config = small_config()

    summary = run_images([url_file], store_dir, config, ray_address=ray_address, allow_hosts=admit(base))
    assert summary.urls == len(urls) and summary.fetched == len(urls) and summary.units_failed == 0
    store = ImageStore(store_dir)
    rows = store.lookup(urls)
    assert set(rows) == set(urls)
    assert {k: rows[base + k]["status"] for k in expected} == expected
    assert {u: rows[u]["status"] for u in data_uris} == data_uris  # inline images: decoded, never fetched

    # The real photos: stored at 320×320 with their true original size (min side < 150 → the filter's rule).
    for path in photos:
        row = rows[f"{base}/photos/{path.name}"]
        with Image.open(path) as original:
            assert (row["original_width"], row["original_height"]) == original.size
            assert row["original_format"] == original.format.lower()
        assert row["sha256"] and row["original_bytes"] == path.stat().st_size and row["http_status"] == 200
        want = (
            "ok" if check_image_size(*original.size, original.format, FilterConfig().image)[0] else "filtered"
        )
        assert row["status"] == want, (path.name, row)
        if want == "ok":
            stored = Image.open(io.BytesIO(store.read_blob(row["resized_sha256"])))
            assert stored.size == (320, 320) and stored.format == "JPEG"
            assert (row["resized_width"], row["resized_height"]) == (320, 320)
    assert sum(rows[f"{base}/photos/{p.name}"]["status"] == "ok" for p in photos) >= 15

    # The same bytes under two URLs: two rows, one blob.
    twin, dup = rows[f"{base}/photos/sklearn_china.jpg"], rows[f"{base}/dup/same-bytes.jpg"]
    assert twin["resized_sha256"] == dup["resized_sha256"] and twin["sha256"] == dup["sha256"]
    blobs = list((store_dir / "blobs").rglob("*.jpg"))
    assert len(blobs) == len({r["resized_sha256"] for r in rows.values() if r["resized_sha256"]})

    # The crawl's image records: SVG is not an image we decode; raster images get their real size and the
    # filter stage's verdict on it.
    for i, (record, body) in enumerate(records):
        row = rows[f"{base}/warc/{i}"]
        if record["content_type"] == "image/svg+xml":
            assert row["status"] == "not_an_image"
            continue
        with Image.open(io.BytesIO(body)) as original:
            assert (row["original_width"], row["original_height"]) == original.size
            keep, reason = check_image_size(*original.size, original.format, FilterConfig().image)
            if min(original.size) < config.min_side:  # tracking pixels and spacers
                keep, reason = False, None
        want = "ok" if keep else "filtered" if reason else "too_small"
        assert row["status"] == want, (record["image_uri"], row)
        assert row["error_message"] == (None if keep else reason) or want == "too_small"

    # Errors carry their message; the bomb was refused from its header, never decoded.
    assert "900000000 pixels" in rows[f"{base}/bomb.png"]["error_message"]
    assert rows[f"{base}/500.jpg"]["http_status"] == 500
    assert hits["/photos/sklearn_china.jpg"] == 1 and hits["/500.jpg"] == 1
    # Counts by status are in the manifest.
    totals = Manifest(store_dir, "images").totals()
    assert totals["images"] == len(urls)
    assert {k.removeprefix("status."): v for k, v in totals.items() if k.startswith("status.")} == Counter(
        r["status"] for r in rows.values()
    )

    # A re-run fetches nothing with a final status; the 5xx and the timeout get their bounded second attempt.
    before = Counter(hits)
    again = run_images([url_file], store_dir, config, ray_address=ray_address, allow_hosts=admit(base))
    assert again.already_final == len(urls) - 2 and again.fetched == 2
    assert Counter(hits) - before == Counter({"/500.jpg": 1, "/slow.jpg": 1})
    assert store.lookup([f"{base}/500.jpg"])[f"{base}/500.jpg"]["attempts"] == 2
    # ... and then they are out of attempts: a third run fetches nothing at all.
    before = Counter(hits)
    third = run_images([url_file], store_dir, config, ray_address=ray_address, allow_hosts=admit(base))
    assert (third.fetched, third.retries_exhausted) == (0, 2) and Counter(hits) == before
    assert len(store.table()) == len(urls)  # every URL exactly once in the merged index


def test_warc_images_all_decode_without_filters(webcorpus, corpus_server, ray_address, tmp_path) -> None:
    """With the filter rules off, every raster image of the crawl decodes and resizes (PNG palettes with
    transparency, GIFs, grayscale, CMYK JPEG...); pad mode keeps whole logos."""
    base, _, _, records = corpus_server
    urls = [f"{base}/warc/{i}" for i in range(len(records))]
    config = small_config(resize_mode="pad", min_side=1)
    config.filters.enabled = False
    run_images([write_urls(tmp_path / "u.txt", urls)], tmp_path / "store", config, ray_address=ray_address,
               allow_hosts=admit(base))  # fmt: skip
    rows = ImageStore(tmp_path / "store").lookup(urls)
    statuses = Counter(row["status"] for row in rows.values())
    assert statuses == {"ok": len(records) - 3, "not_an_image": 3}, statuses


def test_loopback_refused_without_the_flag(webcorpus, corpus_server, ray_address, tmp_path) -> None:
    base, hits, _, _ = corpus_server
    url = f"{base}/photos/sklearn_china.jpg"
    summary = run_images([write_urls(tmp_path / "u.txt", [url])], tmp_path / "store", small_config(),
                         ray_address=ray_address)  # fmt: skip
    assert summary.statuses == {"blocked_address": 1}
    assert ImageStore(tmp_path / "store").lookup([url])[url]["status"] == "blocked_address"
    assert hits[url.removeprefix(base)] == 0


def test_filtered_documents_input(webcorpus, corpus_server, ray_address, tmp_path) -> None:
    """A filtered/ directory: the image nodes' URLs are fetched; excluded/ tables and text nodes are not."""
    base, hits, _, _ = corpus_server
    names = [p.name for p in photo_files(webcorpus)[:4]]

    def node(i: int, kind: str, **fields) -> dict:
        return {"kind": kind, "node_index": i, **fields}

    docs = [
        {"doc_id": f"d{j}", "url": f"https://example.org/{j}",
         "nodes": [node(0, "text", text="hello", block="paragraph"),
                   node(1, "image", url=f"{base}/photos/{names[j]}"), node(2, "image", url=f"{base}/photos/{names[j + 2]}")]}
        for j in range(2)
    ]  # fmt: skip
    filtered = tmp_path / "filtered"
    (filtered / "excluded").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(docs, schema=doc_spec.DOCUMENT_SCHEMA), filtered / "part-0.parquet")
    excluded = [{"doc_id": "d9", "level": "image", "filter": "image.url", "reason": "logo",
                 "content": f"{base}/404.jpg"}]  # fmt: skip
    pq.write_table(
        pa.Table.from_pylist(excluded, schema=doc_spec.EXCLUDED_SCHEMA), filtered / "excluded" / "x.parquet"
    )
    assert sorted(iter_input_urls([filtered])) == sorted(f"{base}/photos/{n}" for n in names)
    summary = run_images(
        [filtered], tmp_path / "store", small_config(), ray_address=ray_address, allow_hosts=admit(base)
    )
    assert summary.fetched == 4 and hits["/404.jpg"] == 0

    with pytest.raises(ValueError, match="image_size"):  # one store, one geometry
        run_images([filtered], tmp_path / "store", small_config(image_size=224), ray_address=ray_address)


def test_kill_mid_run_then_rerun_keeps_every_url_once(webcorpus, serve_routes, ray_address, tmp_path) -> None:
    photos = [p.read_bytes() for p in photo_files(webcorpus)]
    n, per_unit = 240, 30
    routes = {f"/k/{i}.img": Route(photos[i % len(photos)], delay=0.05) for i in range(n)}
    base, hits = serve_routes(routes)
    urls = [f"{base}/k/{i}.img" for i in range(n)]
    url_file = write_urls(tmp_path / "urls.txt", urls)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "m3w", "images", str(url_file), "--store", str(store),
           "--allow-host", admit(base)[0], "--workers", "1", "--ray-address", ray_address,
           "--set", f"urls_per_unit={per_unit}", "--set", "threads_per_task=2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((store / "index").glob("*.parquet"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = {row["url"] for row in index_rows(store)}
    assert 0 < len(partial) < n

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = index_rows(store)
    assert Counter(row["url"] for row in rows) == Counter(urls)  # every URL exactly once, nothing lost
    assert {row["status"] for row in rows} <= {"ok", "filtered"}
    # Only the chunk in flight at the kill may have been fetched twice.
    assert sum(hits.values()) <= n + per_unit
    assert all(hits[f"/k/{i}.img"] >= 1 for i in range(n))
    assert len(ImageStore(store).table()) == n
