"""The training loop: one batch of every dataset per optimizer step, Σ_m λ_m · NLL_m, exact resume.

Single process:   m3w train m3w/configs/train_tiny.yaml
DDP / FSDP:       torchrun --nproc_per_node 8 -m m3w.trainer.cli m3w/configs/train_compact.yaml [--set distributed=fsdp]

One optimizer step = `grad_accum` rounds; each round takes the next batch of every dataset (or, with
`accumulation: round_robin`, of one dataset chosen by the step) and backpropagates λ_m · NLL_m / grad_accum.
Under DDP/FSDP, gradients are synchronised only on the step's last backward (`no_sync` before it). Each
dataset's loss is weighted by its share of the label tokens over all ranks, so N processes with batch B give
the same gradient as one process with batch N·B.

The rest of the trainer: distributed.py (processes, DDP/FSDP), optim.py (AdamW, schedule, clipping), state.py
(checkpoints and resume), metrics.py (what a run reports), data.py (shard streams), config.py (settings).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from m3w.config import to_dict
from m3w.model.loss import IGNORE_INDEX
from m3w.pipeline import io
from m3w.pipeline.io import atomic_open
from m3w.pipeline.tokenizer import tokenizer_fingerprint
from m3w.trainer import state as st
from m3w.trainer.config import TrainConfig, tensorboard_run_dir
from m3w.trainer.data import build_streams, check_shard_sets
from m3w.trainer.distributed import DistEnv, init_distributed, no_sync, wrap_model
from m3w.trainer.metrics import (
    METRICS_FILE,
    MetricsLogger,
    format_record,
    gate_values,
    step_record,
    truncate_metrics,
)
from m3w.trainer.optim import build_optimizer, clip_gradients


def step_plan(step: int, names: list[str], accumulation: str, grad_accum: int) -> list[str]:
    """Dataset of each micro-batch of `step`: every dataset each round (paper), or one per step (ablation)."""
    if accumulation == "round_robin":
        return [names[step % len(names)]] * grad_accum
    return names * grad_accum


def label_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """Tokens the loss is taken over (after the model's shift by one)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Iterable[tuple[str, float, dict[str, Any]]],
    num_micro: int,
    grad_accum: int,
    env: DistEnv,
) -> dict[str, Any]:
    """Backpropagate Σ λ_m · NLL_m / grad_accum over the step's micro-batches into `.grad` (no optimizer step).

    A non-finite loss skips only that micro-batch's contribution (counted). Returns per-dataset mean NLL over
    the step (token-weighted over ranks), label tokens, samples and non-finite counts."""
    losses: dict[str, list[float]] = defaultdict(list)
    tokens, samples, nonfinite = Counter(), Counter(), Counter()
    for index, (name, weight, batch) in enumerate(micro_batches):
        last = index == num_micro - 1
        sync = contextlib.nullcontext() if last or not env.distributed else no_sync(model)
        n_local = label_tokens(batch).float()
        n_global = n_local.clone()
        if env.distributed:
            dist.all_reduce(n_global)
        # DDP averages gradients over ranks; weighting by the rank's share of label tokens turns that average
        # into the token-weighted mean a single process would compute over the union of the batches
        share = (n_local * env.world_size / n_global).item() if n_global > 0 else 0.0
        with sync:
            loss = model(**batch).loss.float()  # the model applies its precision (Flamingo.precision)
            finite = bool(torch.isfinite(loss))
            if finite and share > 0:
                (loss * (weight * share / grad_accum)).backward()
            elif last and env.distributed:
                # the last backward must still run on every rank (it triggers the all-reduce); zeros add nothing
                sum(p.sum() for p in model.parameters() if p.requires_grad).mul(0.0).backward()
        # [Σ loss·tokens, tokens, non-finite] over ranks, for the log: one collective, called on every rank
        report = torch.tensor(
            [loss.item() * n_local.item(), n_local.item(), 0.0] if finite else [0.0, 0.0, 1.0],
            dtype=torch.float64,
        )
        if env.distributed:
            dist.all_reduce(report)
        if report[2] > 0:
            nonfinite[name] += int(report[2])
        if report[1] > 0:
            losses[name].append(float(report[0] / report[1]))
        tokens[name] += int(batch["attention_mask"].sum())
        samples[name] += batch["input_ids"].shape[0]
    return {
        "loss": {name: sum(v) / len(v) for name, v in losses.items()},
        "tokens": dict(tokens),
        "samples": dict(samples),
        "nonfinite": dict(nonfinite),
    }


def build_model(cfg: TrainConfig, env: DistEnv, fresh: bool) -> nn.Module:
    from m3w.model import Flamingo

    torch.manual_seed(cfg.seed)  # the same trainable init on every rank
    if cfg.model.pretrained:
        model = Flamingo.from_pretrained(cfg.model.pretrained)
    else:
        model = Flamingo.from_config(st.resolve_model_config(cfg, env, fresh))
    model.precision = cfg.precision
    return model.to(env.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns the last logged metrics record."""
    env = init_distributed()
    out = cfg.output_dir  # a local folder or any fsspec URL (s3://...)
    io.makedirs(out)
    state = st.resume_state(cfg, env, resume)  # checked against this config before anything is built
    check_shard_sets(cfg.datasets)  # a shard set that does not fit the config fails before the model is built
    if cfg.tensorboard:
        tensorboard_run_dir(
            cfg
        )  # a folder TensorBoard cannot write to fails now, not after the model is built
    if env.is_main:
        with atomic_open(io.join(out, "train_config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

    seed_everything(cfg.seed)
    model = build_model(cfg, env, fresh=state is None)
    if state is not None:
        st.load_trainable_state(model, state)
    tok = model.tokenizer
    streams = build_streams(
        cfg.datasets,
        model.image_config,
        tok,
        tokenizer_fingerprint(tok),
        model.media_token_id,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        device=env.device,
        states=state["streams"][env.rank] if state else None,
    )
    model = wrap_model(model, cfg, env)
    optimizer, scheduler = build_optimizer(model, cfg)  # after wrapping: FSDP replaces parameters by shards
    start = 0
    if state is not None:
        st.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        st.set_rng_state(state["rng"][env.rank])
        start = state["step"]
        if env.is_main:
            truncate_metrics(io.join(out, METRICS_FILE), start)
    elif env.is_main and io.exists(io.join(out, METRICS_FILE)):
        io.remove(io.join(out, METRICS_FILE))  # a fresh run in a used directory starts a fresh log

    logger = MetricsLogger(cfg, env, start)
    names = list(cfg.datasets)
    weights = {n: cfg.datasets[n].weight for n in names}
    counters = Counter(state["counters"]) if state else Counter()
    window = {"time": 0.0, "wait": 0.0, "tokens": Counter(), "samples": Counter()}
    record: dict[str, Any] = {}
    bar = tqdm(total=cfg.steps, initial=start, disable=not env.is_main, file=sys.stdout, desc="train")
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        wait0 = sum(s.wait_s for s in streams.values())
        plan = step_plan(step, names, cfg.accumulation, cfg.grad_accum)
        micro = ((name, weights[name], streams[name].next_batch()) for name in plan)
        stats = accumulate_gradients(model, micro, len(plan), cfg.grad_accum, env)
        grad_norm = clip_gradients(model, cfg.optim.grad_clip)
        if math.isfinite(grad_norm):
            optimizer.step()
        else:  # inf/nan gradients from finite losses: drop the whole step rather than corrupt the weights
            counters["skipped_steps"] += 1
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        for name, n in stats["nonfinite"].items():
            counters[f"nonfinite_loss/{name}"] += n
        dt = time.perf_counter() - t0
        window["time"] += dt
        window["wait"] += sum(s.wait_s for s in streams.values()) - wait0
        window["tokens"].update(stats["tokens"])
        window["samples"].update(stats["samples"])
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = step_record(
                done, stats, weights, lr, grad_norm, window, env, streams, gate_values(model), counters
            )
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss/total']:.4f}", refresh=False)
            if env.is_main:
                tqdm.write(format_record(record), file=sys.stdout)
            window = {"time": 0.0, "wait": 0.0, "tokens": Counter(), "samples": Counter()}
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            logger.sync()  # first: the log never lacks a step its checkpoint holds (a resume drops later lines)
            st.save_state(model, optimizer, scheduler, streams, counters, cfg, env, done)
    bar.close()
    logger.close()
    st.save_final(model, io.join(out, "final"), env)
    if env.distributed:
        dist.barrier()
    return record
