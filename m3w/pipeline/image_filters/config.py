"""Every image filter setting in one dataclass tree: which steps run (their scores go to the image index) and the
thresholds that drop an image (applied to the stored scores, so a threshold change never re-fetches).

A threshold of None keeps every image and only records the score. The cheap signals run by default; the model
steps are off until a model is named (any Hugging Face checkpoint, by hub name or local path).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PerceptualHashConfig:
    """pHash (DCT of the 64×64 luma, 64 bits) of the stored image: copies of a picture under other URLs
    (resized, re-encoded) mostly hash alike, and differ by a few bits when not; different pictures differ by
    many (≥ 18 bits between any two webcorpus photos)."""

    enabled: bool = True
    # Drop the images of a pHash that more than K stored images (distinct URLs) have: one picture re-hosted under
    # many URLs. Counted across the whole store by a partitioned map/reduce (image_filters/duplicates.py), the
    # counts kept in the store; None: only count. OBELICS's K for one image URL across documents is 10.
    max_duplicates: int | None = None


@dataclass
class BlurConfig:
    """Variance of the Laplacian of the stored image's luma: low means few edges, i.e. blurred or flat."""

    enabled: bool = True
    min_laplacian_variance: float | None = None  # e.g. 20 on 320×320 images drops motion-blurred photos


@dataclass
class TextShareConfig:
    """Share of the image covered by text or QR-code-like tiles (two-tone, high contrast, many strokes), at the
    scale where it is largest: screenshots, slides, scanned pages, memes, QR codes score high."""

    enabled: bool = True
    max_text_share: float | None = None  # e.g. 0.5 drops text-heavy images


@dataclass
class ModelStepConfig:
    model: str = ""  # a Hugging Face model name or a local save_pretrained directory
    batch_size: int = 64
    device: str = "auto"  # auto: the GPU when there is one, else the CPU


@dataclass
class ClipRelevanceConfig(ModelStepConfig):
    """Cosine similarity of CLIP/SigLIP embeddings of the image and its text on the page (alt text, else
    figcaption or title, else the nearest paragraph), as MMC4 and OmniCorpus keep it."""

    enabled: bool = False
    model: str = "openai/clip-vit-base-patch32"
    min_similarity: float | None = None  # model-dependent: 0.15 for OpenAI CLIP ViT-L/14 (NeMo Curator's cut)
    max_text_chars: int = 300  # of the context sent to the text tower (which truncates to its own length)


@dataclass
class NsfwConfig(ModelStepConfig):
    """Probability, from any Hugging Face image classifier, that the image is NSFW: the summed probability of
    the classifier's labels listed in `labels`."""

    enabled: bool = False
    model: str = "Falconsai/nsfw_image_detection"
    labels: list[str] = field(default_factory=lambda: ["nsfw", "porn", "hentai", "sexy", "explicit"])
    max_score: float | None = 0.5


@dataclass
class ImageFiltersConfig:
    phash: PerceptualHashConfig = field(default_factory=PerceptualHashConfig)
    blur: BlurConfig = field(default_factory=BlurConfig)
    text: TextShareConfig = field(default_factory=TextShareConfig)
    clip: ClipRelevanceConfig = field(default_factory=ClipRelevanceConfig)
    nsfw: NsfwConfig = field(default_factory=NsfwConfig)
    # The share of a GPU each images task holds when a model step runs on a cluster with GPUs: fetch tasks mostly
    # wait on the network, so several share one. Without GPUs in the cluster, tasks ask for none.
    gpus_per_task: float = 0.25
