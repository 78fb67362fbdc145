"""`m3w inspect PATH`: one self-contained HTML page to look at shards or documents as a person would.

Shards (a tar or a shard directory): each sample's text with its images inline (data URIs) where its `<image>`
tokens stand, `<EOC>` marked, the source URL, and token/image counts. Documents (a parquet file): the nodes in
order, with images inline from an image store when one is given (else their URL and alt text), and the counts the
shard stage would see.
"""

from __future__ import annotations

import base64
import html
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import click

from m3w.errors import FormatError, UserError
from m3w.pipeline.tario import iter_tar_samples
from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN
from m3w.schemas import shards as shard_spec

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; background: #fafafa; }
h1 { font-size: 1.4rem; } .summary { color: #555; }
.sample { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 1rem 1.2rem; margin: 1.2rem 0; }
.head { display: flex; flex-wrap: wrap; gap: .4rem 1rem; font-size: .85rem; color: #555;
        border-bottom: 1px solid #eee; padding-bottom: .5rem; margin-bottom: .7rem; }
.head a { color: #0645ad; word-break: break-all; } .key { font-family: monospace; }
.badge { background: #eef; border-radius: 4px; padding: 0 .4rem; }
.text { white-space: pre-wrap; word-wrap: break-word; }
.media { display: block; margin: .6rem 0; } .media img { max-width: 240px; border-radius: 4px;
         border: 2px solid #4a7; vertical-align: top; margin-right: 4px; }
.frames img { max-width: 120px; }
.eoc { background: #fde2b8; color: #8a4b00; border-radius: 3px; padding: 0 .3rem; font: .75rem monospace; }
.missing { display: inline-block; border: 2px dashed #c66; color: #a33; padding: .3rem .5rem; font-size: .8rem;
           border-radius: 4px; margin: .3rem 0; }
.prov { font-size: .75rem; color: #777; margin-top: .6rem; word-break: break-all; }
.cut { color: #888; font-weight: bold; }
"""

_SPLIT = re.compile(f"({re.escape(MEDIA_TOKEN)}|{re.escape(EOC_TOKEN)})")


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def img_tag(jpeg: bytes, title: str) -> str:
    return f'<img src="{data_uri(jpeg)}" alt="{html.escape(title)}" title="{html.escape(title)}">'


def eoc_mark() -> str:
    return f'<span class="eoc">{html.escape(EOC_TOKEN)}</span>'


def shard_paths(path: Path) -> list[Path]:
    """A tar, or a shard directory (in its manifest's order when it has one)."""
    if path.is_file():
        return [path]
    if (path / shard_spec.SHARD_MANIFEST).exists():
        return [
            Path(u)
            for u in shard_spec.shard_urls(str(path), shard_spec.read_shard_manifest(str(path)), False)
        ]
    return sorted(path.glob("*.tar"))


def render_sample(key: str, files: dict[str, bytes]) -> str:
    """One shard sample: text split at <image>/<EOC>; each <image> replaced by its media item. An ellipsis marks
    where the window cuts its document: before, when it starts after the document's first token; after, when it
    stops before the document's closing <EOC>."""
    sample = json.loads(files["json"])
    cut = '<span class="cut" title="the window cuts the document here">…</span>'
    before = cut if sample.get("provenance", {}).get("token_start") else ""
    after = "" if sample["text"].endswith(EOC_TOKEN) else cut
    media_keys = sample["images"]
    per_item = sample.get("num_frames", 1) or 1
    items = [media_keys[i : i + per_item] for i in range(0, len(media_keys), per_item)]
    parts, item = [], 0
    for piece in _SPLIT.split(sample["text"]):
        if piece == EOC_TOKEN:
            parts.append(eoc_mark())
        elif piece == MEDIA_TOKEN:
            if item < len(items):
                css = "media frames" if per_item > 1 else "media"
                imgs = "".join(img_tag(files[k], f"{key} {k}") for k in items[item] if k in files)
                parts.append(f'<span class="{css}">{imgs}</span>')
            else:  # a broken sample: say so rather than hide it
                parts.append('<span class="missing">&lt;image&gt; without an image</span>')
            item += 1
        elif piece:
            parts.append(html.escape(piece))
    prov = sample.get("provenance", {})
    url = prov.get("url") or ""
    link = f'<a href="{html.escape(url)}">{html.escape(url)}</a>' if "://" in url else html.escape(url)
    details = {k: v for k, v in prov.items() if k != "url"}
    return (
        f'<div class="sample"><div class="head"><span class="key">{html.escape(key)}</span>'
        f'<span class="badge">{html.escape(sample.get("dataset", "?"))}</span>'
        f"<span>{len(sample['input_ids'])} tokens</span><span>{len(items)} {sample.get('media_kind', 'image')}"
        f"{'s' if len(items) != 1 else ''}</span>{link}</div>"
        f'<div class="text">{before}{"".join(parts)}{after}</div>'
        f'<div class="prov">{html.escape(json.dumps(details, ensure_ascii=False))}</div></div>'
    )


def iter_shard_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    for tar in shard_paths(path):
        try:
            yield from iter_tar_samples(tar)
        except tarfile.TarError as exc:  # not a tar, or cut short
            raise FormatError(f"{tar}: not a readable tar shard ({exc})") from exc


def render_document(doc: dict, store, tok) -> str:
    """One document: nodes in order, images inline when the store has them, and the shard-stage counts."""
    from m3w.pipeline.windows import document_sequence

    urls = [n["url"] for n in doc["nodes"] if n["kind"] == "image" and n.get("url")]
    rows = store.lookup(urls) if store is not None else {}
    ok = store.usable(urls) if store is not None else {}
    counts: Counter = Counter()
    seq = document_sequence(doc["nodes"], ok, tok, counts, require_image=False)
    parts = []
    for node in doc["nodes"]:
        if node["kind"] == "text":
            parts.append(f"<p>{html.escape(node.get('text') or '')}</p>")
        else:
            url = node.get("url") or ""
            caption = " · ".join(x for x in (node.get("alt"), node.get("figcaption")) if x)
            if url in ok:
                parts.append(
                    f'{eoc_mark()}<span class="media">{img_tag(store.read_blob(ok[url]), url)}</span>'
                )
            else:
                status = rows[url]["status"] if url in rows else "not in store"
                parts.append(f'<span class="missing">{node["kind"]} {html.escape(status)}: '
                             f"{html.escape(url)} {html.escape(caption)}</span>")  # fmt: skip
    link = html.escape(doc["url"])
    prov = {k: doc.get(k) for k in ("warc_path", "warc_record_id", "warc_offset")}
    return (
        f'<div class="sample"><div class="head"><span class="key">{html.escape(doc["doc_id"])}</span>'
        f"<span>{len(seq.ids)} tokens</span><span>{len(seq.images)} of {len(urls)} images stored</span>"
        f'<a href="{link}">{link}</a></div><div class="text">{"".join(parts)}{eoc_mark()}</div>'
        f'<div class="prov">{html.escape(json.dumps(prov))}</div></div>'
    )


def render_inspect(
    path: str | Path,
    out_html: str | Path,
    limit: int = 50,
    *,
    store: str | Path | None = None,
    tokenizer: str | None = None,
) -> int:
    """Write a self-contained HTML page for the first `limit` samples (or documents) of `path`.

    `path` is a shard tar, a shard directory, or a documents parquet file. Returns how many were shown.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        from m3w.pipeline.imagestore import ImageStore
        from m3w.pipeline.tokenizer import load_tokenizer
        from m3w.schemas.documents import iter_documents

        tok = load_tokenizer(tokenizer)
        image_store = ImageStore(store) if store else None
        rows = islice(iter_documents(path, batch_size=64), limit)
        blocks = [render_document(doc, image_store, tok) for doc in rows]
        kind = "documents"
    elif path.suffix == ".tar" or path.is_dir():
        if not shard_paths(path):
            raise UserError(
                f"{path}: no shards (*.tar) in it; documents are shown one .parquet file at a time"
            )
        blocks = [render_sample(key, files) for key, files in islice(iter_shard_samples(path), limit)]
        kind = "samples"
    else:
        raise UserError(f"{path}: expected a .tar shard, a shard directory or a .parquet file")
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>m3w inspect: {html.escape(path.name)}</title>'
        f"<style>{STYLE}</style></head><body><h1>m3w inspect: {html.escape(str(path))}</h1>"
        f'<p class="summary">{len(blocks)} {kind} shown (limit {limit}). Images are inline where their '
        f"<code>{html.escape(MEDIA_TOKEN)}</code> token stands; {eoc_mark()} ends a chunk.</p>"
        + "".join(blocks)
        + "</body></html>\n"
    )
    Path(out_html).parent.mkdir(parents=True, exist_ok=True)
    Path(out_html).write_text(page, encoding="utf-8")
    return len(blocks)


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True))
@click.option("--out", "out_html", default="inspect.html", show_default=True, help="HTML file to write.")
@click.option("--limit", default=50, show_default=True, help="Samples (or documents) to show.")
@click.option("--images", "store", type=click.Path(exists=True), help="Image store, for documents files.")
@click.option("--tokenizer", default=None, help="Tokenizer for document token counts (default: shipped).")
def inspect_cmd(path: str, out_html: str, limit: int, store: str | None, tokenizer: str | None) -> None:
    """Render a shard, a shard directory or a documents parquet file as a readable HTML page."""
    shown = render_inspect(path, out_html, limit, store=store, tokenizer=tokenizer)
    click.echo(f"wrote {out_html} ({shown} shown)")
