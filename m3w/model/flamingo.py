"""Flamingo (Alayrac et al. 2022) on Hugging Face parts: a frozen vision encoder, a Perceiver Resampler, and
GATED XATTN-DENSE blocks in front of the decoder layers of a frozen causal LM.

    images [B, N, T, C, H, W] ──vision (frozen, no grad)──▶ patch features [M, T, S, dv]   (M real media)
        ──resampler──▶ visual tokens [B, N, R, dv] ──each block's to_kv──▶ K, V [B, h, N, R, dh]   (once)
    input_ids [B, L] ──embeddings (frozen; own rows for <image>, <EOC>)──▶ LM decoder layers, each n-th one
        preceded by a gated block: text token t cross-attends to the visual tokens of image media_index[t]
    ──▶ logits [B, L, vocab]; loss = mean NLL of the labels (shifted here; with labels the head and the loss run
        fused, chunk by chunk, and the logits are not materialised: model/loss.py)

The text-to-image assignment media_index[t] = (number of `<image>` tokens at positions ≤ t) - 1, so -1 before
the first image. The k-th `<image>` of a row is the k-th real media slot of that row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from m3w.config import from_dict
from m3w.model.config import FlamingoConfig, Precision
from m3w.model.lm_adapter import NewTokenRows, attach_before_layers, decoder_layers, gated_layer_indices
from m3w.model.loss import IGNORE_INDEX, linear_cross_entropy, plain_linear_head
from m3w.model.resampler import PerceiverResampler
from m3w.model.vision import VisionEncoder
from m3w.model.xattn import GatedCrossAttentionBlock

CONFIG_FILE = "flamingo_config.json"
WEIGHTS_FILE = "trainable.safetensors"


def autocast_dtype(precision: Precision, device_type: str) -> torch.dtype | None:
    """The dtype the model computes in under `precision`: "bf16" autocasts to bf16 everywhere, "auto" on CUDA
    only, "fp32" never (None: full precision). Weights stay as loaded: fp32 trainable parts, frozen parts in
    `from_config`'s dtype."""
    if precision not in typing.get_args(Precision):
        raise ValueError(f"precision must be one of {typing.get_args(Precision)}, not {precision!r}")
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: Precision):
    dtype = autocast_dtype(precision, device.type)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@dataclass
class FlamingoOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # None when the loss was computed without them (see Flamingo.forward)
    past_key_values: object | None = None
    hidden: torch.Tensor | None = None  # the LM's final hidden states, when the head was not run


@dataclass
class VisualState:
    """What the gated blocks read during one LM call: each block's visual K/V (None: text only) and, for every
    input token, the index of the image it may see."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    media_index: torch.Tensor | None


class Flamingo(nn.Module):
    def __init__(self, config: FlamingoConfig, lm: nn.Module, vision: VisionEncoder, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.media_token_id: int = tokenizer.convert_tokens_to_ids("<image>")
        self.eoc_token_id: int = tokenizer.convert_tokens_to_ids("<EOC>")
        self.lm = lm.requires_grad_(False)
        self.vision = vision
        lm_dim = lm.config.get_text_config().hidden_size
        self.resampler = PerceiverResampler(
            vision.dim,
            config.resampler_depth,
            config.resampler_heads,
            config.resampler_head_dim,
            config.num_latents,
            config.resampler_ff_mult,
            config.max_frames,
        )
        self.gated_layers = gated_layer_indices(len(decoder_layers(lm)), config.cross_attn_every)
        self.xattn = nn.ModuleList(
            GatedCrossAttentionBlock(
                lm_dim, vision.dim, config.xattn_heads, config.xattn_head_dim, config.xattn_ff_mult
            )
            for _ in self.gated_layers
        )
        self.new_tokens = NewTokenRows(lm, [self.media_token_id, self.eoc_token_id], len(tokenizer))
        self._state: VisualState | None = None  # set only for the duration of one LM call
        self.precision: Precision = (
            "auto"  # see autocast_dtype; the trainer sets its config's `precision` here
        )
        attach_before_layers(lm, config.cross_attn_every, self._cross_attend)
        if config.gradient_checkpointing:
            self.lm.activation_checkpointing_enable({"use_reentrant": False})

    # ---- construction, persistence -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: FlamingoConfig, dtype: torch.dtype = torch.float32) -> Flamingo:
        """Load the frozen parts (LM, vision tower, tokenizer) with `from_pretrained`; build the trainable parts.
        `dtype` is the frozen parts' dtype (bf16 halves their memory on a GPU; the trainable parts stay fp32)."""
        from transformers import AutoModelForCausalLM

        from m3w.pipeline.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer)
        lm = AutoModelForCausalLM.from_pretrained(config.lm, dtype=dtype)
        vision = VisionEncoder.from_pretrained(config.vision, dtype=dtype)
        return cls(config, lm, vision, tokenizer)

    def save_pretrained(self, directory: str | Path) -> None:
        """The trainable weights and a config naming the frozen parts (which are not copied)."""
        from safetensors.torch import save_file

        from m3w.pipeline.io import atomic_open, atomic_path

        weights = {name: p.detach().contiguous().cpu() for name, p in self.trainable_parameters()}
        with atomic_path(Path(directory) / WEIGHTS_FILE) as tmp:  # a killed save leaves no half file
            save_file(weights, str(tmp))
        with atomic_open(Path(directory) / CONFIG_FILE, "w") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> Flamingo:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = from_dict(FlamingoConfig, json.loads((directory / CONFIG_FILE).read_text()), str(directory))
        model = cls.from_config(config, dtype=dtype)
        weights = load_file(str(directory / WEIGHTS_FILE))
        expected = {name for name, _ in model.trainable_parameters()}
        if set(weights) != expected:
            raise ValueError(
                f"{directory}: trainable weights do not match the config "
                f"(missing {sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]})"
            )
        model.load_state_dict(weights, strict=False)
        return model

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def gate_values(self) -> dict[str, float]:
        values = {}
        for layer, block in zip(self.gated_layers, self.xattn):
            values[f"layer{layer}.xattn"] = torch.tanh(block.attn_gate).item()
            values[f"layer{layer}.dense"] = torch.tanh(block.ffw_gate).item()
        return values

    @property
    def image_config(self) -> dict:
        return dict(self.vision.image_config)

    # ---- media ------------------------------------------------------------------------------------------------

    def encode_media(self, images: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, N, T, C, H, W] → visual tokens [B, N, R, dv]; the k-th real medium of a row lands in slot
        k (padding slots are not encoded and come last, as zeros)."""
        if images.dim() != 6:
            raise ValueError(f"images must be [B, N_media, T, C, H, W], got shape {tuple(images.shape)}")
        batch, slots, frames = images.shape[:3]
        real = images.flatten(0, 1) if media_mask is None else images[media_mask]  # [M, T, C, H, W]
        with autocast(images.device, self.precision):
            features = self.vision(real.flatten(0, 1))  # [M·T, S, dv]
            features = features.unflatten(0, (-1, frames)).to(self.resampler.latents.dtype)
            visual = self.resampler(features)  # [M, R, dv]
        if media_mask is None:
            return visual.unflatten(0, (batch, slots))
        counts = media_mask.sum(1)
        packed = torch.arange(slots, device=images.device) < counts[:, None]  # [B, N]
        return visual.new_zeros(batch, slots, *visual.shape[1:]).index_put((packed,), visual)

    def media_index(self, input_ids: torch.Tensor, num_media: torch.Tensor) -> torch.Tensor:
        """[B, L] index of the image each token may see (-1: none); checks one `<image>` token per medium."""
        is_media = (input_ids == self.media_token_id).long()
        counts = is_media.sum(1)
        if not torch.equal(counts, num_media.to(counts.device)):
            bad = (counts != num_media.to(counts.device)).nonzero().flatten().tolist()
            raise ValueError(
                f"rows {bad}: number of <image> tokens {counts[bad].tolist()} != number of media supplied "
                f"{num_media[bad].tolist()}; every <image> token needs exactly one image"
            )
        previous = is_media.cumsum(1) - 1
        if self.training and self.config.p_next > 0:
            # App. A.3: a sampled subset of sequences attends to the image *after* each text chunk instead.
            before = previous + 1 - is_media  # images strictly before t; = k at the k-th <image> itself
            following = torch.where(before < counts[:, None], before, -1)
            use_next = torch.rand(len(input_ids), 1, device=input_ids.device) < self.config.p_next
            return torch.where(use_next, following, previous)
        return previous

    def visual_state(
        self, input_ids: torch.Tensor, images: torch.Tensor | None, media_mask: torch.Tensor | None = None
    ) -> VisualState:
        """Encode the media once and compute every block's K/V: reused by every decoding step."""
        if images is None:
            num_media = torch.zeros(len(input_ids), dtype=torch.long)
        elif media_mask is None:
            num_media = torch.full((len(input_ids),), images.shape[1], dtype=torch.long)
        else:
            num_media = media_mask.sum(1).long()
        media_index = self.media_index(input_ids, num_media)  # also checks one image per <image> token
        if images is None or int(num_media.sum()) == 0:
            return VisualState(kv=None, media_index=None)  # text only: the blocks apply their gated FFW
        visual = self.encode_media(images, media_mask)
        with autocast(images.device, self.precision):
            kv = [block.attn.media_kv(visual) for block in self.xattn]
        return VisualState(kv, media_index)

    def _cross_attend(self, block_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Forward pre-hook body for the gated layers (see lm_adapter.attach_before_layers)."""
        state = self._state
        if state is None:  # the LM called on its own, outside Flamingo.forward
            return hidden
        k, v = state.kv[block_index] if state.kv is not None else (None, None)
        block = self.xattn[block_index]
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, hidden, state.media_index, k, v, use_reentrant=False)
        return block(hidden, state.media_index, k, v)

    # ---- forward ---------------------------------------------------------------------------------------------

    def run_lm(
        self,
        input_ids: torch.Tensor,
        state: VisualState,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        run_head: bool = True,
    ) -> FlamingoOutput:
        """One LM call with the gated blocks reading `state`; with `past_key_values` it extends the LM's cache.
        `run_head=False` stops at the final hidden states (the LM's base model), for the fused loss."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:  # from the mask, so left- and right-padded rows both count from 0
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        inputs = {
            "inputs_embeds": self.new_tokens.embed(input_ids, self.lm.get_input_embeddings()),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": past_key_values,
            "use_cache": past_key_values is not None,
        }
        self._state = state
        try:
            with autocast(input_ids.device, self.precision):
                if not run_head:
                    hidden = self.lm.base_model(**inputs).last_hidden_state
                    return FlamingoOutput(loss=None, logits=None, hidden=hidden)
                out = self.lm(**inputs, output_hidden_states=True)
                logits = self.new_tokens.logits(out.logits, out.hidden_states[-1])
        finally:
            self._state = None
        return FlamingoOutput(loss=None, logits=logits, past_key_values=out.past_key_values)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> FlamingoOutput:
        """Logits, or with `labels` the mean next-token NLL and no logits (the head and the loss run fused, chunk
        by chunk) unless `return_logits` asks for both."""
        state = self.visual_state(input_ids, images, media_mask)
        # shift the labels, not the logits: slicing [B, L, vocab] would copy it
        targets = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
        head = plain_linear_head(self.lm)
        if targets is None or return_logits or head is None:
            out = self.run_lm(input_ids, state, attention_mask)
            if targets is not None:
                out.loss = F.cross_entropy(out.logits.flatten(0, 1), targets, ignore_index=IGNORE_INDEX)
            return out
        out = self.run_lm(input_ids, state, attention_mask, run_head=False)
        rows = self.new_tokens
        out.loss = linear_cross_entropy(
            out.hidden.flatten(0, 1), head, rows.output_rows, rows.token_ids, rows.vocab_size, targets
        )
        return out
