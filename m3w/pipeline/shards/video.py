"""Video-text pairs: a table of (video URL or path, caption) → T-frame samples, one unit per slice of rows."""

from __future__ import annotations

import csv
import io as text_io
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from m3w.errors import FormatError
from m3w.pipeline import io
from m3w.pipeline.io import stable_hash
from m3w.pipeline.shards.config import ShardsConfig
from m3w.pipeline.shards.interleaved import units_hash
from m3w.pipeline.shards.samples import cached_tokenizer, pair_ids, sample_json, sample_key
from m3w.pipeline.shards.writing import Dataset, open_datasets, run_stage, unit_config
from m3w.pipeline.windows import decode, sanitize, special_strings


def read_video_table(path: str | Path) -> list[dict]:
    """Rows of (video, caption) from a CSV or JSONL table (local or URL); `video` is a URL or a local path
    (relative paths are relative to a local table). Column aliases: video_url/url/path, text/caption. A table
    that is neither is a FormatError naming the line or row."""
    path = str(path)
    try:
        text = io.read_text(path)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not a CSV or JSON-lines table (not UTF-8 text)") from exc
    if path.endswith(".csv"):
        raw = list(csv.DictReader(text_io.StringIO(text, newline="")))
    else:
        raw = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except ValueError as exc:
                raise FormatError(
                    f"{path}, line {number}: not JSON ({exc}); a table is .csv or JSON lines"
                ) from exc
    rows = []
    for i, row in enumerate(raw):
        if not isinstance(row, dict):
            raise FormatError(f"{path}: row {i} is not a JSON object")
        video = next((row[k] for k in ("video", "video_url", "url", "path") if row.get(k)), None)
        caption = next((row[k] for k in ("caption", "text") if row.get(k)), None)
        if video is None or caption is None:
            raise FormatError(f"{path}: row {i} needs a video (video/video_url/url/path) and a caption/text")
        if "://" not in video and not Path(video).is_absolute() and not io.is_remote(path):
            video = str((Path(path).parent / video).resolve())
        rows.append({"row": i, "video": video, "caption": caption})
    return rows


def video_unit(args: dict) -> tuple[dict[str, list], dict[str, int]]:
    """A slice of the video table → video-text pair shards (frames written straight into the samples)."""
    from m3w.pipeline.fetch import FetchConfig, safe_fetch
    from m3w.pipeline.video import sample_frames

    config = unit_config(args)
    vc = config.video
    tok, tok_info = cached_tokenizer(config.tokenizer)
    specials = special_strings(tok)
    fetch_config = FetchConfig(allow_hosts=list(args["allow_hosts"]), max_bytes=vc.max_video_bytes)
    counts: Counter = Counter()
    (out,) = open_datasets(args, counts).values()
    with out:
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
            if out.add(sample_key("v", video_id), sample, list(frames.jpegs)):
                counts["samples"] += 1
                counts["tokens"] += len(ids)
    return {"video_pairs": out.shards()}, dict(counts)


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
    rows = read_video_table(io.absolute(table))
    step = config.video.rows_per_unit
    units = [
        (f"rows-{i:08d}-{stable_hash(rows[i : i + step], 8)}", {"rows": rows[i : i + step], "allow_hosts": list(allow_hosts)})
        for i in range(0, len(rows), step)
    ]  # fmt: skip
    config_hash = units_hash(config, "video", "video_pairs")
    return run_stage("video", video_unit, units, [Dataset("video_pairs", "video_pairs")], io.absolute(out),
                     config, config_hash, workers=workers, ray_address=ray_address, rate_key="videos")["video_pairs"]  # fmt: skip
