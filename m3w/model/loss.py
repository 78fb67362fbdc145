"""Next-token NLL through the LM head without materialising [tokens, vocab] logits (a fused linear cross-entropy).

With a frozen head and a scalar loss, the gradient of the mean NLL with respect to the hidden states is known in
the forward pass: dL/dh = (softmax(h W^T) - onehot(target)) W / n. So the head runs over row chunks, each chunk's
logits live only while its loss and gradients are computed, and backward just scales the saved gradients. Memory
for the logits drops from tokens x vocab to chunk x vocab (on a GPU with a 50k vocabulary and 4k tokens per
micro-batch: 0.8 GB of fp32 logits, their log-softmax and its gradient, down to a few MB), and on a CPU the time
the full-size log-softmax spends moving memory goes away.

The model's own rows for `<image>`/`<EOC>` (`NewTokenRows`) take part like the LM's: their logits replace the
LM's for ids inside its vocabulary and extend it for ids beyond; they receive gradients, the frozen head does not.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100
# logits per chunk, (CPU, CUDA): 16 MB of fp32 keeps a CPU's BLAS efficient; 256 MB keeps a GPU busy
CHUNK_ELEMENTS = (1 << 22, 1 << 26)
# Chunk rows are a multiple of this: BLAS kernels block by 8-64 columns, and a ragged chunk (131 rows for a 32k
# vocabulary) ran the two head GEMMs 1.4x slower than 128 rows on the benchmark CPU.
CHUNK_ALIGN = 64


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunks are computed transposed, logits [vocab, chunk] = W h^T, and the softmax reduces over dim 0: on the
    benchmark CPU a 128-row chunk (both GEMMs and the softmax) ran 1.3x faster than as h W^T with a row softmax."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, row_ids, vocab_size: int, targets):
        lm_vocab = weight.shape[0]
        device = hidden.device
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[3]
        in_vocab = row_ids < lm_vocab  # new-token ids that replace an LM row of the head; the rest extend it
        replaced, extra_ids = row_ids[in_vocab], row_ids[~in_vocab]
        # the extra row of each id beyond the head (-1: a pad id, whose logit is -inf-ish, as in the full path)
        extra_row_of = torch.full((max(vocab_size - lm_vocab, 1),), -1, dtype=torch.long, device=device)
        extra_row_of[extra_ids - lm_vocab] = torch.arange(len(extra_ids), device=device)
        lowest = torch.finfo(torch.float32).min
        # ignored positions (padding, <image>) never reach the head: no logits, no loss, zero gradient. The kept
        # rows are padded to whole CHUNK_ALIGN blocks with zero states whose loss is dropped (a zero row adds
        # nothing to the new rows' gradient, and its own gradient is thrown away)
        kept = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        n_kept = len(kept)
        padded = -(-n_kept // CHUNK_ALIGN) * CHUNK_ALIGN
        kept_hidden, kept_targets = hidden.new_zeros((padded, hidden.shape[1])), targets.new_zeros(padded)
        kept_hidden[:n_kept], kept_targets[:n_kept] = hidden[kept], targets[kept]

        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_kept = torch.empty_like(kept_hidden) if need_grad else None
        grad_rows = torch.zeros(rows.shape, dtype=torch.float32, device=device) if need_grad else None
        chunk = CHUNK_ELEMENTS[device.type == "cuda"] // max(vocab_size, 1) // CHUNK_ALIGN * CHUNK_ALIGN
        chunk = max(chunk, CHUNK_ALIGN)
        with torch.autocast(device.type, enabled=False):
            rows32 = rows.float()
            for start in range(0, padded, chunk):
                h = kept_hidden[start : start + chunk]
                t = kept_targets[start : start + chunk]
                logits = (weight @ h.to(weight.dtype).T).float()  # [lm_vocab, c]
                if bias is not None:
                    logits += bias.float()[:, None]
                new = rows32 @ h.float().T  # [n_new, c]
                logits[replaced] = new[in_vocab]
                extra = new[~in_vocab]  # [n_extra, c]

                beyond = t >= lm_vocab
                extra_row = extra_row_of[(t - lm_vocab).clamp(min=0, max=len(extra_row_of) - 1)]
                hit_extra = beyond & (extra_row >= 0)
                target_logit = logits.gather(0, torch.where(beyond, 0, t)[None])[0]
                if len(extra):
                    extra_logit = extra.gather(0, extra_row.clamp(min=0)[None])[0]
                    target_logit = torch.where(hit_extra, extra_logit, target_logit)
                target_logit = torch.where(beyond & ~hit_extra, lowest, target_logit)

                peak = logits.amax(0)
                if len(extra):
                    peak = torch.maximum(peak, extra.amax(0))
                probs = logits.sub_(peak).exp_()  # in place: the logits are not needed any more
                extra_probs = (extra - peak).exp()
                norm = probs.sum(0) + extra_probs.sum(0)
                total += (peak + norm.log() - target_logit)[: n_kept - start].sum()
                if not need_grad:
                    continue

                # d(sum NLL)/d logits = softmax - onehot(target)
                scale = 1.0 / norm
                probs.mul_(scale)
                extra_probs.mul_(scale)
                cols = torch.arange(len(t), device=device)
                probs[t[~beyond], cols[~beyond]] -= 1.0
                extra_probs[extra_row[hit_extra], cols[hit_extra]] -= 1.0
                grad_new = torch.empty_like(new)
                grad_new[in_vocab] = probs[replaced]
                grad_new[~in_vocab] = extra_probs
                probs[replaced] = 0.0  # those logits came from the new rows, not from the frozen head
                grad_h = (weight.T @ probs.to(weight.dtype)).float() + rows32.T @ grad_new  # [d, c]
                grad_kept[start : start + chunk] = grad_h.T.to(hidden.dtype)
                grad_rows += grad_new @ h.float()

        if need_grad:
            inv = 1.0 / max(n_kept, 1)
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, kept, grad_kept[:n_kept] * inv)
            ctx.save_for_backward(grad_hidden, grad_rows * inv)
            ctx.rows_dtype = rows.dtype
        return total / n_kept  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_rows = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        return grad_hidden, None, None, (grad_rows * grad_loss).to(ctx.rows_dtype), None, None, None


def plain_linear_head(lm: nn.Module) -> nn.Linear | None:
    """The LM's output head when its logits are just `h W^T + b` (no soft-capping or scaling), else None."""
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config()
    transformed = any(
        getattr(config, name, None) not in (None, 1, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    )
    return head if type(head) is nn.Linear and not transformed else None


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    rows: torch.Tensor,
    row_ids: torch.Tensor,
    vocab_size: int,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Mean NLL of `targets` [N] (IGNORE_INDEX: skipped) under logits = hidden [N, d] @ head, with the columns
    `row_ids` taken from `rows` [n_new, d] instead (and added beyond the head's vocabulary, up to `vocab_size`)."""
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, rows, row_ids, vocab_size, targets)
