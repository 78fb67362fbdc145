"""Forward+backward time of one Flamingo training step, ours against OpenFlamingo 2.0.1 on the same HF parts.

Default (CPU): the issue-6 shapes (`bench` preset: Llama d256 x4 layers, 4 heads, FFN 4x, 32k vocabulary; CLIP
width 128, 2 layers, patch 16 on 64x64 images; resampler depth 6, 8 heads of 64; cross-attention every 2 layers,
8 heads of 64), batch 2, 256 tokens, 5 images. Steps of the two models alternate, so machine load hits both alike.
Each model runs its own default training path: ours the fused linear cross-entropy (model/loss.py, no
[tokens, vocab] logits), OpenFlamingo HF's logits + cross-entropy.

OpenFlamingo is measured when it is importable from `.venv-openflamingo/` (`make bench` installs it there, as
`pip install --no-deps --target .venv-openflamingo open-flamingo==2.0.1 einops einops-exts`); its package
imports open_clip, which it only needs to build a CLIP tower by name, so a stub stands in for it.

On a CPU it also times a 2048^3 fp32 GEMM between the steps (the same machine load) and prints the step's floor
(every model FLOP at that peak) and how close each model comes to it: the yardstick for a speed-up target.
On a GPU (`--device cuda`, bf16 autocast) it also prints model FLOPs utilisation; `--preset compact` uses
random weights of the compact preset's exact shapes (no hub access needed). Last line:
`step_ms=<float> tokens_per_s=<float>` (+ ` mfu=<float>` on a GPU), for the fastest of our contenders and batch
sizes, e.g. `--device cuda --preset compact --batch 8,16,32 --compile` on a lent GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m3w.model import Flamingo, build_preset  # noqa: E402

OPENFLAMINGO_DIR = ROOT / ".venv-openflamingo"
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def make_batch(model: Flamingo, batch: int, tokens: int, images: int, seed: int = 0):
    """Random text with `images` <image> tokens spread over each row (each chunk closed by <EOC>)."""
    generator = torch.Generator().manual_seed(seed)
    lm_vocab = model.new_tokens.lm_vocab
    special = {model.media_token_id, model.eoc_token_id, model.tokenizer.pad_token_id}
    ids = torch.randint(
        len(special) + 1, min(lm_vocab, len(model.tokenizer)), (batch, tokens), generator=generator
    )
    ids[torch.isin(ids, torch.tensor(sorted(special)))] = len(special) + 1
    starts = torch.linspace(0, tokens, images + 1).long()[:-1]
    ids[:, starts] = model.media_token_id
    ids[:, starts[1:] - 1] = model.eoc_token_id
    size = model.image_config["size"]
    pixels = torch.randn(batch, images, 1, 3, size, size, generator=generator)
    return ids, torch.ones_like(ids), pixels


def load_openflamingo(model: Flamingo) -> torch.nn.Module:
    """OpenFlamingo 2.0.1 around the same frozen LM and CLIP tower files as `model` (fresh copies)."""
    from transformers import AutoModel, AutoModelForCausalLM

    sys.path.insert(0, str(OPENFLAMINGO_DIR))
    sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))  # only used to build towers by name
    from open_flamingo.src.flamingo import Flamingo as OpenFlamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    class OpenClipLikeTower(torch.nn.Module):
        """open_clip's visual(x) with output_tokens=True returns (pooled, patch tokens)."""

        def __init__(self, hf_vision: torch.nn.Module) -> None:
            super().__init__()
            self.model = hf_vision

        def forward(self, pixels: torch.Tensor):
            hidden = self.model(pixel_values=pixels).last_hidden_state
            return hidden[:, 0], hidden[:, 1:]

    lm = AutoModelForCausalLM.from_pretrained(model.config.lm, dtype=torch.float32)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("m3w.model.layers")
    vision = OpenClipLikeTower(AutoModel.from_pretrained(model.config.vision, dtype=torch.float32))
    theirs = OpenFlamingo(
        types.SimpleNamespace(visual=vision),
        lm,
        model.eoc_token_id,
        model.media_token_id,
        vis_dim=model.vision.dim,
        cross_attn_every_n_layers=model.config.cross_attn_every,
    )
    # as their factory does: train the resampler, the gated blocks and the LM's input embeddings
    theirs.requires_grad_(False)
    theirs.perceiver.requires_grad_(True)
    theirs.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    theirs.lang_encoder.get_input_embeddings().requires_grad_(True)
    return theirs


def mfu_field(flops_per_s: float, device: torch.device) -> str:
    """` mfu=<float>` against the card's dense bf16 peak on a known GPU; empty elsewhere."""
    if device.type != "cuda":
        return ""
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return f" mfu={flops_per_s / peak:.3f}" if peak else ""


def step_flops(model: Flamingo, batch: int, tokens: int, images: int) -> float:
    """Model FLOPs of one forward+backward: 2 per multiply-add forward; backward 2x forward for trainable
    weights (input + weight gradients), 1x for the frozen LM (input gradients only), 0 for the frozen vision
    tower. Attention score/value products counted like weights (2·L²·d per layer forward)."""
    lm_config = model.lm.config.get_text_config()
    lm_dim, lm_layers = lm_config.hidden_size, lm_config.num_hidden_layers
    lm_weights = (
        sum(p.numel() for p in model.lm.parameters()) - model.lm.get_input_embeddings().weight.numel()
    )
    text = batch * tokens
    lm = 2 * lm_weights * text + 2 * 2 * batch * tokens**2 * lm_dim * lm_layers
    patches = (model.vision.image_size // model.vision.patch_size) ** 2
    vision = 2 * sum(p.numel() for p in model.vision.parameters()) * batch * images * patches
    resampler_weights = sum(p.numel() for p in model.resampler.parameters())
    resampler = 2 * resampler_weights * batch * images * model.config.num_latents
    xattn_weights = sum(p.numel() for p in model.xattn.parameters())
    xattn = 2 * xattn_weights * text + 2 * 2 * text * images * model.config.num_latents * lm_dim * len(
        model.xattn
    )
    return 2 * lm + vision + 3 * (resampler + xattn)


class GemmPeak:
    """A large square fp32 matmul, timed between the model steps so it runs under the same machine load: the
    practical ceiling of a step made of GEMMs (this machine's speed drifts by 1.5x over minutes)."""

    def __init__(self, size: int = 2048) -> None:
        self.matrix = torch.randn(size, size)
        self.flops: list[float] = []

    def __call__(self) -> None:
        start = time.perf_counter()
        self.matrix @ self.matrix
        self.flops.append(2 * self.matrix.shape[0] ** 3 / (time.perf_counter() - start))


def timed_step(model: torch.nn.Module, ids, mask, pixels, ours: bool, device: torch.device) -> float:
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        if ours:
            loss = model(ids, mask, pixels, labels=ids).loss
        else:
            loss = model(pixels, ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    for p in model.parameters():
        p.grad = None
    return elapsed


def time_contenders(
    contenders: dict, batch: tuple, device: torch.device, warmup: int, steps: int, gemm: GemmPeak | None
) -> dict:
    """Median seconds per step of each contender, steps alternating so machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for step in range(warmup + steps):
        for name, (model, is_ours) in contenders.items():
            elapsed = timed_step(model, *batch, is_ours, device)
            if step >= warmup:
                times[name].append(elapsed)
        if gemm is not None and step >= warmup:
            gemm()
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="bench", help="bench | tiny | compact (compact: random init)")
    parser.add_argument(
        "--batch", default="2", help="batch size, or several (8,16,32) to find the one that fills a GPU"
    )
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    parser.add_argument("--no-openflamingo", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch_sizes = [int(size) for size in args.batch.split(",")]

    best = None  # (tokens/s, FLOP/s, seconds/step) of our fastest contender and batch size
    with tempfile.TemporaryDirectory() as workdir:
        torch.manual_seed(0)
        config = build_preset(args.preset, workdir, random_init=True)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ours = Flamingo.from_config(config, dtype=dtype).to(device).train()
        contenders = {"m3w": (ours, True)}
        if args.compile:
            contenders["m3w+compile"] = (torch.compile(ours), True)
        if not args.no_openflamingo and (OPENFLAMINGO_DIR / "open_flamingo").is_dir():
            contenders["openflamingo-2.0.1"] = (load_openflamingo(ours).to(device).train(), False)
        elif not args.no_openflamingo:
            print(f"OpenFlamingo not found in {OPENFLAMINGO_DIR}: measuring ours only")

        for size in batch_sizes:
            batch = tuple(t.to(device) for t in make_batch(ours, size, args.tokens, args.images))
            gemm = GemmPeak() if device.type == "cpu" else None
            try:
                medians = time_contenders(contenders, batch, device, args.warmup, args.steps, gemm)
            except torch.OutOfMemoryError:
                print(f"batch={size}: out of memory; larger batches skipped")
                break
            finally:
                del batch
            tokens, flops = size * args.tokens, step_flops(ours, size, args.tokens, args.images)
            print(f"preset={args.preset} device={device} batch={size} tokens={args.tokens} images={args.images} "
                  f"threads={torch.get_num_threads()} steps={args.steps}")  # fmt: skip
            for name, seconds in medians.items():
                print(f"  {name:<20} median {seconds * 1e3:9.1f} ms/step  {tokens / seconds:9.0f} tokens/s"
                      + mfu_field(flops / seconds, device))  # fmt: skip
                if name.startswith("m3w") and (best is None or tokens / seconds > best[0]):
                    best = (tokens / seconds, flops / seconds, seconds)
            if "openflamingo-2.0.1" in medians:
                print(f"  speedup vs OpenFlamingo: {medians['openflamingo-2.0.1'] / medians['m3w']:.2f}x")
            if device.type == "cpu":
                # the floor: every model FLOP at the speed of one large GEMM on this machine, measured in this run
                peak = statistics.median(gemm.flops)
                print(f"  model {flops / 1e9:.1f} GFLOP/step; peak fp32 GEMM {peak / 1e9:.0f} GFLOP/s -> floor "
                      f"{flops / peak * 1e3:.0f} ms/step; ours at {flops / medians['m3w'] / peak:.0%} of it")  # fmt: skip
                if "openflamingo-2.0.1" in medians:
                    theirs = flops / medians["openflamingo-2.0.1"] / peak
                    print(
                        f"  OpenFlamingo at {theirs:.0%}; 2x OpenFlamingo would need {2 * theirs:.0%} of it"
                    )

    if best is None:
        raise SystemExit("no batch size fit in memory")
    tokens_per_s, flops_per_s, seconds = best
    print(f"step_ms={seconds * 1e3:.1f} tokens_per_s={tokens_per_s:.0f}" + mfu_field(flops_per_s, device))


if __name__ == "__main__":
    main()
