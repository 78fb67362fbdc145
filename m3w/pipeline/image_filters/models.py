"""The model steps: image-text relevance (any CLIP/SigLIP) and NSFW (any image classifier), from Hugging Face
checkpoints by hub name or local path, batched, on the GPU when there is one.

Models load once per process (Ray reuses worker processes across tasks) and run in inference mode.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from m3w.pipeline.image_filters.config import ClipRelevanceConfig, ImageFiltersConfig, NsfwConfig

_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.Lock()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def task_gpus(config: ImageFiltersConfig, cluster_gpus: float) -> float:
    """GPUs an images task asks Ray for. Ray hides the GPUs from a task that asks for none, so a model step on
    `auto` runs on the GPU exactly when the task holds a share of one."""
    steps = [c for c in (config.clip, config.nsfw) if c.enabled]
    if cluster_gpus <= 0 or not steps or all(c.device == "cpu" for c in steps):
        return 0.0
    return config.gpus_per_task


def _cached(key: tuple, load: Any) -> Any:
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = load()
        return _LOADED[key]


def _features(output: Any) -> Any:
    """`get_*_features` return a tensor (transformers 4) or an output whose pooler_output is it (5)."""
    return output if hasattr(output, "norm") else output.pooler_output


class ClipRelevance:
    """Cosine similarity between each image and its text; NaN where there is no text."""

    def __init__(self, config: ClipRelevanceConfig) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.config = config
        self.device = resolve_device(config.device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModel.from_pretrained(config.model, dtype=dtype).to(self.device).eval()
        self.images = AutoImageProcessor.from_pretrained(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_tokens = getattr(text_config, "max_position_embeddings", 77)
        # SigLIP was trained on texts padded to the full length; CLIP pools at the end-of-text token.
        self.padding = "max_length" if "siglip" in self.model.config.model_type else True

    @classmethod
    def load(cls, config: ClipRelevanceConfig) -> ClipRelevance:
        return _cached(("clip", config.model, resolve_device(config.device)), lambda: cls(config))

    def score(self, images: Sequence[Image.Image], texts: Sequence[str | None]) -> np.ndarray:
        import torch

        scores = np.full(len(images), np.nan, dtype=np.float32)
        with_text = [i for i, t in enumerate(texts) if t and t.strip()]
        for start in range(0, len(with_text), self.config.batch_size):
            batch = with_text[start : start + self.config.batch_size]
            pixels = self.images(images=[images[i] for i in batch], return_tensors="pt")["pixel_values"]
            tokens = self.tokenizer([texts[i][: self.config.max_text_chars] for i in batch],  # type: ignore[index]
                                    padding=self.padding, truncation=True, max_length=self.max_tokens,
                                    return_tensors="pt")  # fmt: skip
            with torch.inference_mode():
                image_emb = _features(self.model.get_image_features(
                    pixel_values=pixels.to(self.device, self.model.dtype)))  # fmt: skip
                text_kwargs = {
                    k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")
                }
                text_emb = _features(self.model.get_text_features(**text_kwargs))
                image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
                text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
                scores[batch] = (image_emb * text_emb).sum(-1).cpu().numpy()
        return scores


class NsfwClassifier:
    """Summed probability of the classifier's labels named in `config.labels`."""

    def __init__(self, config: NsfwConfig) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.config = config
        self.device = resolve_device(config.device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForImageClassification.from_pretrained(config.model, dtype=dtype)
        self.model = self.model.to(self.device).eval()
        self.images = AutoImageProcessor.from_pretrained(config.model)
        wanted = {label.lower() for label in config.labels}
        id2label = self.model.config.id2label
        self.positive = sorted(i for i, name in id2label.items() if str(name).lower() in wanted)
        if not self.positive:
            raise ValueError(f"{config.model}: none of its labels {sorted(id2label.values())} is in nsfw.labels "
                             f"{config.labels}; list the label(s) that mean NSFW for this classifier")  # fmt: skip
        self.multi_label = self.model.config.problem_type == "multi_label_classification"

    @classmethod
    def load(cls, config: NsfwConfig) -> NsfwClassifier:
        key = ("nsfw", config.model, tuple(config.labels), resolve_device(config.device))
        return _cached(key, lambda: cls(config))

    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        scores = np.empty(len(images), dtype=np.float32)
        for start in range(0, len(images), self.config.batch_size):
            batch = images[start : start + self.config.batch_size]
            pixels = self.images(images=list(batch), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                logits = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).logits.float()
            probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
            positive = probs[:, self.positive]
            # Several NSFW labels of one softmax add up; independent (sigmoid) labels: the likeliest one.
            summed = positive.max(-1).values if self.multi_label else positive.sum(-1)
            scores[start : start + len(batch)] = summed.clamp(0, 1).cpu().numpy()
        return scores
