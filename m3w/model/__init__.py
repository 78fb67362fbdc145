"""m3w model: a compact Flamingo on Hugging Face parts.

from m3w.model import Flamingo, FlamingoConfig, build_preset
model = Flamingo.from_config(build_preset("tiny", workdir))
"""

from m3w.model.config import FlamingoConfig
from m3w.model.flamingo import Flamingo, FlamingoOutput
from m3w.model.presets import build_preset

__all__ = ["Flamingo", "FlamingoConfig", "FlamingoOutput", "build_preset"]
