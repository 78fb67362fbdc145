"""Attach Flamingo to any Hugging Face causal LM without copying its code.

- `decoder_layers(lm)` finds the stack of decoder layers (GPT-2 `transformer.h`, Llama/Qwen2 `m3w.model.layers`,
  GPT-NeoX `gpt_neox.layers`, ...) as the ModuleList with `num_hidden_layers` entries.
- `attach_before_layers` registers a forward pre-hook on every n-th layer: the hook rewrites the hidden states
  entering that layer (that is where a GATED XATTN-DENSE block sits). The LM's modules and state dict stay as
  they were, and HF's own gradient checkpointing of the layer still works (HF checkpoints `forward`, hooks run
  outside it).
- `NewTokenRows` gives `<image>` and `<EOC>` their own trainable input and output rows, so the LM's embedding
  matrix stays frozen and the optimizer holds state for 2 rows, not the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    num_layers = lm.config.get_text_config().num_hidden_layers
    for module in lm.modules():  # pre-order: the decoder stack comes before any per-layer list
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"{type(lm).__name__}: no ModuleList of {num_layers} decoder layers found")


def gated_layer_indices(num_layers: int, every: int) -> list[int]:
    """Before every n-th layer, starting with the first (so the first block sees the token embeddings)."""
    return list(range(0, num_layers, every))


def attach_before_layers(
    lm: nn.Module, every: int, rewrite: Callable[[int, torch.Tensor], torch.Tensor]
) -> list[RemovableHandle]:
    """Call `rewrite(block_index, hidden_states)` on the hidden states entering every n-th decoder layer."""
    layers = decoder_layers(lm)

    def make_hook(block_index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if args:
                return (rewrite(block_index, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": rewrite(block_index, kwargs["hidden_states"])}

        return hook

    return [
        layers[layer].register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(gated_layer_indices(len(layers), every))
    ]


class NewTokenRows(nn.Module):
    """Trainable input/output rows for new tokens; all other ids go through the frozen LM.

    Ids at or beyond the LM's vocabulary that are not new tokens (e.g. an added pad) embed as row 0 and get a
    logit of -inf-ish: they are padding, never inputs that matter nor targets.
    """

    def __init__(self, lm: nn.Module, token_ids: list[int], vocab_size: int) -> None:
        super().__init__()
        input_weight = lm.get_input_embeddings().weight
        output_weight = lm.get_output_embeddings().weight
        self.lm_vocab = input_weight.shape[0]
        self.vocab_size = max(vocab_size, self.lm_vocab, max(token_ids) + 1)
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        self.input_rows = nn.Parameter(self._init_rows(input_weight, token_ids))
        self.output_rows = nn.Parameter(self._init_rows(output_weight, token_ids))

    def _init_rows(self, weight: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        """The LM's own row where the id exists (the model then starts exactly as the LM), else the mean row."""
        weight = weight.detach().float()
        mean = weight.mean(0)
        return torch.stack([weight[i] if i < self.lm_vocab else mean for i in token_ids]).clone()

    def embed(self, input_ids: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        x = embedding(input_ids.masked_fill(input_ids >= self.lm_vocab, 0))
        match = input_ids[..., None] == self.token_ids  # [B, L, n_new]
        new = match.to(self.input_rows.dtype) @ self.input_rows
        return torch.where(match.any(-1, keepdim=True), new.to(x.dtype), x)

    def logits(self, lm_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """[B, L, lm_vocab] → [B, L, vocab_size] with the new tokens' logits from their own output rows."""
        logits = lm_logits.float()
        extra = self.vocab_size - logits.shape[-1]
        if extra:
            logits = nn.functional.pad(logits, (0, extra), value=torch.finfo(logits.dtype).min)
        new = hidden.to(self.output_rows.dtype) @ self.output_rows.T  # [B, L, n_new]
        # In place: the LM head's output is a fresh tensor that autograd does not need, and an out-of-place
        # copy of [B, L, vocab] costs more than the whole LM head on a CPU.
        return logits.index_copy_(-1, self.token_ids, new.float())
