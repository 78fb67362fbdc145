"""Visually grounded toy shard sets, in the exact `m3w shards` format, for smoke runs, tests and benchmarks.

A caption here can only be predicted by looking at the image, so a model that learns to use its images shows a
much lower caption loss with the true images than with images shuffled across samples:
  * shapes:  Pillow-drawn shapes on a plain background, "a red circle";
  * photos:  random crops of real photographs, captioned with the photo's caption;
  * m3w:     interleaved windows of several shape images, each followed by its caption;
  * video:   T frames of a shape moving across the frame, "a blue square moving left".
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from m3w.pipeline.shards import sample_json
from m3w.pipeline.tario import ShardWriter
from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN, tokenizer_fingerprint
from m3w.schemas import shards as spec

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 170),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUND = (60, 60, 60)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def draw_shape(
    shape: str, colour: str, size: int, rng: random.Random, centre: tuple[float, float] | None = None
):
    """One shape of one colour at a random scale (and position, unless `centre` is given)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = centre or (rng.uniform(r, size - r), rng.uniform(r, size - r))
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def random_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """A random square crop covering 50-90% of the shorter side, resized to `size`."""
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.5, 0.9))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    return img.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)


def load_photos(webcorpus: str | Path) -> list[tuple[Image.Image, str]]:
    """The webcorpus photographs with their short captions (from `photos.jsonl`)."""
    root = Path(webcorpus)
    photos = []
    with open(root / "photos.jsonl", encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            if not entry.get("caption_short"):
                continue
            img = Image.open(root / entry["file"]).convert("RGB")
            img.thumbnail((256, 256))
            photos.append((img, entry["caption_short"]))
    return photos


class ToyWriter:
    """Write samples of one dataset with the given tokenizer, then its `shards.json`."""

    def __init__(self, out_dir: str | Path, dataset: str, tokenizer, shard_size: int = 200) -> None:
        self.out_dir, self.dataset, self.tok = Path(out_dir), dataset, tokenizer
        self.tok_info = {
            "name": getattr(tokenizer, "m3w_name", "toy"),
            "fingerprint": tokenizer_fingerprint(tokenizer),
        }
        self.media_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
        self.eoc_id = tokenizer.convert_tokens_to_ids(EOC_TOKEN)
        self.writer = ShardWriter(self.out_dir, dataset, max_samples=shard_size)
        self.limits = {"seq_len": 0, "max_media": 0, "num_frames": 1}  # the largest sample written

    def ids(self, chunks: list[tuple[bool, str]]) -> list[int]:
        """[(has_image, caption), ...] → <image>caption<EOC> ... token ids."""
        out: list[int] = []
        for has_image, text in chunks:
            if has_image:
                out.append(self.media_id)
            out += self.tok(text, add_special_tokens=False)["input_ids"]
            out.append(self.eoc_id)
        return out

    def add(self, key: str, chunks: list[tuple[bool, str]], media: list[bytes], frames: int = 1) -> None:
        ids = self.ids(chunks)
        text = "".join((MEDIA_TOKEN if img else "") + t + EOC_TOKEN for img, t in chunks)
        kind = "video" if frames > 1 else "image"
        n_items = len(media) // frames
        prov = {"doc_id": key, "url": f"toy://{self.dataset}/{key}", "node_indices": [], "window_index": 0}
        sample = sample_json(self.dataset, ids, text, n_items, self.tok_info, prov, kind, frames)
        files = {"json": json.dumps(sample, sort_keys=True).encode()}
        files.update(zip(sample["images"], media))
        self.writer.write(key, files, tokens=len(ids), images=n_items)
        self.limits = {
            "seq_len": max(self.limits["seq_len"], len(ids)),
            "max_media": max(self.limits["max_media"], n_items),
            "num_frames": frames,
        }

    def close(self) -> Path:
        self.writer.__exit__(None, None, None)
        shards = [s.to_json() for s in self.writer.shards]
        manifest = spec.shard_manifest(self.dataset, self.tok_info, shards, self.limits, config_hash="toy")
        spec.write_shard_manifest(str(self.out_dir), manifest)
        return self.out_dir


def shape_captions(rng: random.Random) -> Iterator[tuple[str, str]]:
    while True:
        yield rng.choice(SHAPES), rng.choice(list(COLOURS))


def write_shapes(out_dir, tokenizer, n: int, size: int = 64, seed: int = 0, shard_size: int = 200) -> Path:
    """caption pairs: <image>a red circle<EOC>"""
    rng, w = random.Random(seed), ToyWriter(out_dir, "caption_pairs", tokenizer, shard_size)
    captions = shape_captions(rng)
    for i in range(n):
        shape, colour = next(captions)
        w.add(
            f"shape{seed}_{i:06d}",
            [(True, f"a {colour} {shape}")],
            [jpeg(draw_shape(shape, colour, size, rng))],
        )
    return w.close()


def write_photos(
    out_dir, tokenizer, photos, n: int, size: int = 64, seed: int = 0, shard_size: int = 200
) -> Path:
    """alt-text pairs: <image>caption<EOC> for random crops of real photos."""
    rng, w = random.Random(seed), ToyWriter(out_dir, "alt_pairs", tokenizer, shard_size)
    for i in range(n):
        img, caption = photos[rng.randrange(len(photos))]
        w.add(f"photo{seed}_{i:06d}", [(True, caption)], [jpeg(random_crop(img, size, rng))])
    return w.close()


def write_interleaved(
    out_dir, tokenizer, n: int, size: int = 64, seed: int = 0, shard_size: int = 200
) -> Path:
    """M3W-like windows: a title, then 1-5 shape images each followed by its caption."""
    rng, w = random.Random(seed), ToyWriter(out_dir, "m3w", tokenizer, shard_size)
    captions = shape_captions(rng)
    for i in range(n):
        chunks, media = [(False, "Shapes of the day.")], []
        for _ in range(rng.randint(1, 5)):
            shape, colour = next(captions)
            chunks.append((True, f"Here is a {colour} {shape}."))
            media.append(jpeg(draw_shape(shape, colour, size, rng)))
        w.add(f"doc{seed}_{i:06d}", chunks, media)
    return w.close()


def write_video(
    out_dir, tokenizer, n: int, size: int = 64, frames: int = 8, seed: int = 0, shard_size: int = 200
) -> Path:
    """video pairs: T frames of a shape moving left or right, "a blue square moving left"."""
    rng, w = random.Random(seed), ToyWriter(out_dir, "video_pairs", tokenizer, shard_size)
    captions = shape_captions(rng)
    for i in range(n):
        shape, colour = next(captions)
        direction = rng.choice(("left", "right"))
        xs = [size * (0.3 + 0.4 * t / (frames - 1)) for t in range(frames)]
        if direction == "left":
            xs.reverse()
        y = size * rng.uniform(0.35, 0.65)
        clip = [jpeg(draw_shape(shape, colour, size, random.Random(i), (x, y))) for x in xs]
        w.add(f"clip{seed}_{i:06d}", [(True, f"a {colour} {shape} moving {direction}")], clip, frames=frames)
    return w.close()
