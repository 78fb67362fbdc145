"""`m3w eval`: few-shot in-context evaluation of a trained Flamingo, as in the paper and OpenFlamingo.

    m3w eval --model CKPT_DIR --task captioning|vqa|classification --data QUERY_PATH [--support SUPPORT_PATH]
             --shots 0,2,4,8 [--rices] [--shuffle-images] --out results.json

For each query item a prompt of k support examples `<image>{prompt} {answer}<EOC>` is followed by the query
`<image>{prompt}`; 0 shots means two text-only examples. Captioning and VQA generate with beam search (at most 20
and 5 new tokens, stopping at `<EOC>`) and score CIDEr-D / VQA accuracy; classification ranks every class name by
log-likelihood and scores accuracy. `--shuffle-images` adds a control run where each query is shown another
item's image: a model that uses the image must do worse there. Support examples come from `--support` (default:
the query set itself, never the query item) at random (seeded per query) or by RICES.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from m3w.model import generation
from m3w.trainer.fewshot.data import TASKS, Example, TaskData, load_task_data
from m3w.trainer.fewshot.metrics import accuracy, cider_d, vqa_accuracy
from m3w.trainer.fewshot.prompts import (
    DEFAULT_PROMPTS,
    MAX_NEW_TOKENS,
    ZERO_SHOT_TEXT_EXAMPLES,
    build_prompt,
    with_answer,
)
from m3w.trainer.fewshot.selection import random_support, rices_support

METRICS = {"captioning": "CIDEr", "vqa": "VQA accuracy", "classification": "accuracy"}


@dataclass
class EvalSettings:
    task: str
    shots: tuple[int, ...] = (0, 2, 4, 8)
    rices: bool = False
    shuffle_images: bool = False  # also run the images-shuffled control
    prompt: str | None = None  # None: the task's default (trainer.fewshot.prompts.DEFAULT_PROMPTS)
    num_beams: int = 3
    max_new_tokens: int | None = None  # None: 20 for captioning, 5 for VQA
    limit: int | None = None  # score only the first N query items
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; one of {TASKS}")
        if any(k < 0 for k in self.shots):
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        self.prompt = DEFAULT_PROMPTS[self.task] if self.prompt is None else self.prompt
        self.max_new_tokens = self.max_new_tokens or MAX_NEW_TOKENS.get(self.task)


def shuffled_images(examples: list[Example], seed: int) -> list[Example]:
    """Each item gets the image of another item: a random cycle over the distinct images, so no item keeps its
    own image (VQA items that share an image all move to the same other image)."""
    images = sorted({ex.image for ex in examples})
    if len(images) < 2:
        raise ValueError("the shuffled-images control needs at least two distinct images")
    order = images[:]
    random.Random(seed).shuffle(order)
    moved = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    return [replace(ex, image=moved[ex.image]) for ex in examples]


class Evaluator:
    """Runs one task's few-shot settings against one model."""

    def __init__(self, model, settings: EvalSettings, queries: TaskData, support: TaskData) -> None:
        self.model = model.eval()
        self.settings = settings
        self.queries = queries.examples[: settings.limit] if settings.limit else queries.examples
        self.support = support.examples
        self.classes = queries.classes or support.classes
        self.tokenizer = model.tokenizer
        cfg = model.image_config
        self.size = int(cfg["size"])
        self.mean = np.asarray(cfg["mean"], dtype=np.float32)
        self.std = np.asarray(cfg["std"], dtype=np.float32)
        self._pixels: dict[Path, torch.Tensor] = {}
        self._support_features: torch.Tensor | None = None
        self.device = next(model.parameters()).device

    # ---- images ----------------------------------------------------------------------------------------------
    def pixels(self, path: Path) -> torch.Tensor:
        """[C, H, W], normalised as in training."""
        if path not in self._pixels:
            from m3w.trainer.data import decode_image

            self._pixels[path] = torch.from_numpy(
                decode_image(path.read_bytes(), self.size, self.mean, self.std)
            )
        return self._pixels[path]

    def media(self, paths: list[Path]) -> torch.Tensor:
        """[1, N, T=1, C, H, W]"""
        return torch.stack([self.pixels(p) for p in paths])[None, :, None].to(self.device)

    @torch.no_grad()
    def pooled_features(self, paths: list[Path], batch: int = 32) -> torch.Tensor:
        """The frozen vision encoder's patch features, mean-pooled: what RICES compares."""
        out = []
        for i in range(0, len(paths), batch):
            pixels = torch.stack([self.pixels(p) for p in paths[i : i + batch]]).to(self.device)
            out.append(self.model.vision(pixels).float().mean(dim=1).cpu())
        return torch.cat(out)

    # ---- prompts ---------------------------------------------------------------------------------------------
    def choose_support(self, query: Example, shots: int) -> tuple[list[Example], bool]:
        """(support examples, text_only)."""
        seed = self.settings.seed
        if shots == 0:
            return random_support(self.support, query, ZERO_SHOT_TEXT_EXAMPLES, seed), True
        if not self.settings.rices:
            return random_support(self.support, query, shots, seed), False
        if self._support_features is None:
            self._support_features = self.pooled_features([ex.image for ex in self.support])
        query_feature = self.pooled_features([query.image])[0]
        return rices_support(self.support, self._support_features, query, query_feature, shots), False

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]], device=self.device)

    # ---- one query -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, query: Example, shots: int) -> str:
        support, text_only = self.choose_support(query, shots)
        prompt = build_prompt(self.settings.prompt, query, support, text_only)
        ids = self.encode(prompt.text)
        images = self.media(prompt.images)
        if self.settings.task == "classification":
            # A class name's tokens as they follow the prompt: encode "x name" and drop "x", so tokenizers that
            # attach the separating space to the next word (BPE, SentencePiece) give the in-context tokens.
            candidates = [self.encode(with_answer("x", name))[0, 1:].tolist() for name in self.classes]
            scores = generation.score(self.model, ids, candidates, images)
            return self.classes[int(torch.as_tensor(scores).argmax())]
        out = generation.generate(
            self.model,
            ids,
            torch.ones_like(ids),
            images,
            max_new_tokens=self.settings.max_new_tokens,
            num_beams=self.settings.num_beams,
        )  # stops at <EOC> (or the LM's end of text)
        new_tokens = out.sequences[0, ids.shape[1] :].tolist()
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        # The answer is the first line of the continuation (beam search may run into a new prompt).
        return text.strip().split("\n")[0].strip()

    # ---- one setting -----------------------------------------------------------------------------------------
    def run(self, shots: int, shuffled: bool) -> dict[str, Any]:
        start = time.monotonic()
        queries = shuffled_images(self.queries, self.settings.seed) if shuffled else self.queries
        truth = {ex.id: ex.answers for ex in self.queries}  # answers of the item, whatever image it shows
        predictions = {ex.id: self.predict(ex, shots) for ex in queries}
        task = self.settings.task
        if task == "captioning":
            score, _ = cider_d(predictions, {k: list(v) for k, v in truth.items()})
        elif task == "vqa":
            score = sum(vqa_accuracy(p, truth[k]) for k, p in predictions.items()) / len(predictions)
        else:
            score = accuracy([predictions[k] for k in truth], [v[0] for v in truth.values()])
        return {
            "shots": shots,
            "selection": "text-only" if shots == 0 else ("rices" if self.settings.rices else "random"),
            "images": "shuffled" if shuffled else "real",
            "score": score,
            "n": len(predictions),
            "seconds": round(time.monotonic() - start, 2),
            "predictions": [
                {"id": k, "prediction": p, "answers": list(truth[k][:5])} for k, p in predictions.items()
            ],
        }

    def run_all(self) -> list[dict[str, Any]]:
        results = []
        for shots in self.settings.shots:
            for shuffled in (False, True) if self.settings.shuffle_images else (False,):
                results.append(self.run(shots, shuffled))
        return results


def chance_level(task: str, data: TaskData) -> float | None:
    """Accuracy of guessing uniformly among the classes (classification only)."""
    return 1.0 / len(data.classes) if task == "classification" and data.classes else None


def format_table(report: dict[str, Any]) -> str:
    rows = report["results"]
    columns = sorted({r["images"] for r in rows}, key=["real", "shuffled"].index)
    head = f"{report['task']} ({report['metric']}, n={rows[0]['n'] if rows else 0}"
    head += f", chance={report['chance']:.3f})" if report.get("chance") is not None else ")"
    lines = [head, f"{'shots':>5}  {'selection':<10}" + "".join(f"{c + ' images':>17}" for c in columns)]
    for shots in dict.fromkeys(r["shots"] for r in rows):
        cells = {r["images"]: r for r in rows if r["shots"] == shots}
        selection = next(iter(cells.values()))["selection"]
        lines.append(
            f"{shots:>5}  {selection:<10}"
            + "".join(f"{cells[c]['score']:>17.3f}" if c in cells else " " * 17 for c in columns)
        )
    return "\n".join(lines)


def evaluate(
    model,
    settings: EvalSettings,
    data: str | Path,
    support: str | Path | None = None,
    images: str | Path | None = None,
) -> dict[str, Any]:
    """Run every (shots × images real/shuffled) setting and return the report (also what `--out` holds)."""
    queries = load_task_data(settings.task, data, images)
    pool = load_task_data(settings.task, support, images) if support else queries
    if settings.task == "classification" and pool.classes != queries.classes:
        raise ValueError(f"support classes {pool.classes} differ from query classes {queries.classes}")
    evaluator = Evaluator(model, settings, queries, pool)
    return {
        "task": settings.task,
        "metric": METRICS[settings.task],
        "chance": chance_level(settings.task, queries),
        "data": str(data),
        "support": str(support or data),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "results": evaluator.run_all(),
    }


@click.command("eval")
@click.option(
    "--model", "model_dir", required=True, type=click.Path(exists=True), help="Flamingo.save_pretrained dir."
)
@click.option("--task", type=click.Choice(TASKS), required=True)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True),
    help="Query items (COCO/VQAv2 JSON or image folder).",
)
@click.option(
    "--support",
    type=click.Path(exists=True),
    default=None,
    help="Pool of in-context examples (default: --data).",
)
@click.option(
    "--images", type=click.Path(exists=True), default=None, help="Image directory, if not next to the JSON."
)
@click.option(
    "--shots", default="0,2,4,8", show_default=True, help="Comma-separated numbers of in-context examples."
)
@click.option(
    "--rices", is_flag=True, help="Choose support examples by visual similarity (RICES), most similar last."
)
@click.option(
    "--shuffle-images", is_flag=True, help="Also run the control where each query shows another item's image."
)
@click.option(
    "--prompt", default=None, help="Prompt template; {question} is the VQA question. Default per task."
)
@click.option("--num-beams", default=3, show_default=True)
@click.option("--max-new-tokens", type=int, default=None, help="Default: 20 for captioning, 5 for VQA.")
@click.option("--limit", type=int, default=None, help="Score only the first N query items.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(), default=None, help="Write the results JSON here.")
def eval_cmd(
    model_dir,
    task,
    data,
    support,
    images,
    shots,
    rices,
    shuffle_images,
    prompt,
    num_beams,
    max_new_tokens,
    limit,
    seed,
    out,
):
    """Few-shot evaluation: captioning (CIDEr), VQA (VQA accuracy), classification (accuracy)."""
    from m3w.model import Flamingo

    settings = EvalSettings(
        task=task,
        shots=tuple(int(s) for s in shots.split(",") if s.strip()),
        rices=rices,
        shuffle_images=shuffle_images,
        prompt=prompt,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        limit=limit,
        seed=seed,
    )
    torch.manual_seed(seed)
    model = Flamingo.from_pretrained(model_dir)
    report = evaluate(model, settings, data, support, images)
    report["model"] = str(model_dir)
    click.echo(format_table(report))
    if out:
        from m3w.pipeline.io import atomic_open

        with atomic_open(out, "w") as f:
            json.dump(report, f, indent=1)
        click.echo(f"results: {out}")
