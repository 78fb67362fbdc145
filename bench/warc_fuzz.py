"""Benchmark the WARC reader on damaged files: how many of a file's response records it still reads.

    .venv/bin/python bench/warc_fuzz.py [--files 4] [--responses 2500] [--damage 0.05] [--seed 0]

Builds gzipped WARCs from real webcorpus HTML records (the smallest ones, reused), damages a share of them
(seeded) with every kind issue 16 lists, and reads each file with `iter_html_records` and, for comparison, with
fastwarc (which stops at the first damaged record, as m3w's reader did). Per file: responses in the file, those
read (a page, or a logged skip naming the record), the records whose gzip member was broken (their damage is
logged, but the record inside may be unreadable), and fastwarc's count. `unaccounted` = responses neither read
nor in a broken member: silently lost, and meant to be 0. The last line:
`files=<n> responses=<n> read=<n> in_broken_members=<n> unaccounted=<n> fastwarc_read=<n>`.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import sys
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m3w.pipeline.warc import HtmlRecord, Skip, iter_html_records  # noqa: E402

WEBCORPUS = Path(os.environ.get("M3W_WEBCORPUS", ROOT.parent / "shared" / "webcorpus"))
SETS = ("trafilatura_eval", "postlight_parser", "cleaneval_dev")


def small_records(limit: int = 400) -> list[tuple[list[tuple[str, str]], bytes, bytes]]:
    """(WARC fields, HTTP head, body) of the `limit` smallest HTML records of the wrapped webcorpus sets."""
    entries = [json.loads(line) for line in gzip.open(WEBCORPUS / "manifest.jsonl.gz")]
    entries = sorted((e for e in entries if e["source"] in SETS), key=lambda e: e["warc_length"])[:limit]
    records = []
    for entry in entries:
        with open(WEBCORPUS / entry["warc_file"], "rb") as f:
            f.seek(entry["warc_offset"])
            raw = gzip.decompress(f.read(entry["warc_length"]))
        head, http, body = raw.split(b"\r\n\r\n", 2)
        fields = [tuple(line.split(": ", 1)) for line in head.decode().split("\r\n")[1:]]
        records.append((fields, http, body.removesuffix(b"\r\n\r\n")))
    return records


def warc_bytes(
    fields: list[tuple[str, str]], block: bytes, length: int | None = None, lower: bool = False
) -> bytes:
    lines = [(k.lower() if lower else k, v) for k, v in fields if k != "Content-Length"]
    lines.append(
        ("content-length" if lower else "Content-Length", str(len(block) if length is None else length))
    )
    return (
        ("WARC/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines) + "\r\n").encode() + block + b"\r\n\r\n"
    )


def http_with(http: bytes, *extra: bytes) -> bytes:
    kept = [
        h for h in http.split(b"\r\n") if not h.lower().startswith((b"content-length", b"content-encoding"))
    ]
    return b"\r\n".join(kept + list(extra))


def damaged_member(
    kind: str, fields: list[tuple[str, str]], http: bytes, body: bytes, rng: random.Random
) -> bytes:
    """One gzip member (or a few bytes standing for one) holding a record damaged in `kind`'s way."""
    block = http + b"\r\n\r\n" + body
    if kind == "http_header_1mb":
        return gzip.compress(
            warc_bytes(fields, http_with(http, b"X-Junk: " + b"j" * 1_000_000) + b"\r\n\r\n" + body)
        )
    if kind == "http_header_10k_lines":
        lines = b"\r\n".join(b"X-%d: y" % i for i in range(10_000))
        return gzip.compress(warc_bytes(fields, http_with(http, lines) + b"\r\n\r\n" + body))
    if kind == "target_uri_100kb":
        fields = [(k, v + "?" + "q" * 100_000 if k == "WARC-Target-URI" else v) for k, v in fields]
        return gzip.compress(warc_bytes(fields, block))
    if kind == "garbage_http_head":
        return gzip.compress(warc_bytes(fields, rng.randbytes(300) + b"\r\n\r\n" + body))
    if kind == "content_length_short":
        return gzip.compress(warc_bytes(fields, block, len(block) // 3))
    if kind == "content_length_long":
        return gzip.compress(warc_bytes(fields, block, len(block) + 10_000))
    if kind == "lower_case_fields":
        return gzip.compress(warc_bytes(fields, block, lower=True))
    if kind == "chunked_gzip":
        payload = gzip.compress(body)
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(payload[i : i + 500]), payload[i : i + 500])
            for i in range(0, len(payload), 500)
        )
        return gzip.compress(warc_bytes(fields, http_with(http, b"Transfer-Encoding: chunked", b"Content-Encoding: gzip") + b"\r\n\r\n" + chunks + b"0\r\n\r\n"))  # fmt: skip
    if kind == "raw_deflate":
        packer = zlib.compressobj(wbits=-15)
        payload = packer.compress(body) + packer.flush()
        return gzip.compress(
            warc_bytes(fields, http_with(http, b"Content-Encoding: deflate") + b"\r\n\r\n" + payload)
        )
    if kind == "decompression_bomb":
        packer = zlib.compressobj(wbits=31)
        bomb = b"".join(packer.compress(bytes(1 << 20)) for _ in range(16)) + packer.flush()
        return gzip.compress(
            warc_bytes(fields, http_with(http, b"Content-Encoding: gzip") + b"\r\n\r\n" + bomb)
        )
    if kind == "tiny_binary_body":
        return gzip.compress(warc_bytes(fields, http_with(http) + b"\r\n\r\n" + rng.randbytes(16)))
    member = gzip.compress(warc_bytes(fields, block))
    if kind == "corrupt_member":
        at = rng.randrange(20, len(member) - 20)
        return member[:at] + rng.randbytes(16) + member[at + 16 :]
    if kind == "truncated_member":
        return member[: rng.randrange(20, len(member) - 10)]
    if kind == "garbage_after_member":
        return member + rng.randbytes(rng.randrange(10, 3000))
    raise ValueError(kind)


DAMAGE = (
    "http_header_1mb", "http_header_10k_lines", "target_uri_100kb", "garbage_http_head", "content_length_short",
    "content_length_long", "lower_case_fields", "chunked_gzip", "raw_deflate", "decompression_bomb",
    "tiny_binary_body", "corrupt_member", "truncated_member", "garbage_after_member",
)  # fmt: skip


BROKEN_MEMBER = ("corrupt_member", "truncated_member")  # the record's own gzip member cannot be inflated


def build(
    path: Path, records: list, responses: int, damage: float, rng: random.Random
) -> tuple[Counter, set[str], set[str]]:
    """Write a fuzz WARC. Returns (damage kinds, ids of all responses, ids of those in broken gzip members)."""
    kinds: Counter = Counter()
    ids: set[str] = set()
    broken: set[str] = set()
    with open(path, "wb") as f:
        for _ in range(responses):
            fields, http, body = rng.choice(records)
            record_id = f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128))}>"
            fields = [(k, record_id if k == "WARC-Record-ID" else v) for k, v in fields]
            ids.add(record_id)
            if rng.random() < damage:
                kind = rng.choice(DAMAGE)
                kinds[kind] += 1
                broken.update([record_id] if kind in BROKEN_MEMBER else [])
                f.write(damaged_member(kind, fields, http, body, rng))
            else:
                f.write(gzip.compress(warc_bytes(fields, http + b"\r\n\r\n" + body)))
    return kinds, ids, broken


def read_ours(path: Path) -> tuple[set[str], int, float]:
    """(ids of the responses read: pages or skips naming the record, damage rows, seconds)."""
    read: set[str] = set()
    damage = 0
    start = time.perf_counter()
    with open(path, "rb") as f:
        for item in iter_html_records(f, Counter(), 5_000_000):
            if isinstance(item, HtmlRecord) or (isinstance(item, Skip) and item.record_type == "response"):
                read.add(item.record_id or "")
            else:
                damage += 1
    return read, damage, time.perf_counter() - start


def read_fastwarc(path: Path) -> int:
    """Responses fastwarc yields before the first record it cannot read (where m3w's old reader stopped)."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    read = 0
    try:
        with open(path, "rb") as f:
            for record in ArchiveIterator(io.BufferedReader(f), parse_http=True, quirks_mode=True):
                if record.record_type == WarcRecordType.response:
                    record.reader.read()
                    read += 1
    except Exception:  # noqa: BLE001 - counting how far it gets is the point
        pass
    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--responses", type=int, default=2500)
    parser.add_argument("--damage", type=float, default=0.05, help="share of records damaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to write the WARCs (default: a temp dir)")
    args = parser.parse_args()
    import tempfile

    rng = random.Random(args.seed)
    records = small_records()
    totals: Counter = Counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for i in range(args.files):
            path = Path(tmp) / f"fuzz-{i}.warc.gz"
            kinds, ids, broken = build(path, records, args.responses, args.damage, rng)
            read, damage, seconds = read_ours(path)
            old = read_fastwarc(path)
            unaccounted = (
                ids - broken - read
            )  # neither a page nor a logged skip, nor hidden by a broken member
            print(f"{path.name}: {args.responses} responses, {sum(kinds.values())} damaged "
                  f"({', '.join(f'{k}={v}' for k, v in sorted(kinds.items()))})")  # fmt: skip
            print(f"  read {len(read & ids)} ({len(read & ids) / args.responses:.1%}), {len(broken)} in broken gzip "
                  f"members ({damage} damage rows), unaccounted {len(unaccounted)}, {seconds:.1f}s; fastwarc read "
                  f"{old}")  # fmt: skip
            totals.update(responses=args.responses, read=len(read & ids), broken=len(broken),
                          unaccounted=len(unaccounted), fastwarc=old)  # fmt: skip
    print(f"files={args.files} responses={totals['responses']} read={totals['read']} "
          f"in_broken_members={totals['broken']} unaccounted={totals['unaccounted']} "
          f"fastwarc_read={totals['fastwarc']}")  # fmt: skip


if __name__ == "__main__":
    main()
