"""Named model presets: `configs/model_{name}.yaml` (the FlamingoConfig) + the frozen parts it points at.

- `tiny`: random-init HF parts written to a work directory with `save_pretrained` (no hub access), loaded back
  through `from_pretrained` like any checkpoint. Seconds on a CPU; for tests and smoke runs.
- `bench`: the CPU benchmark shapes of issue 6 (Llama d256 x4 layers, 32k vocab; CLIP width 128, patch 16, 64 px).
- `compact`: real hub checkpoints, trainable on one GPU: SmolLM2-360M (Llama family) + SigLIP base/16 (224 px).
  `random_init=True` writes random parts of exactly those shapes instead (benchmarks on machines without hub
  access; `m3w model info` counts parameters from the same shapes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from m3w import CONFIGS_DIR
from m3w.config import load_config
from m3w.errors import ConfigError
from m3w.model.config import FlamingoConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class LMShape:
    family: str = "llama"  # llama | qwen2 | gpt2 | gpt_neox
    dim: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None  # None: = heads (no grouped-query attention)
    ffn: int | None = None  # None: 4 * dim
    vocab: int | None = None  # None: the tokenizer's length
    max_positions: int = 2048
    tie_embeddings: bool = False
    rope_theta: float = 10000.0


@dataclass
class VisionShape:
    family: str = "clip"  # clip | siglip | vit | dinov2
    width: int = 32
    layers: int = 2
    heads: int = 2
    ffn: int | None = None  # None: 4 * width
    patch: int = 8
    image_size: int = 32


FROZEN_SHAPES = {
    "tiny": (LMShape(), VisionShape()),
    "bench": (
        LMShape(dim=256, layers=4, heads=4, vocab=32000),
        VisionShape(width=128, layers=2, heads=2, patch=16, image_size=64),
    ),
    # HuggingFaceTB/SmolLM2-360M and google/siglip-base-patch16-224, for random_init and parameter counts
    "compact": (
        LMShape(dim=960, layers=32, heads=15, kv_heads=5, ffn=2560, vocab=49152, max_positions=8192,
                tie_embeddings=True, rope_theta=100000.0),
        VisionShape(family="siglip", width=768, layers=12, heads=12, ffn=3072, patch=16, image_size=224),
    ),
}  # fmt: skip


def lm_config(shape: LMShape, vocab: int, eos_token_id: int | None = None):
    """A random-init HF config of the chosen family, dropout off (the LM is frozen: no regularisation wanted)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    ffn = shape.ffn or 4 * shape.dim
    ends = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    if shape.family == "gpt2":
        return GPT2Config(
            **ends,
            vocab_size=vocab, n_embd=shape.dim, n_layer=shape.layers, n_head=shape.heads, n_inner=ffn,
            n_positions=shape.max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    if shape.family == "gpt_neox":
        return GPTNeoXConfig(
            **ends,
            vocab_size=vocab, hidden_size=shape.dim, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, intermediate_size=ffn, max_position_embeddings=shape.max_positions,
            hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=shape.tie_embeddings,
        )  # fmt: skip
    families = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if shape.family not in families:
        raise ValueError(f"unknown LM family {shape.family!r}; known: gpt2, gpt_neox, {', '.join(families)}")
    return families[shape.family](
        **ends,
        vocab_size=vocab, hidden_size=shape.dim, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads, intermediate_size=ffn,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=shape.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
    )  # fmt: skip


def vision_config(shape: VisionShape):
    from transformers import CLIPVisionConfig, Dinov2WithRegistersConfig, SiglipVisionConfig, ViTConfig

    families = {
        "clip": CLIPVisionConfig,
        "siglip": SiglipVisionConfig,
        "vit": ViTConfig,
        "dinov2": Dinov2WithRegistersConfig,  # CLS and 4 register tokens before the patches
    }
    if shape.family not in families:
        raise ValueError(f"unknown vision family {shape.family!r}; known: {', '.join(families)}")
    return families[shape.family](
        hidden_size=shape.width, intermediate_size=shape.ffn or 4 * shape.width, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, patch_size=shape.patch, image_size=shape.image_size,
    )  # fmt: skip


def write_random_parts(
    workdir: str | Path, lm: LMShape, vision: VisionShape, tokenizer: str | None = None, seed: int = 0
) -> tuple[str, str, str]:
    """Save a random-init LM, vision tower (+ its image processor config) and the tokenizer under `workdir`.
    Returns their paths (lm, vision, tokenizer)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, CLIPImageProcessor

    from m3w.pipeline.tokenizer import load_tokenizer

    workdir = Path(workdir)
    tok = load_tokenizer(tokenizer)
    tok_dir, lm_dir, vision_dir = workdir / "tokenizer", workdir / f"lm-{lm.family}", workdir / "vision"
    tok.save_pretrained(tok_dir)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(lm_config(lm, lm.vocab or len(tok), tok.eos_token_id)).save_pretrained(
        lm_dir
    )
    AutoModel.from_config(vision_config(vision)).save_pretrained(vision_dir)
    clip = vision.family == "clip"
    CLIPImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        image_mean=CLIP_MEAN if clip else [0.5] * 3,
        image_std=CLIP_STD if clip else [0.5] * 3,
    ).save_pretrained(vision_dir)
    return str(lm_dir), str(vision_dir), str(tok_dir)


def preset_config(name: str, overrides: list[str] | None = None) -> FlamingoConfig:
    path = CONFIGS_DIR / f"model_{name}.yaml"
    if not path.exists():
        known = sorted(p.stem.removeprefix("model_") for p in CONFIGS_DIR.glob("model_*.yaml"))
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(known)}")
    return load_config(FlamingoConfig, path, overrides)


def build_preset(
    name: str,
    workdir: str | Path | None = None,
    tokenizer: str | None = None,
    family: str = "llama",
    random_init: bool = False,
    overrides: list[str] | None = None,
) -> FlamingoConfig:
    """A FlamingoConfig for a named preset (`overrides`: "field=value" strings).

    `tiny` and `bench` (and `compact` with random_init=True) write random-init frozen parts into `workdir` and
    point the config at them; `family` picks the tiny/bench LM architecture (llama, qwen2, gpt2, gpt_neox)."""
    config = preset_config(name, overrides)
    if name == "compact" and not random_init:
        return config if tokenizer is None else dataclasses.replace(config, tokenizer=tokenizer)
    if workdir is None:
        raise ValueError(f"preset {name!r} writes random-init parts into a workdir: pass one")
    lm_shape, vision_shape = FROZEN_SHAPES[name]
    if name != "compact":
        lm_shape = dataclasses.replace(lm_shape, family=family)
    lm, vision, tok = write_random_parts(workdir, lm_shape, vision_shape, tokenizer)
    return dataclasses.replace(config, lm=lm, vision=vision, tokenizer=tok)
