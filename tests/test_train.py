"""`m3w train` on a tiny Flamingo and real tar shards: accumulation maths, non-finite losses, optimizer and
schedule, config, exact resume after SIGKILL, DDP (learning from images: test_train_learns.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import toydata
import yaml

from m3w.config import load_config, to_dict
from m3w.errors import UserError
from m3w.model import Flamingo, build_preset
from m3w.pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint
from m3w.trainer.config import DatasetConfig, OptimConfig, TrainConfig
from m3w.trainer.data import build_streams
from m3w.trainer.distributed import DistEnv
from m3w.trainer.optim import lr_factor, param_groups
from m3w.trainer.state import config_changes, list_checkpoints, load_checkpoint
from m3w.trainer.train import accumulate_gradients, build_model, step_plan

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny preset's random-init parts, written once, plus its FlamingoConfig as a YAML model section."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = build_preset("tiny", root / "preset")
    (root / "flamingo.yaml").write_text(yaml.safe_dump(cfg.__dict__))
    return root


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from m3w.model import FlamingoConfig

    return Flamingo.from_config(FlamingoConfig(**yaml.safe_load((tiny_dir / "flamingo.yaml").read_text())))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    tok = load_tokenizer()
    toydata.write_interleaved(root / "m3w", tok, 64, size=32, shard_size=16)
    toydata.write_shapes(root / "shapes", tok, 48, size=32, shard_size=48)
    toydata.write_video(root / "video", tok, 16, size=32, frames=4, shard_size=8)
    return root


def datasets(data: Path, **per) -> dict[str, dict]:
    base = {
        "m3w": {"path": str(data / "m3w"), "weight": 1.0, "batch_size": 3},
        "caption_pairs": {"path": str(data / "shapes"), "weight": 0.2, "batch_size": 4},
        "video_pairs": {"path": str(data / "video"), "weight": 0.03, "batch_size": 2},
    }
    for name, cfg in base.items():
        cfg.update({"num_workers": 0, **per.get(name, {})})
    return base


def write_config(path: Path, tiny_dir: Path, output: Path, dsets: dict, **extra) -> Path:
    cfg = {
        "output_dir": str(output),
        "seed": 3,
        "model": {"preset": None, "config": yaml.safe_load((tiny_dir / "flamingo.yaml").read_text())},
        "datasets": dsets,
        "optim": {"lr": 1e-3, "warmup_steps": 3},
        "log_every": 1,
        "tensorboard": True,
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def open_gates(model, value: float = 0.4) -> None:
    """Gates start at 0, which zeroes the gradient of everything behind them; open them so every trainable
    parameter has a gradient to compare."""
    with torch.no_grad():
        for name, p in model.trainable_parameters():
            if "gate" in name:
                p.fill_(value)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.trainable_parameters() if p.grad is not None}


def test_accumulation_equals_hand_computed_weighted_sum_and_round_robin_differs(tiny_model, data):
    model = tiny_model
    open_gates(model)
    tok = model.tokenizer
    cfgs = {n: DatasetConfig(**c) for n, c in datasets(data).items()}
    streams = build_streams(
        cfgs, model.image_config, tok, tokenizer_fingerprint(tok), model.media_token_id, seed=0
    )
    names = list(cfgs)
    weights = {n: cfgs[n].weight for n in names}
    rounds = [{n: streams[n].next_batch() for n in names} for _ in range(2)]  # grad_accum = 2

    expected: dict[str, torch.Tensor] = {}
    for batches in rounds:
        for name in names:
            model.zero_grad(set_to_none=True)
            model(**batches[name]).loss.backward()
            for key, g in grads(model).items():
                expected[key] = expected.get(key, 0) + weights[name] * g / 2
    assert all(v.abs().sum() > 0 for v in expected.values())

    model.zero_grad(set_to_none=True)
    plan = step_plan(0, names, "all", 2)
    micro = [(n, weights[n], rounds[i // len(names)][n]) for i, n in enumerate(plan)]
    stats = accumulate_gradients(model, micro, len(micro), 2, DistEnv())
    got = grads(model)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-8)
    assert set(stats["loss"]) == set(names) and not stats["nonfinite"]

    model.zero_grad(set_to_none=True)
    plan = step_plan(0, names, "round_robin", 2)
    assert plan == [names[0], names[0]]
    accumulate_gradients(model, [(n, weights[n], rounds[i][n]) for i, n in enumerate(plan)], 2, 2, DistEnv())
    rr = grads(model)
    differs = max((rr[k] - expected[k]).abs().max().item() for k in expected)
    print(f"max |round_robin - accumulated| = {differs:.3e}")
    assert differs > 1e-3


def test_nonfinite_loss_skips_only_that_dataset(tiny_model, data):
    model = tiny_model
    open_gates(model)
    tok = model.tokenizer
    cfgs = {n: DatasetConfig(**c) for n, c in datasets(data).items() if n != "video_pairs"}
    streams = build_streams(
        cfgs, model.image_config, tok, tokenizer_fingerprint(tok), model.media_token_id, seed=0
    )
    good, bad = streams["caption_pairs"].next_batch(), streams["m3w"].next_batch()
    bad["images"] = torch.full_like(bad["images"], float("nan"))  # a poisoned batch: NaN loss
    model.zero_grad(set_to_none=True)
    model(**good).loss.backward()
    expected = {k: 0.2 * g for k, g in grads(model).items()}
    model.zero_grad(set_to_none=True)
    stats = accumulate_gradients(model, [("m3w", 1.0, bad), ("caption_pairs", 0.2, good)], 2, 1, DistEnv())
    assert stats["nonfinite"] == {"m3w": 1} and "m3w" not in stats["loss"]
    for key, g in grads(model).items():
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, expected[key], rtol=1e-5, atol=1e-8)


def test_optimizer_gets_only_trainable_params_with_decay_on_matrices(tiny_model):
    groups = param_groups(tiny_model, 0.1)
    trainable = {id(p) for _, p in tiny_model.trainable_parameters()}
    in_groups = [p for g in groups for p in g["params"]]
    assert {id(p) for p in in_groups} == trainable and len(in_groups) == len(trainable)
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    gates = [p for n, p in tiny_model.trainable_parameters() if "gate" in n]
    assert gates and all(any(g is p for p in groups[1]["params"]) for g in gates)
    with_gate_lr = param_groups(tiny_model, 0.1, gate_lr=0.5)
    assert [id(p) for p in with_gate_lr[2]["params"]] == [id(g) for g in gates] and with_gate_lr[2][
        "lr"
    ] == 0.5
    assert not any(g is p for group in with_gate_lr[:2] for p in group["params"] for g in gates)


def test_schedule_warmup_then_cosine_or_linear():
    opt = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, opt, 110) == pytest.approx(0.1) and lr_factor(9, opt, 110) == pytest.approx(1.0)
    assert lr_factor(60, opt, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, opt, 110) == pytest.approx(0.1)
    lin = OptimConfig(warmup_steps=0, schedule="linear")
    assert lr_factor(25, lin, 100) == pytest.approx(0.75)
    assert lr_factor(500, OptimConfig(warmup_steps=0, schedule="constant"), 100) == 1.0


def test_resume_allows_only_changes_that_keep_the_computation():
    saved = to_dict(TrainConfig())
    longer = TrainConfig(steps=2000, log_every=1, output_dir="moved", tensorboard=False)
    assert config_changes(saved, to_dict(longer)) == []
    other = TrainConfig(seed=1, precision="fp32")
    other.datasets["m3w"].num_workers = 4  # each worker has its own data cursor in the checkpoint
    assert config_changes(saved, to_dict(other)) == [
        "datasets.m3w.num_workers (2 → 4)", "precision ('auto' → 'fp32')", "seed (0 → 1)"
    ]  # fmt: skip


def test_the_configs_precision_is_the_models(tiny_dir, tmp_path):
    """Issue 13, defect 3, the trainer's half: the model the trainer builds computes in TrainConfig.precision
    (test_model.py checks that the model follows it; it used to choose bf16 on CUDA by itself)."""
    for precision in ("fp32", "bf16", "auto"):
        out = tmp_path / precision
        config = write_config(tmp_path / "c.yaml", tiny_dir, out, {"m3w": {"path": "x"}}, precision=precision)
        assert build_model(load_config(TrainConfig, config), DistEnv(), fresh=True).precision == precision


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"m3w": {"path": "x", "batch_size": 2}}, "steps": 5}))
    cfg = load_config(
        TrainConfig, path, ["optim.lr=3e-4", "datasets.m3w.weight=0.5", "accumulation=round_robin"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.datasets["m3w"].weight == 0.5 and cfg.datasets["m3w"].batch_size == 2
    assert cfg.accumulation == "round_robin" and cfg.steps == 5
    with pytest.raises(ValueError, match="optim.learning_rate: unknown key"):
        load_config(TrainConfig, path, ["optim.learning_rate=1"])
    for shipped in ("train_tiny.yaml", "train_compact.yaml"):
        cfg = load_config(TrainConfig, ROOT / "m3w" / "configs" / shipped)
        assert cfg.datasets["m3w"].weight == 1.0 and cfg.datasets["video_pairs"].weight == 0.03
        assert cfg.datasets["alt_pairs"].weight == cfg.datasets["caption_pairs"].weight == 0.2


def run_train(config: Path, *args: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "m3w.trainer.cli", str(config), *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen
    )


def kill_after_checkpoint(proc: subprocess.Popen, checkpoint: str) -> None:
    """SIGKILL a training run right after it reports storing `checkpoint`."""
    for line in proc.stdout:
        if checkpoint in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_exact_resume_after_sigkill(tiny_dir, data, tmp_path):
    """20 steps straight == 10 steps, SIGKILL, --resume to 20: same losses, same final trainable weights."""
    dsets = datasets(data, m3w={"num_workers": 2, "shuffle_buffer": 8}, caption_pairs={"num_workers": 1})
    extra = {"steps": 20, "checkpoint_every": 5, "keep_checkpoints": 2}
    straight = tmp_path / "straight"
    proc = run_train(write_config(tmp_path / "a.yaml", tiny_dir, straight, dsets, **extra))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]

    killed = tmp_path / "killed"
    config = write_config(tmp_path / "b.yaml", tiny_dir, killed, dsets, **extra)
    kill_after_checkpoint(run_train(config), "step-00000010.pt")
    assert max(r["step"] for r in metrics(killed)) < 20, "the run finished before it was killed"
    proc = run_train(config)  # a fresh start would overwrite the interrupted run: refused
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "pass --resume" in out
    # resuming with settings that change the computation would not continue the same run: refused, naming them
    proc = run_train(config, "--resume", "--set", "optim.lr=3e-4", "--set", "datasets.m3w.batch_size=5")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "datasets.m3w.batch_size (3 → 5); optim.lr (0.001 → 0.0003)" in out, out[
        -2000:
    ]
    proc = run_train(config, "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out and "step 10" in out

    a, b = metrics(straight), metrics(killed)
    assert (
        [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 21))
    )  # nothing lost or duplicated
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7), ra["step"]
        assert ra["lr"] == pytest.approx(rb["lr"])
    final_a, final_b = (
        load_checkpoint(list_checkpoints(straight)[-1]),
        load_checkpoint(list_checkpoints(killed)[-1]),
    )
    assert final_a["step"] == final_b["step"] == 20
    for name, tensor in final_a["trainable"].items():
        torch.testing.assert_close(final_b["trainable"][name], tensor, rtol=1e-6, atol=1e-7)
    assert [Path(p).name for p in list_checkpoints(straight)] == [
        "step-00000015.pt",
        "step-00000020.pt",
    ]  # rotation
    assert final_a["streams"][0]["m3w"]["batches"] == 20
    assert (straight / "final").is_dir() and (straight / "tensorboard").is_dir()
    assert set(a[-1]["gates"]) and 0 <= a[-1]["data_wait_fraction"] <= 1 and a[-1]["tokens_per_s"] > 0


def test_ddp_and_fsdp_two_gloo_processes_match_one_process_with_double_batch(tiny_dir, data, tmp_path):
    """2 ranks x batch B (gloo; DDP, then FSDP) and 1 process x batch 2B see the same samples per step (epoch
    mode, no shuffle, samples split across ranks), so their loss curves and weights must agree."""
    steps = 6

    def dsets(scale: int) -> dict:
        fixed = {"resampled": False, "shuffle_buffer": 0, "shard_shuffle": False}
        return {
            "caption_pairs": {**datasets(data)["caption_pairs"], **fixed, "batch_size": 3 * scale},
            "m3w": {**datasets(data)["m3w"], **fixed, "path": str(data / "shapes"), "batch_size": 2 * scale},
        }

    single = tmp_path / "single"
    proc = run_train(write_config(tmp_path / "s.yaml", tiny_dir, single, dsets(2), steps=steps))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    a = metrics(single)
    assert min(abs(v) for v in a[-1]["gates"].values()) > 1e-4  # it trained: the gates left 0
    wa = load_checkpoint(list_checkpoints(single)[-1])

    for mode in ("ddp", "fsdp"):
        output = tmp_path / mode
        config = write_config(
            tmp_path / f"{mode}.yaml", tiny_dir, output, dsets(1), steps=steps, distributed=mode
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["-m", "m3w.trainer.cli", str(config)]
        result = subprocess.run(cmd, cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        b = metrics(output)
        for ra, rb in zip(a, b, strict=True):
            print(
                f"step {ra['step']}: 1 proc {ra['loss/total']:.6f}  2 procs ({mode}) {rb['loss/total']:.6f}"
            )
            assert rb["loss/total"] == pytest.approx(ra["loss/total"], rel=1e-4)
        wb = load_checkpoint(list_checkpoints(output)[-1])
        assert len(wb["streams"]) == 2  # every rank's stream cursors
        for name, tensor in wa["trainable"].items():
            torch.testing.assert_close(wb["trainable"][name], tensor, rtol=1e-3, atol=1e-5)
        assert (output / "final" / "trainable.safetensors").exists()


def test_checkpoints_on_s3_resume_like_a_local_run(tiny_dir, data, s3_bucket, tmp_path):
    """output_dir and the training shards on s3:// (an S3 API server on 127.0.0.1): checkpoints, metrics and the
    final model go there, and a run killed after a checkpoint resumes from it exactly as a local run goes on."""
    from m3w.pipeline import io
    from m3w.trainer.config import tensorboard_run_dir

    remote = f"{s3_bucket}/{uuid.uuid4().hex}"
    for path in sorted((data / "m3w").iterdir()):
        io.write_bytes(io.join(remote, "m3w", path.name), path.read_bytes())
    dsets = {"m3w": {"path": io.join(remote, "m3w"), "weight": 1.0, "batch_size": 3, "num_workers": 1}}
    extra = {"steps": 12, "checkpoint_every": 4, "keep_checkpoints": 2, "tensorboard": False}
    straight = tmp_path / "straight"
    proc = run_train(write_config(tmp_path / "a.yaml", tiny_dir, straight, dsets, **extra))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]

    output = io.join(remote, "run")
    config = write_config(tmp_path / "b.yaml", tiny_dir, output, dsets, **extra)
    kill_after_checkpoint(run_train(config), "step-00000004.pt")
    assert [Path(p).name for p in list_checkpoints(output)] == ["step-00000004.pt"]
    proc = run_train(config, "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from {output}/checkpoints/step-00000004.pt (step 4)" in out

    local = metrics(straight)
    there = [json.loads(line) for line in io.read_text(io.join(output, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in there] == [r["step"] for r in local] == list(range(1, 13))
    for a, b in zip(local, there):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
    assert [Path(p).name for p in list_checkpoints(output)] == ["step-00000008.pt", "step-00000012.pt"]
    final_a, final_b = (
        load_checkpoint(list_checkpoints(straight)[-1]),
        load_checkpoint(list_checkpoints(output)[-1]),
    )
    for name, tensor in final_a["trainable"].items():
        torch.testing.assert_close(final_b["trainable"][name], tensor, rtol=1e-6, atol=1e-7)
    assert sorted(io.list_dir(io.join(output, "final"))) == sorted(
        p.name for p in (straight / "final").iterdir()
    )
    assert not list(Path(ROOT).glob("s3:*"))  # nothing landed in a local folder named after the URL
    with pytest.raises(UserError, match="tensorboard_dir"):
        tensorboard_run_dir(TrainConfig(output_dir=output))
