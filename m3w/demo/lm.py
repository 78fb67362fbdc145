"""A pretrained language model for the demo, made offline: the tiny LM pretrained on the crawl's own text and on
naming drills.

Flamingo freezes a *pretrained* LM and trains only the resampler and the gated cross-attention. With no model
hub at hand, the demo's stand-in for "download a pretrained LM" is this: take the tiny preset's LM shape (with
tied input and output embeddings, so that copying a token is the identity map) and pretrain it as a causal LM,
then hand it to `m3w train` as the frozen LM (`--set model.config.lm=DIR`). The tokenizer is m3w's default, the
one the shards were made with.

The demo ships the LM this recipe made (BUNDLED_LM, `make demo-lm` remakes it), as a user would download one:
pretraining it takes longer than the rest of the demo together. `python -m m3w.demo.run --pretrain-lm` makes
one in the run instead.

Fast binding needs an LM that copies from its context: a pretrained LM's induction heads do that (Olsson et al.
2022), but a tiny LM trained for a minute on a few hundred pages memorises the pages instead (it preferred a name
it had seen in the context to a fresh one 23 times in 40). So each step also reads *naming drills*: the naming
games' own surface form (`<EOC><image>This is a dakop.<EOC><image>This is a mizet.<EOC>...`) with fresh names,
where every token of a picture's chunk carries a random vector standing in for the picture (one vector per kind
of picture, fresh in every drill, with noise per picture), and the loss is on the names shown a second time.
That is where Flamingo's cross-attention writes what it sees: its output is added to every token after an image,
before the first LM layer. The LM learns to give the name whose picture-vector matches the current one; what
the vectors are is left to Flamingo's training, which learns to write them from real pictures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from m3w.demo import BUNDLED_LM, LM_RECORD
from m3w.schemas.documents import document_texts


@dataclasses.dataclass
class Drill:
    input_ids: list[int]
    pictures: (
        torch.Tensor
    )  # [len(input_ids), dim]: the picture-vector each token carries (0 before the first)
    targets: list[int]  # positions whose next token is part of a name shown before (the loss is there)


class NamingDrills:
    """Naming drills in the demo web's naming-game format (see the module docstring)."""

    def __init__(self, tok, dim: int, seed: int, pictures: int = 10, noise: float = 0.3) -> None:
        from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN

        self.dim, self.pictures, self.noise = dim, pictures, noise
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.eoc, self.media = tok.convert_tokens_to_ids(EOC_TOKEN), tok.convert_tokens_to_ids(MEDIA_TOKEN)
        self.prefix = tok("This is a", add_special_tokens=False)["input_ids"]
        self.stop = tok(".", add_special_tokens=False)["input_ids"]
        self.encode = tok.backend_tokenizer.encode  # the `tokenizers` call alone: 5x faster than tok(...)

    def __call__(self) -> Drill:
        from m3w.demo.web import made_up_name

        kinds = self.rng.choice([2, 3])
        words = [f" {made_up_name(self.rng)}" for _ in range(kinds)]
        names = [self.encode(word, add_special_tokens=False).ids for word in words]
        order = list(range(kinds)) + [self.rng.randrange(kinds) for _ in range(self.pictures - kinds)]
        self.rng.shuffle(order)
        ids, chunk_lengths, targets, shown = [self.eoc], [1], [], set()
        for kind in order:
            chunk = [self.media, *self.prefix, *names[kind], *self.stop, self.eoc]
            name_start = len(ids) + 1 + len(self.prefix)
            if kind in shown:
                targets += range(name_start - 1, name_start - 1 + len(names[kind]))
            shown.add(kind)
            ids += chunk
            chunk_lengths.append(len(chunk))
        # the same draws, in the same order, as one vector per kind and then one noise vector per picture
        kind_vectors = torch.randn(kinds, self.dim, generator=self.gen)
        noise = self.noise * torch.randn(len(order), self.dim, generator=self.gen)
        before_first = torch.zeros(1, self.dim)
        per_chunk = torch.cat([before_first, kind_vectors[order] + noise])
        return Drill(ids, per_chunk.repeat_interleave(torch.tensor(chunk_lengths), dim=0), targets)


def pretrain_lm(
    filtered_dir: Path,
    out_dir: Path,
    steps: int = 1200,
    seq_len: int = 128,
    batch: int = 4,
    drills: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
) -> Path:
    """Pretrain the tiny preset's LM on the documents (`batch` windows of `seq_len` tokens per step) and on
    `drills` naming drills per step; returns the save_pretrained directory."""
    from transformers import AutoModelForCausalLM

    from m3w.model.presets import FROZEN_SHAPES, lm_config
    from m3w.pipeline.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    tok = load_tokenizer()
    shape = dataclasses.replace(FROZEN_SHAPES["tiny"][0], tie_embeddings=True)
    lm = AutoModelForCausalLM.from_config(lm_config(shape, len(tok), tok.eos_token_id))
    eoc = tok.convert_tokens_to_ids("<EOC>")
    stream: list[int] = []
    for text in document_texts(filtered_dir):
        stream += tok(text, add_special_tokens=False)["input_ids"] + [eoc]
    chunks = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
    make_drill = NamingDrills(tok, lm.config.hidden_size, seed)
    embed = lm.get_input_embeddings()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    lm.train()
    drill_losses: list[float] = []
    for step in range(1, steps + 1):
        ids = chunks[rng.sample(range(len(chunks)), min(batch, len(chunks)))]
        text_loss = lm(input_ids=ids, labels=ids).loss
        drill_loss = naming_loss(lm, embed, [make_drill() for _ in range(drills)], eoc)
        (text_loss + drill_loss).backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        drill_losses.append(drill_loss.item())
        if step % 100 == 0 or step == steps:
            print(f"lm pretrain step {step}/{steps} loss: text {text_loss.item():.3f} "
                  f"names shown again {drill_loss.item():.3f}", flush=True)  # fmt: skip
    target = out_dir / "lm"
    lm.save_pretrained(target)
    record = {
        "recipe": "m3w.demo.lm.pretrain_lm",
        "settings": {"steps": steps, "seq_len": seq_len, "batch": batch, "drills": drills, "lr": lr, "seed": seed,
                     "dim": shape.dim, "layers": shape.layers, "torch_threads": torch.get_num_threads()},
        "text_tokens": len(stream),
        "final_text_loss": round(text_loss.item(), 4),
        "final_drill_loss": round(sum(drill_losses[-100:]) / len(drill_losses[-100:]), 4),  # last 100 steps' mean
        "first_name_accuracy": round(first_name_accuracy(lm, tok, seed + 1), 4),  # on drills it never saw
    }  # fmt: skip
    (target / LM_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return target


@torch.no_grad()
def first_name_accuracy(lm, tok, seed: int, drills: int = 200) -> float:
    """The share of names shown a second time whose first token the LM ranks first, in `drills` fresh drills: what
    fast binding asks of it (before a name's first token, only the picture-vector tells which name comes)."""
    make_drill = NamingDrills(tok, lm.config.hidden_size, seed)
    batch = []
    for _ in range(drills):
        drill = make_drill()
        firsts = [t for t in drill.targets if drill.input_ids[t] == make_drill.prefix[-1]]
        batch.append(dataclasses.replace(drill, targets=firsts))
    lm.eval()
    logits, names = target_logits(lm, lm.get_input_embeddings(), batch, make_drill.eoc)
    return (logits.argmax(-1) == names).float().mean().item()


def bundle_lm(source: Path, target: Path = BUNDLED_LM) -> Path:
    """Copy a pretrained demo LM, weights and pretraining record, into the package: as it is, in float32, so that
    a run with it trains on the very numbers a run that pretrained it did."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def naming_loss(lm, embed: torch.nn.Module, batch: list[Drill], pad_id: int) -> torch.Tensor:
    """Next-token NLL at the drills' target positions only (`target_logits`)."""
    return F.cross_entropy(*target_logits(lm, embed, batch, pad_id))


def target_logits(
    lm, embed: torch.nn.Module, batch: list[Drill], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's logits at the drills' target positions and the tokens that follow them there, the picture-vectors
    added to the token embeddings (scaled to the embeddings' own RMS, which training moves). The drills are padded
    at their ends, which a causal LM's earlier positions never see; the LM head runs on the targets alone."""
    length = max(len(d.input_ids) for d in batch)
    ids = torch.full((len(batch), length), pad_id)
    pictures = torch.zeros(len(batch), length, embed.embedding_dim)
    rows, cols = [], []
    for r, drill in enumerate(batch):
        ids[r, : len(drill.input_ids)] = torch.tensor(drill.input_ids)
        pictures[r, : len(drill.input_ids)] = drill.pictures
        rows += [r] * len(drill.targets)
        cols += drill.targets
    scale = embed.weight.detach().pow(2).mean().sqrt()
    hidden = lm.base_model(inputs_embeds=embed(ids) + scale * pictures).last_hidden_state
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    return lm.get_output_embeddings()(hidden[rows_t, cols_t]), ids[rows_t, cols_t + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("filtered_dir", type=Path, nargs="?", help="the kept documents to pretrain on")
    parser.add_argument("--out", type=Path, help="where to write lm/")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", type=Path, metavar="LM_DIR",
                        help=f"instead: copy this pretrained LM into the package ({BUNDLED_LM})")  # fmt: skip
    args = parser.parse_args()
    if args.bundle:
        print(bundle_lm(args.bundle))
    elif args.filtered_dir and args.out:
        print(pretrain_lm(args.filtered_dir, args.out, steps=args.steps, seed=args.seed))
    else:
        parser.error("give the kept documents' folder and --out, or --bundle LM_DIR")


if __name__ == "__main__":
    main()
