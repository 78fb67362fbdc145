"""Language identification with py3langid, whose model ships inside the package (nothing is downloaded)."""

from __future__ import annotations

import functools
import re

# langid's score saturates long before this; capping keeps long pages cheap (< 1 ms each).
MAX_LANGID_CHARS = 2_000
_LETTER_RE = re.compile(r"[^\W\d_]")


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid import langid

    return langid.LanguageIdentifier.from_modelpath(langid.MODEL_DIR / langid.MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability). Text without letters gives ("", 0.0) rather than a guess."""
    sample = text[:MAX_LANGID_CHARS]
    if not _LETTER_RE.search(sample):
        return "", 0.0
    lang, score = _identifier().classify(sample)
    return lang, float(score)
