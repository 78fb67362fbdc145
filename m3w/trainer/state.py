"""Checkpoint state and resume: everything needed to continue a run exactly, written atomically and rotated.

`<output_dir>/checkpoints/step-00001000.pt` (output_dir: a local folder or any fsspec URL, e.g. s3://) holds
    trainable   {name: tensor}   only the trainable parameters (the frozen LM and vision tower come from
                                 their own checkpoints, named in the model config)
    optimizer, scheduler         state dicts
    step                         optimizer steps done
    rng                          per rank: python, numpy, torch CPU and every CUDA device's generator state
    streams                      per rank and dataset: batches/samples consumed, each worker's cursor, skip counts
    counters                     skipped steps, non-finite losses
    config                       the TrainConfig of the run, as a dict
Everything is plain tensors, numbers, strings, lists and dicts, so loading works with `weights_only=True`.
`<output_dir>/model_config.yaml` is the run's resolved FlamingoConfig: a resume rebuilds exactly that model.
A checkpoint is built in a local temp file and stored whole (a rename, or one upload that an object store
publishes whole), so the newest one listed is always complete: the listing is the "latest" pointer.

A resume takes the newest checkpoint and first checks that it continues the same run: the config may differ from
the saved one only in what does not change the computation (RESUMABLE_CHANGES), and the number of processes
must be the same (every rank has its own data cursors and RNG).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from m3w.config import from_dict, load_config, to_dict
from m3w.errors import UserError
from m3w.pipeline import io
from m3w.pipeline.io import atomic_open, atomic_path
from m3w.trainer.config import TrainConfig
from m3w.trainer.data import DatasetStream
from m3w.trainer.distributed import DistEnv, is_fsdp, unwrap

CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_FILE = "model_config.yaml"
_NAME = re.compile(r"^step-(\d{8})\.pt$")
# Settings a resumed run may change: the schedule's length, logging, checkpointing, memory/speed trade-offs.
RESUMABLE_CHANGES = (
    "output_dir",
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "tensorboard",
    "tensorboard_dir",
    "run_name",
    "wandb_project",
    "gradient_checkpointing",
    "datasets.*.prefetch_factor",
)


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_path(output_dir: str | Path, step: int) -> str:
    return io.join(output_dir, CHECKPOINT_DIR, f"step-{step:08d}.pt")


def list_checkpoints(output_dir: str | Path) -> list[str]:
    """Finished checkpoints, oldest first (temp files of a killed writer are never listed)."""
    directory = io.join(output_dir, CHECKPOINT_DIR)
    found = [(int(m.group(1)), name) for name in io.list_dir(directory) if (m := _NAME.match(name))]
    return [io.join(directory, name) for _, name in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> str:
    """Write `state` as the checkpoint of `step` (atomically), then delete all but the newest `keep`."""
    path = checkpoint_path(output_dir, step)
    with atomic_path(path) as tmp:
        torch.save({"step": step, **state}, tmp)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        io.remove(old)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    with io.open_input(path) as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": _to_lists(random.getstate()),
        # numpy's key array becomes a tensor: weights_only loading refuses numpy arrays
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# ------------------------------------------------------------------------------------------------- resume


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(data) if isinstance(data, tuple) else data}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ between a checkpoint's config and this run's, beyond RESUMABLE_CHANGES."""
    before, after = _flat(saved), _flat(current)
    changed = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key) and not any(fnmatch.fnmatch(key, p) for p in RESUMABLE_CHANGES):
            changed.append(f"{key} ({before.get(key)!r} → {after.get(key)!r})")
    return changed


def resume_state(cfg: TrainConfig, env: DistEnv, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from (None: a fresh run), checked against this run's config and processes."""
    out = cfg.output_dir
    path = latest_checkpoint(out)
    if not resume:
        if path is not None:
            raise UserError(
                f"{out} already holds checkpoints of another run: pass --resume to continue it, or use a new output_dir"
            )
        return None
    if path is None:
        print(
            f"--resume: no checkpoint in {io.join(out, CHECKPOINT_DIR)}; starting from step 0",
            file=sys.stderr,
        )
        return None
    state = load_checkpoint(path)
    changed = config_changes(state["config"], to_dict(cfg))
    if changed:
        raise UserError(
            f"--resume: {path} was made with another config ({'; '.join(changed[:5])}"
            f"{'; ...' if len(changed) > 5 else ''}): resuming would not continue the same run; set the saved "
            "values or start a new output_dir"
        )
    if len(state["streams"]) != env.world_size:
        raise UserError(
            f"--resume: {path} was written by {len(state['streams'])} processes, this run has {env.world_size}: "
            "every process resumes its own data streams, so resume with the same number"
        )
    if env.is_main:
        print(f"resuming from {path} (step {state['step']})", file=sys.stderr)
    return state


# ------------------------------------------------------------------------------------------- model config


def resolve_model_config(cfg: TrainConfig, env: DistEnv, fresh: bool):
    """The run's FlamingoConfig: saved in the run directory on first start, so a resume rebuilds the same model
    (a preset writes random-init frozen parts; rebuilding them would change the frozen weights)."""
    from m3w.model import FlamingoConfig, build_preset

    saved = io.join(cfg.output_dir, MODEL_CONFIG_FILE)
    if (fresh or not io.exists(saved)) and env.is_main:
        section = cfg.model
        if section.preset:
            if io.is_remote(cfg.output_dir):
                raise UserError(
                    f"model.preset builds its frozen parts in <output_dir>/preset, which must be on a local disk, "
                    f"not {cfg.output_dir}: use a local output_dir, or model.pretrained or model.config naming "
                    "frozen parts already built"
                )
            workdir = io.join(cfg.output_dir, "preset")
            fcfg = build_preset(section.preset, workdir, tokenizer=section.tokenizer, family=section.family)
        else:
            fcfg = FlamingoConfig(tokenizer=section.tokenizer)
        overrides = {**section.config, "gradient_checkpointing": cfg.gradient_checkpointing}
        fcfg = from_dict(FlamingoConfig, {**to_dict(fcfg), **overrides}, "model.config")
        with atomic_open(saved, "w") as f:
            yaml.safe_dump(dataclasses.asdict(fcfg), f, sort_keys=False)
    if env.distributed:
        dist.barrier()
    return load_config(FlamingoConfig, saved)


# ------------------------------------------------------------------------------------------- saving state


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


def load_trainable_state(model: nn.Module, state: dict[str, Any]) -> None:
    """The checkpoint's trainable weights into a freshly built (unwrapped) model."""
    missing = set(dict(model.trainable_parameters())) - set(state["trainable"])
    if missing:
        raise ValueError(f"checkpoint lacks trainable parameters {sorted(missing)[:5]}...")
    with torch.no_grad():
        for name, p in model.trainable_parameters():
            p.copy_(state["trainable"][name].to(p.device, p.dtype))


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


def save_state(
    model, optimizer, scheduler, streams, counters, cfg: TrainConfig, env: DistEnv, step: int
) -> None:
    trainable = trainable_state(model)
    optim_state = optimizer_state(model, optimizer)
    stream_states = gather_stream_states(streams, env)
    rng = [rng_state()]
    if env.distributed:
        rng = [None] * env.world_size
        dist.all_gather_object(rng, rng_state())
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
        path = save_checkpoint(cfg.output_dir, step, state, cfg.keep_checkpoints)
        tqdm.write(f"saved checkpoint {path}", file=sys.stdout)
    if env.distributed:
        dist.barrier()


def save_final(model: nn.Module, directory: str, env: DistEnv) -> None:
    """`Flamingo.save_pretrained` of the trained model (for `m3w eval`) into `directory` (a folder or a URL);
    under FSDP, from gathered weights."""
    inner = unwrap(model)
    if not is_fsdp(inner):
        if env.is_main:
            with io.local_folder(directory) as folder:
                inner.save_pretrained(str(folder))
        return
    from m3w.model import Flamingo

    weights = trainable_state(model)  # a collective: every rank takes part
    if env.is_main:
        plain = Flamingo.from_config(inner.config)
        plain.load_state_dict(weights, strict=False)
        with io.local_folder(directory) as folder:
            plain.save_pretrained(str(folder))
