"""`m3w shards`: filtered documents + the image store → WebDataset shards (M3W windows, image-text pairs, video).

Two steps, so that shards are byte-identical whatever the number of Ray workers:

1. **Units** (parallel, `run_units`): one input file → one part file `_parts/<unit>.jsonl` holding that input's
   samples in input order (token ids, text, provenance, and the blob keys of their media, not the media bytes).
   A killed job resumes from the manifest; a part is written atomically.
2. **Merge** (one process, cheap): walk the parts in sorted unit order, read each sample's media from the blob
   store and write `<name>-000000.tar`, … with `m3w.pipeline.tario` (fixed headers, fixed order), then
   `shards.json`. Nothing in the output depends on which worker made which part, or when.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from m3w.cli import OutputDir, stage_options
from m3w.config import from_dict, to_dict
from m3w.errors import UserError
from m3w.pipeline.filters.config import CaptionFilterConfig
from m3w.pipeline.io import atomic_open, stable_hash
from m3w.pipeline.manifest import Manifest
from m3w.pipeline.ray_runner import Unit, run_units
from m3w.pipeline.tario import ShardWriter
from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN, load_tokenizer, tokenizer_fingerprint
from m3w.pipeline.windows import (
    WindowConfig,
    decode,
    document_sequence,
    make_windows,
    sanitize,
    special_strings,
)
from m3w.schemas import shards as spec
from m3w.schemas.documents import document_files, iter_documents
from m3w.schemas.images import STATUS_OK

PARTS_DIR = "_parts"


@dataclass
class PairsConfig:
    alt_max_tokens: int = 32  # ALIGN-like alt-text pairs: <image>alt<EOC>, at most 32 tokens
    caption_max_tokens: int = 64  # LTIP-like caption pairs: <image>caption<EOC>, at most 64 tokens
    caption_blocks: bool = True  # also take a text node of block "caption" right after/before the image
    dedup: bool = True  # keep one pair per (image, text): logos and stock photos repeat across pages
    caption: CaptionFilterConfig = field(default_factory=CaptionFilterConfig)  # the text rules of a pair


@dataclass
class VideoConfig:
    fps: float = 1.0  # frames sampled per second of video (paper: 1 FPS)
    num_frames: int = 8  # T (paper: 8)
    size: int = 320  # frames are resized to size × size …
    resize_mode: str = "center_crop"  # … with the images stage's resize: center_crop | pad | keep_ratio
    fill: str = "loop"  # short clips: "loop" repeats the clip, "pad" repeats the last frame
    max_tokens: int = 32  # <image>caption<EOC>, at most 32 tokens
    jpeg_quality: int = 90
    rows_per_unit: int = 64  # table rows per Ray task
    max_video_bytes: int = 200 * 1024 * 1024


@dataclass
class ShardsConfig:
    windows: WindowConfig = field(default_factory=WindowConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    tokenizer: str | None = None  # any Hugging Face tokenizer name or path; None = the shipped default
    shard_max_samples: int | None = 1000
    shard_max_bytes: int | None = None  # e.g. 500_000_000; whichever limit comes first closes a shard


# ---------------------------------------------------------------------------------------------------------
# Shared by every dataset


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name: str | None):
    """One tokenizer per worker process (loading takes ~0.3 s; a unit may be small)."""
    tok = load_tokenizer(name)
    return tok, {"name": tok.m3w_name, "fingerprint": tokenizer_fingerprint(tok)}


def sample_key(*parts: Any) -> str:
    """A webdataset key: no dots or slashes (webdataset splits on the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", "_".join(str(p) for p in parts))


def provenance(doc: dict, node_indices: list[int], window_index: int, **extra: Any) -> dict:
    return {
        "doc_id": doc["doc_id"],
        "url": doc["url"],
        "warc_path": doc.get("warc_path"),
        "warc_record_id": doc.get("warc_record_id"),
        "warc_offset": doc.get("warc_offset"),
        "node_indices": node_indices,
        "window_index": window_index,
        **extra,
    }


def sample_json(dataset: str, ids: list[int], text: str, n_media: int, tok_info: dict, prov: dict,
                media_kind: str = "image", num_frames: int = 1) -> dict:  # fmt: skip
    n_files = n_media * num_frames
    return {
        "schema": spec.SCHEMA_VERSION,
        "dataset": dataset,
        "input_ids": ids,
        "text": text,
        "images": [f"{i}.jpg" for i in range(n_files)],
        "media_kind": media_kind,
        "num_frames": num_frames,
        "tokenizer": tok_info,
        "provenance": prov,
    }


def part_record(key: str, sample: dict, media: list[str]) -> str:
    """One line of a part file: the sample JSON and the blob keys of its media files, in order."""
    return json.dumps({"key": key, "json": sample, "media": media}, ensure_ascii=False) + "\n"


def stored_images(docs: list[dict], store_root: str) -> dict[str, str]:
    """url → blob key (resized sha256) of every image of `docs` that the store holds with status ok and that
    passes the store's image filter thresholds."""
    from m3w.pipeline.image_filters.replay import store_filters
    from m3w.pipeline.imagestore import ImageStore

    urls = sorted({n["url"] for d in docs for n in d["nodes"] if n["kind"] == "image" and n.get("url")})
    rows = ImageStore(store_root).lookup(urls) if urls else {}
    filters = store_filters(store_root)
    return {
        url: row["resized_sha256"]
        for url, row in rows.items()
        if row
        and row.get("status") == STATUS_OK
        and row.get("resized_sha256")
        and (filters is None or filters.verdict(row) is None)
    }


def input_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Parquet files of the given files/directories, sorted (the merge order is the sorted unit order)."""
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            # Not recursive: a filter output dir also holds excluded/ and _cache/ parquet files.
            files.extend(document_files(path))
        elif path.exists():
            files.append(path)
        else:
            raise click.BadParameter(f"{path} does not exist")
    return sorted(set(files))


def unit_id(path: Path) -> str:
    """A readable, unique unit id: the file name plus a hash of the full path (two dirs may share names)."""
    return f"{path.stem}-{stable_hash(str(path.resolve()), 8)}"


# ---------------------------------------------------------------------------------------------------------
# Unit functions (module level: Ray pickles them by reference)


def m3w_unit(args: dict) -> tuple[str, dict[str, int]]:
    """One filtered parquet file → a part file of M3W window samples."""
    config = from_dict(ShardsConfig, args["config"])
    tok, tok_info = cached_tokenizer(config.tokenizer)
    counts: Counter = Counter()
    docs = list(iter_documents(args["input"]))
    image_keys = stored_images(docs, args["store"])
    with atomic_open(args["part"], "w") as out:
        for doc in docs:
            counts["documents"] += 1
            seq = document_sequence(doc["nodes"], image_keys, tok, counts)
            if not seq.images:
                counts["skip.document_without_stored_image"] += 1
                continue
            for window in make_windows(doc["doc_id"], seq, tok, config.windows, counts):
                prov = provenance(doc, window.node_indices, window.index, token_start=window.start)
                sample = sample_json(
                    "m3w", window.ids, decode(tok, window.ids), len(window.images), tok_info, prov
                )
                out.write(part_record(sample_key(doc["doc_id"], window.index), sample, window.images))
                counts["samples"] += 1
                counts["tokens"] += len(window.ids)
                counts["images"] += len(window.images)
    return args["part"], dict(counts)


def pair_ids(tok, text: str, max_tokens: int) -> tuple[list[int], bool]:
    """`<image>text<EOC>` in at most `max_tokens` tokens; True when the text had to be cut."""
    media_id, eoc_id = tok.convert_tokens_to_ids(MEDIA_TOKEN), tok.convert_tokens_to_ids(EOC_TOKEN)
    body = tok(text, add_special_tokens=False)["input_ids"]
    room = max_tokens - 2
    return [media_id, *body[:room], eoc_id], len(body) > room


def adjacent_caption(nodes: list[dict], position: int) -> dict | None:
    """The text node of block "caption" right after (else right before) the image at `position`."""
    for j in (position + 1, position - 1):
        if 0 <= j < len(nodes) and nodes[j]["kind"] == "text" and nodes[j].get("block") == "caption":
            return nodes[j]
    return None


def pairs_unit(args: dict) -> tuple[str, dict[str, int]]:
    """One filtered parquet file → two part files: alt-text pairs and caption pairs."""
    from m3w.pipeline.filters import check_caption_text

    config = from_dict(ShardsConfig, args["config"])
    tok, tok_info = cached_tokenizer(config.tokenizer)
    specials = special_strings(tok)
    counts: Counter = Counter()
    docs = list(iter_documents(args["input"]))
    image_keys = stored_images(docs, args["store"])
    parts = args["parts"]
    with atomic_open(parts["alt_pairs"], "w") as alt_out, atomic_open(parts["caption_pairs"], "w") as cap_out:
        for doc in docs:
            counts["documents"] += 1
            nodes = doc["nodes"]
            for position, node in enumerate(nodes):
                if node["kind"] != "image":
                    continue
                blob = image_keys.get(node.get("url") or "")
                if blob is None:
                    counts["skip.image_not_stored"] += 1
                    continue
                caption_node = None
                caption = node.get("figcaption")
                if not caption and config.pairs.caption_blocks:
                    caption_node = adjacent_caption(nodes, position)
                    caption = caption_node["text"] if caption_node else None
                candidates = [
                    ("alt_pairs", node.get("alt"), config.pairs.alt_max_tokens, alt_out, [node["node_index"]]),
                    ("caption_pairs", caption, config.pairs.caption_max_tokens, cap_out,
                     sorted({node["node_index"], *([caption_node["node_index"]] if caption_node else [])})),
                ]  # fmt: skip
                for dataset, text, max_tokens, out, node_indices in candidates:
                    text = " ".join(sanitize(text or "", specials).split())
                    if not text:
                        counts[f"{dataset}.skip.no_text"] += 1
                        continue
                    keep, reason = check_caption_text(text, config.pairs.caption)
                    if not keep:
                        counts[f"{dataset}.skip.{reason.split(':')[0]}"] += 1  # the rule, not the value
                        continue
                    ids, truncated = pair_ids(tok, text, max_tokens)
                    counts[f"{dataset}.truncated"] += truncated
                    prov = provenance(doc, node_indices, 0, image_url=node["url"])
                    sample = sample_json(dataset, ids, decode(tok, ids), 1, tok_info, prov)
                    out.write(part_record(sample_key(doc["doc_id"], node["node_index"]), sample, [blob]))
                    counts[f"{dataset}.samples"] += 1
                    counts[f"{dataset}.tokens"] += len(ids)
    return json.dumps(parts, sort_keys=True), dict(counts)


# ---------------------------------------------------------------------------------------------------------
# Merge: parts → shards (one process, sorted order, deterministic bytes)


def iter_part_records(part_paths: Iterable[Path]) -> Iterator[dict]:
    for path in part_paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def merge_parts(
    part_paths: list[Path],
    out_dir: Path,
    *,
    dataset: str,
    name: str,
    read_media: Callable[[str], bytes],
    config: ShardsConfig,
    tok_info: dict,
    config_hash: str,
    inputs: list[str],
    failed_units: list[str],
    dedup: bool = False,
    unit_counts: dict[str, int] | None = None,
) -> dict:
    """Write the shards of one dataset from its parts, in the given order, then `shards.json`."""
    counts: Counter = Counter()
    seen_keys: set[str] = set()
    seen_pairs: set[str] = set()
    with ShardWriter(out_dir, name, config.shard_max_samples, config.shard_max_bytes) as writer:
        for record in iter_part_records(part_paths):
            key, sample = record["key"], record["json"]
            if key in seen_keys:  # the same page twice in the inputs (e.g. overlapping input dirs)
                counts["skip.duplicate_key"] += 1
                continue
            seen_keys.add(key)
            if dedup:
                pair = stable_hash([record["media"], sample["text"]])
                if pair in seen_pairs:
                    counts["skip.duplicate_pair"] += 1
                    continue
                seen_pairs.add(pair)
            try:
                media = [read_media(blob) for blob in record["media"]]
            except FileNotFoundError as exc:
                counts["skip.missing_blob"] += 1
                click.echo(f"warning: {key}: {exc}", err=True)
                continue
            files = {"json": json.dumps(sample, sort_keys=True, ensure_ascii=False).encode()}
            files.update(zip(sample["images"], media))
            writer.write(key, files, tokens=len(sample["input_ids"]), images=len(media))
    shards = writer.shards
    remove_stale_shards(out_dir, name, len(shards))
    manifest = {
        "schema": spec.SCHEMA_VERSION,
        "dataset": dataset,
        "tokenizer": tok_info,
        **sample_limits(dataset, config),
        "config_hash": config_hash,
        "config": to_dict(config),
        "inputs": inputs,
        "failed_units": failed_units,
        "shards": [s.to_json() for s in shards],
        "totals": {
            "shards": len(shards),
            "samples": sum(s.samples for s in shards),
            "tokens": sum(s.tokens for s in shards),
            "images": sum(s.images for s in shards),
            "bytes": sum(s.bytes for s in shards),
        },
        "unit_counts": unit_counts or {},
        "merge_counts": dict(sorted(counts.items())),
    }
    with atomic_open(out_dir / spec.SHARD_MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return manifest


def sample_limits(dataset: str, config: ShardsConfig) -> dict[str, int]:
    """L, N and T that bound every sample of `dataset` (written into shards.json for the trainer to check)."""
    if dataset == "m3w":
        return {"seq_len": config.windows.seq_len, "max_media": config.windows.max_images, "num_frames": 1}
    if dataset == "video_pairs":
        return {"seq_len": config.video.max_tokens, "max_media": 1, "num_frames": config.video.num_frames}
    tokens = config.pairs.alt_max_tokens if dataset == "alt_pairs" else config.pairs.caption_max_tokens
    return {"seq_len": tokens, "max_media": 1, "num_frames": 1}


def remove_stale_shards(out_dir: Path, name: str, keep: int) -> None:
    """A re-run that makes fewer shards must not leave old higher-numbered shards behind, nor the temp files
    of a killed merge."""
    pattern = re.compile(rf"^{re.escape(name)}-(\d{{6}})\.tar$")
    for path in out_dir.iterdir():
        match = pattern.match(path.name)
        if (match and int(match.group(1)) >= keep) or path.name.startswith(f".tmp-{name}-"):
            path.unlink()


@functools.lru_cache(maxsize=2)
def image_store(store_root: str):
    from m3w.pipeline.imagestore import ImageStore

    return ImageStore(store_root)


def store_fingerprint(store_root: str | Path) -> str:
    """Changes whenever the image store gains index files, so shards are rebuilt when new images arrive."""
    index = Path(store_root) / "index"
    files = sorted((p.name, p.stat().st_size) for p in index.glob("*.parquet")) if index.is_dir() else []
    return stable_hash(files)


# ---------------------------------------------------------------------------------------------------------
# Video-text pairs


def read_video_table(path: str | Path) -> list[dict]:
    """Rows of (video, caption) from a CSV or JSONL table; `video` is a URL or a local path (relative paths
    are relative to the table). Column aliases: video_url/url/path, text/caption."""
    import csv

    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
    else:
        with open(path, encoding="utf-8") as f:
            raw = [json.loads(line) for line in f if line.strip()]
    rows = []
    for i, row in enumerate(raw):
        video = next((row[k] for k in ("video", "video_url", "url", "path") if row.get(k)), None)
        caption = next((row[k] for k in ("caption", "text") if row.get(k)), None)
        if video is None or caption is None:
            raise ValueError(f"{path}: row {i} needs a video (video/video_url/url/path) and a caption/text")
        if "://" not in video and not Path(video).is_absolute():
            video = str((path.parent / video).resolve())
        rows.append({"row": i, "video": video, "caption": caption})
    return rows


def video_unit(args: dict) -> tuple[str, dict[str, int]]:
    """A slice of the video table → a part file of video-text pairs (frames go to the dataset's blob dir)."""
    from m3w.pipeline.fetch import FetchConfig, safe_fetch
    from m3w.pipeline.video import sample_frames

    config = from_dict(ShardsConfig, args["config"])
    vc = config.video
    tok, tok_info = cached_tokenizer(config.tokenizer)
    specials = special_strings(tok)
    fetch_config = FetchConfig(allow_hosts=list(args["allow_hosts"]), max_bytes=vc.max_video_bytes)
    counts: Counter = Counter()
    with atomic_open(args["part"], "w") as out:
        for row in args["rows"]:
            counts["videos"] += 1
            source: str | bytes = row["video"]
            if "://" in row["video"]:
                fetched = safe_fetch(row["video"], fetch_config)
                if not fetched.ok:
                    counts[f"skip.fetch_{fetched.status}"] += 1
                    continue
                source = fetched.content
            elif not Path(source).is_file():
                counts["skip.missing_file"] += 1
                continue
            try:
                frames = sample_frames(source, num_frames=vc.num_frames, fps=vc.fps, size=vc.size,
                                       fill=vc.fill, resize_mode=vc.resize_mode, quality=vc.jpeg_quality)  # fmt: skip
            except ValueError:
                counts["skip.decode_error"] += 1
                continue
            text = " ".join(sanitize(row["caption"], specials).split())
            if not text:
                counts["skip.no_text"] += 1
                continue
            ids, truncated = pair_ids(tok, text, vc.max_tokens)
            counts["truncated"] += truncated
            counts[f"fill.{frames.fill}"] += 1
            # Frames live in a store of their own (same layout as images/), so the merge reads them alike.
            blobs = [image_store(args["frames_dir"]).write_blob(jpeg) for jpeg in frames.jpegs]
            video_id = stable_hash([row["video"], row["caption"]], 20)
            prov = {
                "doc_id": video_id,
                "url": row["video"],
                "table_row": row["row"],
                "node_indices": [],
                "window_index": 0,
                "frame_times": frames.timestamps,
                "distinct_frames": frames.distinct,
                "fill": frames.fill,
                "duration": frames.duration,
            }
            sample = sample_json("video_pairs", ids, decode(tok, ids), 1, tok_info, prov,
                                 media_kind="video", num_frames=vc.num_frames)  # fmt: skip
            out.write(part_record(sample_key("v", video_id), sample, blobs))
            counts["samples"] += 1
            counts["tokens"] += len(ids)
    return args["part"], dict(counts)


# ---------------------------------------------------------------------------------------------------------
# Drivers: units → parts → merged shards


@dataclass
class DatasetPlan:
    """One output dataset of a run: where its parts go and how its media are read back at merge time."""

    dataset: str
    name: str
    read_media: Callable[[str], bytes]
    dedup: bool = False


def run_stage(
    stage: str,
    fn: Callable[[dict], tuple[str, dict[str, int]]],
    units: list[tuple[str, dict]],
    plans: list[DatasetPlan],
    out: Path,
    config: ShardsConfig,
    config_hash: str,
    *,
    workers: int | None,
    ray_address: str | None,
    rate_key: str = "documents",
) -> dict[str, dict]:
    """Run the units (each writes one part per dataset in `plans`), then merge each dataset's parts."""
    _, tok_info = cached_tokenizer(config.tokenizer)
    manifest = Manifest(out / plans[0].dataset, stage, config_hash)

    def part(plan: DatasetPlan, uid: str) -> Path:
        return out / plan.dataset / PARTS_DIR / f"{uid}.jsonl"

    for plan in plans:
        (out / plan.dataset / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    ray_units = []
    for uid, args in units:
        args = dict(args, config=to_dict(config))
        parts = {plan.dataset: str(part(plan, uid)) for plan in plans}
        if len(plans) == 1:
            args["part"] = parts[plans[0].dataset]
        else:
            args["parts"] = parts
        ray_units.append(Unit(uid, args))
    summary = run_units(fn, ray_units, manifest, workers=workers, ray_address=ray_address,
                        desc=f"shards {stage}", rate_key=rate_key)  # fmt: skip
    done = manifest.done_units(config_hash)
    unit_ids = [uid for uid, _ in units]  # already in sorted input order
    failed = [uid for uid in unit_ids if uid not in done]
    entries = manifest.entries()
    unit_counts: Counter = Counter()
    for uid in unit_ids:
        if uid in done:
            unit_counts.update(entries[uid]["counts"])
    results = {}
    for plan in plans:
        results[plan.dataset] = merge_parts(
            [part(plan, uid) for uid in unit_ids if uid in done],
            out / plan.dataset,
            dataset=plan.dataset,
            name=plan.name,
            read_media=plan.read_media,
            config=config,
            tok_info=tok_info,
            config_hash=config_hash,
            inputs=[uid for uid in unit_ids if uid in done],
            failed_units=failed,
            dedup=plan.dedup,
            unit_counts=dict(sorted(unit_counts.items())),
        )
        results[plan.dataset]["unit_failures"] = {u: summary.failures[u][:500] for u in summary.failures}
    return results


def _document_units(inputs: Iterable[str | Path], store: str | Path) -> list[tuple[str, dict]]:
    files = input_files(inputs)
    if not files:
        raise UserError("no parquet input files found")
    return [(unit_id(f), {"input": str(f), "store": str(store)}) for f in files]


UNIT_SETTINGS = {"m3w": "windows", "pairs": "pairs", "video": "video"}


def _hash(config: ShardsConfig, kind: str, *extra: Any) -> str:
    """The units' config hash: only the settings their parts depend on. Shard sizes only change the merge, so
    re-sharding with another size re-merges without re-tokenising anything."""
    _, tok_info = cached_tokenizer(config.tokenizer)
    settings = to_dict(getattr(config, UNIT_SETTINGS[kind]))
    return stable_hash({"kind": kind, "settings": settings, "tokenizer": tok_info, "extra": extra})


def run_m3w_shards(
    inputs: Iterable[str | Path],
    store: str | Path,
    out: str | Path,
    config: ShardsConfig | None = None,
    *,
    name: str = "m3w",
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict:
    """filtered/ parquet + image store → `out/m3w/<name>-NNNNNN.tar` + `shards.json`. Returns the manifest."""
    config = config or ShardsConfig()
    out = Path(out)
    plan = DatasetPlan("m3w", name, functools.partial(_read_store_blob, str(store)))
    config_hash = _hash(config, "m3w", store_fingerprint(store))
    return run_stage("m3w", m3w_unit, _document_units(inputs, store), [plan], out, config, config_hash,
                     workers=workers, ray_address=ray_address)["m3w"]  # fmt: skip


def run_pair_shards(
    inputs: Iterable[str | Path],
    store: str | Path,
    out: str | Path,
    config: ShardsConfig | None = None,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, dict]:
    """filtered/ + image store → `out/alt_pairs/` and `out/caption_pairs/` shard sets."""
    config = config or ShardsConfig()
    read = functools.partial(_read_store_blob, str(store))
    plans = [DatasetPlan(d, d, read, config.pairs.dedup) for d in ("alt_pairs", "caption_pairs")]
    config_hash = _hash(config, "pairs", store_fingerprint(store))
    return run_stage("pairs", pairs_unit, _document_units(inputs, store), plans, Path(out), config,
                     config_hash, workers=workers, ray_address=ray_address)  # fmt: skip


def run_video_shards(
    table: str | Path,
    out: str | Path,
    config: ShardsConfig | None = None,
    *,
    allow_hosts: Sequence[str] = (),
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict:
    """A (video, caption) table → `out/video_pairs/` shards of T-frame samples."""
    config = config or ShardsConfig()
    out = Path(out)
    rows = read_video_table(table)
    frames_dir = out / "video_pairs" / "_frames"
    step = config.video.rows_per_unit
    units = [
        (f"rows-{i:08d}-{stable_hash(rows[i : i + step], 8)}",
         {"rows": rows[i : i + step], "frames_dir": str(frames_dir), "allow_hosts": list(allow_hosts)})
        for i in range(0, len(rows), step)
    ]  # fmt: skip
    plan = DatasetPlan("video_pairs", "video_pairs", functools.partial(_read_store_blob, str(frames_dir)))
    config_hash = _hash(config, "video")
    return run_stage("video", video_unit, units, [plan], out, config, config_hash,
                     workers=workers, ray_address=ray_address, rate_key="videos")["video_pairs"]  # fmt: skip


def _read_store_blob(store_root: str, blob: str) -> bytes:
    return image_store(store_root).read_blob(blob)


# ---------------------------------------------------------------------------------------------------------
# CLI


def _shards_options(fn):
    """--out, --tokenizer and the shared stage options; the command receives `config` with the tokenizer set."""

    @functools.wraps(fn)
    def wrapper(*args, config: ShardsConfig, tokenizer: str | None, **kwargs):
        if tokenizer:
            config.tokenizer = tokenizer
        return fn(*args, config=config, **kwargs)

    wrapper = stage_options(ShardsConfig, set_help="Override one config value, e.g. windows.seq_len=512.")(
        wrapper
    )
    wrapper = click.option("--tokenizer", default=None, help="Hugging Face tokenizer name or path.")(wrapper)
    return click.option("--out", required=True, type=OutputDir(), help="Output root (one dir per dataset).")(
        wrapper
    )


def _report(*results: dict) -> None:
    """One line per dataset; failed units are listed and make the exit status 1 (their shards are written
    without them; a re-run retries them)."""
    failed = {}
    for result in results:
        totals = result["totals"]
        click.echo(
            f"{result['dataset']}: {totals['samples']} samples, {totals['tokens']} tokens, {totals['images']} "
            f"media files in {totals['shards']} shards ({totals['bytes'] / 1e6:.1f} MB)"
        )
        failed.update(result["unit_failures"])
    for unit, error in failed.items():
        click.echo(f"failed unit {unit}: {error.splitlines()[0]}", err=True)
    if failed:
        raise SystemExit(1)


@click.group("shards")
def shards_group() -> None:
    """Make WebDataset shards: M3W windows, image-text pairs, video-text pairs."""


@shards_group.command("m3w")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--images", "store", required=True, type=click.Path(exists=True), help="Image store dir.")
@click.option("--name", default="m3w", show_default=True, help="Shard file name prefix.")
@_shards_options
def m3w_cmd(inputs, store, name, config, workers, ray_address, out) -> None:
    """Filtered documents (INPUTS: parquet files or dirs) → M3W token-window shards in OUT/m3w/."""
    _report(run_m3w_shards(inputs, store, out, config, name=name, workers=workers, ray_address=ray_address))


@shards_group.command("pairs")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--images", "store", required=True, type=click.Path(exists=True), help="Image store dir.")
@_shards_options
def pairs_cmd(inputs, store, config, workers, ray_address, out) -> None:
    """Filtered documents → alt-text pairs (OUT/alt_pairs/) and caption pairs (OUT/caption_pairs/)."""
    _report(*run_pair_shards(inputs, store, out, config, workers=workers, ray_address=ray_address).values())


@shards_group.command("video")
@click.argument("table", type=click.Path(exists=True))
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="IP[:PORT]|CIDR[:PORT]",
    help="Admit video URLs on this private address (repeatable), e.g. 127.0.0.1:8000.",
)
@_shards_options
def video_cmd(table, allow_hosts, config, workers, ray_address, out) -> None:
    """A CSV/JSONL table of (video URL or path, caption) → video-text pair shards in OUT/video_pairs/."""
    try:
        result = run_video_shards(table, out, config, allow_hosts=allow_hosts, workers=workers,
                                  ray_address=ray_address)  # fmt: skip
    except ValueError as exc:  # a malformed table: say which row, no traceback
        raise UserError(str(exc)) from exc
    _report(result)
