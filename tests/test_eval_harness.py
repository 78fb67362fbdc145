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
from m3w.pipeline.tokenizer import MEDIA_TOKEN
from m3w.trainer.evaluate import EvalSettings, Evaluator, evaluate, log_tensorboard, shuffled_images
from m3w.trainer.fewshot.data import load_image_folder, load_task_data, load_vqa

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from m3w.model import Flamingo, build_preset

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    model = Flamingo.from_config(build_preset("tiny", root / "parts"))
    model.save_pretrained(root / "model")
    eval_root = write_eval_sets(root / "eval", seed=7, support=8, query=6, binding_questions=8)
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


def test_binding_ranks_each_episodes_names_against_chance_and_logs_to_tensorboard(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, _, eval_root = tiny
    items = load_task_data("binding", eval_root / "binding").examples
    report = evaluate(
        model, EvalSettings("binding", shots=(0, 2), shuffle_images=True), eval_root / "binding"
    )
    chance = report["chance"]
    assert chance["score"] == 0.5 and chance["ci95"][0] < 0.5 < chance["ci95"][1]  # two names per episode
    assert [(r["shots"], r["images"], r["selection"]) for r in report["results"]] == [
        (0, "real", "none"),
        (0, "shuffled", "none"),
        (2, "real", "episode"),
        (2, "shuffled", "episode"),
    ]
    choices = {ex.id: ex.choices for ex in items}
    for r in report["results"]:
        assert r["n"] == 8 and r["ci95"][0] <= r["score"] <= r["ci95"][1]
        assert all(p["prediction"] in choices[p["id"]] for p in r["predictions"])
    shown = report["results"][2]["prompts"][0]  # the item's own first two support examples, then the question
    assert shown["text"].count(MEDIA_TOKEN) == 3 and shown["text"].endswith(f"{MEDIA_TOKEN}This is a")
    assert shown["images"] == [
        str(items[0].support[0].image),
        str(items[0].support[1].image),
        str(items[0].image),
    ]
    for item, moved in zip(items, shuffled_images(items, seed=0)):  # the control: no picture keeps its name
        assert moved.image != item.image and all(
            a.image != b.image for a, b in zip(item.support, moved.support)
        )
    with pytest.raises(ValueError, match="bring their own support"):
        evaluate(model, EvalSettings("binding"), eval_root / "binding", support=eval_root / "binding")

    log_tensorboard(report, tmp_path / "tensorboard" / "run")
    events = EventAccumulator(str(tmp_path / "tensorboard" / "run")).Reload()
    assert [e.step for e in events.Scalars("eval/binding/real_images")] == [0, 2]
    assert "eval/binding/chance" in events.Tags()["scalars"] and len(events.Tags()["images"]) == 3


def test_captioning_reports_the_held_out_caption_loss(tiny):
    model, _, eval_root = tiny
    settings = EvalSettings("captioning", shots=(0,), limit=3, num_beams=1, max_new_tokens=4)
    report = evaluate(model, settings, eval_root / "captioning" / "query")
    loss = report["caption_loss"]
    assert loss["n"] == 3 and loss["real"] > 0 and loss["shuffled"] > 0
    assert loss["ratio"] == pytest.approx(loss["real"] / loss["shuffled"])


@pytest.mark.parametrize(
    "task, settings",
    [
        ("binding", {"shots": (0, 2)}),
        ("vqa", {"shots": (0, 2), "num_beams": 1}),
        ("captioning", {"shots": (2,), "num_beams": 3, "max_new_tokens": 6}),
    ],
)
def test_items_run_together_score_as_they_do_one_by_one(tiny, task, settings):
    """Items whose prompts have one length run as one batch (ranking, greedy decoding, beam search): every
    prediction and score is the one the item gets alone, to the last digit."""
    model, _, eval_root = tiny
    data = {"binding": "binding", "vqa": "vqa/query", "captioning": "captioning/query"}[task]

    def results(batch_size: int) -> list[dict]:
        chosen = EvalSettings(task, shuffle_images=True, batch_size=batch_size, **settings)
        return [
            {k: v for k, v in r.items() if k != "seconds"}
            for r in evaluate(model, chosen, eval_root / data)["results"]
        ]

    assert results(batch_size=1) == results(batch_size=16)


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
            assert report["chance"]["score"] == pytest.approx(1 / 6)
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
