"""What every dedup phase shares: the rules, document ids as integers, the "newest" order, partition functions.

A document is named by `gid = unit ordinal << 32 | row` (its position in the corpus), so every shuffle carries
only integers. Keys are 64-bit hashes (URL, text, image set, MinHash band, image URL, domain + paragraph).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from m3w.pipeline.filters import steps

NULL_KEY = np.iinfo(np.int64).min  # "no key" (no URL, no text, no image); a real hash never takes this value
MISSING_DATE = np.iinfo(np.int64).min  # no fetch date: older than any date
BAD_DATE = MISSING_DATE + 1  # a fetch date that is not ISO 8601: older than any readable one
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ROW_BITS = 32


@dataclass(frozen=True)
class Rule:
    name: str  # the filter name in the funnel and in excluded/
    what: str  # for the reason: "<what> as <kept doc> (fetched <date>, kept)"
    column: str = ""  # the signals column holding the key (document-level exact rules)


# Document-level rules in their order of application: each acts on the documents the previous ones kept. Their
# names, and where they sit in the funnel, are the filter steps' (`filters/steps.py`).
_URL, _TEXT, _IMAGE_SET, _NEAR = steps.DOC_DEDUP_RULES
SAME_URL = Rule(_URL, "same URL", "url_hash")
EXACT_TEXT = Rule(_TEXT, "same text", "text_hash")
SAME_IMAGE_SET = Rule(_IMAGE_SET, "same set of image URLs", "image_set_hash")
EXACT_RULES = (SAME_URL, EXACT_TEXT, SAME_IMAGE_SET)
NEAR_DUPLICATE = Rule(_NEAR, "MinHash Jaccard")
# Node-level rules, applied by the decide step to the nodes the quality filters kept.
IMAGE_FREQUENCY = Rule(steps.IMAGE_FREQUENCY, "image URL")
DOMAIN_PARAGRAPH = Rule(steps.DOMAIN_PARAGRAPH, "paragraph")
DOCUMENT_RULES = (*EXACT_RULES, NEAR_DUPLICATE)
RULES = (*DOCUMENT_RULES, IMAGE_FREQUENCY, DOMAIN_PARAGRAPH)
RULE_CODE = {rule.name: code for code, rule in enumerate(RULES)}  # int8 in the shuffles


def gids(ordinal: int, rows: int) -> np.ndarray:
    return (np.int64(ordinal) << _ROW_BITS) + np.arange(rows, dtype=np.int64)


def unit_of(gid: np.ndarray) -> np.ndarray:
    return gid >> _ROW_BITS


def row_of(gid: np.ndarray) -> np.ndarray:
    return gid & ((1 << _ROW_BITS) - 1)


def hash_partition(keys: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of each 64-bit hash key: `partitions` equal ranges of the hash space (by its top 32 bits)."""
    top = keys.astype(np.int64).view(np.uint64) >> np.uint64(32)
    return ((top * np.uint64(partitions)) >> np.uint64(32)).astype(np.int64)


def group_partition(gid: np.ndarray, group_starts: np.ndarray) -> np.ndarray:
    """The unit group of each document: groups are runs of consecutive unit ordinals starting at `group_starts`."""
    return np.searchsorted(group_starts, unit_of(gid), side="right") - 1


def mix64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One well-spread 64-bit key from two (splitmix64's finaliser over a ^ rotated b; products wrap)."""
    b = np.asarray(b, dtype=np.int64).view(np.uint64)
    x = np.asarray(a, dtype=np.int64).view(np.uint64) ^ ((b << np.uint64(17)) | (b >> np.uint64(47)))
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (x ^ (x >> np.uint64(31))).view(np.int64)


def not_null(keys: np.ndarray) -> np.ndarray:
    return keys != NULL_KEY


# ------------------------------------------------------------------------------------------------ "newest"


def date_key(fetch_date: str | None) -> int:
    """Microseconds since 1970 of an ISO 8601 fetch date (WARC-Date), UTC when it names no zone."""
    if not fetch_date:
        return int(MISSING_DATE)
    text = fetch_date.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"  # Python 3.10's fromisoformat does not read "Z"
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return int(BAD_DATE)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def id_key(doc_id: str) -> int:
    """The first 8 bytes of `doc_id` as a signed integer in the same order as the strings."""
    return int.from_bytes(doc_id.encode("utf-8")[:8].ljust(8, b"\0"), "big") - (1 << 63)


def order_keys(doc_ids: list[str], fetch_dates: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(date key, id key) of each document: of two copies the one with the larger (date, id, gid) is kept."""
    return (
        np.fromiter((date_key(d) for d in fetch_dates), dtype=np.int64, count=len(fetch_dates)),
        np.fromiter((id_key(i) for i in doc_ids), dtype=np.int64, count=len(doc_ids)),
    )
