"""The demo report: one self-contained page, a sentence under every metric, and what a browser shows of it."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from PIL import Image

from m3w.demo.report import EXPLAIN, ReportInputs, write_report
from m3w.demo.run import verdict
from m3w.demo.screenshot import find_browser, screenshot


def results(task: str, scores: dict[tuple[int, str], float], image: Path, chance: float | None) -> dict:
    """An `m3w eval` results JSON with the given scores (and one shown prompt per setting)."""
    rows = []
    for (shots, images), score in scores.items():
        prompt = {"id": "0", "text": "<image>This is a dax<EOC>" * shots + "<image>This is a",
                  "images": [str(image)] * (shots + 1)}  # fmt: skip
        rows.append({"shots": shots, "images": images, "score": score, "ci95": [score - 0.1, score + 0.1],
                     "selection": "episode", "n": 50, "prompts": [prompt],
                     "predictions": [{"id": "0", "prediction": "dax", "answers": ["dax"], "score": 1.0}]})  # fmt: skip
    report = {"task": task, "metric": "accuracy", "results": rows, "chance": None}
    if chance is not None:
        report["chance"] = {"score": chance, "ci95": [chance - 0.1, chance + 0.1]}
    return report


@pytest.fixture(scope="module")
def evals(tmp_path_factory) -> dict[str, dict]:
    image = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    grid = lambda real, shuffled: {  # noqa: E731
        **{(k, "real"): v for k, v in zip((0, 1, 2, 4, 8), real)},
        **{(k, "shuffled"): v for k, v in zip((0, 1, 2, 4, 8), shuffled)},
    }
    captioning = results("captioning", grid([0.3] * 5, [0.2] * 5), image, None)
    captioning["caption_loss"] = {"real": 0.5, "shuffled": 1.0, "ratio": 0.5, "n": 24}
    return {
        "binding": results("binding", grid([0.5, 0.6, 0.8, 0.9, 0.95], [0.5] * 5), image, 0.5),
        "vqa": results("vqa", grid([0.3, 0.4, 0.5, 0.5, 0.5], [0.1] * 5), image, None),
        "captioning": captioning,
    }


def test_verdict_states_each_check_with_its_figures(evals):
    checks = verdict(evals)
    assert [ok for ok, _ in checks] == [True, True, True, True]
    assert "0.900 >= 0-shot 0.500 + 0.30" in checks[0][1]
    weak = dict(evals, binding=results("binding", {(0, "real"): 0.5, (4, "real"): 0.7, (4, "shuffled"): 0.65},
                                       Path("x.png"), 0.5))  # fmt: skip
    failed = [text for ok, text in verdict(weak) if not ok]
    assert len(failed) == 2 and "learns in context" in failed[0] and "uses the pictures" in failed[1]
    # VQA no better with the real pictures than with shuffled ones (the model answers from the question alone)
    close = dict(evals, vqa=results("vqa", {(4, "real"): 0.4, (4, "shuffled"): 0.42}, Path("x.png"), None))
    failed = [text for ok, text in verdict(close) if not ok]
    assert (
        len(failed) == 1
        and "VQA answers from the pictures" in failed[0]
        and "0.400 [0.30, 0.50]" in failed[0]
    )


@pytest.fixture(scope="module")
def page(evals, tmp_path_factory) -> Path:
    inputs = ReportInputs(
        title="test report",
        summary="what was run",
        verdict=verdict(evals),
        evals=evals,
        funnel={
            "Documents": [("pages", 300), ("kept", 240)],
            "Images": [("nodes", 900), ("stored", 800)],
            "Tokens": [("extracted", 90000), ("kept", 70000)],
        },  # fmt: skip
        samples=[("A sample", '<div class="sample">a window <span class="cut">…</span></div>')],
        training=[
            {"step": s, "loss": {"m3w": 3 - s / 10}, "loss/total": 3 - s / 10, "gates": {"layer0": s / 100}}
            for s in range(1, 11)
        ],  # fmt: skip
        times={"web": 1.0, "train": 2.0},
        commands=["m3w build m3w/configs/demo.yaml"],
        tensorboard="demo-out/tensorboard",
    )
    return write_report(inputs, tmp_path_factory.mktemp("report") / "report.html")


@pytest.mark.parametrize("task", ["binding", "vqa", "captioning"])
def test_demo_eval_settings_reach_m3w_eval_as_given(task, tmp_path):
    """The demo runs `m3w eval` with EVALS' settings as options (bench/eval_speed.py times the same settings):
    the options parse back to those values."""
    from m3w.demo.run import EVALS, eval_flags
    from m3w.trainer.evaluate import eval_cmd

    settings = EVALS[task]["settings"]
    args = ["--model", str(tmp_path), "--task", task, "--data", str(tmp_path), *eval_flags(settings)]
    params = eval_cmd.make_context("eval", args).params
    parsed = dict(params, shots=tuple(int(s) for s in params["shots"].split(",")))
    assert {field: parsed[field] for field in settings} == settings


def test_report_is_one_self_contained_page(page):
    text = page.read_text()
    sources = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # nothing beside the file
    style = text.split("</style>")[0]
    assert "<iframe" not in text and not re.search(
        r"(?<![\w-])(max-)?height:\s*[\d.]+", style
    )  # no fixed frames
    for sentence in EXPLAIN.values():  # one sentence under every metric
        assert html.escape(sentence) in text
    assert "Verdict: PASS" in text and "[0.80, 1.00]" in text  # the 4-shot cell with its interval
    assert "tensorboard --logdir demo-out/tensorboard" in text


@pytest.mark.skipif(find_browser() is None, reason="no Chromium here (apt-get install chromium)")
def test_screenshot_shows_the_page(page, tmp_path):
    png = screenshot(page, tmp_path / "report.png", width=1000)
    with Image.open(png) as shot:
        assert shot.width == 1000 and shot.height > 2000  # the whole page, trailing blank rows cropped
        colours = shot.convert("RGB").resize((50, 200)).getcolors(10000)
    assert len(colours) > 50  # charts and text, not a blank or error page
