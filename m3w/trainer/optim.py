"""The optimizer and its schedule: AdamW on the trainable parameters, warmup then decay, global-norm clipping."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from m3w.trainer.config import OptimConfig, TrainConfig
from m3w.trainer.distributed import unwrap


def param_groups(model: nn.Module, weight_decay: float, gate_lr: float | None = None) -> list[dict[str, Any]]:
    """Only trainable parameters; weight decay on matrices (≥ 2-d), none on biases, norms, gates, scalars. With
    `gate_lr`, the tanh gates form a third group with that learning rate."""
    decay, no_decay, gates = [], [], []
    for name, p in model.trainable_parameters():
        if gate_lr is not None and name.endswith("_gate"):
            gates.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr": gate_lr})
    return groups


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
    """AdamW and its LambdaLR schedule. Build it after wrapping: FSDP replaces parameters by shards."""
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(unwrap(model), opt.weight_decay, opt.gate_lr),
        lr=opt.lr,
        betas=opt.betas,
        eps=opt.eps,
        fused=False,
    )

    def schedule(step: int) -> float:
        return lr_factor(step, opt, cfg.steps)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global L2 norm of all trainable gradients (over every shard under FSDP); returns the norm."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
