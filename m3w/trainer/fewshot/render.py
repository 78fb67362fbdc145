"""A few-shot prompt as one picture: each image with the text that follows it, then the model's answer.

What TensorBoard's image tab and the demo report show for a handful of evaluated items, so a reader sees what the
model saw (the support examples, in order, then the query) and what it answered.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN

THUMB = 96  # pixels per image
LINE = 15  # pixels per text line


def prompt_captions(text: str) -> tuple[str, list[list[str]]]:
    """The prompt's text before its first image, and the text after each image wrapped to the thumbnail's width:
    every line of it, so a support example's answer (the end of its text) is always shown."""
    chunks = text.split(MEDIA_TOKEN)
    lead, chunks = chunks[0].replace(EOC_TOKEN, " ").strip(), chunks[1:]
    wrap = max(8, THUMB // 7)
    return lead, [textwrap.wrap(chunk.replace(EOC_TOKEN, "").strip(), wrap) for chunk in chunks]


def render_prompt(text: str, images: list[Path | str], prediction: str, answers: list[str]) -> Image.Image:
    """A strip of the prompt's images, each captioned with the text after its `<image>` token (`<EOC>` removed),
    and a last line with the prediction, green when it is one of the answers, red otherwise."""
    font = ImageFont.load_default(size=12)
    lead, captions = prompt_captions(text)
    pad, height_text = 6, LINE * max([len(c) for c in captions] + [1])
    width = pad + len(images) * (THUMB + pad)
    top = LINE + pad if lead else pad
    canvas = Image.new("RGB", (max(width, 320), top + THUMB + pad + height_text + 2 * LINE + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if lead:  # text-only examples before the first image (the zero-shot format)
        draw.text((pad, pad // 2), textwrap.shorten(lead, width // 6), fill=(90, 90, 90), font=font)
    for i, (path, caption) in enumerate(zip(images, captions)):
        x = pad + i * (THUMB + pad)
        with Image.open(path) as img:
            canvas.paste(img.convert("RGB").resize((THUMB, THUMB), Image.BICUBIC), (x, top))
        for k, line in enumerate(caption):
            draw.text((x, top + THUMB + 2 + k * LINE), line, fill=(30, 30, 30), font=font)
    right = prediction.strip().lower() in {a.strip().lower() for a in answers}
    y = top + THUMB + pad + height_text
    draw.text((pad, y), f"model: {prediction or '(nothing)'}", fill=(20, 130, 40) if right else (200, 30, 30),
              font=font)  # fmt: skip
    draw.text((pad, y + LINE), f"expected: {' | '.join(answers[:3])}", fill=(90, 90, 90), font=font)
    return canvas
