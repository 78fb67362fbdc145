"""`m3w build`: every stage in order from one YAML file, on the demo web served over loopback HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from m3w.demo.web import build_web
from m3w.pipeline.build import Build, load_build_config
from m3w.pipeline.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def web(tmp_path_factory, webcorpus):
    """The demo web (a small one) and the HTTP server it was built for."""
    from conftest import start_http_server

    out = tmp_path_factory.mktemp("web")
    (out / "site").mkdir()
    base_url, server = start_http_server(out / "site")
    summary = build_web(out, base_url, pages=40, seed=1, webcorpus=webcorpus)
    yield out, base_url, summary
    server.shutdown()
    server.server_close()


def overrides(web, out: Path, ray_address: str, *extra: str) -> list[str]:
    root, base_url, _ = web
    return [
        f"out={out}",
        f"ray_address={ray_address}",
        f"extract.cc_base_url={base_url}/",
        f"images.allow_hosts=[{base_url.removeprefix('http://')}]",  # the demo web's server, nothing else
        f"shards.video_table={root / 'videos.jsonl'}",
        *extra,
    ]


def samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


@pytest.fixture(scope="module")
def built(web, ray_address, tmp_path_factory):
    """The demo config run through the CLI, as a user runs it (joining the test session's Ray)."""
    out = tmp_path_factory.mktemp("corpus")
    cmd = [sys.executable, "-m", "m3w", "build", str(ROOT / "m3w" / "configs" / "demo.yaml")]
    for o in overrides(web, out, ray_address):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_stage_runs_in_order_and_writes_the_corpus(built):
    out, stdout = built
    for stage in ("extract", "filter", "images", "shards"):
        assert f"{stage:<8} done" in stdout
    summary = {r["stage"]: r for r in json.loads((out / "build_summary.json").read_text())}
    assert list(summary) == ["extract", "filter", "images", "shards"]
    assert summary["extract"]["counts"]["documents"] == 40
    assert 0 < summary["filter"]["counts"]["out.documents"] < 40  # the junk pages went
    statuses = {k: v for k, v in summary["images"]["counts"].items() if k.startswith("status.")}
    assert statuses["status.ok"] > 50 and statuses.get("status.http_error", 0) > 0  # broken links counted
    for dataset in ("m3w", "alt_pairs", "caption_pairs", "video_pairs"):
        assert summary["shards"]["counts"][f"{dataset}.samples"] > 0, dataset


def test_shards_are_self_consistent(built):
    out, _ = built
    tars = sorted((out / "shards" / "m3w").glob("*.tar"))
    assert tars
    from m3w.pipeline.tokenizer import MEDIA_TOKEN, load_tokenizer

    media_id = load_tokenizer().convert_tokens_to_ids(MEDIA_TOKEN)
    for key, files in samples(tars[0]).items():
        meta = json.loads(files["json"])
        assert meta["input_ids"].count(media_id) == len(meta["images"]) >= 1, key
        assert all(name in files for name in meta["images"])
        assert meta["provenance"]["url"].startswith("http://127.0.0.1:")
    video = samples(next((out / "shards" / "video_pairs").glob("*.tar")))
    first = json.loads(next(iter(video.values()))["json"])
    assert first["num_frames"] == 8 and "moving from" in first["text"]


def test_rerun_skips_finished_stages_and_a_change_reruns_downstream(built, web, ray_address):
    out, _ = built
    config, base = load_build_config(ROOT / "m3w" / "configs" / "demo.yaml", overrides(web, out, ray_address))
    results = Build(config, base).run(log=lambda *_: None)
    assert [(r.stage, r.status) for r in results] == [
        ("extract", "skipped"),
        ("filter", "skipped"),
        ("images", "skipped"),
        ("shards", "skipped"),
    ]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "documents").glob("*.parquet")}
    # Stricter in a way that only removes: at most 4 images a page drops the naming games. (A stricter paragraph
    # rule is not: dropping a game's short repeated sentences lets its page pass the word-repetition rule.)
    changed = overrides(web, out, ray_address, "filter.options.document.max_images=4")
    config, base = load_build_config(ROOT / "m3w" / "configs" / "demo.yaml", changed)
    results = Build(config, base).run(log=lambda *_: None)
    assert [r.status for r in results] == ["skipped", "done", "done", "done"]
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "documents").glob("*.parquet")}
    # The images stage fetched nothing new: every URL the stricter filter kept was already in the store.
    assert results[2].counts["fetched"] == 0 and results[2].counts["already_final"] > 0


def test_failed_stage_stops_the_build_and_is_retried(web, ray_address, tmp_path):
    out = tmp_path / "corpus"
    bad = overrides(
        web, out, ray_address, "extract.crawl=null", f"extract.inputs=[{tmp_path / 'missing.warc.gz'}]"
    )
    config, base = load_build_config(ROOT / "m3w" / "configs" / "demo.yaml", bad)
    results = Build(config, base).run(log=lambda *_: None)
    assert [(r.stage, r.status) for r in results] == [("extract", "failed")]  # nothing downstream ran
    assert not (out / "filtered").exists()
    assert "extract" not in Manifest(out, "build").done_units()


def test_bad_config_is_a_clear_error(tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump({"extract": {"crawl": "CC-MAIN-2099-01", "limt": 2}}))
    proc = subprocess.run(
        [sys.executable, "-m", "m3w", "build", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "extract.limt: unknown key (did you mean 'limit'?" in proc.stderr


def test_cc_config_has_the_demo_shape_without_loopback():
    demo = yaml.safe_load((ROOT / "m3w" / "configs" / "demo.yaml").read_text())
    cc = yaml.safe_load((ROOT / "m3w" / "configs" / "cc.yaml").read_text())
    assert set(demo) == set(cc) and all(set(demo[k]) == set(cc[k]) for k in demo if isinstance(demo[k], dict))
    assert cc["images"]["allow_hosts"] == [] and cc["extract"]["crawl"].startswith("CC-MAIN-")
    config, _ = load_build_config(ROOT / "m3w" / "configs" / "cc.yaml", ["extract.limit=1"])
    assert config.extract.limit == 1 and config.extract.cc_base_url == "https://data.commoncrawl.org/"
