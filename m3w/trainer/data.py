"""Shard streams for training: one infinite, seeded, resumable stream of collated batches per dataset.

Per DataLoader worker, one stream is, epoch after epoch:

    shard list (permutation or draw with replacement, seeded by (seed, epoch))
      → split by node (rank) and worker (by shard, or by sample when there are fewer shards than readers)
      → tar samples (webdataset)  → sample shuffle buffer (seeded by (seed, epoch, rank, worker))
      → skip the samples a resumed run already consumed  → decode JPEGs, cut to seq_len / max_media
      → collate batches of `batch_size`

Every batch carries the worker's cursor (epoch, raw samples read in that epoch). The main process keeps the
cursor of each worker's last *consumed* batch, so a checkpoint names exactly where every worker stands, and a
resumed stream re-reads (without decoding) only the current epoch up to the cursor. DataLoader hands out
batches round-robin over workers; a resumed loader rotates worker identities so the worker that was next
is asked first.

Labels (what the model is trained to predict, after its internal shift):
  * text tokens and `<EOC>` are targets: `<EOC>` ends every chunk and document, so predicting it teaches the
    model when a caption/answer is finished (as in the paper);
  * `<image>` is not a target: where an image stands is given by the data, and predicting it would spend
    capacity guessing image positions (and push the generator to emit images it cannot produce);
  * padding is not a target (it is not content).
"""

from __future__ import annotations

import io
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from m3w.errors import UserError
from m3w.model.loss import IGNORE_INDEX
from m3w.schemas import shards as spec
from m3w.trainer.config import DatasetConfig


class TokenizerMismatchError(UserError, ValueError):
    """The shards were tokenized with a different tokenizer than the model's: token ids would mean other words."""


class ShardLimitsMismatchError(UserError, ValueError):
    """The config asks for another window length, image cap or frame count than the shards were cut to."""


class BadSample(Exception):
    """A sample that cannot be used; the stream skips it and counts `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------
# The shard-set manifest


@dataclass
class ShardSet:
    """What `shards.json` says about one dataset directory."""

    dataset: str
    urls: list[str]
    samples_per_shard: list[int]
    tokenizer: dict[str, str]
    seq_len: int  # L: tokens per sample at most
    max_media: int  # N: media items per sample at most
    num_frames: int  # T: frames per media item

    @property
    def num_samples(self) -> int:
        return sum(self.samples_per_shard)


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def read_shard_set(path: str) -> ShardSet:
    """Read `<path>/shards.json` (local folder or fsspec URL) and list its non-empty shards."""
    manifest = spec.read_shard_manifest(path)
    shards = [s for s in manifest["shards"] if s.get("samples", 0) > 0]
    if not shards:
        raise UserError(f"{join_url(path, spec.SHARD_MANIFEST)}: lists no shard with samples")
    return ShardSet(
        dataset=manifest.get("dataset", ""),
        urls=spec.shard_urls(path, manifest),
        samples_per_shard=[int(s["samples"]) for s in shards],
        tokenizer=manifest.get("tokenizer") or {},
        **{k: manifest[k] for k in spec.SAMPLE_LIMITS},
    )


def sample_limits(name: str, cfg: DatasetConfig, shard_set: ShardSet) -> dict[str, int]:
    """L, N and T of a stream: the shard set's (shards.json); a value set in the config must be the same, since
    samples cut to other limits would train on other windows than the ones the config names."""
    limits = {}
    for key in spec.SAMPLE_LIMITS:
        wanted, made = getattr(cfg, key), getattr(shard_set, key)
        if wanted is not None and wanted != made:
            raise ShardLimitsMismatchError(
                f"datasets.{name}.{key} is {wanted}, but the shards at {cfg.path} were made with {key} {made} "
                f"(shards.json): leave datasets.{name}.{key} unset to use it, or re-run `m3w shards` with {wanted}"
            )
        limits[key] = made
    return limits


def check_shard_sets(datasets: dict[str, DatasetConfig]) -> None:
    """Every stream's shards.json read and its limits checked against the config: before a model is built."""
    for name, cfg in datasets.items():
        sample_limits(name, cfg, read_shard_set(cfg.path))


def check_tokenizer(found: dict[str, str] | None, expected_fingerprint: str, where: str) -> None:
    if not found or found.get("fingerprint") != expected_fingerprint:
        found = found or {}
        raise TokenizerMismatchError(
            f"{where} was tokenized with tokenizer {found.get('name')!r} (fingerprint "
            f"{found.get('fingerprint')!r}), but the model's tokenizer has fingerprint {expected_fingerprint!r}. "
            "Re-run `m3w shards` with the model's tokenizer, or train a model with the shards' tokenizer."
        )


# ---------------------------------------------------------------------------------------------------------
# Decoding and collation (run in DataLoader workers)


@dataclass(frozen=True)
class Preprocess:
    """Everything a worker needs to turn raw tar samples into model inputs."""

    size: int  # vision encoder input size (square)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    media_token_id: int
    pad_token_id: int
    fingerprint: str
    seq_len: int
    max_media: int
    num_frames: int


def decode_image(data: bytes, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """JPEG/PNG bytes → normalised float32 [C, size, size]."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger than needed (fast)
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return ((arr - mean) / std).transpose(2, 0, 1)


def cut_to_limits(ids: list[int], media_token_id: int, seq_len: int, max_media: int) -> list[int]:
    """Cut a window to `seq_len` tokens and before its (max_media+1)-th `<image>`; media follow the tokens."""
    ids = ids[:seq_len]
    positions = [i for i, t in enumerate(ids) if t == media_token_id]
    if len(positions) > max_media:
        ids = ids[: positions[max_media]]
    return ids


def decode_sample(sample: dict[str, Any], pre: Preprocess) -> dict[str, Any]:
    """Raw tar sample → {"key", "input_ids": list[int], "images": float32 [N, T, C, H, W]}; BadSample if unusable."""
    if "json" not in sample:
        raise BadSample("missing_json", sample.get("__key__", ""))
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("bad_json", str(exc)) from exc
    # A tokenizer mismatch is a configuration error, not bad data: it must stop the run, not be skipped.
    check_tokenizer(
        meta.get("tokenizer"), pre.fingerprint, f"sample {sample.get('__key__')} of {sample.get('__url__')}"
    )
    ids = meta.get("input_ids")
    keys = meta.get("images") or []
    frames = int(meta.get("num_frames") or 1)
    if not isinstance(ids, list) or not ids:
        raise BadSample("no_tokens", sample.get("__key__", ""))
    if frames < 1 or len(keys) % frames:
        raise BadSample("bad_media_list", f"{len(keys)} files for {frames} frames per item")
    n_items = len(keys) // frames
    if sum(t == pre.media_token_id for t in ids) != n_items:
        raise BadSample("media_count_mismatch", sample.get("__key__", ""))
    ids = cut_to_limits(ids, pre.media_token_id, pre.seq_len, pre.max_media)
    n_keep = sum(t == pre.media_token_id for t in ids)
    # T frames per item, sampled evenly from the item's frames (repeats frames of shorter clips)
    frame_idx = np.linspace(0, frames - 1, pre.num_frames).round().astype(int)
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    images = np.zeros((n_keep, pre.num_frames, 3, pre.size, pre.size), dtype=np.float32)
    for item in range(n_keep):
        for t, f in enumerate(frame_idx):
            key = keys[item * frames + f]
            if key not in sample:
                raise BadSample("missing_image", f"{sample.get('__key__')}.{key}")
            try:
                images[item, t] = decode_image(sample[key], pre.size, mean, std)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise BadSample("corrupt_image", f"{sample.get('__key__')}.{key}: {exc}") from exc
    return {"key": sample.get("__key__", ""), "input_ids": ids, "images": images}


def collate(samples: list[dict[str, Any]], pre: Preprocess) -> dict[str, torch.Tensor | None]:
    """Pad a list of decoded samples into model inputs (right padding to the longest row)."""
    length = max(len(s["input_ids"]) for s in samples)
    n_media = max(len(s["images"]) for s in samples)
    input_ids = torch.full((len(samples), length), pre.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        input_ids[row, : len(s["input_ids"])] = torch.tensor(s["input_ids"], dtype=torch.long)
        attention_mask[row, : len(s["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels = labels.masked_fill(input_ids == pre.media_token_id, IGNORE_INDEX)
    batch: dict[str, torch.Tensor | None] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "images": None,
        "media_mask": None,
    }
    if n_media:
        images = torch.zeros((len(samples), n_media, pre.num_frames, 3, pre.size, pre.size))
        media_mask = torch.zeros((len(samples), n_media), dtype=torch.bool)
        for row, s in enumerate(samples):
            n = len(s["images"])
            images[row, :n] = torch.from_numpy(s["images"])
            media_mask[row, :n] = True
        batch["images"], batch["media_mask"] = images, media_mask
    return batch


# ---------------------------------------------------------------------------------------------------------
# The per-worker stream


def open_urls(urls: list[str], opened: list[str], on_error) -> Iterator[dict[str, Any]]:
    """Open local paths or any fsspec URL (s3://, gs://, http(s)://) as the byte streams webdataset expands.

    `opened` gets each URL as it is opened, so error handlers know which shard a tar error belongs to."""
    for url in urls:
        opened.append(url)
        try:
            yield {"url": url, "stream": fsspec.open(url, "rb").open()}
        except Exception as exc:  # noqa: BLE001 - an unreadable shard is skipped and counted, like a bad sample
            on_error(exc)


def _rng(*parts: Any) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))  # str seeds are hashed with sha512: any process


@dataclass
class StreamSpec:
    """A picklable description of one dataset stream, shipped to each DataLoader worker."""

    name: str
    shard_set: ShardSet
    cfg: DatasetConfig
    pre: Preprocess
    seed: int
    rank: int = 0
    world_size: int = 1
    cursors: dict[int, tuple[int, int]] = field(default_factory=dict)  # logical worker → (epoch, offset)
    rotation: int = 0  # logical worker = (physical + rotation) % num_workers


class ShardStream(IterableDataset):
    """Infinite stream of collated batches of one dataset (see the module docstring)."""

    def __init__(self, spec_: StreamSpec) -> None:
        super().__init__()
        self.spec = spec_

    def shards_for_epoch(self, epoch: int, reader: int, readers: int) -> tuple[list[str], int, int]:
        """(urls this reader opens, sample stride, sample offset) for one epoch."""
        s, urls = self.spec, list(self.spec.shard_set.urls)
        if s.cfg.resampled:
            rng = _rng(s.seed, s.name, "resample", epoch, reader)
            return [rng.choice(urls) for _ in range(max(1, len(urls) // readers))], 1, 0
        if s.cfg.shard_shuffle:
            _rng(s.seed, s.name, "shards", epoch).shuffle(urls)  # the same permutation on every reader
        if len(urls) >= readers:
            return urls[reader::readers], 1, 0
        return urls, readers, reader  # fewer shards than readers: every reader keeps every readers-th sample

    def raw_epoch(self, epoch: int, reader: int, readers: int, skipped: Counter) -> Iterator[dict[str, Any]]:
        """Shuffled raw samples of one epoch for this reader; unreadable shards/tar members are counted."""
        urls, stride, offset = self.shards_for_epoch(epoch, reader, readers)
        opened: list[str] = []
        bad: set[str] = set()

        def on_error(exc: Exception) -> bool:
            if opened and opened[-1] not in bad:  # a truncated tar raises at its member and again at its end
                bad.add(opened[-1])
                skipped["bad_shard"] += 1
            return True  # skip and go on with the next member/shard

        files = tar_file_expander(open_urls(urls, opened, on_error), handler=on_error)
        samples: Iterator[dict[str, Any]] = group_by_keys(files, handler=on_error)
        if stride > 1:
            samples = (x for i, x in enumerate(samples) if i % stride == offset)
        if self.spec.cfg.shuffle_buffer > 1:
            rng = _rng(self.spec.seed, self.spec.name, "samples", epoch, reader)
            buf = self.spec.cfg.shuffle_buffer
            samples = _shuffle(samples, bufsize=buf, initial=buf, rng=rng)
        return samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.spec
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (physical + s.rotation) % num_workers
        reader, readers = s.rank * num_workers + worker, s.world_size * num_workers
        epoch, start = s.cursors.get(worker, (0, 0))
        skipped: Counter = Counter()
        pending: list[dict[str, Any]] = []
        while True:
            read = 0
            for raw in self.raw_epoch(epoch, reader, readers, skipped):
                read += 1
                if read <= start:  # consumed before the checkpoint: re-read, not decoded
                    continue
                try:
                    pending.append(decode_sample(raw, s.pre))
                except BadSample as exc:
                    skipped[exc.reason] += 1
                if len(pending) == s.cfg.batch_size:
                    batch = collate(pending, s.pre)
                    batch["meta"] = {
                        "worker": worker,
                        "cursor": (epoch, read),
                        "skipped": dict(skipped),
                        "keys": [x["key"] for x in pending],
                    }
                    yield batch
                    pending = []
                    skipped.clear()  # not a new Counter: the tar error handler holds this one
            if read == 0:
                raise RuntimeError(
                    f"dataset {s.name!r}: reader {reader}/{readers} found no readable samples in epoch {epoch} "
                    f"(shards: {s.shard_set.urls[:3]}...); skipped so far: {dict(skipped)}"
                )
            # a partial batch carries over into the next epoch: resuming from any earlier cursor re-reads the
            # remainder and carries it over the same way, so the data order stays exact
            epoch, start = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------
# The main-process handle


class DatasetStream:
    """One dataset's DataLoader plus the bookkeeping a checkpoint needs: where every worker stands."""

    def __init__(self, spec_: StreamSpec, device: torch.device, state: dict[str, Any] | None = None) -> None:
        self.name = spec_.name
        self.cfg = spec_.cfg
        self.epoch_size = spec_.shard_set.num_samples
        self.num_workers = spec_.cfg.num_workers
        self.world_size = spec_.world_size
        self.batches = 0  # consumed since the run started (across resumes)
        self.samples = 0
        self.skipped: Counter = Counter()
        self.cursors: dict[int, tuple[int, int]] = {}
        self.wait_s = 0.0
        self.last_keys: list[str] = []  # sample keys of the last batch (debugging, tests)
        if state:
            self.load_state(state)
        spec_.cursors = dict(self.cursors)
        spec_.rotation = self.batches % max(1, self.num_workers)
        self.device = device
        self.loader = DataLoader(
            ShardStream(spec_),
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=spec_.cfg.prefetch_factor if self.num_workers else None,
            pin_memory=device.type == "cuda",
            # workers seed themselves from (seed, epoch, rank, worker); a private generator keeps the
            # DataLoader from drawing on the global torch RNG, which the checkpoint restores exactly
            generator=torch.Generator().manual_seed(spec_.seed),
        )
        self._it = iter(self.loader)

    def load_state(self, state: dict[str, Any]) -> None:
        if state["num_workers"] != self.num_workers or state["world_size"] != self.world_size:
            raise ValueError(
                f"dataset {self.name!r}: checkpoint was taken with {state['world_size']} processes x "
                f"{state['num_workers']} workers, now {self.world_size} x {self.num_workers}; the data order "
                "can only resume exactly with the same layout"
            )
        self.batches, self.samples = state["batches"], state["samples"]
        self.skipped = Counter(state["skipped"])
        self.cursors = {int(w): (int(e), int(o)) for w, (e, o) in state["cursors"].items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "skipped": dict(self.skipped),
            "cursors": {int(w): [e, o] for w, (e, o) in self.cursors.items()},
            "num_workers": self.num_workers,
            "world_size": self.world_size,
        }

    @property
    def epochs(self) -> float:
        """Epochs of the whole shard set consumed by all processes together."""
        return self.samples * self.world_size / max(1, self.epoch_size)

    def next_batch(self) -> dict[str, Any]:
        """The next batch on the device; the time spent waiting for it is added to `wait_s`."""
        start = time.perf_counter()
        batch = next(self._it)
        self.wait_s += time.perf_counter() - start
        meta = batch.pop("meta")
        self.cursors[meta["worker"]] = tuple(meta["cursor"])
        self.skipped.update(meta["skipped"])
        self.last_keys = meta["keys"]
        self.batches += 1
        self.samples += batch["input_ids"].shape[0]
        non_blocking = self.device.type == "cuda"
        return {
            k: v.to(self.device, non_blocking=non_blocking) if v is not None else None
            for k, v in batch.items()
        }


def build_streams(
    datasets: dict[str, DatasetConfig],
    image_config: dict[str, Any],
    tokenizer,
    fingerprint: str,
    media_token_id: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    states: dict[str, dict[str, Any]] | None = None,
) -> dict[str, DatasetStream]:
    """One DatasetStream per dataset; refuses shards made with another tokenizer before any worker starts."""
    streams = {}
    for name, cfg in datasets.items():
        shard_set = read_shard_set(cfg.path)
        check_tokenizer(shard_set.tokenizer, fingerprint, f"shard set {cfg.path}")
        limits = sample_limits(name, cfg, shard_set)
        pre = Preprocess(
            size=int(image_config["size"]),
            mean=tuple(image_config["mean"]),
            std=tuple(image_config["std"]),
            media_token_id=media_token_id,
            pad_token_id=tokenizer.pad_token_id,
            fingerprint=fingerprint,
            **limits,
        )
        spec_ = StreamSpec(name, shard_set, cfg, pre, seed, rank, world_size)
        streams[name] = DatasetStream(spec_, device or torch.device("cpu"), (states or {}).get(name))
    return streams
