"""Tokenizers: load any Hugging Face tokenizer with m3w's special tokens, fingerprint it, train the default.

`<image>` marks where a media item stands; `<EOC>` ends a chunk (before every image and at the end of a
document). Both are added as special tokens, so the text "<image>" in a page can never become one by accident
of BPE merges, and decoding keeps them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<EOC>"
PAD_TOKEN = "<pad>"
DEFAULT_TOKENIZER = str(Path(__file__).parent / "assets" / "tokenizer")


def load_tokenizer(name_or_path: str | None = None):
    """Load a tokenizer by hub name or local path and add `<image>`, `<EOC>` (and a pad token if missing)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path or DEFAULT_TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": [MEDIA_TOKEN, EOC_TOKEN]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.m3w_name = name_or_path or "m3w-default"
    return tok


def tokenizer_fingerprint(tok) -> str:
    """sha256 over the vocabulary, the merges and the special tokens' ids: equal iff the ids mean the same."""
    backend = json.loads(tok.backend_tokenizer.to_str())
    special = {t: tok.convert_tokens_to_ids(t) for t in (MEDIA_TOKEN, EOC_TOKEN, tok.pad_token)}
    payload = json.dumps(
        {"model": backend.get("model"), "added": backend.get("added_tokens"), "special": special},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
