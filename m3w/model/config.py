"""The Flamingo configuration: which frozen Hugging Face parts to load, and the shape of the trainable parts.

Defaults follow the paper (Alayrac et al. 2022, App. A.1): 64 latents, a 6-layer Perceiver Resampler, gated
cross-attention with 8 heads of 64 and a 4x feed-forward, and no "attend to the next image" (p_next = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How the model computes: "bf16" autocast everywhere, "auto" on CUDA only, "fp32" never (flamingo.autocast_dtype)
Precision = Literal["auto", "bf16", "fp32"]


@dataclass
class FlamingoConfig:
    lm: str = ""  # any HF causal LM, by hub name or local path; frozen
    vision: str = ""  # any HF vision model (CLIP, SigLIP, ViT), by hub name or local path; frozen
    tokenizer: str | None = None  # None: m3w's shipped tokenizer (pipeline.tokenizer.load_tokenizer)
    cross_attn_every: int = 1  # a GATED XATTN-DENSE block before every n-th LM layer (paper: 1/4/7)
    num_latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    resampler_ff_mult: int = 4
    xattn_heads: int = 8
    xattn_head_dim: int = 64
    xattn_ff_mult: int = 4
    max_frames: int = 8  # learned temporal embeddings: one per frame position of a video
    p_next: float = 0.0  # App. A.3: per sequence, attend to the next image instead of the previous one
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.cross_attn_every < 1:
            raise ValueError(f"cross_attn_every must be >= 1, got {self.cross_attn_every}")
        if not 0.0 <= self.p_next <= 1.0:
            raise ValueError(f"p_next must be a probability, got {self.p_next}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
