"""`m3w images` end to end on a real Ray and a real HTTP server on 127.0.0.1 serving the webcorpus photos, the
162 image records of the webcorpus crawl WARCs, and every failure the issue lists."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, Route
from fastwarc.warc import ArchiveIterator, WarcRecordType
from PIL import Image

from m3w.pipeline.filters import FilterConfig, check_image_size
from m3w.pipeline.images import ImagesConfig, decode_and_resize, iter_input_urls, resize, run_images
from m3w.pipeline.imagestore import BlobRef, BlobShardWriter, ImageStore, index_generation, write_rows
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
    """Every row every fetch unit ever wrote (all attempts), from the rows files."""
    return [row for f in sorted((store / "rows").glob("*/*.parquet")) for row in pq.read_table(f).to_pylist()]


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
    store.create({"image_size": 320}, buckets=4)
    assert store.lookup(["http://a/x.jpg"]) == {} and store.count() == 0
    # Generation 1: one unit; the same bytes twice in its shard are stored once.
    shard = spec.shard_id(1, 0)
    blobs = BlobShardWriter(store, shard)
    sha, length = blobs.add(b"jpeg bytes")
    assert blobs.add(b"jpeg bytes") == (sha, length) and blobs.images == 1
    write_rows(store, shard, [{"url": "http://a/x.jpg", "status": "timeout", "attempts": 1},
                              {"url": "http://a/404.jpg", "status": "http_error", "http_status": 404, "attempts": 1},
                              {"url": "http://a/503.jpg", "status": "http_error", "http_status": 503, "attempts": 1},
                              {"url": "http://a/reset.jpg", "status": "http_error", "attempts": 1},
                              {"url": "http://a/one.jpg", "status": "ok", "attempts": 1, "resized_sha256": sha,
                               "blob_length": length},
                              {"url": "http://a/two.jpg", "status": "ok", "attempts": 1, "resized_sha256": sha,
                               "blob_length": length}], blobs.close())  # fmt: skip
    with tarfile.open(tmp_path / spec.blob_relpath(shard)) as tar:
        assert tar.getnames() == [f"{sha}.jpg"]
    index_generation(store, 1, [shard])
    rows = store.lookup(["http://a/404.jpg", "http://a/503.jpg", "http://a/reset.jpg", "http://a/x.jpg"])
    finals = {u for u, r in rows.items() if spec.is_final(r["status"], r["http_status"])}
    assert finals == {"http://a/404.jpg"}  # 5xx, timeouts, connection failures: retryable
    usable = store.usable(["http://a/one.jpg", "http://a/two.jpg", "http://a/x.jpg"])
    assert set(usable) == {"http://a/one.jpg", "http://a/two.jpg"}
    assert store.read_blobs(list(usable.values())) == [b"jpeg bytes"] * 2
    # Generation 2: the retry of x.jpg lands in a later unit with more attempts; it wins in the index.
    retry = spec.shard_id(2, 0)
    blobs = BlobShardWriter(store, retry)
    sha2, length2 = blobs.add(b"other bytes")
    write_rows(store, retry, [{"url": "http://a/x.jpg", "status": "ok", "attempts": 2, "resized_sha256": sha2,
                               "blob_length": length2}], blobs.close())  # fmt: skip
    index_generation(store, 2, [retry])
    row = store.lookup(["http://a/x.jpg", "http://unknown/"])
    assert list(row) == ["http://a/x.jpg"] and row["http://a/x.jpg"]["status"] == "ok"
    assert store.read_blob(BlobRef.of(row["http://a/x.jpg"])) == b"other bytes"
    assert store.count() == 6 and sorted(r["url"] for r in store.iter_rows()) == sorted(
        ["http://a/x.jpg", "http://a/404.jpg", "http://a/503.jpg", "http://a/reset.jpg", "http://a/one.jpg",
         "http://a/two.jpg"])  # fmt: skip
    # A stale attempt written later (fewer attempts) does not undo the retry: the most attempts win.
    stale = spec.shard_id(3, 0)
    write_rows(store, stale, [{"url": "http://a/x.jpg", "status": "timeout", "attempts": 1}])
    index_generation(store, 3, [stale])
    assert store.lookup(["http://a/x.jpg"])["http://a/x.jpg"]["attempts"] == 2
    # The same images in any order (fetches finish when they finish) make the same shard, byte for byte.
    images = [b"image %d" % i for i in range(40)]
    made = []
    for order, unit in ((images, 0), (images[::-1], 1)):
        blobs = BlobShardWriter(store, spec.shard_id(4, unit))
        for data in order:
            blobs.add(data)
        offsets = blobs.close()
        made.append(((tmp_path / spec.blob_relpath(spec.shard_id(4, unit))).read_bytes(), offsets))
    assert made[0] == made[1]
    with pytest.raises(ValueError, match="needs its blob shard's offsets"):
        write_rows(store, spec.shard_id(5, 0), [{"url": "http://a/y.jpg", "status": "ok", "resized_sha256": sha,
                                                 "blob_length": length}])  # fmt: skip


def test_lookup_reads_only_the_blocks_it_needs(tmp_path: Path) -> None:
    """A store of 20 k URLs in one bucket: a point lookup finds every URL (fence blocks straddled included)
    and reads a few blocks, not the bucket."""
    store = ImageStore(tmp_path)
    store.create({}, buckets=1)
    shard = spec.shard_id(1, 0)
    urls = [f"http://h/{i}" for i in range(20_000)]
    write_rows(
        store, shard, [{"url": u, "status": "http_error", "http_status": 404, "attempts": 1} for u in urls]
    )
    index_generation(store, 1, [shard])
    index_bytes = (tmp_path / spec.index_relpath(0, 1)).stat().st_size
    assert index_bytes > 20_000 * spec.INDEX_RECORD.itemsize
    found = store.locate(urls[::7] + ["http://h/missing"])
    assert set(found) == set(urls[::7])
    rows = store.lookup(urls[:5])
    assert [rows[u]["url"] for u in urls[:5]] == urls[:5]


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
            stored = Image.open(io.BytesIO(store.read_blob(BlobRef.of(row))))
            assert stored.size == (320, 320) and stored.format == "JPEG"
            assert (row["resized_width"], row["resized_height"]) == (320, 320)
    assert sum(rows[f"{base}/photos/{p.name}"]["status"] == "ok" for p in photos) >= 15

    # The same bytes under two URLs: two rows, the same image (stored once if one unit fetched both).
    twin, dup = rows[f"{base}/photos/sklearn_china.jpg"], rows[f"{base}/dup/same-bytes.jpg"]
    assert twin["resized_sha256"] == dup["resized_sha256"] and twin["sha256"] == dup["sha256"]
    assert store.read_blob(BlobRef.of(twin)) == store.read_blob(BlobRef.of(dup))
    # Every image lives in a blob shard, one tar per fetch unit, each distinct image once per shard.
    members = {}
    for tar_path in sorted((store_dir / "blobs").rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
        assert len(names) == len(set(names))
        members[tar_path.name] = names
    assert sum(map(len, members.values())) == len({(r["blob_shard"], r["resized_sha256"]) for r in rows.values()
                                                   if r["status"] == "ok"})  # fmt: skip
    assert not list(store_dir.rglob("*.jpg"))  # no file per image

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
    assert store.count() == len(urls)  # every URL exactly once in the index


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
    while len(list((store / "rows").glob("*/*.parquet"))) < 2 and time.monotonic() < deadline:
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
    assert ImageStore(store).count() == n


# ---------------------------------------------------------------------------------- inputs, lease, migration


def test_url_lists_keep_whole_lines(tmp_path: Path) -> None:
    """A URL list is one URL a line, spaces included (31 of the 4,072 webcorpus image URLs have them)."""
    urls = ["http://a.example/x y.jpg", "http://a.example/plain.jpg", "http://a.example/ tab\\there.png"]
    listing = tmp_path / "urls.txt"
    listing.write_text("# a comment\n" + "\n".join(f"  {u}  " for u in urls) + "\n\n")
    assert list(iter_input_urls([listing])) == urls


def test_a_second_writer_is_refused_and_a_dead_ones_lease_taken_over(tmp_path: Path) -> None:
    from m3w.pipeline.lease import Lease, LeaseHeld

    with Lease(str(tmp_path)):
        with pytest.raises(LeaseHeld, match="in use by another job"):
            Lease(str(tmp_path)).acquire()
    assert not (tmp_path / "_lease.json").exists()
    # A job killed on this host leaves its lease: the next run takes it over at once.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / "_lease.json").write_text(json.dumps({"owner": "x", "host": os.uname().nodename,
                                                      "pid": int(dead.stdout), "expires": time.time() + 600}))  # fmt: skip
    with Lease(str(tmp_path)) as lease:
        assert json.loads((tmp_path / "_lease.json").read_text())["owner"] == lease.owner


def _legacy_store(root: Path, photos: list[Path]) -> list[str]:
    """A store in layout 1 (one file per image, index/*.parquet), as earlier versions wrote it."""
    schema = pa.schema([(f.name, f.type) for f in spec.IMAGE_ROW_SCHEMA if not f.name.startswith(("url_hash", "blob_"))],
                       metadata={b"m3w.schema_version": b"m3w.images/1"})  # fmt: skip
    rows, urls = [], []
    for i, photo in enumerate(photos):
        data = photo.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (root / "blobs" / sha[:2]).mkdir(parents=True, exist_ok=True)
        (root / "blobs" / sha[:2] / f"{sha}.jpg").write_bytes(data)
        urls.append(f"http://legacy.example/{i}.jpg")
        rows.append({"url": urls[-1], "status": "ok", "attempts": 1, "resized_sha256": sha})
    urls.append("http://legacy.example/gone.jpg")
    first = [{"url": urls[-1], "status": "timeout", "attempts": 1}]
    retry = [{"url": urls[-1], "status": "http_error", "http_status": 404, "attempts": 2}]
    (root / "index").mkdir()
    pq.write_table(pa.Table.from_pylist(rows + retry, schema=schema), root / "index" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(first, schema=schema), root / "index" / "b.parquet")
    (root / "_store_config.json").write_text(json.dumps(ImagesConfig().store_settings()))
    return urls


def test_an_old_store_is_refused_then_migrated(webcorpus: Path, tmp_path: Path, ray_address) -> None:
    photos = photo_files(webcorpus)[:5]
    store_dir = tmp_path / "old"
    urls = _legacy_store(store_dir, photos)
    listing = write_urls(tmp_path / "urls.txt", urls)
    cli = [sys.executable, "-m", "m3w"]
    refused = subprocess.run([*cli, "images", str(listing), "--store", str(store_dir)], capture_output=True,
                             text=True, cwd=ROOT)  # fmt: skip
    assert (
        refused.returncode == 2
        and "m3w store migrate" in refused.stderr
        and "Traceback" not in refused.stderr
    )
    assert not (store_dir / spec.STORE_FILE).exists()  # nothing was written beside the old layout

    migrated = subprocess.run([*cli, "store", "migrate", str(store_dir), "--buckets", "4"], capture_output=True,
                              text=True, cwd=ROOT)  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    store = ImageStore(store_dir)
    rows = store.lookup(urls)
    assert set(rows) == set(urls) and rows[urls[-1]]["attempts"] == 2 and rows[urls[-1]]["http_status"] == 404
    assert [store.read_blob(BlobRef.of(rows[u])) for u in urls[:-1]] == [p.read_bytes() for p in photos]
    assert not list(store_dir.rglob("*.jpg")) and not list((store_dir / "index").glob("*.parquet"))
    # The migrated store serves the stage: every URL is final, nothing is fetched again.
    again = run_images([listing], store_dir, small_config(), ray_address=ray_address)
    assert (again.urls, again.already_final, again.fetched) == (len(urls), len(urls), 0)


def test_a_layout_2_store_is_refused_then_migrated(tmp_path: Path) -> None:
    """Layout 2 (index records without a blob shard of their own, images where their unit stored them)."""
    store = ImageStore(tmp_path)
    store.create(ImagesConfig().store_settings(), buckets=4)
    shard = spec.shard_id(1, 0)
    blobs = BlobShardWriter(store, shard)
    rows = [{"url": f"http://a/{i}.jpg", "status": "ok", "attempts": 1} for i in range(3)]
    for i, row in enumerate(rows):
        row["resized_sha256"], row["blob_length"] = blobs.add(b"jpeg %d" % (i % 2))
    offsets = blobs.close()
    write_rows(
        store,
        shard,
        [*rows, {"url": "http://a/gone.jpg", "status": "http_error", "http_status": 404}],
        offsets,
    )
    index_generation(store, 1, [shard])
    # ... written back as layout 2 wrote it: 72-byte records, magic M3WIDX04, schema m3w.images/2.
    state = json.loads((tmp_path / spec.STORE_FILE).read_text())
    for bucket, generation in enumerate(state["index_generations"]):
        if generation >= 0:
            path = tmp_path / spec.index_relpath(bucket, generation)
            records = spec.decode_index(path.read_bytes(), str(path))
            old = np.zeros(len(records), spec.UNMOVABLE_INDEX_RECORD)
            for name in old.dtype.names:
                old[name] = records[name]
            head = spec.encode_index(records)[len(spec.INDEX_MAGIC) : -records.nbytes]  # counts and fence
            path.write_bytes(spec.UNMOVABLE_INDEX_MAGIC + head + old.tobytes())
    (tmp_path / spec.STORE_FILE).write_text(json.dumps({**state, "schema": spec.UNMOVABLE_SCHEMA_VERSION}))

    cli = [sys.executable, "-m", "m3w"]
    refused = subprocess.run([*cli, "store", "info", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert (
        refused.returncode == 2
        and "m3w store migrate" in refused.stderr
        and "Traceback" not in refused.stderr
    )
    migrated = subprocess.run(
        [*cli, "store", "migrate", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert migrated.returncode == 0 and "migrated 4 URLs, 3 images" in migrated.stdout, migrated.stderr[
        -2000:
    ]
    store = ImageStore(tmp_path)
    assert (
        store.generation == 2 and store.state().history[-1]["migrated_from"] == spec.UNMOVABLE_SCHEMA_VERSION
    )
    found = store.lookup([r["url"] for r in rows] + ["http://a/gone.jpg"])
    assert [store.read_blob(BlobRef.of(found[r["url"]])) for r in rows] == [b"jpeg 0", b"jpeg 1", b"jpeg 0"]
    assert found["http://a/gone.jpg"]["http_status"] == 404
    assert not list(tmp_path.glob("index/*/g000001.idx"))
