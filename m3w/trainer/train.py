"""The training loop: one batch of every dataset per optimizer step, Σ_m λ_m · NLL_m, exact resume.

Single process:   m3w train m3w/configs/train_tiny.yaml
DDP / FSDP:       torchrun --nproc_per_node 8 -m m3w.trainer.cli m3w/configs/train_compact.yaml [--set distributed=fsdp]

One optimizer step = `grad_accum` rounds; each round takes the next batch of every dataset (or, with
`accumulation: round_robin`, of one dataset chosen by the step) and backpropagates λ_m · NLL_m / grad_accum.
Under DDP/FSDP, gradients are synchronised only on the step's last backward (`no_sync` before it). Each
dataset's loss is weighted by its share of the label tokens over all ranks, so N processes with batch B give
the same gradient as one process with batch N·B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from m3w.config import from_dict, to_dict
from m3w.model.loss import IGNORE_INDEX
from m3w.pipeline.io import atomic_open
from m3w.pipeline.tokenizer import tokenizer_fingerprint
from m3w.trainer import checkpoint as ckpt
from m3w.trainer.config import OptimConfig, TrainConfig
from m3w.trainer.data import DatasetStream, build_streams, check_shard_sets

METRICS_FILE = "metrics.jsonl"
MODEL_CONFIG_FILE = (
    "model_config.yaml"  # the resolved FlamingoConfig of the run: a resume rebuilds exactly it
)


# ---------------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Read torchrun's environment; start a process group (NCCL on GPUs, gloo on CPUs) when there are peers."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(rank, world_size, local_rank, device)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA ("auto"), fp32 on CPU ("auto"); "bf16"/"fp32" force either."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision not in ("auto", "bf16"):
        raise ValueError(f"precision must be auto|bf16|fp32, not {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule


def resolve_model_config(cfg: TrainConfig, env: DistEnv, fresh: bool):
    """The run's FlamingoConfig: saved in the run directory on first start, so a resume rebuilds the same model
    (a preset writes random-init frozen parts; rebuilding them would change the frozen weights)."""
    from m3w.model import FlamingoConfig, build_preset

    saved = Path(cfg.output_dir) / MODEL_CONFIG_FILE
    if (fresh or not saved.exists()) and env.is_main:
        section = cfg.model
        if section.preset:
            workdir = str(Path(cfg.output_dir) / "preset")
            fcfg = build_preset(section.preset, workdir, tokenizer=section.tokenizer, family=section.family)
        else:
            fcfg = FlamingoConfig(tokenizer=section.tokenizer)
        overrides = {**section.config, "gradient_checkpointing": cfg.gradient_checkpointing}
        fcfg = from_dict(FlamingoConfig, {**to_dict(fcfg), **overrides}, "model.config")
        with atomic_open(saved, "w") as f:
            yaml.safe_dump(dataclasses.asdict(fcfg), f, sort_keys=False)
    if env.distributed:
        dist.barrier()
    with open(saved, encoding="utf-8") as f:
        return from_dict(FlamingoConfig, yaml.safe_load(f))


def build_model(cfg: TrainConfig, env: DistEnv, fresh: bool) -> nn.Module:
    from m3w.model import Flamingo

    torch.manual_seed(cfg.seed)  # the same trainable init on every rank
    if cfg.model.pretrained:
        model = Flamingo.from_pretrained(cfg.model.pretrained)
    else:
        model = Flamingo.from_config(resolve_model_config(cfg, env, fresh))
    return model.to(env.device)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Only trainable parameters; weight decay on matrices (≥ 2-d), none on biases, norms, gates, scalars."""
    decay, no_decay = [], []
    for _, p in model.trainable_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup to 1, then cosine / linear decay to `min_lr_ratio` at `total_steps` (or constant)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(unwrap(model), opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=False
    )

    def schedule(step: int) -> float:
        return lr_factor(step, opt, cfg.steps)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def wrap_model(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """DDP, or FSDP (per-parameter sharding, `fully_shard`) under torchrun; the model itself otherwise.

    FSDP shards every HF decoder / encoder layer (the classes each HF model lists in `_no_split_modules`), then
    the rest; frozen and trainable parameters may share a unit. It modifies the model in place."""
    if not env.distributed:
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        layer_names = set()
        for part in model.modules():
            layer_names.update(getattr(part, "_no_split_modules", None) or [])
        for part in list(model.modules()):
            if type(part).__name__ in layer_names:
                fully_shard(part, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally, without the all-reduce (DDP) / reduce-scatter (FSDP)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def gate_values(model: nn.Module) -> dict[str, float]:
    """tanh(α) of every gate; under FSDP the gates are sharded tensors, gathered here."""
    inner = unwrap(model)
    if not is_fsdp(inner):
        return inner.gate_values()
    return {
        name: float(torch.tanh(p.full_tensor()).item())
        for name, p in inner.trainable_parameters()
        if "gate" in name
    }


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------------------
# One optimizer step


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
    precision: str = "auto",
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
            with autocast_context(precision, env.device):
                out = model(**batch)
            loss = out.loss.float()
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


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global L2 norm of all trainable gradients (over every shard under FSDP); returns the norm."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ---------------------------------------------------------------------------------------------------------
# State: checkpoints and resume


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights by name, as full tensors on CPU (gathered from the shards under FSDP)."""
    inner = unwrap(model)
    names = [n for n, _ in inner.trainable_parameters()]
    if is_fsdp(inner):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(inner, options=_full_state_options())
        return {n: full[n] for n in names if n in full}  # full on rank 0 only (cpu_offload), empty elsewhere
    return {n: p.detach().cpu().clone() for n, p in inner.trainable_parameters()}


def optimizer_state(model: nn.Module, optimizer) -> dict[str, Any]:
    if is_fsdp(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap(model), optimizer, options=_full_state_options())
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    if is_fsdp(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, state, options=_full_state_options())
    else:
        optimizer.load_state_dict(state)


def gather_stream_states(streams: dict[str, DatasetStream], env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's stream cursors (rank 0 writes them all into the checkpoint)."""
    mine = {name: s.state_dict() for name, s in streams.items()}
    if not env.distributed:
        return [mine]
    every: list[Any] = [None] * env.world_size
    dist.all_gather_object(every, mine)
    return every


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint a run resumes from, so none is duplicated."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------------------------
# Logging


class MetricsLogger:
    """stdout + JSONL (always) + TensorBoard + W&B (optional), on rank 0 only."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, start_step: int) -> None:
        self.enabled = env.is_main
        self.path = Path(cfg.output_dir) / METRICS_FILE
        self.tb = self.wandb = None
        if not self.enabled:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard"), purge_step=start_step + 1)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed; logging without it", file=sys.stderr)
            else:
                self.wandb = wandb.init(project=cfg.wandb_project, config=to_dict(cfg), resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        flat = dict(_flatten(record))
        step = record["step"]
        if self.tb is not None:
            for key, value in flat.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _flatten(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


# ---------------------------------------------------------------------------------------------------------
# The run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns the last logged metrics record."""
    env = init_distributed()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        with atomic_open(out / "train_config.yaml", "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

    state = None
    if resume:
        path = ckpt.latest_checkpoint(out)
        if path is None:
            print(
                f"--resume: no checkpoint in {out / ckpt.CHECKPOINT_DIR}; starting from step 0",
                file=sys.stderr,
            )
        else:
            state = ckpt.load_checkpoint(path)
            if env.is_main:
                print(f"resuming from {path} (step {state['step']})", file=sys.stderr)

    if state is None and ckpt.latest_checkpoint(out) is not None:
        raise FileExistsError(
            f"{out} already holds checkpoints of another run: pass --resume to continue it, or use a new output_dir"
        )
    check_shard_sets(cfg.datasets)  # a shard set that does not fit the config fails before the model is built
    seed_everything(cfg.seed)
    model = build_model(cfg, env, fresh=state is None)
    if state is not None:
        missing = set(dict(model.trainable_parameters())) - set(state["trainable"])
        if missing:
            raise ValueError(f"checkpoint lacks trainable parameters {sorted(missing)[:5]}...")
        with torch.no_grad():
            for name, p in model.trainable_parameters():
                p.copy_(state["trainable"][name].to(p.device, p.dtype))
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
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"][env.rank] if len(state["rng"]) > env.rank else state["rng"][0])
        start = state["step"]
        if env.is_main:
            truncate_metrics(out / METRICS_FILE, start)
    elif env.is_main and (out / METRICS_FILE).exists():
        (out / METRICS_FILE).unlink()  # a fresh run in a used directory starts a fresh log

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
        stats = accumulate_gradients(model, micro, len(plan), cfg.grad_accum, env, cfg.precision)
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
            save_state(model, optimizer, scheduler, streams, counters, cfg, env, done)
    bar.close()
    logger.close()
    save_final(model, out / "final", env)
    if env.distributed:
        dist.barrier()
    return record


def save_state(
    model, optimizer, scheduler, streams, counters, cfg: TrainConfig, env: DistEnv, step: int
) -> None:
    trainable = trainable_state(model)
    optim_state = optimizer_state(model, optimizer)
    stream_states = gather_stream_states(streams, env)
    rng = [ckpt.rng_state()]
    if env.distributed:
        rng = [None] * env.world_size
        dist.all_gather_object(rng, ckpt.rng_state())
    if env.is_main:
        state = {
            "trainable": trainable,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "streams": stream_states,
            "counters": dict(counters),
            "config": to_dict(cfg),
        }
        path = ckpt.save_checkpoint(cfg.output_dir, step, state, cfg.keep_checkpoints)
        tqdm.write(f"saved checkpoint {path}", file=sys.stdout)
    if env.distributed:
        dist.barrier()


def save_final(model: nn.Module, directory: Path, env: DistEnv) -> None:
    """`Flamingo.save_pretrained` of the trained model (for `m3w eval`); under FSDP, from gathered weights."""
    inner = unwrap(model)
    if not is_fsdp(inner):
        if env.is_main:
            inner.save_pretrained(str(directory))
        return
    from m3w.model import Flamingo

    weights = trainable_state(model)  # a collective: every rank takes part
    if env.is_main:
        plain = Flamingo.from_config(inner.config)
        plain.load_state_dict(weights, strict=False)
        plain.save_pretrained(str(directory))


def step_record(step, stats, weights, lr, grad_norm, window, env, streams, gates, counters) -> dict[str, Any]:
    """One metrics record: the step's losses, plus rates and fractions over the steps since the last record."""
    world = env.world_size
    seconds = max(window["time"], 1e-9)
    tokens = sum(window["tokens"].values()) * world
    total = sum(weights[n] * v for n, v in stats["loss"].items())
    return {
        "step": step,
        "loss/total": total,
        "loss": stats["loss"],
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": {n: v * world / seconds for n, v in window["samples"].items()},
        "data_wait_fraction": window["wait"] / seconds,
        "epochs": {n: s.epochs for n, s in streams.items()},
        "skipped_samples": {n: sum(s.skipped.values()) for n, s in streams.items()},
        "gates": gates,
        "counters": dict(counters),
    }


def format_record(record: dict[str, Any]) -> str:
    losses = " ".join(f"{n}={v:.4f}" for n, v in record["loss"].items())
    return (
        f"step {record['step']} loss {record['loss/total']:.4f} ({losses}) lr {record['lr']:.3g} "
        f"gnorm {record['grad_norm']:.3f} tok/s {record['tokens_per_s']:.0f} "
        f"wait {100 * record['data_wait_fraction']:.1f}%"
    )
