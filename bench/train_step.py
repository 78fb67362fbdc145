"""Trainer throughput: full optimizer steps (a batch of every dataset, Σ λ_m NLL_m, clip, AdamW) from real shards.

Toy shards in the exact `m3w shards` format (Pillow shapes, one image per pair, 1-5 per M3W window, T-frame
videos) are streamed through the trainer's DataLoaders, so the measured step includes decoding wait. Prints
tokens/s (all streams, non-pad tokens) and data-wait fraction; on a GPU also MFU (model FLOPs from
bench/model_step.py's `step_flops`, summed over the step's micro-batches, against the bf16 dense peak).

Default: the `bench` preset on CPU; `--preset compact` uses random weights of the compact preset's exact shapes
(SmolLM2-360M + SigLIP-B/16 at 224 px), for GPUs without hub access. Last line:
`tokens_per_s=<float> data_wait_fraction=<float>` (+ ` mfu=<float>` on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # toydata: the toy shard sets of the tests
sys.path.insert(0, str(ROOT / "bench"))

import toydata  # noqa: E402
from model_step import mfu_field, step_flops  # noqa: E402

from m3w.model import Flamingo, build_preset  # noqa: E402
from m3w.pipeline.tokenizer import tokenizer_fingerprint  # noqa: E402
from m3w.trainer.config import DatasetConfig, TrainConfig, paper_datasets  # noqa: E402
from m3w.trainer.data import build_streams  # noqa: E402
from m3w.trainer.distributed import DistEnv  # noqa: E402
from m3w.trainer.optim import build_optimizer, clip_gradients  # noqa: E402
from m3w.trainer.train import accumulate_gradients, step_plan  # noqa: E402

WRITERS = {
    "m3w": toydata.write_interleaved,
    "alt_pairs": toydata.write_shapes,
    "caption_pairs": toydata.write_shapes,
    "video_pairs": toydata.write_video,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="bench", help="tiny | bench | compact (random init)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--batch-scale", type=float, default=None, help="x paper-shaped per-dataset batch sizes"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per dataset")
    parser.add_argument("--samples", type=int, default=400, help="toy samples written per dataset")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    scale = args.batch_scale or (1.0 if cuda else 0.125)
    env = DistEnv(device=device)

    with tempfile.TemporaryDirectory() as tmp:
        config = build_preset(args.preset, Path(tmp) / "preset", random_init=args.preset == "compact")
        model = (
            Flamingo.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32).to(device).train()
        )
        tok = model.tokenizer
        datasets: dict[str, DatasetConfig] = {}
        for name, ds in paper_datasets().items():
            path = Path(tmp) / name
            video = name == "video_pairs"  # T JPEGs per sample: fewer samples
            kwargs = {"frames": 8} if video else {}  # paper: T = 8
            WRITERS[name](path, tok, args.samples // 4 if video else args.samples, size=320, **kwargs)
            ds.path, ds.num_workers = str(path), args.workers
            ds.batch_size = max(1, round({"m3w": 32, "video_pairs": 32}.get(name, 128) * scale))
            datasets[name] = ds
        cfg = TrainConfig(datasets=datasets, steps=args.steps + args.warmup)
        streams = build_streams(datasets, model.image_config, tok, tokenizer_fingerprint(tok),
                                model.media_token_id, seed=0, device=device)  # fmt: skip
        optimizer, _ = build_optimizer(model, cfg)
        names, weights = list(datasets), {n: d.weight for n, d in datasets.items()}
        step_s, wait_s, tokens, flops = [], [], [], []
        for step in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            t0, w0 = time.perf_counter(), sum(s.wait_s for s in streams.values())
            batches = [(n, weights[n], streams[n].next_batch()) for n in step_plan(step, names, "all", 1)]
            stats = accumulate_gradients(model, batches, len(batches), 1, env)
            clip_gradients(model, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                step_s.append(time.perf_counter() - t0)
                wait_s.append(sum(s.wait_s for s in streams.values()) - w0)
                tokens.append(sum(stats["tokens"].values()))
                flops.append(sum(
                    step_flops(model, b["input_ids"].shape[0], b["input_ids"].shape[1],
                               b["images"].shape[1] * b["images"].shape[2])
                    for _, _, b in batches
                ))  # fmt: skip

    sizes = {n: d.batch_size for n, d in datasets.items()}
    median = statistics.median(step_s)
    tok_s = sum(tokens) / sum(step_s)
    wait = sum(wait_s) / sum(step_s)
    print(f"preset={args.preset} device={device} batch sizes={sizes} workers/dataset={args.workers} "
          f"threads={torch.get_num_threads()}")  # fmt: skip
    print(
        f"  median step {median * 1e3:.1f} ms, {tok_s:.0f} tokens/s, data wait {100 * wait:.1f}% of step time"
    )
    print(
        f"tokens_per_s={tok_s:.1f} data_wait_fraction={wait:.4f}"
        + mfu_field(sum(flops) / sum(step_s), device)
    )


if __name__ == "__main__":
    main()
