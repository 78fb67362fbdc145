"""Text statistics shared by the paragraph, document and caption filters, and the shipped word lists.

Definitions follow OBELICS (which took them from BigScience ROOTS), except the word repetition ratio, which is
datatrove's maintained Gopher implementation (fraction of characters inside duplicated word n-grams).
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex

_HERE = Path(__file__).resolve().parent
# Words are maximal runs of letters, marks, digits and in-word apostrophes/hyphens: punctuation never counts.
_WORD_RE = re.compile(r"[^\W_](?:[\w'’-]*[^\W_])?")
_LETTERS_RE = regex.compile(r"[\p{L}\p{M}]+")
_NUMPY_MIN_CHARS = 2_000
# Statistics are computed on at most this many characters: a 10 MB "paragraph" is judged on its first 100 kB
# (its word count is still exact), so one hostile node cannot stall a worker.
MAX_STATS_CHARS = 100_000


@functools.cache
def _wordlists(name: str) -> dict[str, frozenset[str]]:
    with open(_HERE / f"{name}.json", encoding="utf-8") as f:
        data = json.load(f)
    return {lang: frozenset(words) for lang, words in data["languages"].items()}


def stopwords(lang: str) -> frozenset[str]:
    """Stopwords of `lang` (ISO 639-1) from the shipped stopwords-iso lists; empty for an unknown language."""
    return _wordlists("stopwords").get(lang, frozenset())


def flagged_words(lang: str) -> frozenset[str]:
    """Flagged (adult/offensive) words of `lang`; empty where no list ships (then the flagged filter passes)."""
    return _wordlists("flagged_words").get(lang, frozenset())


def words(text: str) -> list[str]:
    """Lower-cased words of `text`. Scripts without spaces (CJK) count a run of characters as one word."""
    return _WORD_RE.findall(text.lower().replace("’", "'"))


def word_count(text: str) -> int:
    return sum(1 for _ in _WORD_RE.finditer(text))


def special_char_ratio(text: str) -> float:
    """Share of characters that are not letters or marks (punctuation, symbols, digits, spaces, emoji)."""
    if not text:
        return 0.0
    return len(_LETTERS_RE.sub("", text)) / len(text)


def char_repetition_ratio(text: str, n: int) -> float:
    """BigScience: share of character n-gram occurrences taken by the sqrt(#distinct) most frequent n-grams,
    counting only n-grams that repeat (so a short text of unique n-grams scores 0, not 1/sqrt(len))."""
    if len(text) < n:
        return 0.0
    if len(text) < _NUMPY_MIN_CHARS:
        freq = np.array(
            sorted(Counter(text[i : i + n] for i in range(len(text) - n + 1)).values(), reverse=True)
        )
    else:
        # Long texts: each n-gram as a 64-bit polynomial hash of its code points, counted with numpy (20x
        # faster than a Counter of substrings; a collision among one text's n-grams is vanishingly unlikely).
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        m = len(codes) - n + 1
        hashes = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                hashes = hashes * np.uint64(1_000_003) + codes[k : k + m]
        freq = np.sort(np.unique(hashes, return_counts=True)[1])[::-1]
    repeated = int(np.count_nonzero(freq > 1))
    top_k = min(int(len(freq) ** 0.5), repeated)
    return float(freq[:top_k].sum() / freq.sum())


def word_repetition_ratio(word_list: list[str], n: int) -> float:
    """Gopher (datatrove): share of word characters inside word n-grams seen earlier in the text."""
    # Imported here: datatrove takes ~0.5 s to import, and `m3w images` workers (which use only the image rules
    # of pipeline.filters) should not pay it at start-up.
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate

    total = sum(len(w) for w in word_list)
    if total == 0 or len(word_list) < n:
        return 0.0
    return find_all_duplicate(word_list, n) / total


def ratio_in(word_list: list[str], vocabulary: frozenset[str]) -> float:
    if not word_list:
        return 0.0
    return sum(1 for w in word_list if w in vocabulary) / len(word_list)


@dataclass(frozen=True)
class TextStats:
    """Everything the text filters decide on, for one paragraph, caption or document text."""

    words: int
    char_repetition: float
    word_repetition: float
    special_chars: float
    stopwords: float
    flagged_words: float


def text_stats(text: str, lang: str, char_ngram: int = 10, word_ngram: int = 5) -> TextStats:
    """Statistics of `text`, with the word lists of `lang`."""
    sample = text[:MAX_STATS_CHARS]
    sample_words = words(sample)
    return TextStats(
        words=len(sample_words) if len(text) <= MAX_STATS_CHARS else word_count(text),
        char_repetition=char_repetition_ratio(sample, char_ngram),
        word_repetition=word_repetition_ratio(sample_words, word_ngram),
        special_chars=special_char_ratio(sample),
        stopwords=ratio_in(sample_words, stopwords(lang)),
        flagged_words=ratio_in(sample_words, flagged_words(lang)),
    )
