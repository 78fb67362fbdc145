"""Benchmark: our image stage vs plain img2dataset on the same loopback URL list, and the CPU cost of each image
filter step.

    .venv/bin/python bench/images.py [--images 1200] [--out bench-out/images]

Both download the same ≥1,000 real-photo-sized JPEGs (crops/rescales/re-encodes of webcorpus/photos, so every
file's bytes differ) from one HTTP/1.1 server on 127.0.0.1, resize them to 320×320 center crops and write them
out, in the same run. Each tool has the SSRF guard it ships with: ours every check (scheme allow-list, per-hop
address vetting with only the server's address and port allowed (`--allow-host`), byte cap, total deadline,
X-Robots-Tag) and its default per-host politeness; img2dataset none. The ratio is measured with the image
filter steps off (as img2dataset has none); a second run of ours with the default steps (pHash, blur, text
share) shows what they cost end to end. img2dataset runs from its own venv (`.venv-img2dataset`, created here
if missing: it pins webdataset<0.3 and pandas<3, which must not enter our venv).

Throughput is URLs / wall seconds of each tool's whole run on an already started Ray for ours (as on a
cluster; Ray start-up is printed separately) and of the whole `img2dataset` command for it. Peak RSS sums the
processes doing the work (our driver + Ray workers; img2dataset's process tree).

Then the CPU cost per image of each step, on the stored images of our run, one thread: the luma decode the
cheap signals share, pHash, blur, text share; the model steps with the default architectures (CLIP ViT-B/32 and
a ViT-B/16 classifier, random weights built from their configs: the same FLOPs as the published checkpoints,
nothing downloaded), batched, on this machine's CPU (torch threads: all cores); and the store-wide pHash counts
(map/reduce Ray tasks: wall ms per stored image).
Last line: ours_img_s=<float> img2dataset_img_s=<float> ratio=<float> ours_default_steps_img_s=<float>
peak_rss_mb=<float> then `<step>_ms=<float>` per step (CPU ms per image).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = Path(os.environ.get("M3W_WEBCORPUS", ROOT.parent / "shared" / "webcorpus")) / "photos"
I2D_VENV = ROOT / ".venv-img2dataset"

SERVER = """
import http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for clients that use it
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True
import functools
s = S(("127.0.0.1", 0), functools.partial(H, directory=sys.argv[1]))
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def make_images(www: Path, n: int, seed: int = 0) -> list[str]:
    """n distinct JPEGs of web-photo sizes (long side 500-1600 px) derived from the webcorpus photos."""
    names = [f"img{i:05d}.jpg" for i in range(n)]
    if www.is_dir() and all((www / name).exists() for name in names):
        return names
    www.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.iterdir()) if p.suffix in (".jpg", ".png")]
    sources = [s for s in sources if min(s.size) >= 300]
    for name in names:
        src = rng.choice(sources)
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        ch = max(ch, cw // 2 + 1)  # keep the aspect ratio ≤ 2 so the filter rules keep them
        cw = max(cw, ch // 2 + 1)
        left, top = rng.randint(0, w - min(cw, w)), rng.randint(0, h - min(ch, h))
        crop = src.crop((left, top, left + cw, top + ch))
        long_side = rng.randint(500, 1600)
        scale = long_side / max(crop.size)
        img = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
        img.save(www / name, "JPEG", quality=rng.randint(82, 93))
    return names


class RssSampler:
    """Peak summed RSS of a set of processes, re-picked at every sample (Ray workers come and go)."""

    def __init__(self, pick) -> None:
        self.pick = pick
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            total = 0
            for pid in self.pick():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
                except (OSError, StopIteration, ValueError):
                    continue
            self.peak_kb = max(self.peak_kb, total)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ray_workers_and_self() -> list[str]:
    """This driver and the Ray workers of the Ray it started (not the Ray daemons, not other users' Rays)."""
    mine = descendants(os.getpid())
    return [str(os.getpid())] + [p for p in mine if _cmdline(p).startswith("ray::")]


def descendants(root: int) -> list[str]:
    children: dict[str, list[str]] = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [str(root)]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def ensure_img2dataset() -> Path:
    exe = I2D_VENV / "bin" / "img2dataset"
    if not exe.exists():
        print("creating .venv-img2dataset (img2dataset pins old webdataset/pandas; kept out of .venv)")
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset"], check=True)
    return exe


def run_img2dataset(
    exe: Path, url_file: Path, out: Path, n: int, workers: int, threads: int
) -> tuple[float, int, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(exe), "--url_list", str(url_file), "--input_format", "txt", "--output_folder", str(out),
           "--output_format", "files", "--image_size", "320", "--resize_mode", "center_crop",
           "--processes_count", str(workers), "--thread_count", str(threads),
           "--number_sample_per_shard", str(max(50, n // (4 * workers))), "--encode_quality", "95",
           "--extract_exif", "False", "--timeout", "10", "--retries", "0"]  # fmt: skip
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with RssSampler(lambda: descendants(proc.pid)) as rss:
        _, stderr = proc.communicate()
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed: {stderr.decode()[-2000:]}")
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok, rss.peak_kb / 1024


def run_ours(
    url_file: Path, store: Path, workers: int, threads: int, server: str, steps: bool
) -> tuple[float, int, float, dict]:
    from m3w.pipeline.images import ImagesConfig, run_images

    shutil.rmtree(store, ignore_errors=True)
    # One fetch unit per worker: the default unit (10 k URLs, img2dataset's shard size) exceeds this benchmark.
    urls = sum(1 for line in url_file.read_text().splitlines() if line.strip())
    config = ImagesConfig(threads_per_task=threads, urls_per_unit=max(1, -(-urls // max(workers, 1))))
    if not steps:
        filters = config.image_filters
        filters.phash.enabled = filters.blur.enabled = filters.text.enabled = False
    with RssSampler(ray_workers_and_self) as rss:
        summary = run_images([url_file], store, config, workers=workers, allow_hosts=[server])
    return summary.seconds, summary.statuses.get("ok", 0), rss.peak_kb / 1024, summary.statuses


def _cpu_ms_per_item(fn, items: list) -> float:
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) / len(items) * 1e3


def _tiny_word_tokenizer(path: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)


def step_costs(jpegs: list[bytes], work: Path, model_images: int = 32) -> dict[str, tuple[float, float]]:
    """step → (CPU ms, wall ms) per image, on stored JPEGs. Cheap signals: one thread, each on top of the luma
    decode they share. Models: the default architectures with random weights, batched, all CPU threads."""
    import torch
    from PIL import Image as PILImage
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    from m3w.pipeline.image_filters import ClipRelevanceConfig, NsfwConfig
    from m3w.pipeline.image_filters import signals as sig
    from m3w.pipeline.image_filters.models import ClipRelevance, NsfwClassifier

    costs: dict[str, tuple[float, float]] = {}
    lumas = [sig.luma(j) for j in jpegs]
    for name, fn, items in (("luma", sig.luma, jpegs), ("phash", sig.perceptual_hash, lumas),
                            ("blur", sig.laplacian_variance, lumas), ("text_share", sig.text_share, lumas)):  # fmt: skip
        start = time.monotonic()
        cpu = _cpu_ms_per_item(fn, items)
        costs[name] = (cpu, (time.monotonic() - start) / len(items) * 1e3)

    images = [PILImage.open(io.BytesIO(j)).convert("RGB") for j in jpegs[:model_images]]
    texts = [f"a photograph of item {i} on a web page about the city" for i in range(len(images))]
    torch.manual_seed(0)
    clip_dir, nsfw_dir = work / "clip-b32", work / "vit-b16-nsfw"
    if not (clip_dir / "config.json").exists():
        CLIPModel(CLIPConfig()).save_pretrained(clip_dir)  # ViT-B/32 image tower, 12-layer text tower
        CLIPImageProcessor().save_pretrained(clip_dir)
        _tiny_word_tokenizer(clip_dir, texts)
    if not (nsfw_dir / "config.json").exists():
        labels = {0: "normal", 1: "nsfw"}
        ViTForImageClassification(ViTConfig(id2label=labels, label2id={v: k for k, v in labels.items()})
                                  ).save_pretrained(nsfw_dir)  # fmt: skip
        ViTImageProcessor().save_pretrained(nsfw_dir)
    clip = ClipRelevance(ClipRelevanceConfig(enabled=True, model=str(clip_dir), batch_size=32, device="cpu"))
    nsfw = NsfwClassifier(NsfwConfig(enabled=True, model=str(nsfw_dir), batch_size=32, device="cpu"))
    clip.score(images[:2], texts[:2]), nsfw.score(images[:2])  # warm-up: first-call allocations
    for name, run in (
        ("clip_b32", lambda: clip.score(images, texts)),
        ("nsfw_vit_b16", lambda: nsfw.score(images)),
    ):
        start, cpu = time.monotonic(), time.process_time()
        run()
        costs[name] = (
            (time.process_time() - cpu) / len(images) * 1e3,
            (time.monotonic() - start) / len(images) * 1e3,
        )
    return costs


def phash_counts_cost(store: Path) -> tuple[float, float]:
    """Wall ms per stored image of the store-wide pHash counts (map + reduce Ray tasks), counted afresh; its CPU
    time is spent in Ray workers, so the wall time stands for both."""
    from m3w.pipeline.image_filters.duplicates import run_phash_counts
    from m3w.pipeline.images import rows_files
    from m3w.pipeline.imagestore import ImageStore
    from m3w.schemas.image_duplicates import PHASH_DIR
    from m3w.schemas.images import is_usable

    shutil.rmtree(store / PHASH_DIR, ignore_errors=True)
    image_store = ImageStore(store)
    stored = sum(1 for row in image_store.iter_rows() if is_usable(row))
    start = time.monotonic()
    run_phash_counts(store, rows_files(image_store))
    wall = (time.monotonic() - start) / max(stored, 1) * 1e3
    return wall, wall


def stored_jpegs(store: Path, n: int) -> list[bytes]:
    from m3w.pipeline.imagestore import BlobRef, ImageStore
    from m3w.schemas.images import is_usable

    image_store = ImageStore(store)
    refs = [BlobRef.of(row) for row in image_store.iter_rows() if is_usable(row)][:n]
    return image_store.read_blobs(refs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--threads", type=int, default=32, help="download threads per process/task, both tools"
    )
    args = parser.parse_args()

    names = make_images(args.out / "www", args.images)
    total_mb = sum((args.out / "www" / n).stat().st_size for n in names) / 1e6
    load = os.getloadavg()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(args.out / "www")], stdout=subprocess.PIPE)
    try:
        port = int(server.stdout.readline())
        url_file = args.out / "urls.txt"
        url_file.write_text("".join(f"http://127.0.0.1:{port}/{name}\n" for name in names))
        print(f"{len(names)} JPEGs, {total_mb:.0f} MB, served on 127.0.0.1:{port}; {args.workers} processes × "
              f"{args.threads} threads each; load average before: {load[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip

        exe = ensure_img2dataset()
        i2d_s, i2d_ok, i2d_rss = run_img2dataset(exe, url_file, args.out / "img2dataset", len(names),
                                                 args.workers, args.threads)  # fmt: skip
        print(f"img2dataset: {i2d_ok}/{len(names)} ok in {i2d_s:.1f}s, peak RSS {i2d_rss:.0f} MB")

        from m3w.pipeline.ray_runner import init_ray

        start = time.monotonic()
        init_ray(num_cpus=args.workers)
        print(f"ray start: {time.monotonic() - start:.1f}s (not counted: a cluster is already up)")
        runs = {}
        for label, steps in (("steps off", False), ("default steps", True)):
            runs[label] = run_ours(
                url_file, args.out / "store", args.workers, args.threads, f"127.0.0.1:{port}", steps
            )
            seconds, ok, rss, statuses = runs[label]
            print(
                f"ours ({label}): {ok}/{len(names)} ok in {seconds:.1f}s, peak RSS {rss:.0f} MB, statuses {statuses}"
            )
    finally:
        server.terminate()
        server.wait()
    (ours_s, ours_ok, ours_rss, _), (steps_s, steps_ok, _, _) = runs["steps off"], runs["default steps"]
    if ours_ok != len(names) or i2d_ok != len(names) or steps_ok != len(names):
        raise SystemExit(f"not every image was downloaded: ours {ours_ok}/{steps_ok}, img2dataset {i2d_ok}")
    costs = step_costs(stored_jpegs(args.out / "store", 200), args.out / "models")
    costs["phash_counts"] = phash_counts_cost(args.out / "store")
    for step, (cpu, wall) in costs.items():
        print(f"  {step:<14} {cpu:8.2f} CPU ms/image {wall:8.2f} wall ms/image")
    print(
        f"load average after: {os.getloadavg()[0]:.1f} (other processes share these CPUs: figures are noisy)"
    )
    ours_rate, i2d_rate = len(names) / ours_s, len(names) / i2d_s
    print(f"ours_img_s={ours_rate:.1f} img2dataset_img_s={i2d_rate:.1f} ratio={ours_rate / i2d_rate:.2f} "
          f"ours_default_steps_img_s={len(names) / steps_s:.1f} peak_rss_mb={ours_rss:.0f} "
          + " ".join(f"{step}_ms={cpu:.2f}" for step, (cpu, _) in costs.items()))  # fmt: skip


if __name__ == "__main__":
    main()
