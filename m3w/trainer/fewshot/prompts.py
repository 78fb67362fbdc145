"""Few-shot prompts, as in the Flamingo paper and OpenFlamingo.

A prompt is the support examples `<image>{prompt}{answer}<EOC>` followed by the query `<image>{prompt}`; the
model continues with the answer. Zero-shot uses two *text-only* support examples (their images removed), as the
paper does, so the model still sees the answer format. `{question}` in a prompt template is the item's question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN
from m3w.trainer.fewshot.data import Example

# Task defaults (OpenFlamingo's wording). The answer follows the prompt after one space.
DEFAULT_PROMPTS = {
    "captioning": "Output:",
    "vqa": "Question:{question} Short answer:",
    "classification": "A photo of a",
    "binding": "This is a",  # Frozen's fast binding: "this is a dax"
}
MAX_NEW_TOKENS = {"captioning": 20, "vqa": 5}
ZERO_SHOT_TEXT_EXAMPLES = 2


def render(template: str, example: Example) -> str:
    return template.replace("{question}", example.question or "")


def with_answer(prompt: str, answer: str) -> str:
    """`prompt answer`: one space between them (BPE tokenizers attach the space to the answer's first token)."""
    if not prompt or prompt[-1].isspace():
        return prompt + answer
    return f"{prompt} {answer}"


def support_answer(example: Example) -> str:
    """The answer a support example shows: its first reference (the majority answer for VQA)."""
    if len(example.answers) > 3:  # VQA: ten annotators; show the most frequent answer
        return max(sorted(set(example.answers)), key=example.answers.count)
    return example.answers[0]


@dataclass
class Prompt:
    text: str  # with one MEDIA_TOKEN per image
    images: list[Path]  # in the order of the MEDIA_TOKENs


def build_prompt(template: str, query: Example, support: list[Example], text_only: bool = False) -> Prompt:
    """Support examples, then the query. `text_only` drops the support images (the zero-shot setting)."""
    parts, images = [], []
    for ex in support:
        shot = with_answer(render(template, ex), support_answer(ex)) + EOC_TOKEN
        if text_only:
            parts.append(shot)
        else:
            parts.append(MEDIA_TOKEN + shot)
            images.append(ex.image)
    parts.append(MEDIA_TOKEN + render(template, query))
    images.append(query.image)
    return Prompt("".join(parts), images)


# Where a generated VQA answer ends: OpenFlamingo's postprocess_vqa_generation cuts at "Question", "Answer",
# "Short" and ", "; a sentence end cuts too, since web text goes on after its answers ("Short answer: blue. The").
VQA_ANSWER_END = re.compile(r"Question|Answer|Short|, |[.!?](?:\s|$)")


def short_answer(generated: str) -> str:
    """The answer in a VQA generation: its first line, up to where the model goes on to something else."""
    return VQA_ANSWER_END.split(generated.strip().split("\n")[0], maxsplit=1)[0].strip()
