"""Few-shot evaluation pieces: prompt building, VQA answer normalisation, CIDEr-D, RICES ordering, loaders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from m3w.demo.web import COLOURS, write_eval_sets
from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN
from m3w.trainer.fewshot.data import Example, load_coco_captions, load_image_folder, load_task_data, load_vqa
from m3w.trainer.fewshot.metrics import (
    accuracy,
    bootstrap_interval,
    chance_interval,
    cider_d,
    normalize_vqa_answer,
    tokenize_caption,
    vqa_accuracy,
    wilson_interval,
)
from m3w.trainer.fewshot.prompts import DEFAULT_PROMPTS, build_prompt, short_answer
from m3w.trainer.fewshot.selection import random_support, rices_order, rices_support


def ex(i: int, answers=("a cat",), question=None) -> Example:
    return Example(str(i), Path(f"/img/{i}.png"), tuple(answers), question)


# --- prompts ------------------------------------------------------------------------------------------------


def test_prompt_support_then_query():
    support = [ex(1, ["two red circles"]), ex(2, ["one blue square"])]
    p = build_prompt("Output:", ex(9), support)
    assert p.text == (
        f"{MEDIA_TOKEN}Output: two red circles{EOC_TOKEN}{MEDIA_TOKEN}Output: one blue square{EOC_TOKEN}"
        f"{MEDIA_TOKEN}Output:"
    )
    assert p.images == [Path("/img/1.png"), Path("/img/2.png"), Path("/img/9.png")]
    assert p.text.count(MEDIA_TOKEN) == len(p.images)


def test_zero_shot_prompt_has_text_only_examples():
    support = [ex(1, ["red"], "What colour?"), ex(2, ["blue"], "What colour?")]
    p = build_prompt(DEFAULT_PROMPTS["vqa"], ex(3, ["green"], "How many?"), support, text_only=True)
    assert p.text == (
        f"Question:What colour? Short answer: red{EOC_TOKEN}Question:What colour? Short answer: blue{EOC_TOKEN}"
        f"{MEDIA_TOKEN}Question:How many? Short answer:"
    )
    assert p.images == [Path("/img/3.png")]


def test_vqa_support_shows_the_majority_answer():
    annotators = ["2", "two", "two", "two", "2", "two", "two", "two", "three", "two"]
    p = build_prompt("Q:{question} A:", ex(9, question="How many?"), [ex(1, annotators, "How many?")])
    assert p.text.startswith(f"{MEDIA_TOKEN}Q:How many? A: two{EOC_TOKEN}")


def test_rendered_prompt_shows_each_support_answer(tmp_path):
    """The picture of a prompt (report, TensorBoard) shows all of each image's text: a VQA support example's
    answer comes after a question that wraps to five lines under its thumbnail."""
    from PIL import Image

    from m3w.trainer.fewshot.render import LINE, THUMB, prompt_captions, render_prompt

    question = "How many shapes are there?"
    support = [ex(1, ["four"], question), ex(2, ["three"], question)]
    p = build_prompt("Question: {question} Short answer:", ex(9, question=question), support)
    lead, captions = prompt_captions(p.text)
    assert lead == ""
    assert [c[-1].split()[-1] for c in captions[:2]] == ["four", "three"]
    assert max(len(c) for c in captions) >= 5
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), "red").save(images[-1])
    canvas = render_prompt(p.text, images, "two", ["two"])
    assert canvas.height >= THUMB + LINE * max(len(c) for c in captions) + 2 * LINE


# --- VQA normalisation and accuracy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two", "2"),
        ("the red one.", "red 1"),
        ("A dog", "dog"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("yes!", "yes"),
        ("black-and-white", "black and white"),
        ("3.5", "3.5"),
        ("  an Apple\n", "apple"),
        ("left, right", "left right"),
    ],
)
def test_vqa_answer_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize(
    ("generated", "answer"),
    [(" blue. The picture shows", "blue"), ("two Question: How", "two"), ("red, blue", "red"),
     ("3.5 apples", "3.5 apples"), ("circles.", "circles"), ("yes\nQuestion", "yes")],
)  # fmt: skip
def test_vqa_short_answer_stops_where_the_model_goes_on(generated, answer):
    assert short_answer(generated) == answer


def test_vqa_accuracy_min_of_three():
    answers = ["red"] * 3 + ["blue"] * 7
    # leave-one-out: 3 subsets lose a "red" (2/3), 7 keep all three (1.0)
    assert vqa_accuracy("Red.", answers) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("blue", answers) == 1.0
    assert vqa_accuracy("green", answers) == 0.0
    assert vqa_accuracy("three", ["3"] * 10) == 1.0


def test_accuracy():
    assert accuracy(["a", "b", "c", "d"], ["a", "b", "x", "y"]) == 0.5
    with pytest.raises(ValueError):
        accuracy([], [])


# --- CIDEr-D ------------------------------------------------------------------------------------------------


def test_cider_exact_match_with_unique_ngrams_scores_ten():
    # Two images whose references share no n-gram: every n-gram has document frequency 1, so the tf-idf
    # vectors of an exact match are identical (cosine 1 at each n), the length penalty is 1, and CIDEr-D is 10.
    refs = {"a": ["red circles on the left"], "b": ["one blue square"]}
    mean, per = cider_d({"a": "Red circles on the left.", "b": "green triangles"}, refs)
    assert per["a"] == pytest.approx(10.0)
    assert per["b"] == 0.0
    assert mean == pytest.approx(5.0)


def test_cider_known_value_with_length_penalty_and_idf():
    # "the" occurs in every image's references: idf log(2/2) = 0, so it carries no weight. Candidate "red cat"
    # against reference "the red cat" (all other n-grams have the same weight, log 2):
    #   unigrams: (red, cat) vs (the: 0, red, cat) → cosine 1;
    #   bigrams: (red cat) vs (the red, red cat) → cosine 1/sqrt(2);
    #   tri/4-grams: the candidate has none → 0. Length 2 vs 3: Gaussian penalty exp(-1/(2·6²)).
    refs = {"a": ["the red cat"], "b": ["the blue dog"]}
    _, per = cider_d({"a": "red cat", "b": "the blue dog"}, refs)
    penalty = math.exp(-1 / (2 * 36))
    assert per["a"] == pytest.approx(10.0 * (1.0 + 1 / math.sqrt(2)) / 4 * penalty)
    # "the blue dog" exactly: unigram and bigram vectors as the reference's; "the blue dog" trigram has df 1.
    assert per["b"] == pytest.approx(10.0 * (1 + 1 + 1 + 0) / 4)


def test_cider_clips_repeated_ngrams_and_averages_references():
    refs = {"a": ["red circles", "blue squares"], "b": ["green triangles"]}
    _, repeated = cider_d({"a": "red red red circles", "b": "x"}, refs)
    _, once = cider_d({"a": "red circles", "b": "x"}, refs)
    assert 0 < repeated["a"] < once["a"]
    # Matches one of two references exactly at n = 1, 2 (two words: no 3- or 4-grams), the other not at all.
    assert once["a"] == pytest.approx(10.0 * (1 + 1 + 0 + 0) / 4 / 2)
    with pytest.raises(ValueError):
        cider_d({"a": "x"}, refs)


def test_caption_tokenizer():
    assert tokenize_caption("A man, riding a horse!") == ["a", "man", "riding", "a", "horse"]


# --- support selection --------------------------------------------------------------------------------------


def test_rices_most_similar_last():
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.95, 0.3], [-1.0, 0.0]])
    query = torch.tensor([1.0, 0.0])
    assert rices_order(query, pool, 3, allowed=list(range(5))) == [2, 3, 0]
    assert rices_order(query, pool, 2, allowed=[1, 2, 4]) == [1, 2]


def test_rices_support_excludes_the_query_itself():
    pool = [ex(i) for i in range(4)]
    feats = torch.eye(4)
    chosen = rices_support(pool, feats, pool[2], feats[2] + 0.5 * feats[3], k=2)
    assert [e.id for e in chosen][-1] == "3" and "2" not in [e.id for e in chosen]


def test_random_support_seeded_per_query():
    pool = [ex(i) for i in range(20)]
    a = random_support(pool, pool[0], 4, seed=1)
    assert a == random_support(pool, pool[0], 4, seed=1)
    assert a != random_support(pool, pool[0], 4, seed=2)
    assert pool[0] not in a and len(set(a)) == 4
    with pytest.raises(ValueError):
        random_support(pool, pool[0], 20, seed=0)


# --- loaders (the demo's held-out items, and the public formats' quirks) -------------------------------------


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> Path:
    return write_eval_sets(
        tmp_path_factory.mktemp("eval") / "eval", seed=5, support=8, query=6, binding_questions=12
    )


def test_loaders_read_the_demo_sets(eval_root):
    caps = load_coco_captions(eval_root / "captioning" / "query")
    assert len(caps.examples) == 6 and all(len(e.answers) == 5 and e.image.exists() for e in caps.examples)
    vqa = load_vqa(eval_root / "vqa" / "support")
    assert len(vqa.examples) == 3 * 8 and all(e.question and len(e.answers) == 10 for e in vqa.examples)
    cls = load_image_folder(eval_root / "classification" / "query")
    assert cls.classes == sorted(COLOURS) and len(cls.examples) == 6
    assert all(e.answers[0] == e.image.parent.name for e in cls.examples)
    assert load_task_data("vqa", eval_root / "vqa" / "query").task == "vqa"
    with pytest.raises(ValueError):
        load_task_data("detection", eval_root)


def test_vqa_loader_finds_coco_style_image_names(tmp_path):
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"")
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"questions": [{"image_id": 42, "question": "Why?", "question_id": 420}]})
    )
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(
        json.dumps(
            {"annotations": [{"question_id": 420, "image_id": 42, "answers": [{"answer": "because"}] * 10}]}
        )
    )
    data = load_vqa(tmp_path, images=tmp_path / "val2014")
    assert data.examples[0].image.name == "COCO_val2014_000000000042.jpg"
    assert data.examples[0].answers == ("because",) * 10


# --- confidence intervals and chance ------------------------------------------------------------------------


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)  # the textbook example
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0] > wilson_interval(500, 1000)[1] - 0.5


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    scores = [0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.5] * 5
    low, high = bootstrap_interval(scores, seed=3)
    assert low < sum(scores) / len(scores) < high and (low, high) == bootstrap_interval(scores, seed=3)
    assert bootstrap_interval([2.0] * 9) == (2.0, 2.0)


def test_chance_interval_is_the_binomial_range():
    mean, low, high = chance_interval([0.5] * 100)
    assert mean == 0.5 and (low, high) == (0.4, 0.6)  # the central 95% of Binomial(100, 1/2), over 100
    mean, low, high = chance_interval([1 / 2, 1 / 4] * 50)
    assert mean == pytest.approx(0.375) and low < mean < high


# --- fast binding -------------------------------------------------------------------------------------------


def test_binding_episodes_bring_their_own_support(eval_root):
    data = load_task_data("binding", eval_root / "binding")
    assert data.task == "binding" and len(data.examples) == 12
    for item in data.examples:
        names = [s.answers[0] for s in item.support]
        assert len(item.support) == 8 and len(item.choices) == 2 and item.answers[0] in item.choices
        # the support alternates the two kinds in shuffled pairs: any first 2k examples show each name k times
        assert all(sorted(names[i : i + 2]) == sorted(item.choices) for i in range(0, 8, 2))
        assert item.image.exists() and all(s.image.exists() for s in item.support)
    # each episode is asked about both of its kinds (a new picture each): a model blind to the query picture
    # scores exactly 0.5 on it, whichever name it prefers
    for first, second in zip(data.examples[::2], data.examples[1::2]):
        assert [s.image for s in first.support] == [s.image for s in second.support]
        assert first.image != second.image
        assert first.choices == second.choices and {first.answers[0], second.answers[0]} == set(first.choices)
    four = build_prompt(DEFAULT_PROMPTS["binding"], data.examples[0], list(data.examples[0].support[:4]))
    assert four.text.count(MEDIA_TOKEN) == 5 and four.text.endswith(f"{MEDIA_TOKEN}This is a")
    assert f"This is a {data.examples[0].support[0].answers[0]}{EOC_TOKEN}" in four.text


def test_binding_loader_rejects_an_answer_outside_the_episode(tmp_path):
    entry = {"question_id": 1, "image_1": "a.png", "caption_1": "this is a dax", "image_2": "b.png",
             "caption_2": "this is a blicket", "question_image": "c.png", "answer": "wug"}  # fmt: skip
    (tmp_path / "fast_binding_all_questions.json").write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match="none of its support's names"):
        load_task_data("binding", tmp_path)
    entry["answer"] = "blicket"
    (tmp_path / "fast_binding_all_questions.json").write_text(json.dumps([entry]))
    item = load_task_data("binding", tmp_path).examples[0]
    assert item.choices == ("dax", "blicket") and item.answers == ("blicket",)
