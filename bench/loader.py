"""Loader throughput: decoded, collated M3W batches per second per DataLoader worker.

M3W shards like `m3w shards` writes them (320x320 JPEG crops of the real webcorpus photos, 1-5 per 256-token
window) are read through the trainer's stream (tar reading, shuffle buffer, JPEG decode + resize + normalise,
collation), for the vision encoder size of the compact preset (224) by default. Each worker count runs for a
fixed time after a warm-up batch; the figure is samples/s divided by workers.

The loader keeps data wait under 5% of step time when workers x samples_per_s_per_worker exceeds the trainer's
M3W samples/s by 20x or so (the other streams are lighter: one image per sample, shorter texts). Last line:
`samples_per_s_per_worker=<float>` (the best per-worker rate measured: on a machine with few cores, more
workers than cores share them and the per-worker rate drops for lack of CPU, not of loader efficiency).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # toydata: the toy shard sets of the tests

import toydata  # noqa: E402

from m3w.pipeline.tokenizer import MEDIA_TOKEN, load_tokenizer, tokenizer_fingerprint  # noqa: E402
from m3w.trainer.config import DatasetConfig  # noqa: E402
from m3w.trainer.data import build_streams  # noqa: E402

WEBCORPUS = ROOT.parent / "shared" / "webcorpus"


def write_m3w(out: Path, tok, n: int, size: int = 320) -> Path:
    """M3W-like windows of real-photo crops, captioned, ~256 tokens each."""
    rng = random.Random(0)
    photos = toydata.load_photos(WEBCORPUS)
    writer = toydata.ToyWriter(out, "m3w", tok, shard_size=250)
    filler = " ".join(["The page goes on about the picture above and more."] * 3)
    for i in range(n):
        chunks, media = [(False, "A page of photographs. " + filler)], []
        for _ in range(rng.randint(1, 5)):
            img, caption = photos[rng.randrange(len(photos))]
            chunks.append((True, f"{caption} {filler}"))
            media.append(toydata.jpeg(toydata.random_crop(img, size, rng)))
        writer.add(f"doc_{i:06d}", chunks, media)
    return writer.close()


def measure(path: Path, tok, workers: int, seconds: float, size: int, batch: int) -> float:
    cfg = DatasetConfig(path=str(path), batch_size=batch, num_workers=workers, shuffle_buffer=500,
                        prefetch_factor=4)  # fmt: skip
    image_config = {"size": size, "mean": [0.5] * 3, "std": [0.5] * 3}
    media_id = tok.convert_tokens_to_ids(MEDIA_TOKEN)
    stream = build_streams({"m3w": cfg}, image_config, tok, tokenizer_fingerprint(tok), media_id, seed=0)[
        "m3w"
    ]
    stream.next_batch()  # workers started, first batches decoded
    start, samples = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        samples += stream.next_batch()["input_ids"].shape[0]
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1000, help="M3W windows to write")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=224, help="vision encoder input size")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    tok = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_m3w(Path(tmp) / "m3w", tok, args.samples)
        print(f"wrote {args.samples} M3W windows in {time.perf_counter() - t0:.1f} s")
        best = 0.0
        for workers in args.workers:
            rate = measure(path, tok, workers, args.seconds, args.size, args.batch)
            per_worker = rate / workers
            best = max(best, per_worker)
            print(f"workers={workers} samples_per_s={rate:.1f} per_worker={per_worker:.1f} "
                  f"images~{rate * 3:.0f}/s size={args.size}")  # fmt: skip
    print(f"samples_per_s_per_worker={best:.2f}")


if __name__ == "__main__":
    main()
