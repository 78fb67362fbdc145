"""Building blocks shared by the Perceiver Resampler and the gated cross-attention: pre-norm feed-forward and
multi-head attention through PyTorch's fused `scaled_dot_product_attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Sequential):
    """LayerNorm → Linear(d, mult·d) → GELU → Linear(mult·d, d), without biases (as in the paper's FFW)."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., S, heads·dh] → [..., heads, S, dh]"""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[..., heads, S, dh] → [..., S, heads·dh]"""
    return x.transpose(-3, -2).flatten(-2)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / √dh) v over heads already split; `mask` (bool, True = may attend) broadcasts to the scores."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
