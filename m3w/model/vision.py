"""The frozen vision encoder: any Hugging Face vision tower → patch features, run without gradient."""

from __future__ import annotations

import torch
from torch import nn

# Used when a checkpoint ships no image processor config: SigLIP/ViT-style [-1, 1] scaling.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


class VisionEncoder(nn.Module):
    def __init__(self, model: nn.Module, image_config: dict) -> None:
        super().__init__()
        # CLIPModel / SiglipModel checkpoints carry a text tower too; keep only the vision tower.
        self.model = getattr(model, "vision_model", model).requires_grad_(False).eval()
        config = getattr(model.config, "vision_config", model.config)
        self.dim: int = config.hidden_size
        self.patch_size: int = config.patch_size
        self.image_size: int = config.image_size
        self.image_config = image_config

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32) -> VisionEncoder:
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
        config = getattr(model.config, "vision_config", model.config)
        image_config = {"size": config.image_size, "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path)
            image_config.update(mean=list(processor.image_mean), std=list(processor.image_std))
        except (OSError, ValueError, AttributeError):
            pass  # no processor config next to the weights: keep the defaults above
        return cls(model, image_config)

    def train(self, mode: bool = True) -> VisionEncoder:
        return super().train(False)  # frozen: always in inference mode (no dropout)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [M, C, H, W] (normalised) → patch features [M, (H/p)·(W/p), d]: the 2D grid flattened.

        Patch tokens are the last (H/p)·(W/p) outputs in every HF ViT (CLS and register tokens come first, SigLIP
        has none), so slicing them off the end drops CLS consistently across families."""
        height, width = pixels.shape[-2:]
        kwargs = {} if height == width == self.image_size else {"interpolate_pos_encoding": True}
        features = self.model(pixel_values=pixels, **kwargs).last_hidden_state
        return features[:, -(height // self.patch_size) * (width // self.patch_size) :]
