"""Language identification with py3langid, whose model ships inside the package (nothing is downloaded)."""

from __future__ import annotations

import functools

# langid's score saturates long before this; capping keeps a 10 MB page from costing a second.
MAX_LANGID_CHARS = 20_000


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid import langid

    return langid.LanguageIdentifier.from_modelpath(langid.MODEL_DIR / langid.MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability). Text without letters gives ("", 0.0) rather than a guess."""
    sample = text[:MAX_LANGID_CHARS]
    if not any(ch.isalpha() for ch in sample):
        return "", 0.0
    lang, score = _identifier().classify(sample)
    return lang, float(score)
