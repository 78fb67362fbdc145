"""A pretrained language model for the demo, made offline: the tiny LM pretrained on the crawl's own text.

Flamingo freezes a *pretrained* LM and trains only the resampler and the gated cross-attention. With no model
hub at hand, the demo's stand-in for "download a pretrained LM" is this: take the tiny preset's random-init LM
and pretrain it as a plain causal LM on the text of the filtered documents (about a minute on 2 cores), then
hand it to `m3w train` as the frozen LM (`--set model.config.lm=DIR`). The tokenizer is m3w's default, the one
the shards were made with.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from m3w.schemas.documents import iter_documents


def document_texts(filtered_dir: Path) -> list[str]:
    """The text of each kept document (its text nodes in order)."""
    texts = []
    for doc in iter_documents(filtered_dir, columns=["nodes"]):
        text = "\n".join(n["text"] for n in doc["nodes"] if n["kind"] == "text" and n["text"])
        if text:
            texts.append(text)
    if not texts:
        raise ValueError(f"no document text in {filtered_dir}")
    return texts


def pretrain_lm(
    filtered_dir: Path,
    out_dir: Path,
    steps: int = 200,
    seq_len: int = 128,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Pretrain the tiny preset LM on the documents; returns the save_pretrained directory."""
    from transformers import AutoModelForCausalLM

    from m3w.model import build_preset
    from m3w.pipeline.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    parts = build_preset("tiny", out_dir / "random")
    tok = load_tokenizer(parts.tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(parts.lm)
    stream: list[int] = []
    for text in document_texts(filtered_dir):
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<EOC>")]
    chunks = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    lm.train()
    for step in range(1, steps + 1):
        ids = chunks[rng.sample(range(len(chunks)), min(batch, len(chunks)))]
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            print(f"lm pretrain step {step}/{steps} loss {loss.item():.3f}", flush=True)
    target = out_dir / "lm"
    lm.save_pretrained(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("filtered_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print(pretrain_lm(args.filtered_dir, args.out, steps=args.steps))


if __name__ == "__main__":
    main()
