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


# tokenizer_config.json classes that are a plain `tokenizers` file (transformers 5 names it TokenizersBackend,
# transformers 4 PreTrainedTokenizerFast; m3w's own and `m3w tokenizer train`'s are such)
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer_class(path: str):
    """The class that loads `path`. A local plain `tokenizers` file loads with that class directly: AutoTokenizer
    would get the same class, but through transformers' model-config modules, which import torch (seconds, and
    hundreds of MB in every shard worker that only tokenizes)."""
    config = Path(path) / "tokenizer_config.json"
    if config.is_file() and (Path(path) / "tokenizer.json").is_file():
        if json.loads(config.read_text()).get("tokenizer_class") in PLAIN_TOKENIZER_CLASSES:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def load_tokenizer(name_or_path: str | None = None):
    """Load a tokenizer by hub name or local path and add `<image>`, `<EOC>` (and a pad token if missing)."""
    path = name_or_path or DEFAULT_TOKENIZER
    tok = _tokenizer_class(path).from_pretrained(path)
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
