"""The image filter steps on real webcorpus photos: pHash near duplicates, blur, text share, and the model steps
with tiny random Hugging Face models saved to a temp dir (nothing is downloaded)."""

from __future__ import annotations

import functools
import io
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from m3w.pipeline.image_filters import ImageFilters, ImageFiltersConfig
from m3w.pipeline.image_filters.signals import hamming, laplacian_variance, luma, perceptual_hash, text_share
from m3w.pipeline.images import ImagesConfig, decode_and_resize

STORED = ImagesConfig(min_side=1)  # what the images stage stores: 320×320 center crops, JPEG q95
STORED.filters.enabled = False


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def stored(data: bytes) -> bytes:
    """The stored JPEG the images stage makes of downloaded bytes (scores are computed from it)."""
    return decode_and_resize(data, STORED).jpeg


@pytest.fixture(scope="module")
def photos(webcorpus: Path) -> dict[str, tuple[bytes, str]]:
    """name → (stored JPEG, caption or "") of every webcorpus photo."""
    out = {}
    with open(webcorpus / "photos.jsonl") as f:
        for line in f:
            record = json.loads(line)
            path = webcorpus / record["file"]
            out[path.name] = (stored(path.read_bytes()), record.get("caption_short") or "")
    return out


def text_image(size: int, width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A screenshot-like page of text in the given font size."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while data corpus image text model crawl".split()
    img = Image.new("RGB", (width, height), (250, 250, 245))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=size)
    for y in range(8, height - size, int(size * 1.5)):
        draw.text((8, y), " ".join(rng.choice(words) for _ in range(60)), fill=(20, 20, 20), font=font)
    return img


def qr_code(modules: int = 29, module_px: int = 8, seed: int = 0) -> Image.Image:
    """A QR-code-like symbol: random modules with the three finder patterns, in a quiet zone."""
    rng = np.random.default_rng(seed)
    dark = rng.random((modules, modules)) < 0.5
    for r, c in ((0, 0), (0, modules - 7), (modules - 7, 0)):
        dark[r : r + 7, c : c + 7] = False
        dark[r : r + 7, [c, c + 6]] = dark[[r, r + 6], c : c + 7] = True
        dark[r + 2 : r + 5, c + 2 : c + 5] = True
    pixels = np.where(np.kron(dark, np.ones((module_px, module_px))), 0, 255).astype(np.uint8)
    return Image.fromarray(np.pad(pixels, 4 * module_px, constant_values=255)).convert("RGB")


# ---------------------------------------------------------------------------------------------- signals


def test_phash_catches_resized_and_reencoded_copies_and_keeps_distinct_photos(webcorpus, photos) -> None:
    """Copies of each photo (downscaled, upscaled, re-encoded at low quality) hash alike or within 4 bits; the
    corpus-wide count groups identical hashes, which most copies have. Different photos differ by ≥ 16 bits."""
    hashes = {name: perceptual_hash(luma(jpeg)) for name, (jpeg, _) in photos.items()}
    assert len(hashes) == 21
    for (a, ha), (b, hb) in itertools.combinations(hashes.items(), 2):  # 210 pairs of different photos
        assert hamming(ha, hb) >= 16, (a, b, hamming(ha, hb))
    distances = []
    for name, original in hashes.items():
        img = Image.open(webcorpus / "photos" / name).convert("RGB")
        for scale, quality in ((0.5, 70), (1.6, 92), (0.35, 50)):
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            copy = stored(jpeg_bytes(img.resize(size, Image.Resampling.BILINEAR), quality))
            distances.append(hamming(original, perceptual_hash(luma(copy))))
    assert max(distances) <= 4 and distances.count(0) >= 0.85 * len(distances), sorted(distances)
    # Vectorised distances agree with the scalar ones.
    values = np.array(list(hashes.values()), dtype=np.int64)
    assert list(hamming(values, values[0])) == [hamming(int(h), int(values[0])) for h in values]


def test_blur_is_low_for_blurred_and_flat_images(webcorpus, photos) -> None:
    blur = {name: laplacian_variance(luma(jpeg)) for name, (jpeg, _) in photos.items()}
    assert blur["skimage_clock_motion.png"] < 20 < min(blur["sklearn_china.jpg"], blur["skimage_coins.png"])
    sharp = Image.open(webcorpus / "photos" / "sklearn_china.jpg")
    for radius in (2, 4):
        blurred = stored(jpeg_bytes(sharp.filter(ImageFilter.GaussianBlur(radius))))
        assert laplacian_variance(luma(blurred)) < blur["sklearn_china.jpg"] / 10


def test_text_share_is_high_for_text_and_qr_codes_low_for_photos(photos) -> None:
    share = {name: text_share(luma(jpeg)) for name, (jpeg, _) in photos.items()}
    assert share["skimage_page.png"] >= 0.4  # a photographed page of a book
    for size in (10, 16, 28):
        assert text_share(luma(stored(jpeg_bytes(text_image(size))))) >= 0.8, size
    assert text_share(luma(stored(jpeg_bytes(qr_code())))) >= 0.5
    # Photos: almost no text-like tiles. The brick wall (regular two-tone strokes) is the heuristic's known
    # false positive, still under the page of text.
    others = {k: v for k, v in share.items() if k not in ("skimage_page.png", "skimage_brick.png")}
    assert max(others.values()) < 0.15 and np.median(list(others.values())) < 0.05, others
    assert share["skimage_brick.png"] < share["skimage_page.png"]


def test_thresholds_drop_with_a_reason_and_count_in_a_funnel(photos) -> None:
    config = ImageFiltersConfig()
    config.blur.min_laplacian_variance, config.text.max_text_share = 20.0, 0.4
    filters = ImageFilters(config)
    rows = [{"url": name, **filters.signals(jpeg)} for name, (jpeg, _) in photos.items()]
    rows.append({"url": "old-row-without-scores"})
    assert {"phash", "blur", "text_share"} <= set(rows[0])
    verdicts = {row["url"]: filters.verdict(row) for row in rows}
    assert verdicts["skimage_clock_motion.png"][0] == "image.blur"
    assert verdicts["skimage_clock_motion.png"][1].startswith("image.blur: blur ")
    assert verdicts["skimage_page.png"] == ("image.text_share", verdicts["skimage_page.png"][1])
    assert verdicts["sklearn_china.jpg"] is None and verdicts["old-row-without-scores"] is None
    counts = filters.funnel(rows)
    dropped = sum(v for k, v in counts.items() if k.startswith("drop."))
    assert counts["in.images"] == 22 and counts["out.images"] == 22 - dropped
    assert counts["drop.image.blur.images"] == sum(1 for v in verdicts.values() if v and v[0] == "image.blur")
    assert counts["unscored.image.blur"] == 1 and counts["unscored.image.text_share"] == 1
    # Looser thresholds on the same stored scores: nothing to recompute.
    config.blur.min_laplacian_variance = config.text.max_text_share = None
    assert ImageFilters(config).funnel(rows)["out.images"] == 22


def test_steps_off_compute_nothing(photos) -> None:
    config = ImageFiltersConfig()
    config.phash.enabled = config.blur.enabled = config.text.enabled = False
    filters = ImageFilters(config)
    assert filters.signals(photos["sklearn_china.jpg"][0]) == {} and not filters.uses_models


# ------------------------------------------------------------------------------------------ model steps


def _tiny_tokenizer(path: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, photos) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("tiny-clip")
    _tiny_tokenizer(path, [caption for _, caption in photos.values()])
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(text_config={**tower, "vocab_size": 256, "max_position_embeddings": 32},
                        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16)  # fmt: skip
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory, photos) -> Path:
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    path = tmp_path_factory.mktemp("tiny-siglip")
    _tiny_tokenizer(path, [caption for _, caption in photos.values()])
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = SiglipConfig(text_config={**tower, "vocab_size": 256, "max_position_embeddings": 16},
                          vision_config={**tower, "image_size": 32, "patch_size": 8})  # fmt: skip
    SiglipModel(config).save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny-nsfw")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})  # fmt: skip
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.mark.parametrize("model", ["tiny_clip", "tiny_siglip"])
def test_clip_relevance_scores_batched_and_drops_by_threshold(request, photos, model: str) -> None:
    config = ImageFiltersConfig()
    config.clip.enabled, config.clip.model, config.clip.batch_size = (
        True,
        str(request.getfixturevalue(model)),
        8,
    )
    names = sorted(photos)
    jpegs = [photos[n][0] for n in names]
    texts: list[str | None] = [photos[n][1] or "a photograph" for n in names]
    texts[3] = None  # an image without text on its page: no score, never dropped for it
    rows = [{"url": n} for n in names]
    ImageFilters(config).score_models(rows, jpegs, texts)
    scores = [row["clip_similarity"] for row in rows]
    assert scores[3] is None and all(-1.0 <= s <= 1.0 for i, s in enumerate(scores) if i != 3)
    assert len({round(s, 6) for i, s in enumerate(scores) if i != 3}) > 10  # the image and text matter
    assert {row["clip_model"] for row in rows} == {config.clip.model}
    again = [{"url": n} for n in names]
    config.clip.batch_size = 64  # batching does not change a score
    ImageFilters(config).score_models(again, jpegs, texts)
    assert np.allclose([r["clip_similarity"] or 0 for r in again], [s or 0 for s in scores], atol=1e-5)
    config.clip.min_similarity = float(np.median([s for s in scores if s is not None]))
    filters = ImageFilters(config)
    dropped = {row["url"] for row in rows if filters.verdict(row)}
    assert dropped == {row["url"] for row in rows if row["clip_similarity"] is not None
                       and row["clip_similarity"] < config.clip.min_similarity}  # fmt: skip
    assert 5 <= len(dropped) <= 15
    assert filters.verdict(rows[0]) is None or config.clip.model in filters.verdict(rows[0])[1]


def test_nsfw_scores_any_classifier_and_drops_by_threshold(photos, tiny_classifier) -> None:
    config = ImageFiltersConfig()
    config.nsfw.enabled, config.nsfw.model = True, str(tiny_classifier)
    rows = [{"url": n} for n in sorted(photos)]
    ImageFilters(config).score_models(rows, [photos[r["url"]][0] for r in rows], [None] * len(rows))
    scores = np.array([row["nsfw_score"] for row in rows])
    assert ((scores >= 0) & (scores <= 1)).all() and scores.std() > 0
    config.nsfw.max_score = float(np.median(scores))
    filters = ImageFilters(config)
    dropped = [row for row in rows if filters.verdict(row)]
    assert dropped and all(r["nsfw_score"] > config.nsfw.max_score for r in dropped)
    assert all(filters.verdict(r)[0] == "image.nsfw" for r in dropped)

    config.nsfw.labels = ["porn"]  # this classifier has no such label: one clear error, not silent zeros
    with pytest.raises(ValueError, match="none of its labels"):
        ImageFilters(config).score_models(rows[:1], [photos[rows[0]["url"]][0]], [None])


# ----------------------------------------------------------------------------------- the images stage


def test_images_stage_stores_scores_and_a_threshold_change_replays_without_fetching(
    webcorpus, photos, serve_routes, ray_address, tmp_path, tiny_classifier
) -> None:
    from conftest import Route

    from m3w.pipeline.images import run_images
    from m3w.pipeline.imagestore import ImageStore
    from m3w.pipeline.shards.interleaved import stored_images
    from m3w.pipeline.stats import format_funnel, funnel

    names = ["sklearn_china.jpg", "skimage_clock_motion.png", "skimage_page.png", "skimage_coffee.png"]
    china = Image.open(webcorpus / "photos" / "sklearn_china.jpg")
    routes = {f"/{n}": Route((webcorpus / "photos" / n).read_bytes()) for n in names}
    routes["/china-copy.jpg"] = Route(jpeg_bytes(china.resize((320, 213)), quality=60))  # resized, re-encoded
    base, hits = serve_routes(routes)
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{base}{path}\n" for path in routes))
    store = tmp_path / "store"
    config = ImagesConfig()
    config.filters.enabled = False  # the size rules would drop the page (aspect 2.01): not under test
    nsfw = config.image_filters.nsfw
    nsfw.enabled, nsfw.model, nsfw.max_score = True, str(tiny_classifier), None  # scores only, at first
    run = functools.partial(run_images, [urls], store, ray_address=ray_address, allow_hosts=[base[7:]])

    first = run(config)
    assert first.statuses == {"ok": 5} and first.filter_drops == {} and first.units_failed == 0, first
    rows = ImageStore(store).lookup([f"{base}{p}" for p in routes])
    for row in rows.values():
        assert row["phash"] is not None and row["blur"] > 0 and 0 <= row["text_share"] <= 1
        assert 0 <= row["nsfw_score"] <= 1 and row["nsfw_model"] == str(tiny_classifier)
        assert row["clip_similarity"] is None  # the step is off
    copy, original = rows[f"{base}/china-copy.jpg"], rows[f"{base}/sklearn_china.jpg"]
    assert copy["phash"] == original["phash"]  # the resized, re-encoded copy hashes alike

    config.image_filters.blur.min_laplacian_variance, config.image_filters.text.max_text_share = 20.0, 0.4
    fetched_before = sum(hits.values())
    second = run(config)
    assert second.fetched == 0 and sum(hits.values()) == fetched_before  # nothing fetched, nothing re-scored
    assert second.filter_drops == {"image.blur": 1, "image.text_share": 1}, second.filter_drops
    docs = [{"nodes": [{"kind": "image", "url": f"{base}{p}"} for p in routes]}]
    assert set(stored_images(ImageStore(store), docs)) == {f"{base}{p}" for p in routes} - {
        f"{base}/skimage_clock_motion.png", f"{base}/skimage_page.png"}  # fmt: skip
    table = format_funnel(funnel([store]))
    assert "image.blur" in table and "image.text_share" in table, table


def test_image_context_is_what_the_page_says_about_the_image() -> None:
    from m3w.pipeline.image_filters.context import image_contexts

    nodes = [
        {"kind": "text", "text": "A long   introduction."},
        {"kind": "image", "url": "http://a/1.jpg", "alt": "  A red\nbus ", "title": "ignored"},
        {"kind": "image", "url": "http://a/2.jpg", "alt": "", "figcaption": "The harbour at dawn."},
        {"kind": "image", "url": "http://a/3.jpg", "alt": None, "title": "Map"},
        {"kind": "image", "url": "http://a/4.jpg"},  # nearest text: the paragraph right after it
        {"kind": "text", "text": "Caption-like text after the image."},
        {"kind": "image", "url": None},
        {"kind": "text", "text": "x" * 500},
    ]
    assert dict(image_contexts(nodes, 100)) == {
        "http://a/1.jpg": "A red bus",
        "http://a/2.jpg": "The harbour at dawn.",
        "http://a/3.jpg": "Map",
        "http://a/4.jpg": "Caption-like text after the image.",
    }
    assert dict(image_contexts([{"kind": "image", "url": "u"}], 100)) == {"u": ""}
    assert dict(image_contexts([{"kind": "image", "url": "u"}, *nodes[-1:]], 100)) == {"u": "x" * 100}


def test_images_tasks_ask_for_a_gpu_share_only_when_a_model_step_can_use_one() -> None:
    from m3w.pipeline.image_filters.models import task_gpus

    config = ImageFiltersConfig()
    assert task_gpus(config, cluster_gpus=8) == 0.0  # cheap signals only: CPU tasks
    config.clip.enabled = True
    assert task_gpus(config, cluster_gpus=0) == 0.0 and task_gpus(config, cluster_gpus=8) == 0.25
    config.clip.device = "cpu"
    assert task_gpus(config, cluster_gpus=8) == 0.0
    config.nsfw.enabled, config.gpus_per_task = True, 0.5
    assert task_gpus(config, cluster_gpus=8) == 0.5


def test_images_stage_compares_each_image_with_its_text_on_the_page(
    webcorpus, photos, serve_routes, ray_address, tmp_path, tiny_clip
) -> None:
    """Documents in: each image is scored against what its first page says about it (alt text here, the nearest
    paragraph there); an image no page says anything about has no score. The stored score is the model's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import Route

    from m3w.pipeline.image_filters.models import ClipRelevance
    from m3w.pipeline.images import run_images
    from m3w.pipeline.imagestore import BlobRef, ImageStore
    from m3w.schemas import documents as doc_spec

    names = ["sklearn_china.jpg", "skimage_coffee.png", "skimage_coins.png"]
    base, _ = serve_routes({f"/{n}": Route((webcorpus / "photos" / n).read_bytes()) for n in names})
    china, coffee, coins = (f"{base}/{n}" for n in names)
    docs = [
        {"doc_id": "a", "url": "https://example.org/a", "nodes": [
            {"kind": "image", "node_index": 0, "url": china, "alt": "a temple roof in china"},
            {"kind": "text", "node_index": 1, "text": "a cup of coffee on a table", "block": "paragraph"},
            {"kind": "image", "node_index": 2, "url": coffee}]},
        {"doc_id": "b", "url": "https://example.org/b", "nodes": [  # a later page: its alt text is not used
            {"kind": "image", "node_index": 0, "url": china, "alt": "something else"},
            {"kind": "image", "node_index": 1, "url": coins}]},
    ]  # fmt: skip
    filtered = tmp_path / "filtered"
    filtered.mkdir()
    pq.write_table(pa.Table.from_pylist(docs, schema=doc_spec.DOCUMENT_SCHEMA), filtered / "part-0.parquet")
    config = ImagesConfig()
    config.filters.enabled = False
    clip = config.image_filters.clip
    clip.enabled, clip.model = True, str(tiny_clip)
    summary = run_images(
        [filtered], tmp_path / "store", config, ray_address=ray_address, allow_hosts=[base[7:]]
    )
    assert summary.statuses == {"ok": 3} and summary.units_failed == 0, summary
    store = ImageStore(tmp_path / "store")
    rows = store.lookup([china, coffee, coins])
    assert rows[coins]["clip_similarity"] is None  # no text on its page
    model = ClipRelevance.load(clip)
    for url, text in ((china, "a temple roof in china"), (coffee, "a cup of coffee on a table")):
        image = Image.open(io.BytesIO(store.read_blob(BlobRef.of(rows[url])))).convert("RGB")
        assert rows[url]["clip_similarity"] == pytest.approx(float(model.score([image], [text])[0]), abs=1e-5)
        assert rows[url]["clip_model"] == str(tiny_clip)


# ------------------------------------------------------------------------------------ pHash duplicate counts


def test_phash_counts_are_a_partitioned_group_by_of_the_store(ray_address, tmp_path) -> None:
    """Map per run of rows files, reduce per partition: the counts equal a group-by of every stored image's pHash,
    however many ranges; rows that are not stored images do not count; a run over the same files is cached."""
    from m3w.pipeline.dedup.keys import hash_partition
    from m3w.pipeline.image_filters.duplicates import _runs, duplicate_counts, run_phash_counts, shuffle_keys
    from m3w.pipeline.imagestore import ImageStore, write_rows
    from m3w.schemas import images as spec

    rng = np.random.default_rng(0)
    pool = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=40, dtype=np.int64)
    files, every_phash = [], []
    for i in range(5):
        phashes = rng.choice(pool, size=30)
        rows = [{"url": f"u{i}-{j}", "status": "ok", "phash": int(h)} for j, h in enumerate(phashes)]
        rows += [
            {"url": f"bad{i}", "status": "http_error", "phash": int(pool[0])},
            {"url": f"n{i}", "status": "ok"},
        ]
        shard = spec.shard_id(1, i)
        write_rows(ImageStore(tmp_path), shard, rows)
        files.append(tmp_path / spec.rows_relpath(shard))
        every_phash.extend(phashes.tolist())
    values, counts = np.unique(every_phash, return_counts=True)
    expected = {int(v): int(c) for v, c in zip(values, counts) if c >= 2}

    # 5 rows files of 32 rows, ≤ 70 rows a task: 3 map tasks (2 + 2 + 1 files), 3 partitions.
    key = run_phash_counts(tmp_path, files, ray_address, rows_per_task=70)
    counted = tmp_path / "_phash" / "counts" / key
    assert len(list(counted.glob("*.parquet"))) == 3 and not (counted / "map").exists()  # the shuffle went
    assert duplicate_counts(str(tmp_path), key) == expected
    limit = sorted(expected.values())[len(expected) // 2]
    assert duplicate_counts(str(tmp_path), key, limit) == {h: n for h, n in expected.items() if n > limit}
    assert run_phash_counts(tmp_path, files, ray_address) == key  # cached: nothing recounted
    # Fewer files: other counts, under another key; the superseded counts go.
    fewer = run_phash_counts(tmp_path, files[:2], ray_address)
    assert fewer != key and not (tmp_path / "_phash" / "counts" / key).exists()
    assert sum(duplicate_counts(str(tmp_path), fewer).values()) < sum(expected.values())
    # Map tasks read runs of consecutive rows files up to the row budget; a file over it alone.
    assert _runs([32] * 5, 70) == [range(0, 2), range(2, 4), range(4, 5)]
    assert _runs([100, 1, 1], 70) == [range(0, 1), range(1, 3)] and _runs([], 70) == []
    # The shuffle keys spread the pHashes over the partitions (pHash bits are not uniform), without collisions.
    keys = shuffle_keys(np.arange(0, 4000, dtype=np.int64) << 52)
    assert len(set(keys.tolist())) == 4000
    assert np.bincount(hash_partition(keys, 4)).min() > 800


def test_images_stage_counts_phash_duplicates_and_drops_overused_pictures(
    webcorpus, serve_routes, ray_address, tmp_path
) -> None:
    """Copies of one photo (resized, re-encoded) under several URLs share a pHash: the store counts them, and with
    `phash.max_duplicates` = K the images of a pHash more than K stored images have are dropped (replayed from
    the index, nothing fetched), counted in the funnel and left out of the shards; distinct photos stay."""
    from conftest import Route

    from m3w.pipeline.image_filters.duplicates import duplicate_counts
    from m3w.pipeline.images import run_images
    from m3w.pipeline.imagestore import ImageStore
    from m3w.pipeline.shards.interleaved import stored_images
    from m3w.pipeline.stats import format_funnel, funnel
    from m3w.schemas.images import read_phash_counts

    china = Image.open(webcorpus / "photos" / "sklearn_china.jpg").convert("RGB")
    routes = {f"/{n}": Route((webcorpus / "photos" / n).read_bytes())
              for n in ("sklearn_china.jpg", "skimage_coffee.png", "skimage_coins.png")}  # fmt: skip
    for i, (size, quality) in enumerate((((320, 213), 60), ((480, 320), 85), ((1000, 667), 92))):
        routes[f"/china-{i}.jpg"] = Route(jpeg_bytes(china.resize(size, Image.Resampling.BILINEAR), quality))
    base, hits = serve_routes(routes)
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{base}{p}\n" for p in list(routes)[:5]))  # one copy held back for a later run
    store = tmp_path / "store"
    config = ImagesConfig()
    config.filters.enabled = False
    run = functools.partial(run_images, store_dir=store, ray_address=ray_address, allow_hosts=[base[7:]])

    first = run([urls], config=config)
    assert first.statuses == {"ok": 5} and first.filter_drops == {} and first.units_failed == 0, first
    rows = list(ImageStore(store).iter_rows())
    by_hash = Counter(row["phash"] for row in rows)
    china_hash = next(r["phash"] for r in rows if r["url"].endswith("/sklearn_china.jpg"))
    assert by_hash[china_hash] >= 3  # the original and (most of) its copies hash alike
    counts = duplicate_counts(str(store), read_phash_counts(store))
    assert counts == {h: n for h, n in by_hash.items() if n >= 2}  # the count kept per shared pHash

    more = tmp_path / "more.txt"
    more.write_text("".join(f"{base}{p}\n" for p in routes))
    config.image_filters.phash.max_duplicates = 2
    second = run([more], config=config)
    assert second.fetched == 1 and second.units_failed == 0, second
    rows = list(ImageStore(store).iter_rows())
    by_hash = Counter(row["phash"] for row in rows)
    overused = {r["url"] for r in rows if by_hash[r["phash"]] > 2}
    assert len(overused) >= 4 and f"{base}/sklearn_china.jpg" in overused
    assert second.filter_drops == {"image.phash_duplicates": len(overused)}, second.filter_drops
    docs = [{"nodes": [{"kind": "image", "url": f"{base}{p}"} for p in routes]}]
    assert set(stored_images(ImageStore(store), docs)) == {f"{base}{p}" for p in routes} - overused
    assert "image.phash_duplicates" in format_funnel(funnel([store]))

    config.image_filters.phash.max_duplicates = None  # a looser rule: replayed, nothing fetched
    before = sum(hits.values())
    third = run([more], config=config)
    assert third.fetched == 0 and third.filter_drops == {} and sum(hits.values()) == before
    assert set(stored_images(ImageStore(store), docs)) == {f"{base}{p}" for p in routes}
