"""Perceiver Resampler (paper §2.1 and App. A.1.1): a variable number of visual features → a fixed set of latents.

    x_f = vision_features + temporal_embeddings      [M, T, S, d]  → flattened to [M, T·S, d]
    x   = latents                                     [M, R, d]
    repeat depth times:
        x = x + attention(q = x, kv = concat(x_f, x))    # latents also attend to themselves
        x = x + FFW(x)
    return LayerNorm(x)                               [M, R, d]

R (num_latents) is fixed, so the cost of the gated cross-attention does not depend on image resolution or on the
number of video frames.
"""

from __future__ import annotations

import torch
from torch import nn

from m3w.model.layers import FeedForward, attend, merge_heads, split_heads


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media [M, S, d], latents [M, R, d] → [M, R, d]"""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        out = attend(q, split_heads(k, self.heads), split_heads(v, self.heads))
        return self.to_out(merge_heads(out))


class PerceiverResampler(nn.Module):
    def __init__(
        self, dim: int, depth: int, heads: int, head_dim: int, num_latents: int, ff_mult: int, max_frames: int
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        # Small init: at start the frame features dominate, the order of frames is learned.
        self.temporal_embeddings = nn.Parameter(torch.randn(max_frames, 1, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim), FeedForward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [M, T, S, d] (T frames of S patch features each) → [M, num_latents, d]"""
        frames = features.shape[1]
        if frames > self.temporal_embeddings.shape[0]:
            raise ValueError(f"{frames} frames exceed max_frames={self.temporal_embeddings.shape[0]}")
        media = (features + self.temporal_embeddings[:frames]).flatten(1, 2)
        x = self.latents.expand(media.shape[0], -1, -1)
        for attention, ffw in self.layers:
            x = x + attention(media, x)
            x = x + ffw(x)
        return self.norm(x)
