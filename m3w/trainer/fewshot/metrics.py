"""Metrics of the few-shot benchmarks: CIDEr-D (captioning), VQA accuracy, classification accuracy.

CIDEr-D follows Vedantam et al. 2015 as implemented by the COCO caption evaluation code (n-grams 1-4, tf-idf
weights with document frequencies taken over the references, clipped counts, a Gaussian length penalty with
sigma 6, scaled by 10). The COCO code needs Java for its tokenizer; ours tokenizes the same way in Python
(lower case, punctuation removed), so the metric runs offline anywhere.

The VQA accuracy follows the official VQAv2 evaluation: answers are normalised (punctuation, number words to
digits, articles dropped, contractions restored) and a prediction scores min(#matching annotators / 3, 1),
averaged over the ten leave-one-annotator-out subsets.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

# --- CIDEr-D ------------------------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s']|_")


def tokenize_caption(text: str) -> list[str]:
    """Lower case, punctuation removed, split on whitespace: what the COCO (PTB) tokenizer step amounts to."""
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(tokens: list[str], n_max: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1))


def cider_d(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], n_max: int = 4, sigma: float = 6.0
) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D of one candidate per item against that item's references. Returns (mean, per item).

    Document frequencies come from the references of all items given, so the score of an item depends on the
    corpus it is scored in, as in the COCO evaluation.
    """
    if set(candidates) != set(references):
        raise ValueError("candidates and references must cover the same item ids")
    if not candidates:
        raise ValueError("CIDEr needs at least one item")
    refs = {k: [_ngrams(tokenize_caption(r), n_max) for r in v] for k, v in references.items()}
    doc_freq: Counter = Counter()
    for counts in refs.values():
        doc_freq.update(set().union(*counts) if counts else set())
    log_n_docs = math.log(len(refs))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n_max)]
        norms = [0.0] * n_max
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (log_n_docs - math.log(max(1.0, doc_freq[gram])))
            vec[n][gram] = weight
            norms[n] += weight * weight
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
        return vec, [math.sqrt(x) for x in norms], length

    def similarity(hyp, ref) -> float:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        total = 0.0
        for n in range(n_max):
            dot = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
            if nh[n] and nr[n]:
                total += dot / (nh[n] * nr[n]) * penalty
        return total / n_max

    per_item = {}
    for key, text in candidates.items():
        hyp = vector(_ngrams(tokenize_caption(text), n_max))
        sims = [similarity(hyp, vector(r)) for r in refs[key]]
        per_item[key] = 10.0 * sum(sims) / max(1, len(sims))
    return sum(per_item.values()) / len(per_item), per_item


# --- VQA accuracy -------------------------------------------------------------------------------------------

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm",
    "isnt": "isn't", "itll": "it'll", "ive": "i've", "shouldnt": "shouldn't", "thats": "that's",
    "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "youve": "you've",
}  # fmt: skip
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation: punctuation, then number words, articles and contractions."""
    original = answer.replace("\n", " ").replace("\t", " ").strip()
    text = original
    for p in _PUNCTUATION:
        # A mark next to a space (in the original answer), or any mark when a comma sits inside a number, is
        # deleted; elsewhere it separates words. Same rule, same quirks, as the official evaluation.
        if (p + " " in original or " " + p in original) or _COMMA_IN_NUMBER.search(original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, annotator_answers: Sequence[str]) -> float:
    """min(#humans that said it / 3, 1), averaged over the leave-one-out subsets of the annotators."""
    if not annotator_answers:
        raise ValueError("VQA accuracy needs the annotators' answers")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in annotator_answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(scores) / len(scores)


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("accuracy needs as many predictions as labels, and at least one")
    return sum(p == t for p, t in zip(predictions, labels)) / len(labels)


# --- confidence intervals over items ------------------------------------------------------------------------

Z_95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy (`correct` of `n` items right): unlike the normal
    approximation, it stays inside [0, 1] and is honest near 0 and 1 and for small n."""
    if n <= 0:
        raise ValueError("an interval needs at least one item")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(scores: Sequence[float], seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-item scores (CIDEr, VQA accuracy), seeded."""
    import numpy as np

    if not scores:
        raise ValueError("an interval needs at least one item")
    values = np.asarray(scores, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[draws].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def chance_interval(probabilities: Sequence[float]) -> tuple[float, float, float]:
    """Accuracy of a uniform guesser over items whose chance of a right guess is `probabilities[i]`: the
    expected value and the central 95% range of what it scores on these items (the exact distribution of a sum
    of independent Bernoulli draws, by dynamic programming)."""
    if not probabilities:
        raise ValueError("chance needs at least one item")
    n = len(probabilities)
    dist = [1.0]  # dist[k]: probability that k guesses are right
    for p in probabilities:
        nxt = [0.0] * (len(dist) + 1)
        for k, mass in enumerate(dist):
            nxt[k] += mass * (1 - p)
            nxt[k + 1] += mass * p
        dist = nxt
    cumulative, low, high = 0.0, None, None
    for k, mass in enumerate(dist):
        cumulative += mass
        if low is None and cumulative >= 0.025:
            low = k
        if high is None and cumulative >= 0.975:
            high = k
    return sum(probabilities) / n, low / n, high / n


def cell(score: float, interval: list[float] | None) -> str:
    """`0.850 [0.77, 0.91]`: a score and its 95% interval."""
    return f"{score:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def format_table(report: dict[str, Any]) -> str:
    """shots × (real images, shuffled images, chance), each score with its 95% interval."""
    rows = report["results"]
    columns = sorted({r["images"] for r in rows}, key=["real", "shuffled"].index)
    chance = report.get("chance")
    width = 22
    head = f"{report['task']} ({report['metric']}, n={rows[0]['n'] if rows else 0}, 95% intervals over items)"
    titles = [c + " images" for c in columns] + (["chance"] if chance else [])
    lines = [head, f"{'shots':>5}  {'support':<10}" + "".join(f"{t:>{width}}" for t in titles)]
    for shots in dict.fromkeys(r["shots"] for r in rows):
        cells = {r["images"]: r for r in rows if r["shots"] == shots}
        selection = next(iter(cells.values()))["selection"]
        texts = [cell(cells[c]["score"], cells[c].get("ci95")) if c in cells else "" for c in columns]
        if chance:
            texts.append(cell(chance["score"], chance["ci95"]))
        lines.append(f"{shots:>5}  {selection:<10}" + "".join(f"{t:>{width}}" for t in texts))
    if report.get("caption_loss"):
        loss = report["caption_loss"]
        lines.append(f"held-out caption loss (NLL/token, n={loss['n']}): real images {loss['real']:.3f}, "
                     f"shuffled {loss['shuffled']:.3f}, ratio {loss['ratio']:.3f}")  # fmt: skip
    return "\n".join(lines)
