"""`m3w model ...`: model utilities."""

from __future__ import annotations

import tempfile

import click


def parameter_counts(model) -> dict[str, int]:
    """Parameters by part: the frozen LM and vision tower, each trainable module, and the totals."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        counts[part] = counts.get(part, 0) + p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["trainable"] = sum(p.numel() for _, p in model.trainable_parameters())
    return counts


def skeleton(name: str, overrides: list[str]):
    """The `compact` model built on the meta device from its known shapes: counts without downloads."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from m3w.model.flamingo import Flamingo
    from m3w.model.presets import FROZEN_SHAPES, lm_config, preset_config, vision_config
    from m3w.model.vision import VisionEncoder
    from m3w.pipeline.tokenizer import load_tokenizer

    lm_shape, vision_shape = FROZEN_SHAPES[name]
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(lm_config(lm_shape, lm_shape.vocab))
        vision = VisionEncoder(AutoModel.from_config(vision_config(vision_shape)), {})
        return Flamingo(preset_config(name, overrides), lm, vision, load_tokenizer())


@click.group("model")
def model_group() -> None:
    """Model utilities."""


@model_group.command("info")
@click.option("--preset", default="tiny", show_default=True, help="tiny | bench | compact")
@click.option(
    "--family", default="llama", show_default=True, help="tiny/bench LM family: llama|qwen2|gpt2|gpt_neox"
)
@click.option(
    "--set", "overrides", multiple=True, help="FlamingoConfig override, e.g. --set cross_attn_every=2"
)
def info_cmd(preset: str, family: str, overrides: tuple[str, ...]) -> None:
    """Print total / trainable parameter counts of a preset (compact: from its shapes, nothing downloaded)."""
    from m3w.model.flamingo import Flamingo
    from m3w.model.presets import build_preset

    with tempfile.TemporaryDirectory() as workdir:
        if preset == "compact":
            model = skeleton(preset, list(overrides))
        else:
            model = Flamingo.from_config(
                build_preset(preset, workdir, family=family, overrides=list(overrides))
            )
    counts = parameter_counts(model)
    click.echo(f"preset: {preset}   gated layers: {model.gated_layers}")
    for part in ("lm", "vision", "resampler", "xattn", "new_tokens"):
        click.echo(
            f"  {part:<11} {counts.get(part, 0):>14,}  {'frozen' if part in ('lm', 'vision') else 'trainable'}"
        )
    click.echo(
        f"total: {counts['total']:,}  trainable: {counts['trainable']:,}  frozen: {counts['total'] - counts['trainable']:,}"
    )
