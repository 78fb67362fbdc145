"""The CLI's one error path: every bad input is one line on stderr, exit status 2, no traceback, and no Ray.

The commands run in this process (click's runner), with Ray's entry points replaced by a tripwire: each error
must be found before any work starts. Two cases run as real processes: `python -m m3w`, and a read-only --out
(as an unprivileged user when the tests run as root, who may write anywhere).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from m3w import CONFIGS_DIR, __version__
from m3w.cli import main

ROOT = Path(__file__).resolve().parents[1]
OBELICS_ROW = {
    "images": [None, "https://example.org/cat.jpg"],
    "metadata": json.dumps([None, {"src": "https://example.org/cat.jpg", "alt_text": "A cat"}]),
    "general_metadata": json.dumps({"url": "https://example.org/a"}),
    "texts": ["Our cat.", None],
}


@pytest.fixture
def no_ray(monkeypatch):
    """A tripwire: starting or joining Ray fails the test (bad input must be refused before any work)."""
    import ray

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(ray, "init", tripwire)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def run(args: list[str], env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_one_line_error(result, command: str, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"m3w {command}: error: "), lines[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def inputs(tmp_path, webcorpus) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    urls = tmp_path / "urls.txt"
    urls.write_text("https://example.org/a.jpg\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("colour: blue\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("paragraph:\n  min_words: [5\n")
    obelics = tmp_path / "obelics.jsonl"
    obelics.write_text(json.dumps(OBELICS_ROW) + "\n")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet\n")
    garbage_tar = tmp_path / "garbage.tar"
    garbage_tar.write_text("not a tar\n")
    foreign = tmp_path / "foreign.parquet"  # parquet, but not written by m3w (no schema version)
    pq.write_table(pa.table({"url": ["https://example.org/a"]}), foreign)
    torn = tmp_path / "torn"  # a shard folder whose shards.json was cut short
    torn.mkdir()
    (torn / "shards.json").write_text('{"schema": "m3w.sha')
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({"datasets": {"m3w": {"path": str(empty)}}, "steps": 1}))
    return {
        "warc": webcorpus / "warc" / "cleaneval_dev.warc.gz",
        "empty": empty,
        "urls": urls,
        "unknown": unknown,
        "broken": broken,
        "obelics": obelics,
        "garbage": garbage,
        "foreign": foreign,
        "garbage_tar": garbage_tar,
        "torn": torn,
        "train_yaml": train_yaml,
        "out": tmp_path / "out",
    }


# (command, args, words the one line must contain); paths are keys of `inputs`
STAGE_ARGS = {
    "extract": ["extract", "warc", "--out", "out"],
    "images": ["images", "urls", "--store", "out"],
    "shards": ["shards", "m3w", "empty", "--images", "empty", "--out", "out"],
    "filter": ["filter", "empty", "--out", "out"],
}


def expand(args: list[str], inputs: dict[str, Path]) -> list[str]:
    return [str(inputs[a]) if a in inputs else a for a in args]


@pytest.mark.parametrize("stage", ["extract", "images", "shards", "train"])
def test_unknown_keys_in_yaml_and_set(stage, inputs, no_ray):
    config = ["train", "unknown"] if stage == "train" else [*STAGE_ARGS[stage], "--config", "unknown"]
    assert_one_line_error(run(expand(config, inputs)), stage, "colour: unknown key", "unknown.yaml")
    base = ["train", "train_yaml"] if stage == "train" else STAGE_ARGS[stage]
    assert_one_line_error(run(expand([*base, "--set", "colour=blue"], inputs)), stage, "colour: unknown key")
    nested = "optim.lrate=1" if stage == "train" else {"extract": "page.max_html=1", "images": "fetch.retries=1",
                                                          "shards": "windows.length=64"}[stage]  # fmt: skip
    assert_one_line_error(run(expand([*base, "--set", nested], inputs)), stage, nested.split("=")[0])


@pytest.mark.parametrize(
    ("args", "command", "needles"),
    [
        (["extract", "{tmp}/nowhere/*.warc.gz", "--out", "out"], "extract", ["no WARC matches", "nowhere"]),
        (["extract", "empty", "--out", "out"], "extract", ["is a directory", "empty"]),
        (["filter", "empty", "--out", "out"], "filter", ["no documents", "empty"]),
        (["filter", "empty", "--out", "out", "--set", "document.min_words"], "filter", ["expected KEY=VALUE"]),
        (["filter", "empty", "--out", "out", "--set", "document.min_words=abc"], "filter",
         ["document.min_words: expected an int, got 'abc'"]),
        (["filter", "empty", "--out", "out", "--config", "broken"], "filter", ["broken.yaml, line", "invalid YAML"]),
        (["interop", "import", "obelics", "--format", "mmc4", "--out", "out"], "interop",
         ["is not mmc4", "use --format obelics"]),
        (["build", str(CONFIGS_DIR / "demo.yaml"), "--set", "filter.options.paragraph.min_wrds=3"], "build",
         ["filter.options.paragraph.min_wrds: unknown key", "did you mean 'min_words'"]),
        (["interop", "import", "garbage", "--format=obelics", "--out", "out"], "interop",
         ["garbage.parquet: not a parquet file", "magic bytes"]),
        (["interop", "export", "garbage", "--out", "out"], "interop", ["garbage.parquet: not a documents file"]),
        (["docs", "to-jsonl", "garbage"], "docs", ["garbage.parquet: not a documents file", "magic bytes"]),
        (["docs", "to-jsonl", "foreign"], "docs", ["foreign.parquet: not a documents file", "schema version"]),
        (["docs", "to-jsonl", "empty"], "docs", ["no documents", "empty"]),
        (["inspect", "garbage", "--out", "{tmp}/x.html"], "inspect", ["garbage.parquet: not a documents file"]),
        (["inspect", "empty", "--out", "{tmp}/x.html"], "inspect", ["no shards", "one .parquet file"]),
        (["inspect", "garbage_tar", "--out", "{tmp}/x.html"], "inspect", ["garbage.tar: not a readable tar shard"]),
        (["images", "foreign", "--store", "out"], "images", ["foreign.parquet: not a documents file"]),
        (["model", "info", "--preset", "nosuch"], "model", ["unknown preset 'nosuch'", "tiny"]),
        (["inspect", "torn", "--out", "{tmp}/x.html"], "inspect", ["torn/shards.json: not a shard manifest"]),
        (["train", "train_yaml", "--set", "datasets.m3w.path={tmp}/torn"], "train",
         ["torn/shards.json: not a shard manifest"]),
        (["shards", "video", "garbage", "--out", "out"], "shards", ["garbage.parquet, line 1: not JSON"]),
        (["shards", "video", "foreign", "--out", "out"], "shards", ["foreign.parquet: not a CSV or JSON-lines"]),
        (["shards", "video", "obelics", "--out", "out"], "shards", ["obelics.jsonl: row 0 needs a video"]),
        (["tokenizer", "train", "garbage_tar", "--out", "out"], "tokenizer", ["garbage.tar: not a WARC"]),
        (["tokenizer", "train", "empty", "--out", "out"], "tokenizer", ["no WARC files", "empty"]),
        (["extract", "warc", "--out", "warc"], "extract", ["exists and is not a directory"]),
        (["stats", "empty"], "stats", ["no stage manifest", "empty"]),
        (["extract"], "extract", ["Missing option '--out'"]),
        (["nosuchcommand"], "", ["No such command 'nosuchcommand'"]),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_with_exit_2(args, command, needles, inputs, tmp_path, no_ray):
    args = [a.replace("{tmp}", str(tmp_path)) for a in expand(args, inputs)]
    result = run(args)
    if command:
        assert_one_line_error(result, command, *needles)
    else:
        assert result.exit_code == 2 and result.stderr.startswith("m3w: error: No such command")


def test_debug_shows_the_traceback(inputs, no_ray):
    result = run(expand(["--debug", "extract", "empty", "--out", "out"], inputs))
    assert result.exit_code == 2 and "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("m3w extract: error: ")


def without_dac_override() -> None:
    """In the child, before exec: drop root's power to write where permissions forbid (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, from the capability bounding set), so a 0555 directory is read-only to it too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_out_is_refused_before_any_work(inputs):
    """A real process that cannot write to --out (as root: without the capability to ignore permissions)."""
    parent = Path(tempfile.mkdtemp(prefix="m3w-ro-"))
    try:
        parent.chmod(0o755)
        out = parent / "ro"
        out.mkdir(mode=0o555)
        out.chmod(0o555)
        proc = subprocess.run(
            [sys.executable, "-m", "m3w", "extract", str(inputs["warc"]), "--out", str(out / "documents")],
            capture_output=True, text=True, cwd=parent, timeout=120,
            preexec_fn=without_dac_override if os.geteuid() == 0 else None,
        )  # fmt: skip
    finally:
        (parent / "ro").chmod(0o755)
        for path in sorted(parent.rglob("*"), reverse=True):
            path.rmdir()
        parent.rmdir()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert "cannot write to" in proc.stderr and "Permission denied" in proc.stderr


def test_version_and_module_entry_point():
    assert run(["--version"]).output.strip() == f"m3w, version {__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "m3w", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"m3w, version {__version__}"
