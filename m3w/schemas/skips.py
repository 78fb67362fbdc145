"""The per-record skip log of `m3w extract`: `_skips/<unit>.parquet` beside the unit's documents file.

Every response record of a WARC ends as a document or as one row here, with the reason (`not_html`,
`http_status`, `bad_content_length`, `empty`, ...); so does every damaged stretch of a WARC that hid its records
(a corrupt gzip member, garbage between members), as a row without a record type. The counts per reason are the
`skip.<reason>` counts of the unit's manifest entry. `m3w stats --skips DIR` lists the rows.

A unit's log is written next to its documents, both renamed into place before the manifest marks the unit done,
so a done unit always has both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from m3w.schemas.documents import METADATA_KEY, RowGroupWriter, check_version

SCHEMA_VERSION = "m3w.skips/1"
DIRNAME = "_skips"

SKIP_SCHEMA = pa.schema(
    [
        pa.field("warc_path", pa.string(), nullable=False),
        pa.field("offset", pa.int64()),  # of the record (for a gzipped WARC: of its gzip member) in the WARC
        pa.field(
            "length", pa.int64()
        ),  # bytes from `offset`; null when not known (a multi-record gzip member)
        pa.field("record_id", pa.string()),  # WARC-Record-ID; null for damage that hid the record header
        pa.field("record_type", pa.string()),  # WARC-Type, lower case; null for damage
        pa.field("url", pa.string()),  # WARC-Target-URI
        pa.field("reason", pa.string(), nullable=False),  # the `skip.<reason>` it is counted under
        pa.field("detail", pa.string()),  # what was found, for a person to read
    ],
    metadata={METADATA_KEY: SCHEMA_VERSION.encode()},
)


def skip_log_path(out_dir: str | Path, unit: str) -> str:
    """Where a unit's skip log lies (a local path or a URL, as `out_dir`)."""
    from m3w.pipeline import io

    return io.join(out_dir, DIRNAME, f"{unit}.parquet")


class SkipLogWriter(RowGroupWriter):
    """Rows (dicts with SKIP_SCHEMA's fields) streamed into one parquet file, a row group at a time, so a WARC of
    a million skipped records costs no more memory than one of ten. An empty log is still written: the file says
    "nothing was skipped"."""

    def __init__(self, path: str | Path, rows_per_group: int = 10_000) -> None:
        super().__init__(path, SKIP_SCHEMA, rows_per_group)


def skip_log_files(out_dir: str | Path, units: Iterable[str] | None = None) -> list[str]:
    """The skip logs in a documents/ directory (of `units` only, when given), in name order."""
    from m3w.pipeline import io

    names = [
        n for n in io.list_dir(io.join(out_dir, DIRNAME)) if n.endswith(".parquet") and not n.startswith(".")
    ]
    if units is not None:
        names = sorted(set(names) & {f"{u}.parquet" for u in units})
    return [io.join(out_dir, DIRNAME, n) for n in names]


def iter_skips(files: Iterable[str | Path], batch_size: int = 4096) -> Iterator[dict[str, Any]]:
    """The rows of skip logs (local paths or URLs), file by file, streaming row groups."""
    from m3w.pipeline import io

    for file in files:
        parquet = io.parquet_file(file)
        check_version(parquet.schema_arrow, SCHEMA_VERSION)
        for batch in parquet.iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()
