"""`make demo`: a synthetic web (`m3w.demo.web`) and the end-to-end run over it (`m3w.demo.run`)."""

from pathlib import Path

# The frozen LM the package ships (demo.lm made it; `make demo-lm` remakes it), and the record of how it was made
# that demo.lm writes beside an LM's weights. Here, not in demo.lm, so that demo.run reads them without torch.
BUNDLED_LM = Path(__file__).parent / "assets" / "lm"
LM_RECORD = "pretraining.json"
