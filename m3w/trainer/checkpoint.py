"""Training checkpoints: everything needed to continue a run exactly, written atomically and rotated.

`<output_dir>/checkpoints/step-00001000.pt` holds
    trainable   {name: tensor}   only the trainable parameters (the frozen LM and vision tower come from
                                 their own checkpoints, named in the model config)
    optimizer, scheduler         state dicts
    step                         optimizer steps done
    rng                          python, numpy, torch CPU and every CUDA device's generator state
    streams                      per dataset and rank: batches/samples consumed, each worker's cursor, skip counts
    config                       the TrainConfig as a dict, for reference
Everything is plain tensors, numbers, strings, lists and dicts, so loading works with `weights_only=True`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3w.pipeline.io import atomic_path

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (temp files of a killed writer are never listed)."""
    directory = Path(output_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


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


def save_checkpoint(output_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `step` (atomically), then delete all but the newest `keep`."""
    path = checkpoint_path(output_dir, step)
    with atomic_path(path) as tmp:
        torch.save({"step": step, **state}, tmp)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
