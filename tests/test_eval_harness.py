"""`m3w eval` end to end on a tiny random Flamingo (saved and loaded back), on the demo's held-out items."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from m3w.demo.web import write_eval_sets
from m3w.trainer.evaluate import EvalSettings, Evaluator, shuffled_images
from m3w.trainer.fewshot.data import load_image_folder, load_vqa

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from m3w.model import Flamingo, build_preset

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    model = Flamingo.from_config(build_preset("tiny", root / "parts"))
    model.save_pretrained(root / "model")
    eval_root = write_eval_sets(root / "eval", seed=7, support=8, query=6)
    return model, root / "model", eval_root


def test_shuffled_images_moves_every_image(tiny):
    _, _, eval_root = tiny
    items = load_vqa(eval_root / "vqa" / "query").examples
    moved = shuffled_images(items, seed=0)
    assert sorted(e.image for e in moved) == sorted(e.image for e in items)
    assert all(a.image != b.image for a, b in zip(items, moved))
    by_image: dict = {}
    for a, b in zip(items, moved):  # questions about one picture all move to the same other picture
        by_image.setdefault(a.image, set()).add(b.image)
    assert all(len(v) == 1 for v in by_image.values())
    assert [(a.id, a.answers) for a in items] == [(b.id, b.answers) for b in moved]


def test_rices_puts_the_visually_closest_example_last(tiny):
    model, _, eval_root = tiny
    data = load_image_folder(eval_root / "classification" / "support")
    query = data.examples[0]
    twin = replace(data.examples[0], id="twin")  # same picture, another item: the nearest neighbour
    pool = replace(data, examples=[twin, *data.examples[1:]])
    evaluator = Evaluator(model, EvalSettings("classification", rices=True), data, pool)
    support, text_only = evaluator.choose_support(query, 4)
    assert not text_only and len(support) == 4 and support[-1].id == "twin"
    assert query not in support
    zero, text_only = evaluator.choose_support(query, 0)
    assert text_only and len(zero) == 2


def test_eval_cli_writes_table_and_json(tiny, tmp_path):
    _, model_dir, eval_root = tiny
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a loaded shared CPU: one thread is faster than two fighting
    for task, extra in (("classification", ["--rices"]), ("vqa", ["--limit", "6", "--num-beams", "2"])):
        cmd = [sys.executable, "-m", "m3w", "eval", "--model", str(model_dir), "--task", task,
               "--data", str(eval_root / task / "query"), "--support", str(eval_root / task / "support"),
               "--shots", "0,2", "--shuffle-images", "--out", str(out), *extra]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(out.read_text())
        assert report["task"] == task
        assert [(r["shots"], r["images"]) for r in report["results"]] == [
            (0, "real"),
            (0, "shuffled"),
            (2, "real"),
            (2, "shuffled"),
        ]
        assert all(
            0.0 <= r["score"] <= 1.0 and r["n"] == len(r["predictions"]) > 0 for r in report["results"]
        )
        assert "real images" in proc.stdout and "shuffled images" in proc.stdout
        if task == "classification":
            assert report["chance"] == pytest.approx(1 / 6)
            assert report["results"][2]["selection"] == "rices"
            classes = {p.name for p in (eval_root / task / "query").iterdir()}
            assert all(p["prediction"] in classes for r in report["results"] for p in r["predictions"])
        else:
            assert report["results"][0]["n"] == 6


def test_eval_rejects_bad_input(tiny, tmp_path):
    _, model_dir, eval_root = tiny
    broken = tmp_path / "broken"
    shutil.copytree(eval_root / "vqa" / "query", broken)
    (broken / "annotations.json").write_text(json.dumps({"annotations": []}))
    cmd = [sys.executable, "-m", "m3w", "eval", "--model", str(model_dir), "--task", "vqa",
           "--data", str(broken), "--shots", "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "has no annotation" in proc.stderr
    with pytest.raises(ValueError, match="unknown task"):
        EvalSettings("detection")
