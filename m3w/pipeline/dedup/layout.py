"""Where each dedup phase writes, and how many tasks each runs: decided once per run from the corpus size."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from m3w.pipeline.dedup.keys import EXACT_RULES, Rule, group_partition
from m3w.pipeline.filters.config import DedupConfig
from m3w.pipeline.io import join
from m3w.schemas.filter_cache import write_parts


@dataclass(frozen=True)
class SignalsUnit:
    """One unit as dedup sees it: its cached signals and how many key rows each rule gets from it."""

    name: str
    signals: str  # URL of the signals file
    documents: int
    band_rows: int = 0  # MinHash band keys (bands × documents with text)
    image_rows: int = 0  # image nodes with a URL
    paragraph_rows: int = 0  # text nodes


# The keys each map task writes, one partitioned file per kind: the exact rules by name, then these.
BANDS, IMAGES, PARAGRAPHS = "bands", "images", "paragraphs"
_TAGS = {"dedup.same_url": "url", "dedup.exact_text": "text", "dedup.same_image_set": "imageset"}


@dataclass(frozen=True)
class Layout:
    """The shape of one dedup run: its directory, reduce partitions per key kind, and unit groups (runs of
    consecutive units of at most `group_documents` documents, the unit of the per-document phases)."""

    directory: str
    units: int
    exact: tuple[str, ...]  # the enabled exact rules, in order of application
    partitions: dict[str, int]  # key kind (exact rule name, "bands", "images", "paragraphs") → reduce tasks
    group_starts: tuple[int, ...]  # first unit ordinal of each group
    config: DedupConfig = field(default_factory=DedupConfig)

    @property
    def groups(self) -> int:
        return len(self.group_starts)

    @property
    def starts(self) -> np.ndarray:
        return np.asarray(self.group_starts, dtype=np.int64)

    def group_units(self, group: int) -> range:
        end = self.group_starts[group + 1] if group + 1 < self.groups else self.units
        return range(self.group_starts[group], end)

    def exact_rule(self, name: str) -> Rule:
        return next(r for r in EXACT_RULES if r.name == name)

    def later(self, name: str) -> tuple[str, ...]:
        """The enabled exact rules applied after `name`."""
        return self.exact[self.exact.index(name) + 1 :]

    # paths ------------------------------------------------------------------------------------------------

    def path(self, phase: str, name: str) -> str:
        return join(self.directory, phase, name)

    def map_file(self, ordinal: int, kind: str) -> str:
        return self.path("map", f"{ordinal:07d}.{_TAGS.get(kind, kind)}.parts")

    def map_files(self, kind: str) -> list[str]:
        return [self.map_file(u, kind) for u in range(self.units)]

    def reduce_file(self, kind: str, partition: int, output: str) -> str:
        return self.path(_TAGS.get(kind, kind), f"{partition:05d}.{output}.parts")

    def reduce_files(self, kind: str, output: str) -> list[str]:
        return [self.reduce_file(kind, k, output) for k in range(self.partitions[kind])]

    def forward_file(self, source: str, partition: int, target: str) -> str:
        """Documents the exact rule `source` (partition `partition`) dropped, sent on to the rule `target`."""
        return self.reduce_file(source, partition, f"to-{_TAGS[target]}")

    def group_file(self, phase: str, group: int, output: str = "out") -> str:
        return self.path(phase, f"{group:05d}.{output}.parts")

    def drops_file(self, unit: str) -> str:
        return self.path("drops", f"{unit}.parquet")

    def write_by_group(self, url: str, table: pa.Table, gid: np.ndarray) -> int:
        """Write `table` partitioned by the unit group of the document `gid` of each row. Returns bytes written."""
        return write_parts(url, table, group_partition(gid, self.starts), self.groups)


def partitions_for(rows: int, config: DedupConfig) -> int:
    """Reduce tasks for a key kind of `rows` rows: `num_partitions` when set, else one per `reducer_rows`."""
    if config.num_partitions > 0:
        return config.num_partitions
    return max(1, math.ceil(rows / config.reducer_rows))


def unit_groups(documents: list[int], limit: int) -> tuple[int, ...]:
    """Start ordinals of runs of consecutive units holding at most `limit` documents (a larger unit alone)."""
    starts, size = [], 0
    for ordinal, n in enumerate(documents):
        if not starts or size + n > limit:
            starts.append(ordinal)
            size = 0
        size += n
    return tuple(starts) or (0,)


def plan_layout(directory: str, units: list[SignalsUnit], config: DedupConfig) -> Layout:
    exact = tuple(
        rule.name
        for rule, enabled in zip(EXACT_RULES, (config.same_url, config.exact_text, config.same_image_set))
        if enabled
    )
    documents = sum(u.documents for u in units)
    rows = {name: documents for name in exact}
    rows[BANDS] = sum(u.band_rows for u in units) if config.near_duplicates else 0
    rows[IMAGES] = sum(u.image_rows for u in units)
    rows[PARAGRAPHS] = sum(u.paragraph_rows for u in units)
    return Layout(
        directory=directory,
        units=len(units),
        exact=exact,
        partitions={kind: partitions_for(n, config) for kind, n in rows.items()},
        group_starts=unit_groups([u.documents for u in units], config.group_documents),
        config=config,
    )
