"""What a run reports: one record per `log_every` steps to stdout, `metrics.jsonl`, TensorBoard and W&B (rank 0)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m3w.config import to_dict
from m3w.pipeline import io
from m3w.pipeline.io import atomic_open
from m3w.trainer.config import TrainConfig, tensorboard_run_dir
from m3w.trainer.distributed import DistEnv, is_fsdp, unwrap

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """stdout + JSONL (always) + TensorBoard + W&B (optional), on rank 0 only."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, start_step: int) -> None:
        self.enabled = env.is_main
        self.path = io.join(cfg.output_dir, METRICS_FILE)
        self.local = Path(self.path)
        self.tb = self.wandb = None
        if not self.enabled:
            return
        if io.is_remote(self.path):
            # An object store cannot append: the log grows in a local file, stored whole by `sync` at each
            # checkpoint (a resume runs the steps after its checkpoint again, and logs them again).
            fd, local = tempfile.mkstemp(prefix="m3w-metrics-", suffix=".jsonl")
            os.close(fd)
            self.local = Path(local)
            if io.exists(self.path):
                self.local.write_bytes(io.read_bytes(self.path))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_run_dir(cfg)), purge_step=start_step + 1)
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
        with open(self.local, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        flat = dict(_flatten(record))
        step = record["step"]
        if self.tb is not None:
            for key, value in flat.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def sync(self) -> None:
        """Store a remote log's lines so far (a local log is always up to date)."""
        if self.enabled and io.is_remote(self.path):
            io.write_bytes(self.path, self.local.read_bytes())

    def close(self) -> None:
        self.sync()
        if self.enabled and io.is_remote(self.path):
            self.local.unlink(missing_ok=True)
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


def truncate_metrics(path: str, step: int) -> None:
    """Drop log lines of steps after the checkpoint a run resumes from, so none is duplicated."""
    if not io.exists(path):
        return
    kept = [
        line for line in io.read_text(path).splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


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
