"""The content-addressed image store (layout and row format in `schemas/images.py`).

Writers append index parquet files and blobs; nothing is ever rewritten in place. Readers merge the index files:
for a URL fetched more than once (a retried timeout or 5xx), the row with the most attempts wins.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m3w.pipeline.io import atomic_path, write_parquet_atomic
from m3w.schemas import documents as doc_spec
from m3w.schemas import images as spec

INDEX_DIR = "index"


def is_final(status: str, http_status: int | None) -> bool:
    """A final status is never fetched again. Timeouts, 5xx, 429 and connection failures (http_error without
    an HTTP status) may be transient and are retried, a bounded number of times."""
    if status == "timeout":
        return False
    if status == "http_error":
        return http_status is not None and http_status < 500 and http_status != 429
    return True


# root → (index fingerprint, merged table, url → row position). Callers construct `ImageStore(root)` per batch
# of documents; merging thousands of index files each time would dominate their run time.
_MERGED: dict[str, tuple[tuple, pa.Table, dict[str, int]]] = {}


class ImageStore:
    """`ImageStore(root)`: read the merged index, read blobs, write blobs and index files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------------------------

    def index_files(self) -> list[Path]:
        return sorted((self.root / INDEX_DIR).glob("*.parquet"))

    def table(self) -> pa.Table:
        """The merged index: one row per URL ever attempted."""
        return self._merged()[0]

    def _merged(self) -> tuple[pa.Table, dict[str, int]]:
        files = self.index_files()
        fingerprint = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        key = str(self.root.resolve())
        cached = _MERGED.get(key)
        if cached is None or cached[0] != fingerprint:
            table = self._merge(files)
            positions = {url: i for i, url in enumerate(table.column("url").to_pylist())}
            if len(_MERGED) >= 4:
                _MERGED.clear()
            cached = _MERGED[key] = (fingerprint, table, positions)
        return cached[1], cached[2]

    @staticmethod
    def _merge(files: list[Path]) -> pa.Table:
        tables = []
        for path in files:
            table = pq.read_table(path)
            doc_spec.check_version(table.schema, spec.SCHEMA_VERSION)
            tables.append(table.cast(spec.IMAGE_INDEX_SCHEMA))
        if not tables:
            return spec.IMAGE_INDEX_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        # Most attempts first within a URL, then the file written last (file order, for determinism).
        order = pa.array(np.repeat(np.arange(len(tables)), [len(t) for t in tables]))
        table = table.append_column("_file", order)
        table = table.sort_by([("url", "ascending"), ("attempts", "descending"), ("_file", "descending")])
        urls = table.column("url").to_numpy(zero_copy_only=False)
        first = np.ones(len(urls), dtype=bool)
        first[1:] = urls[1:] != urls[:-1]
        return table.filter(pa.array(first)).drop_columns(["_file"])

    def lookup(self, urls: list[str] | set[str]) -> dict[str, dict[str, Any]]:
        """url → index row (as a dict) for each of `urls` the store has seen; unseen URLs are absent."""
        table, positions = self._merged()
        wanted = sorted({positions[u] for u in urls if u in positions})
        rows = table.take(pa.array(wanted, type=pa.int64())).to_pylist()
        return {row["url"]: row for row in rows}

    def final_urls(self) -> set[str]:
        """URLs with a final status: a re-run never fetches them again."""
        table = self.table()
        return {
            url
            for url, status, http_status in zip(
                table.column("url").to_pylist(),
                table.column("status").to_pylist(),
                table.column("http_status").to_pylist(),
            )
            if is_final(status, http_status)
        }

    def blob_path(self, resized_sha256: str) -> Path:
        return self.root / spec.blob_relpath(resized_sha256)

    def read_blob(self, resized_sha256: str) -> bytes:
        """The stored resized JPEG bytes. Raises FileNotFoundError for an unknown key."""
        return self.blob_path(resized_sha256).read_bytes()

    # -- writing ---------------------------------------------------------------------------------------------

    def write_blob(self, data: bytes) -> str:
        """Store `data` under its sha256 (once, however many URLs have it) and return the key."""
        key = hashlib.sha256(data).hexdigest()
        path = self.blob_path(key)
        if not path.exists():
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        return key

    def write_index(self, name: str, rows: list[dict[str, Any]]) -> str:
        """Write one index file atomically; returns its path relative to the store root."""
        relpath = f"{INDEX_DIR}/{name}.parquet"
        rows = sorted(rows, key=lambda r: r["url"])
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=spec.IMAGE_INDEX_SCHEMA), self.root / relpath)
        return relpath
