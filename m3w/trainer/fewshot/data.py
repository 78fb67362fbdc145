"""Evaluation items from local files in the public benchmarks' formats.

- captioning: COCO caption JSON (`images` with `id`/`file_name`, `annotations` with `image_id`/`caption`);
- vqa: VQAv2 question JSON (`questions`) + annotation JSON (`annotations`, ten `answers` each);
- classification: an image folder, `root/<class name>/<image>`;
- binding: fast binding (Frozen, Tsimpoukelli et al. 2021, open-ended miniImageNet): a JSON list of questions,
  each with its own support `image_1..image_n` / `caption_1..caption_n` ("this is a dax"), a `question_image`
  and the `answer` (the made-up name bound to that kind of image in the support), shaped like the files of
  DeepMind's released open-ended miniImageNet.

A `--data` path is either the JSON file(s)' directory or the file itself; images are looked up in `images/` next
to the JSON (or the JSON's own directory), by `file_name` or, for VQA, by the 12-digit image id in the file name
(`COCO_val2014_000000000042.jpg`) or the bare id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("captioning", "vqa", "classification", "binding")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


@dataclass(frozen=True)
class Example:
    """One item: an image, an optional question, and its reference answers (captions, annotators' answers, or
    the class name)."""

    id: str
    image: Path
    answers: tuple[str, ...]
    question: str | None = None
    choices: tuple[str, ...] = ()  # the answers ranked for this item (binding: its episode's names)
    support: tuple[Example, ...] = ()  # the item's own in-context examples, in order (binding: its episode)


@dataclass
class TaskData:
    task: str
    examples: list[Example]
    classes: list[str] = field(default_factory=list)  # classification only


def _find_json(path: Path, *names: str) -> Path:
    if path.is_file():
        return path
    for name in names:
        hits = sorted(path.glob(name))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(f"{path}: several files match {name}: {[h.name for h in hits]}")
    raise FileNotFoundError(f"{path}: no file matching {' or '.join(names)}")


def _image_dir(json_path: Path, images: Path | None) -> Path:
    if images is not None:
        return images
    candidate = json_path.parent / "images"
    return candidate if candidate.is_dir() else json_path.parent


def load_coco_captions(path: str | Path, images: str | Path | None = None) -> TaskData:
    json_path = _find_json(Path(path), "captions*.json", "*.json")
    image_dir = _image_dir(json_path, Path(images) if images else None)
    data = json.loads(json_path.read_text())
    refs: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        refs.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    examples = []
    for img in sorted(data["images"], key=lambda i: i["id"]):
        if img["id"] not in refs:
            continue  # an image without captions cannot be scored
        examples.append(Example(str(img["id"]), image_dir / img["file_name"], tuple(refs[img["id"]])))
    return TaskData("captioning", examples)


def _index_images_by_id(image_dir: Path) -> dict[int, Path]:
    by_id: dict[int, Path] = {}
    for p in image_dir.iterdir():
        if p.suffix.lower() in IMAGE_SUFFIXES:
            m = re.search(r"(\d+)$", p.stem)
            if m:
                by_id.setdefault(int(m.group(1)), p)
    return by_id


def load_vqa(path: str | Path, images: str | Path | None = None) -> TaskData:
    path = Path(path)
    questions_path = _find_json(path, "*questions*.json")
    annotations_path = _find_json(path if path.is_dir() else path.parent, "*annotations*.json")
    image_dir = _image_dir(questions_path, Path(images) if images else None)
    by_id = _index_images_by_id(image_dir)
    annotations = {a["question_id"]: a for a in json.loads(annotations_path.read_text())["annotations"]}
    examples = []
    for q in sorted(json.loads(questions_path.read_text())["questions"], key=lambda q: q["question_id"]):
        ann = annotations.get(q["question_id"])
        if ann is None:
            raise ValueError(f"question {q['question_id']} has no annotation in {annotations_path}")
        if q["image_id"] not in by_id:
            raise FileNotFoundError(f"no image for image_id {q['image_id']} in {image_dir}")
        answers = tuple(a["answer"] for a in ann["answers"])
        examples.append(Example(str(q["question_id"]), by_id[q["image_id"]], answers, q["question"]))
    return TaskData("vqa", examples)


def load_image_folder(path: str | Path) -> TaskData:
    root = Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: an image-folder dataset needs one sub-directory per class")
    examples = [
        Example(f"{cls}/{img.name}", img, (cls,))
        for cls in classes
        for img in sorted((root / cls).iterdir())
        if img.suffix.lower() in IMAGE_SUFFIXES
    ]
    return TaskData("classification", examples, classes)


BINDING_CAPTION = re.compile(r"^\s*this is an? (?P<name>.+?)[.\s]*$", re.IGNORECASE)


def load_binding(path: str | Path, images: str | Path | None = None) -> TaskData:
    """Fast-binding questions: each is an episode (support images with "this is a <name>" captions, then the
    question image); the choices are the episode's names, in order of first appearance."""
    json_path = _find_json(Path(path), "*all_questions.json", "*.json")
    image_dir = _image_dir(json_path, Path(images) if images else None)
    examples = []
    for entry in json.loads(json_path.read_text()):
        support = []
        for i in range(1, len(entry) + 1):
            if f"image_{i}" not in entry:
                break
            caption = entry[f"caption_{i}"]
            match = BINDING_CAPTION.match(caption)
            if match is None:
                raise ValueError(f"{json_path}: question {entry['question_id']}: caption {caption!r} is not "
                                 "'this is a <name>'")  # fmt: skip
            support.append(Example(f"{entry['question_id']}/{i}", image_dir / entry[f"image_{i}"],
                                   (match["name"],)))  # fmt: skip
        names = tuple(dict.fromkeys(ex.answers[0] for ex in support))
        if entry["answer"] not in names:
            raise ValueError(f"{json_path}: question {entry['question_id']}: answer {entry['answer']!r} is "
                             f"none of its support's names {names}")  # fmt: skip
        examples.append(
            Example(
                str(entry["question_id"]),
                image_dir / entry["question_image"],
                (entry["answer"],),
                choices=names,
                support=tuple(support),
            )  # fmt: skip
        )
    return TaskData("binding", examples)


def load_task_data(task: str, path: str | Path, images: str | Path | None = None) -> TaskData:
    if task == "captioning":
        return load_coco_captions(path, images)
    if task == "vqa":
        return load_vqa(path, images)
    if task == "classification":
        return load_image_folder(path)
    if task == "binding":
        return load_binding(path, images)
    raise ValueError(f"unknown task {task!r}; one of {TASKS}")
