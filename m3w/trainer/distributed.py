"""Processes and devices under torchrun: the environment, DDP / FSDP wrapping, and when gradients synchronise."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from m3w.trainer.config import TrainConfig


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
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def unwrap(model: nn.Module) -> nn.Module:
    """The Flamingo inside a DDP wrapper (FSDP modifies the model in place: it is its own inner model)."""
    return getattr(model, "module", model)
