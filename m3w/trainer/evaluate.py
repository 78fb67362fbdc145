"""`m3w eval`: few-shot in-context evaluation of a trained Flamingo, as in the paper and OpenFlamingo.

    m3w eval --model CKPT_DIR --task captioning|vqa|classification|binding --data QUERY_PATH
             [--support SUPPORT_PATH] --shots 0,2,4,8 [--rices] [--shuffle-images] --out results.json
             [--tensorboard RUN_DIR]

For each query item a prompt of k support examples `<image>{prompt} {answer}<EOC>` is followed by the query
`<image>{prompt}`; 0 shots means two text-only examples. Captioning and VQA generate with beam search (at most 20
and 5 new tokens, stopping at `<EOC>`) and score CIDEr-D / VQA accuracy; classification ranks every class name by
log-likelihood and scores accuracy. Fast binding (Frozen's open-ended miniImageNet) ranks the names of each
question's own episode; its k-shot prompt is the first k support examples of that episode, its 0-shot prompt the
question alone (nothing tells the name). `--shuffle-images` adds a control run where each query is shown another
item's image (binding: every image of every episode moves to another episode): a model that uses the images
must do worse there. Support examples come from `--support` (default: the query set itself, never the query item)
at random (seeded per query) or by RICES.

Query items whose prompts have the same numbers of tokens and images run as one batch (`--batch-size`): with no
padding, each gets the very numbers it gets alone.

Every score comes with a 95% confidence interval over the items (Wilson for accuracy, a seeded bootstrap for
CIDEr and VQA accuracy), and ranking tasks with chance: what a uniform guesser scores, with its 95% range.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from tqdm import tqdm

from m3w.model import generation
from m3w.trainer.fewshot.data import TASKS, Example, TaskData, load_task_data
from m3w.trainer.fewshot.metrics import (
    bootstrap_interval,
    chance_interval,
    cider_d,
    format_table,
    vqa_accuracy,
    wilson_interval,
)
from m3w.trainer.fewshot.prompts import (
    DEFAULT_PROMPTS,
    MAX_NEW_TOKENS,
    ZERO_SHOT_TEXT_EXAMPLES,
    Prompt,
    build_prompt,
    short_answer,
    with_answer,
)
from m3w.trainer.fewshot.selection import random_support, rices_support

METRICS = {"captioning": "CIDEr", "vqa": "VQA accuracy", "classification": "accuracy", "binding": "accuracy"}
RANKED = ("classification", "binding")  # tasks that rank candidate answers instead of generating
SHOWN_PROMPTS = 3  # prompts kept in the results per setting, for reports and TensorBoard


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
    batch_size: int = 16  # query items run together (those whose prompts have the same length)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; one of {TASKS}")
        if any(k < 0 for k in self.shots):
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.prompt = DEFAULT_PROMPTS[self.task] if self.prompt is None else self.prompt
        self.max_new_tokens = self.max_new_tokens or MAX_NEW_TOKENS.get(self.task)


def shuffled_images(examples: list[Example], seed: int) -> list[Example]:
    """Each item gets the image of another item: a random cycle over the distinct images, so no item keeps its
    own image (VQA items that share an image all move to the same other image). An item's own support examples
    (a binding episode) take part: their images move too, so no picture keeps the name it was given."""
    images = sorted({ex.image for ex in examples} | {s.image for ex in examples for s in ex.support})
    if len(images) < 2:
        raise ValueError("the shuffled-images control needs at least two distinct images")
    order = images[:]
    random.Random(seed).shuffle(order)
    moved = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    return [
        replace(
            ex, image=moved[ex.image], support=tuple(replace(s, image=moved[s.image]) for s in ex.support)
        )
        for ex in examples
    ]


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
        if query.support:  # the item's own episode: its first `shots` examples, and none at 0 shots
            if shots > len(query.support):
                raise ValueError(f"{shots} shots asked for, item {query.id} has {len(query.support)}")
            return list(query.support[:shots]), False
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
    def prompt(self, query: Example, shots: int) -> Prompt:
        support, text_only = self.choose_support(query, shots)
        return build_prompt(self.settings.prompt, query, support, text_only)

    def candidate(self, name: str) -> list[int]:
        """A name's tokens as they follow the prompt: encode "x name" and drop "x", so tokenizers that attach the
        separating space to the next word (BPE, SentencePiece) give the in-context tokens."""
        return self.encode(with_answer("x", name))[0, 1:].tolist()

    @torch.no_grad()
    def predict_all(self, queries: list[Example], shots: int, label: str) -> dict[str, str]:
        """Every query's prediction, in query order. Queries whose prompts have the same numbers of tokens and
        images run as one batch (at most `batch_size`): without padding each item gets the very numbers it gets
        on its own, whereas left padding would move the attention's sums in the last bits."""
        prompts = [self.prompt(ex, shots) for ex in queries]
        ids = [self.encode(p.text) for p in prompts]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (prompt, tokens) in enumerate(zip(prompts, ids)):
            groups.setdefault((tokens.shape[1], len(prompt.images)), []).append(i)
        predictions: dict[int, str] = {}
        size = self.settings.batch_size
        with tqdm(
            total=len(queries), desc=label, unit="item", file=sys.stderr, leave=False, mininterval=1.0
        ) as bar:
            for members in groups.values():
                for start in range(0, len(members), size):
                    chunk = members[start : start + size]
                    batch = torch.cat([ids[i] for i in chunk])
                    images = torch.cat([self.media(prompts[i].images) for i in chunk])
                    answers = self.predict_batch([queries[i] for i in chunk], batch, images)
                    predictions.update(zip(chunk, answers))
                    bar.update(len(chunk))
        return {ex.id: predictions[i] for i, ex in enumerate(queries)}

    def predict_batch(self, queries: list[Example], ids: torch.Tensor, images: torch.Tensor) -> list[str]:
        """Predictions for prompts of one length: ids [B, L], images [B, N, T=1, C, H, W]."""
        if self.settings.task in RANKED:
            names = [list(query.choices or self.classes) for query in queries]
            candidates = [[self.candidate(name) for name in row] for row in names]
            scores = generation.score_prompts(self.model, ids, candidates, images)
            return [row[int(row_scores.argmax())] for row, row_scores in zip(names, scores)]
        out = generation.generate(
            self.model,
            ids,
            torch.ones_like(ids),
            images,
            max_new_tokens=self.settings.max_new_tokens,
            num_beams=self.settings.num_beams,
        )  # stops at <EOC> (or the LM's end of text)
        ends = {self.model.eoc_token_id, self.tokenizer.eos_token_id}
        answers = []
        for row in out.sequences[:, ids.shape[1] :].tolist():
            # up to the row's end token: a batch pads the rows that end before the others
            new_tokens = row[: next((i + 1 for i, token in enumerate(row) if token in ends), len(row))]
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
            # VQA: the short answer; otherwise the first line of the continuation (beam search may run into a
            # new prompt)
            answers.append(
                short_answer(text) if self.settings.task == "vqa" else text.strip().split("\n")[0].strip()
            )
        return answers

    # ---- one setting -----------------------------------------------------------------------------------------
    def selection(self, shots: int) -> str:
        if self.queries and self.queries[0].support:
            return "none" if shots == 0 else "episode"
        return "text-only" if shots == 0 else ("rices" if self.settings.rices else "random")

    def run(self, shots: int, shuffled: bool) -> dict[str, Any]:
        start = time.monotonic()
        queries = shuffled_images(self.queries, self.settings.seed) if shuffled else self.queries
        truth = {ex.id: ex.answers for ex in self.queries}  # answers of the item, whatever image it shows
        label = f"{self.settings.task} {shots}-shot {'shuffled' if shuffled else 'real'}"
        predictions = self.predict_all(queries, shots, label)
        task = self.settings.task
        if task == "captioning":
            score, per_item = cider_d(predictions, {k: list(v) for k, v in truth.items()})
            interval = bootstrap_interval([per_item[k] for k in truth], seed=self.settings.seed)
        elif task == "vqa":
            per_item = {k: vqa_accuracy(p, truth[k]) for k, p in predictions.items()}
            score = sum(per_item.values()) / len(per_item)
            interval = bootstrap_interval([per_item[k] for k in truth], seed=self.settings.seed)
        else:
            per_item = {k: float(predictions[k] == truth[k][0]) for k in truth}
            score = sum(per_item.values()) / len(per_item)
            interval = wilson_interval(int(sum(per_item.values())), len(per_item))
        shown = [
            {"id": ex.id, "text": p.text, "images": [str(i) for i in p.images]}
            for ex in queries[:SHOWN_PROMPTS]
            for p in [self.prompt(ex, shots)]
        ]
        return {
            "shots": shots,
            "selection": self.selection(shots),
            "images": "shuffled" if shuffled else "real",
            "score": score,
            "ci95": [interval[0], interval[1]],
            "n": len(predictions),
            "seconds": round(time.monotonic() - start, 2),
            "predictions": [
                {"id": k, "prediction": p, "answers": list(truth[k][:5]), "score": per_item[k]}
                for k, p in predictions.items()
            ],
            "prompts": shown,  # what the model saw for the first items (reports render them)
        }

    @torch.no_grad()
    def caption_loss(self, shuffled: bool, batch: int = 32) -> float:
        """Mean NLL per token of each item's first reference in the caption-pair format `<image>caption<EOC>`,
        with the item's image or (shuffled) another item's: how much the image tells about its caption."""
        items = shuffled_images(self.queries, self.settings.seed) if shuffled else self.queries
        media, eoc = self.model.media_token_id, self.model.eoc_token_id
        total, tokens = 0.0, 0
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            truth = [ex.answers[0] for ex in self.queries[start : start + batch]]
            rows = [[media, *self.encode(caption)[0].tolist(), eoc] for caption in truth]
            length = max(map(len, rows))
            ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            labels = ids.masked_fill((mask == 0) | (ids == media), -100)
            images = torch.stack([self.pixels(ex.image) for ex in chunk])[:, None, None].to(self.device)
            n = int((labels[:, 1:] != -100).sum())
            out = self.model(ids.to(self.device), mask.to(self.device), images, labels=labels.to(self.device))
            total, tokens = total + out.loss.item() * n, tokens + n
        return total / tokens

    def run_all(self) -> list[dict[str, Any]]:
        results = []
        for shots in self.settings.shots:
            for shuffled in (False, True) if self.settings.shuffle_images else (False,):
                results.append(self.run(shots, shuffled))
        return results


def chance_level(task: str, examples: list[Example], classes: list[str]) -> dict[str, Any] | None:
    """What guessing uniformly among each item's candidates scores (ranking tasks only): the expected accuracy
    and the central 95% range of a guesser's accuracy on these items."""
    if task not in RANKED or not examples:
        return None
    mean, low, high = chance_interval([1.0 / len(ex.choices or classes) for ex in examples])
    return {"score": mean, "ci95": [low, high]}


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
    if settings.task == "binding" and (support or any(not ex.support for ex in queries.examples)):
        raise ValueError("binding items bring their own support (their episode): --support does not apply")
    if settings.task == "classification" and pool.classes != queries.classes:
        raise ValueError(f"support classes {pool.classes} differ from query classes {queries.classes}")
    evaluator = Evaluator(model, settings, queries, pool)
    report = {
        "task": settings.task,
        "metric": METRICS[settings.task],
        "chance": chance_level(settings.task, evaluator.queries, evaluator.classes),
        "data": str(data),
        "support": str(support or data),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "results": evaluator.run_all(),
    }
    if settings.task == "captioning":
        real, shuffled = evaluator.caption_loss(False), evaluator.caption_loss(True)
        report["caption_loss"] = {"real": real, "shuffled": shuffled, "ratio": real / shuffled,
                                  "n": len(evaluator.queries)}  # fmt: skip
    return report


def log_tensorboard(report: dict[str, Any], run_dir: str | Path) -> None:
    """Scores (x axis: shots) with their 95% bounds and chance, and the rendered prompts of the largest shot
    count, into a TensorBoard run folder (a training run's own folder puts them next to its curves)."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from m3w.trainer.fewshot.render import render_prompt

    task = report["task"]
    with SummaryWriter(str(run_dir)) as tb:
        for r in report["results"]:
            tag = f"eval/{task}/{r['images']}_images"
            tb.add_scalar(tag, r["score"], r["shots"])
            tb.add_scalar(f"{tag}_ci95_low", r["ci95"][0], r["shots"])
            tb.add_scalar(f"{tag}_ci95_high", r["ci95"][1], r["shots"])
            if report.get("chance"):
                tb.add_scalar(f"eval/{task}/chance", report["chance"]["score"], r["shots"])
        last = max((r for r in report["results"] if r["images"] == "real"), key=lambda r: r["shots"])
        predictions = {p["id"]: p for p in last["predictions"]}
        for i, shown in enumerate(last["prompts"]):
            answer = predictions[shown["id"]]
            picture = render_prompt(shown["text"], shown["images"], answer["prediction"], answer["answers"])
            tb.add_image(f"eval/{task}/{last['shots']}-shot sample {i}", np.asarray(picture), last["shots"],
                         dataformats="HWC")  # fmt: skip
        tb.add_text(f"eval/{task}/table", "    " + format_table(report).replace("\n", "\n    "))


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
@click.option(
    "--batch-size",
    default=EvalSettings.batch_size,
    show_default=True,
    help="Query items run together (prompts of one length).",
)
@click.option("--out", type=click.Path(), default=None, help="Write the results JSON here.")
@click.option(
    "--tensorboard",
    "tensorboard_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="A TensorBoard run folder (e.g. the training run's) for the scores and a few rendered prompts.",
)
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
    batch_size,
    out,
    tensorboard_dir,
):
    """Few-shot evaluation: captioning (CIDEr), VQA (VQA accuracy), classification and fast binding (accuracy)."""
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
        batch_size=batch_size,
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
    if tensorboard_dir:
        log_tensorboard(report, tensorboard_dir)
        click.echo(f"tensorboard: {tensorboard_dir}")
