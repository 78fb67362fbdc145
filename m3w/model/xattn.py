"""GATED XATTN-DENSE (paper §2.2, Fig. 4): how the frozen LM looks at the visual tokens.

    y = x + tanh(α_xattn) · CrossAttention(q = LN(x), kv = visual tokens of the token's own image)
    y = y + tanh(α_dense) · FFW(y)

Both α start at 0, so at initialisation the block is the identity and the whole model is the frozen LM.

Per-image masking: token t sees only the R visual tokens of image `media_index[t]` (the last `<image>` at or
before t). Tokens with media_index = -1 (before the first image) see nothing: their attention row is left
unmasked so softmax stays finite (an all-masked row is NaN), and the result is multiplied by 0 explicitly.
"""

from __future__ import annotations

import torch
from torch import nn

from m3w.model.layers import FeedForward, attend, merge_heads, split_heads


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, media_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def media_kv(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual tokens [B, N, R, Dm] → keys, values [B, heads, N, R, dh]. Computed once per batch of media
        (and once per generation: these are the cached cross-attention keys/values)."""
        k, v = self.to_kv(visual).chunk(2, dim=-1)
        return split_heads(k, self.heads).transpose(1, 2), split_heads(v, self.heads).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, media_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """x [B, L, D], media_index [B, L] in [-1, N), k/v [B, heads, N, R, dh] → [B, L, D]"""
        num_media, num_latents = k.shape[2], k.shape[3]
        key_media = torch.arange(num_media, device=x.device).repeat_interleave(num_latents)  # [N·R]
        sees = media_index[..., None] == key_media  # [B, L, N·R]
        has_media = media_index >= 0  # [B, L]
        mask = sees | ~has_media[..., None]
        q = split_heads(self.to_q(self.norm(x)), self.heads)
        out = attend(q, k.flatten(2, 3), v.flatten(2, 3), mask[:, None])
        return self.to_out(merge_heads(out)) * has_media[..., None].to(x.dtype)


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, media_dim: int, heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim, media_dim, heads, head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffw = FeedForward(dim, ff_mult)
        self.ffw_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: torch.Tensor,
        media_index: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A text-only batch (k is None) has no cross-attention, only the gated FFW, exactly like the text before
        the first image of a multimodal batch."""
        y = x
        if k is not None:
            y = y + torch.tanh(self.attn_gate) * self.attn(y, media_index, k, v)
        y = y + torch.tanh(self.ffw_gate) * self.ffw(y)
        return y.to(x.dtype)  # keep the LM's residual stream in the LM's dtype (bf16 LM, fp32 blocks)
