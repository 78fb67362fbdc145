"""Greedy decoding, beam search and log-likelihood scoring that reuse both caches.

The media are encoded once and every gated block's visual keys/values computed once (`Flamingo.visual_state`);
the LM's own KV cache grows by one token per step. Every generated token sees the last image of its prompt
(`<image>` itself is never generated: there would be no image for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m3w.model.flamingo import Flamingo, VisualState


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, L + new]: the prompt, then the generated tokens (pad after the end)
    scores: torch.Tensor  # [B]: greedy: sum of log-probs; beam: sum of log-probs / length ** length_penalty
    step_logits: list[torch.Tensor] | None = None  # greedy: [B, vocab] logits each step chose from


class Decoder:
    """The state of an incremental decode: LM cache, cached visual K/V, attention mask, image index per row."""

    def __init__(
        self,
        model: Flamingo,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: torch.Tensor | None,
        media_mask: torch.Tensor | None,
    ) -> None:
        from transformers import DynamicCache

        self.model = model
        self.attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        state = model.visual_state(input_ids, images, media_mask)
        self.kv = state.kv
        # the prompt's last position is a real token (prompts are left-padded), its image is the last one
        self.media_index = None if state.media_index is None else state.media_index[:, -1:]
        self.cache = DynamicCache(config=model.lm.config)
        out = model.run_lm(input_ids, state, self.attention_mask, past_key_values=self.cache)
        self.logits = out.logits[:, -1]  # [rows, vocab]: the distribution of the next token

    def select(self, rows: torch.Tensor) -> None:
        """Keep/duplicate/reorder rows (beam expansion and reordering; one prompt → many candidates)."""
        self.cache.reorder_cache(rows)
        self.attention_mask = self.attention_mask[rows]
        self.logits = self.logits[rows]
        if self.kv is not None:
            self.kv = [(k[rows], v[rows]) for k, v in self.kv]
            self.media_index = self.media_index[rows]

    def extend(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append tokens [rows, n] (mask: which are real, right padding) → their logits [rows, n, vocab]."""
        mask = torch.ones_like(tokens) if mask is None else mask.long()
        start = self.attention_mask.sum(1, keepdim=True)
        positions = start + mask.cumsum(1) - 1
        self.attention_mask = torch.cat([self.attention_mask, mask], dim=1)
        media_index = None if self.media_index is None else self.media_index.expand(-1, tokens.shape[1])
        state = VisualState(self.kv, media_index)
        out = self.model.run_lm(tokens, state, self.attention_mask, positions, past_key_values=self.cache)
        self.logits = out.logits[:, -1]
        return out.logits


def _end_ids(model: Flamingo, eos_token_id: int | list[int] | None | str) -> torch.Tensor:
    if eos_token_id == "default":  # a chunk ends with <EOC>; the LM may also end the text
        ids = [model.eoc_token_id, model.tokenizer.eos_token_id]
    elif eos_token_id is None:
        ids = []
    else:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor([i for i in ids if i is not None], dtype=torch.long)


def _allowed(model: Flamingo, logits: torch.Tensor) -> torch.Tensor:
    """Never generate `<image>` (no image would go with it) nor padding."""
    banned = [model.media_token_id]
    pad = model.tokenizer.pad_token_id
    if pad is not None and pad not in (model.tokenizer.eos_token_id, model.eoc_token_id):
        banned.append(pad)
    return logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))


def _pad_id(model: Flamingo) -> int:
    pad = model.tokenizer.pad_token_id
    return pad if pad is not None else model.eoc_token_id


@torch.no_grad()
def generate(
    model: Flamingo,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    media_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    eos_token_id: int | list[int] | None | str = "default",
    length_penalty: float = 1.0,
) -> GenerationOutput:
    """Prompts [B, L] (left-padded when their lengths differ) → continuations. num_beams=1: greedy."""
    decoder = Decoder(model, input_ids, attention_mask, images, media_mask)
    end_ids = _end_ids(model, eos_token_id).to(input_ids.device)
    if num_beams == 1:
        return _greedy(model, decoder, input_ids, max_new_tokens, end_ids)
    return _beam_search(model, decoder, input_ids, max_new_tokens, end_ids, num_beams, length_penalty)


def _greedy(
    model: Flamingo, decoder: Decoder, input_ids: torch.Tensor, max_new_tokens: int, end_ids: torch.Tensor
) -> GenerationOutput:
    rows = len(input_ids)
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    scores = torch.zeros(rows, device=input_ids.device)
    tokens, step_logits = [], []
    for _ in range(max_new_tokens):
        step_logits.append(decoder.logits)
        logprobs = F.log_softmax(_allowed(model, decoder.logits), dim=-1)
        token = logprobs.argmax(-1)
        scores += torch.where(done, 0.0, logprobs.gather(1, token[:, None])[:, 0])
        token = token.masked_fill(done, _pad_id(model))
        tokens.append(token)
        done |= torch.isin(token, end_ids)
        if done.all():
            break
        decoder.extend(token[:, None])
    return GenerationOutput(torch.cat([input_ids, torch.stack(tokens, 1)], 1), scores, step_logits)


def _beam_search(
    model: Flamingo,
    decoder: Decoder,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    end_ids: torch.Tensor,
    beams: int,
    length_penalty: float,
) -> GenerationOutput:
    """Standard beam search: `beams` live hypotheses per prompt; a hypothesis that emits an end token is
    finished with score sum(log p) / length ** length_penalty; a prompt is done when `beams` finished ones
    beat the best live one. The highest-scoring finished (or, at max length, live) hypothesis is returned."""
    batch, device = len(input_ids), input_ids.device
    decoder.select(torch.arange(batch, device=device).repeat_interleave(beams))
    beam_scores = torch.full((batch, beams), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first one at step 0
    history = torch.empty(batch * beams, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    end = set(end_ids.tolist())
    for step in range(1, max_new_tokens + 1):
        logprobs = F.log_softmax(_allowed(model, decoder.logits), dim=-1)
        vocab = logprobs.shape[-1]
        candidates = (beam_scores[..., None] + logprobs.view(batch, beams, vocab)).view(batch, -1)
        # enough candidates that `beams` of them do not end even when every beam's best tokens are end tokens
        top_scores, top_index = candidates.topk(min(beams * (1 + len(end)), candidates.shape[1]), dim=1)
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            live = []
            for score, index in zip(top_scores[b].tolist(), top_index[b].tolist()):
                row, token = b * beams + index // vocab, index % vocab
                if token in end:
                    if not done[b] and len(live) < beams:
                        sequence = torch.cat([history[row], torch.tensor([token], device=device)])
                        finished[b].append((score / step**length_penalty, sequence))
                else:
                    live.append((row, token, score))
                if len(live) == beams:
                    break
            next_rows += [r for r, _, _ in live]
            next_tokens += [t for _, t, _ in live]
            next_scores += [s for _, _, s in live]
            best_live = max(s for _, _, s in live) / step**length_penalty
            finished[b] = sorted(finished[b], key=lambda item: -item[0])[:beams]
            done[b] = done[b] or (len(finished[b]) == beams and finished[b][-1][0] >= best_live)
        rows = torch.tensor(next_rows, device=device)
        tokens = torch.tensor(next_tokens, device=device)
        beam_scores = torch.tensor(next_scores, device=device).view(batch, beams)
        history = torch.cat([history[rows], tokens[:, None]], dim=1)
        if all(done) or step == max_new_tokens:
            break
        decoder.select(rows)
        decoder.extend(tokens[:, None])
    for b in range(batch):  # live hypotheses compete with the finished ones at the end
        if not done[b]:
            for i in range(beams):
                row = b * beams + i
                finished[b].append(
                    (beam_scores[b, i].item() / history.shape[1] ** length_penalty, history[row])
                )
    best = [max(hyps, key=lambda item: item[0]) for hyps in finished]
    width = max(len(seq) for _, seq in best)
    generated = torch.full((batch, width), _pad_id(model), dtype=torch.long, device=device)
    for b, (_, seq) in enumerate(best):
        generated[b, : len(seq)] = seq
    scores = torch.tensor([score for score, _ in best], device=device)
    return GenerationOutput(torch.cat([input_ids, generated], 1), scores)


@torch.no_grad()
def score(
    model: Flamingo,
    prompt_ids: torch.Tensor,
    candidates: list,
    images: torch.Tensor | None = None,
    media_mask: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """log p(candidate | prompt, images) for each candidate → [C] (mean per token with normalize=True).

    For close-ended tasks (classification, multiple-choice VQA). The prompt and its images are run once; its
    cache is shared by all candidates, which run as one batch."""
    prompt = torch.as_tensor(prompt_ids).view(1, -1)
    if images is not None and images.dim() == 5:
        images = images[None]  # [N, T, C, H, W] for the one prompt
    return score_prompts(model, prompt, [candidates], images, media_mask, normalize)[0]


@torch.no_grad()
def score_prompts(
    model: Flamingo,
    prompt_ids: torch.Tensor,
    candidates: list[list],
    images: torch.Tensor | None = None,
    media_mask: torch.Tensor | None = None,
    normalize: bool = False,
) -> list[torch.Tensor]:
    """`score` for B prompts at once: prompt_ids [B, L], candidates[b] the candidates of prompt b, images
    [B, N, T, C, H, W] → one [C_b] tensor per prompt. The prompts are run as one batch, then every candidate of
    every prompt as one batch on its prompt's cache. Prompts of one length need no padding: each prompt's
    numbers are then those it gets on its own."""
    prompts = torch.as_tensor(prompt_ids)
    device = prompts.device
    options = [
        [torch.as_tensor(c, dtype=torch.long, device=device).view(-1) for c in cs] for cs in candidates
    ]
    flat = [c for cs in options for c in cs]
    if len(options) != len(prompts) or any(not cs for cs in options) or any(len(c) == 0 for c in flat):
        raise ValueError("score needs at least one candidate per prompt, and no empty candidate")
    if any((c == model.media_token_id).any() for c in flat):
        raise ValueError("a candidate contains <image>: candidates are text continuations of the prompt")
    decoder = Decoder(model, prompts, None, images, media_mask)
    owner = [b for b, cs in enumerate(options) for _ in cs]  # the prompt of each candidate row
    decoder.select(torch.tensor(owner, dtype=torch.long, device=device))
    first = decoder.logits[:, None]  # the prompt's last position predicts each candidate's first token
    tokens = torch.nn.utils.rnn.pad_sequence(flat, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(c) for c in flat], batch_first=True)
    logits = torch.cat([first, decoder.extend(tokens, mask)[:, :-1]], dim=1)
    token_logprobs = F.log_softmax(logits.float(), dim=-1).gather(2, tokens[..., None])[..., 0] * mask
    total = token_logprobs.sum(1)
    totals = total / mask.sum(1) if normalize else total
    return list(totals.split([len(cs) for cs in options]))
