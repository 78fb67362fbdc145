"""A real two-node Ray cluster on 127.0.0.1, started the way the README says (`ray start --head`, then
`ray start --address` with Ray 2.60's token auth), and the pipeline run on it through `RAY_ADDRESS`:
extract → filter → images (a loopback image server) → shards. Both nodes run tasks, every output is
byte-identical to a local run, a wrong token is one line and exit 2, and a killed driver's workers commit
nothing. Both nodes are stopped by their process ids (never `ray stop`: it ends every Ray on the machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray_procs import (
    free_ports,
    guard_events,
    guarded_env,
    is_loopback,
    kill_session,
    listening_addresses,
    m3w,
    session_pids,
    snapshot,
)
from shards_corpus import image_handler, photo_jpegs, rewrite_image_urls

from m3w.schemas.images import decode_index

WARCS = ("postlight_parser.warc.gz", "cleaneval_dev.warc.gz")
STAGES = ("extract", "filter", "images", "shards")
BUILD_CONFIG = Path(__file__).resolve().parents[1] / "m3w" / "configs" / "demo.yaml"
NODE_START_TIMEOUT_S = 120


@dataclass
class Node:
    name: str
    temp_dir: Path  # short: Ray's socket paths live under it
    proc: subprocess.Popen  # `ray start --block`: the session leader of every process of the node

    def task_names(self) -> set[str]:
        """Names of the tasks this node's workers ran, from the `:task_name:` lines Ray writes to worker logs."""
        names = set()
        for log in self.temp_dir.glob("session_*/logs/worker-*.out"):
            names |= {line.split(":", 2)[2] for line in log.read_text().splitlines() if line.startswith(":task_name:")}  # fmt: skip
        return names


@dataclass
class Cluster:
    address: str
    home: Path  # HOME of the cluster's user: `ray start` keeps the auth token in HOME/.ray/auth_token
    nodes: list[Node]
    guard_log: Path

    def env(self, **extra: str) -> dict[str, str]:
        """A driver's environment: RAY_ADDRESS and the cluster user's HOME, nothing else about auth."""
        return guarded_env(self.guard_log, **{"HOME": str(self.home), "RAY_ADDRESS": self.address, **extra})


# Ray's CLI, with 127.0.0.1 kept as given. `ray start` swaps a loopback --node-ip-address or --address for the
# IP that routes outside (services.resolve_ip_for_localhost: "make sure localhost isn't resolved to the loopback
# ip"), so on a machine with such a route the head would listen beyond loopback and the second node would look
# for it there. In CI's loopback-only network there is no such route and Ray keeps 127.0.0.1 by itself.
RAY_CLI = (
    "import ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; main()"
)


def _ray(*args: str) -> list[str]:
    return [sys.executable, "-c", RAY_CLI, *args]


def _node_ports() -> list[str]:
    """Every port a node opens, free ones: other Rays on this machine (other tests) must not collide."""
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")  # fmt: skip
    return [*(f"{flag}={port}" for flag, port in zip(flags, free_ports(len(flags)))),
            "--min-worker-port=0", "--max-worker-port=0"]  # fmt: skip


def _start_node(name: str, args: list[str], env: dict[str, str], root: Path) -> Node:
    temp_dir = Path(tempfile.mkdtemp(prefix=f"m3w-{name}-", dir="/tmp"))
    with open(root / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            _ray("start", *args, "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--num-cpus=1",
                 "--object-store-memory=100000000", "--disable-usage-stats",
                 "--block", *_node_ports()),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while "Ray runtime started" not in (root / f"{name}.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc.pid)
            pytest.fail(f"ray start ({name}) failed:\n{(root / f'{name}.log').read_text()[-3000:]}")
        time.sleep(0.2)
    return Node(name, temp_dir, proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """Head + one more node on 127.0.0.1, 1 CPU each (two tasks in flight must use both), token auth on as
    Ray 2.60 does it: `ray get-auth-token --generate` writes ~/.ray/auth_token, `ray start --head` finds it
    there, the second node needs RAY_AUTH_MODE=token to join."""
    root = tmp_path_factory.mktemp("cluster")
    home = root / "home"
    home.mkdir()
    guard_log = root / "netguard.jsonl"
    env = guarded_env(guard_log, HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    subprocess.run(_ray("get-auth-token", "--generate"), env=env, check=True, capture_output=True)
    port, dashboard_port, client_port = free_ports(3)
    nodes = []
    try:
        nodes.append(_start_node("head", ["--head", f"--port={port}", f"--dashboard-port={dashboard_port}",
                                          f"--ray-client-server-port={client_port}", "--include-dashboard=false"],
                                 env, root))  # fmt: skip
        nodes.append(
            _start_node("node2", [f"--address=127.0.0.1:{port}"], {**env, "RAY_AUTH_MODE": "token"}, root)
        )
        yield Cluster(f"127.0.0.1:{port}", home, nodes, guard_log)
    finally:
        for node in reversed(nodes):
            kill_session(node.proc.pid)
            node.proc.wait(timeout=30)
            subprocess.run(["rm", "-rf", str(node.temp_dir)], check=False)


@pytest.fixture(scope="module")
def image_server(webcorpus) -> Iterator[str]:
    from conftest import start_http_server

    url, server = start_http_server(Path("."), image_handler(photo_jpegs(webcorpus)))
    yield url
    server.shutdown()
    server.server_close()


def _build(corpus: Path, warcs: list[str], image_url: str, run_stages) -> dict[str, bytes]:
    """extract → filter → images → shards of `warcs` into `corpus`, as `m3w build` does it, in two halves:
    between them the kept documents' image URLs are pointed at the loopback image server. Returns the outputs."""
    run_stages(("extract", "filter"))
    rewrite_image_urls(corpus / "filtered", corpus / "filtered", image_url)
    run_stages(("images", "shards"))
    return _outputs(corpus)


def _settings(corpus: Path, warcs: list[str], image_url: str) -> list[str]:
    return [f"out={corpus}", "extract.crawl=null", f"extract.inputs=[{','.join(warcs)}]",
            f"images.allow_hosts=[{image_url.removeprefix('http://')}]", "shards.video_table=null"]  # fmt: skip


def _outputs(root: Path) -> dict[str, bytes]:
    """Every file's bytes, less what depends on wall-clock time: the manifests' entry times and config hashes and
    shards.json's config hash (the filter and shards stages fingerprint their input files by mtime), the build's
    stage durations and the store's commit times, when each image was fetched; and no caches. The image store's
    blob shards hold a unit's images in the order its fetch threads finished, so they are compared as their
    members (name → bytes) and its rows without the offsets into them. The data files are compared byte for
    byte, the shards included."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "_cache" not in p.parts):
        if path.name in (".lock", "build_summary.json"):
            continue
        data = path.read_bytes()
        if "_manifest" in path.parts and path.suffix == ".json":
            data = json.dumps(_without(json.loads(data), "time", "config_hash"), sort_keys=True).encode()
        elif path.name == "_store.json" or "_generations" in path.parts:  # the state, and its snapshots
            state = json.loads(data)
            state["history"] = [_without(h, "time") for h in state["history"]]
            data = json.dumps(state, sort_keys=True).encode()
        elif path.name == "shards.json":
            data = json.dumps(_without(json.loads(data), "config_hash"), sort_keys=True).encode()
        elif "rows" in path.parts and path.suffix == ".parquet":
            rows = pq.read_table(path).drop_columns(["fetched_at", "blob_offset"]).to_pylist()
            data = json.dumps(rows, default=str).encode()
        elif "blobs" in path.parts and path.suffix == ".tar":
            with tarfile.open(path) as tar:
                data = json.dumps({m.name: tar.extractfile(m).read().hex() for m in tar.getmembers()},
                                  sort_keys=True).encode()  # fmt: skip
        elif "index" in path.parts and path.suffix == ".idx":
            records = decode_index(data, str(path))
            data = json.dumps(sorted(map(repr, records[[n for n in records.dtype.names
                                                         if n not in ("blob_offset", "_pad")]].tolist()))).encode()  # fmt: skip
        files[str(path.relative_to(root))] = data
    return files


def _without(entry: dict, *keys: str) -> dict:
    return {k: v for k, v in entry.items() if k not in keys}


def test_pipeline_on_two_nodes_matches_local_run(cluster, image_server, webcorpus, ray_address, tmp_path):
    """The same build, at the same path (outputs may name their own paths), once on the test session's local
    Ray and once on the cluster through the CLI: `--ray-address` for the first half, RAY_ADDRESS for the rest."""
    from m3w.pipeline.build import Build, load_build_config

    warcs = [str(webcorpus / "warc" / w) for w in WARCS]
    corpus = tmp_path / "corpus"
    settings = _settings(corpus, warcs, image_server)

    def local(stages: tuple[str, ...]) -> None:
        config, base = load_build_config(BUILD_CONFIG, [*settings, f"ray_address={ray_address}"])
        results = Build(config, base).run(stages, log=lambda *_: None)
        assert [r.status for r in results] == ["done"] * len(stages), results

    def on_cluster(stages: tuple[str, ...]) -> None:
        cmd = m3w(
            "build", str(BUILD_CONFIG), *(f"--set={s}" for s in settings), *(f"--only={s}" for s in stages)
        )
        env = cluster.env()
        if stages[0] == "extract":  # the flag, then the environment variable
            cmd.append(f"--ray-address={env.pop('RAY_ADDRESS')}")
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    expected = _build(corpus, warcs, image_server, local)
    corpus.rename(tmp_path / "local")
    got = _build(corpus, warcs, image_server, on_cluster)
    assert any(name.startswith("shards/m3w/") and name.endswith(".tar") for name in expected)
    assert any(name.startswith("images/rows/") and name.endswith(".parquet") for name in expected)
    assert sorted(got) == sorted(expected)
    assert not [name for name in expected if got[name] != expected[name]]

    # Two units in flight, one CPU per node: both nodes ran m3w tasks, and every stage ran on the cluster. (Not
    # every stage on both: the driver reuses a leased worker for its next task, so quick units may all run on one
    # node.)
    ran = {
        node.name: {n.split(".")[1] for n in node.task_names() if n.startswith("m3w.")}
        for node in cluster.nodes
    }
    assert all(ran.values()) and set(STAGES) <= set().union(*ran.values()), ran
    for node in cluster.nodes:  # gcs_server, raylets, agents, workers: nothing listens beyond loopback
        listening = listening_addresses(session_pids(node.proc.pid))
        assert listening and all(is_loopback(a) for a in listening), (node.name, listening)
    blocked = guard_events(cluster.guard_log)[1]
    assert not [e for e in blocked if e["cmdline"][1:3] == ["-m", "m3w"]], blocked


def test_wrong_or_missing_token_is_one_line_and_exit_2(cluster, webcorpus, tmp_path):
    warc = str(webcorpus / "warc" / WARCS[1])
    no_token_home = tmp_path / "home"
    no_token_home.mkdir()
    cases = {
        "requires an auth token and none was found": cluster.env(HOME=str(no_token_home)),
        "rejected the auth token from RAY_AUTH_TOKEN": cluster.env(RAY_AUTH_TOKEN="0" * 64),
    }
    for expected, env in cases.items():
        result = subprocess.run(m3w("extract", warc, "--out", str(tmp_path / "out")), env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert expected in lines[0] and "RAY_AUTH_TOKEN_PATH" in lines[0], lines[0]


def test_workers_of_a_killed_driver_commit_nothing(cluster, webcorpus, tmp_path):
    """`kill -9` of a driver attached to the cluster: its workers live in the nodes' process trees, not the
    driver's. Ray stops them once it learns the job ended (within seconds: nothing moves in the output folder
    after that), and until then they publish nothing: a temp file may still grow, no output appears."""
    out = tmp_path / "documents"
    out.mkdir()
    warcs = [str(webcorpus / "warc" / w) for w in ("trafilatura_eval.warc.gz", *WARCS)]
    proc = subprocess.Popen(m3w("extract", *warcs, "--out", str(out)), env=cluster.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not any(out.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    published = _published(snapshot(out))
    proc.wait(timeout=10)
    time.sleep(3)
    settled = snapshot(out)
    time.sleep(2)
    assert snapshot(out) == settled
    assert _published(settled) == published


def _published(files: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {name: stat for name, stat in files.items() if not Path(name).name.startswith(".tmp-")}
