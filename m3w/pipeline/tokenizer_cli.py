"""`m3w tokenizer train`: train the shipped default tokenizer on real web text.

A byte-level BPE (GPT-2 style: any byte sequence encodes, decoding is lossless) trained with the `tokenizers`
library on the visible text of WARC response pages. `<pad>`, `<|endoftext|>`, `<image>` and `<EOC>` are in the
training vocabulary, so their ids are fixed (0..3) whatever the merges. The vocabulary is kept modest (8k) so the
tiny test model stays small; any Hugging Face tokenizer can replace it with `--tokenizer`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import click

from m3w.errors import FormatError
from m3w.pipeline.tokenizer import DEFAULT_TOKENIZER, EOC_TOKEN, MEDIA_TOKEN, PAD_TOKEN

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, MEDIA_TOKEN, EOC_TOKEN)


def warc_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories to their `*.warc.gz` / `*.warc` files, sorted so training sees a fixed order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.name.endswith((".warc.gz", ".warc"))))
        else:
            files.append(path)
    return files


def iter_page_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Visible text of every HTML page (HTTP 200) of the WARCs: read by the extract stage's WARC reader, decoded
    by its charset rules, then a quick text dump, not the extractor (training text only). A file that is not a
    WARC, or ends inside a record, is a FormatError naming it."""
    from selectolax.lexbor import LexborHTMLParser

    from m3w.pipeline.html_extract import PageOptions, PageSkip, decode_html
    from m3w.pipeline.warc import HtmlRecord, WarcError, iter_html_records, open_input

    max_html_bytes = PageOptions().max_html_bytes
    for path in paths:
        try:
            with open_input(str(path)) as stream:
                for record in iter_html_records(stream, Counter(), max_html_bytes):
                    if not isinstance(record, HtmlRecord):  # a skipped record or a damaged stretch
                        continue
                    try:
                        html, _ = decode_html(record.body, record.charset)
                    except PageSkip:  # undecodable
                        continue
                    tree = LexborHTMLParser(html)
                    for node in tree.css("script, style, noscript, template"):
                        node.decompose()
                    body = tree.body
                    text = body.text(separator="\n", strip=True) if body is not None else ""
                    if text:
                        yield text
        except WarcError as exc:
            raise FormatError(f"{path}: {exc}") from exc


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8192, min_frequency: int = 2
):
    """Train a byte-level BPE on `texts` and save it as a `PreTrainedTokenizerFast` directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        additional_special_tokens=[MEDIA_TOKEN, EOC_TOKEN],
        # Lossless decoding: never "clean up" spaces before punctuation, or decode(ids) != window text.
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return fast


@click.group("tokenizer")
def tokenizer_group() -> None:
    """Train or look at the default tokenizer."""


@click.command("train")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--out",
    required=True,
    help=f"Output tokenizer directory (the shipped default, trained on the webcorpus WARCs: {DEFAULT_TOKENIZER}).",
)
@click.option("--vocab-size", default=8192, show_default=True)
@click.option("--min-frequency", default=2, show_default=True)
def train_cmd(inputs: tuple[str, ...], out: str, vocab_size: int, min_frequency: int) -> None:
    """Train a byte-level BPE on the text of the HTML pages in INPUTS (WARC files or directories of them)."""
    from m3w.pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

    files = warc_files(inputs)
    if not files:
        raise click.UsageError(f"no WARC files (*.warc.gz, *.warc) in {', '.join(inputs)}")
    train_tokenizer(iter_page_texts(files), out, vocab_size=vocab_size, min_frequency=min_frequency)
    tok = load_tokenizer(out)
    click.echo(f"saved {out}: vocab {len(tok)}, fingerprint {tokenizer_fingerprint(tok)}")


tokenizer_group.add_command(train_cmd)
