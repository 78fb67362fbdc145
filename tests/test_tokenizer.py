"""The shipped default tokenizer, `m3w tokenizer train`, and fingerprints."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
from click.testing import CliRunner

from m3w.pipeline.tokenizer import (
    DEFAULT_TOKENIZER,
    EOC_TOKEN,
    MEDIA_TOKEN,
    load_tokenizer,
    tokenizer_fingerprint,
)
from m3w.pipeline.tokenizer_cli import iter_page_texts, tokenizer_group, train_tokenizer, warc_files


@pytest.fixture(scope="module")
def page_texts(webcorpus) -> list[str]:
    files = [webcorpus / "warc" / "cleaneval_dev.warc.gz", *warc_files([webcorpus / "warc"])]
    return list(islice(iter_page_texts(files), 40))


def test_default_tokenizer_is_shipped_small_and_has_fixed_special_ids():
    files = {p.name: p.stat().st_size for p in Path(DEFAULT_TOKENIZER).iterdir()}
    assert "tokenizer.json" in files and sum(files.values()) < 1_500_000  # commit-sized
    tok = load_tokenizer()
    assert 8000 <= len(tok) <= 16384
    assert tok.convert_tokens_to_ids(["<pad>", "<|endoftext|>", MEDIA_TOKEN, EOC_TOKEN]) == [0, 1, 2, 3]
    assert tok.pad_token_id == 0
    assert tok(f"{EOC_TOKEN}{MEDIA_TOKEN}", add_special_tokens=False)["input_ids"] == [3, 2]


def test_plain_tokenizer_loads_as_autotokenizer_loads_it_without_torch(page_texts):
    """m3w's tokenizer loads with its class directly: what AutoTokenizer gives (class, settings, ids), without
    the model-config modules that import torch (shard workers only tokenize)."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    probe = "import sys; from m3w.pipeline.tokenizer import load_tokenizer; load_tokenizer(); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        == "False\n"
    )
    ours, auto = load_tokenizer(), AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER)
    auto.add_special_tokens({"additional_special_tokens": [MEDIA_TOKEN, EOC_TOKEN]})
    assert type(ours) is type(auto) and ours.init_kwargs == auto.init_kwargs
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(auto)
    assert ours(page_texts)["input_ids"] == auto(page_texts)["input_ids"]


def test_default_tokenizer_round_trips_real_web_text(page_texts):
    tok = load_tokenizer()
    assert len(page_texts) == 40
    assert any(not t.isascii() for t in page_texts)
    for text in page_texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
    # Trained on web text: far fewer tokens than bytes.
    total_bytes = sum(len(t.encode()) for t in page_texts)
    total_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in page_texts)
    assert total_tokens < total_bytes / 2.5


def test_fingerprint_is_stable_and_tells_tokenizers_apart(tmp_path, page_texts):
    assert tokenizer_fingerprint(load_tokenizer()) == tokenizer_fingerprint(load_tokenizer())
    other = tmp_path / "other"
    train_tokenizer(page_texts, other, vocab_size=600)
    assert tokenizer_fingerprint(load_tokenizer(str(other))) != tokenizer_fingerprint(load_tokenizer())


def test_any_hf_tokenizer_gets_image_and_eoc_tokens(tmp_path, page_texts):
    """A tokenizer made without m3w's special tokens (as any hub tokenizer is) gets them on load."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(page_texts, trainers.WordLevelTrainer(vocab_size=500, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(str(tmp_path / "wl"))
    tok = load_tokenizer(str(tmp_path / "wl"))
    ids = tok(f"hello{EOC_TOKEN}{MEDIA_TOKEN}", add_special_tokens=False)["input_ids"]
    assert ids[-2:] == tok.convert_tokens_to_ids([EOC_TOKEN, MEDIA_TOKEN])
    assert tok.pad_token is not None and tok.m3w_name == str(tmp_path / "wl")


def test_train_command_writes_a_loadable_tokenizer(tmp_path, webcorpus):
    out = tmp_path / "tok"
    warc = webcorpus / "warc" / "cleaneval_dev.warc.gz"
    result = CliRunner().invoke(
        tokenizer_group, ["train", str(warc), "--out", str(out), "--vocab-size", "1000"]
    )
    assert result.exit_code == 0, result.output
    assert "fingerprint" in result.output
    tok = load_tokenizer(str(out))
    assert len(tok) == 1000
    assert tok.convert_tokens_to_ids([MEDIA_TOKEN, EOC_TOKEN]) == [2, 3]
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
