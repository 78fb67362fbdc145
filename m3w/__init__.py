"""m3w: build M3W-style interleaved image-text corpora from Common Crawl and train Flamingo-style models on them."""

from pathlib import Path

__version__ = "0.1.0"

# The shipped YAML configs (package data, so a wheel install has them too).
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
