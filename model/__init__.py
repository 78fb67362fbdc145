"""m3w model: a compact Flamingo on Hugging Face parts.

from model import Flamingo, FlamingoConfig, build_preset
model = Flamingo.from_config(build_preset("tiny", workdir))
"""

from model.config import FlamingoConfig
from model.flamingo import Flamingo, FlamingoOutput
from model.presets import build_preset

__all__ = ["Flamingo", "FlamingoConfig", "FlamingoOutput", "build_preset"]
