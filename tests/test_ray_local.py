"""A local `m3w` run on Ray: its own private Ray whatever the machine records, nothing outside loopback, no Ray
process outliving a killed driver, and one clear line when a cluster cannot be reached. Each test runs the real
CLI as a subprocess, every Python process of it under the network guard (tests/netguard/sitecustomize.py)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray_procs import (
    ROOT,
    alive,
    free_port,
    guard_events,
    guarded_env,
    is_loopback,
    listening_addresses,
    m3w,
    session_pids,
    snapshot,
    wait_gone,
)

from m3w.pipeline.manifest import Manifest

SMALL_WARCS = ("postlight_parser.warc.gz", "cleaneval_dev.warc.gz")


def _strace_works() -> bool:
    return (
        bool(shutil.which("strace")) and subprocess.run(["strace", "-o", os.devnull, "true"]).returncode == 0
    )


def _traced_connects(trace: Path) -> dict[str, set[str]]:
    """From `strace -f -e trace=connect,execve,clone,clone3` output: executable → IPs it connected to. A thread
    or child belongs to its parent's executable until it runs execve."""
    program: dict[str, str] = {}
    connects: dict[str, set[str]] = {}
    for line in trace.read_text().splitlines():
        pid = line.split(maxsplit=1)[0]
        if m := re.search(r'execve\("([^"]+)"', line):
            if "= 0" in line or "<unfinished" in line:
                program[pid] = Path(m.group(1)).name
        elif "clone" in line and (m := re.search(r"= (\d+)$", line)):
            program[m.group(1)] = program.get(pid, pid)
        elif "connect(" in line:
            for ip in re.findall(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"', line):
                connects.setdefault(program.get(pid, pid), set()).add(ip[0] or ip[1])
    return connects


def test_local_run_is_private_and_stays_on_loopback(tmp_path, webcorpus):
    """With Ray's default temp dir recording a dead cluster (a `ray_current_cluster` naming a closed port) and no
    RAY_ADDRESS, `m3w extract` starts its own Ray in its own temp dir and finishes. No Python process of the run
    (driver, workers, Ray's agents and monitors) connects or resolves a name outside loopback, nothing listens
    beyond loopback, no API server starts; with strace, the same holds for raylet and gcs_server."""
    ray_default_root = tmp_path / "raytmp"  # what Ray reads as its default temp root: RAY_TMPDIR/ray
    (ray_default_root / "ray").mkdir(parents=True)
    recorded = ray_default_root / "ray" / "ray_current_cluster"
    recorded.write_text(f"127.0.0.1:{free_port()}")  # nothing listens there
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = (Path(tempfile.mkdtemp(prefix="m3w-ray-", dir="/tmp")) for _ in range(2))  # a killed run's
    # Left-overs go; a running one's stay: its owner file is locked.
    (stale / "m3w.pid").write_text(str(dead.pid))
    live_owner = open(live / "m3w.pid", "w")  # noqa: SIM115 - held open (locked) until the run has started
    fcntl.flock(live_owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    live_owner.write(str(dead.pid))  # as from another PID namespace: no such pid here, but the lock is held
    live_owner.flush()
    guard_log, trace, out = tmp_path / "netguard.jsonl", tmp_path / "connects.txt", tmp_path / "documents"
    cmd = m3w("extract", *(str(webcorpus / "warc" / w) for w in SMALL_WARCS), "--out", str(out))
    if strace := _strace_works():
        cmd = ["strace", "-f", "-qq", "-e", "trace=connect,execve,clone,clone3", "-o", str(trace), *cmd]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(cmd, env=guarded_env(guard_log, RAY_TMPDIR=str(ray_default_root)),
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)  # fmt: skip
        listening: set[str] = set()
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            listening |= listening_addresses(session_pids(proc.pid))
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("a local run with a dead recorded cluster did not finish in 240 s")
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert len(Manifest(out, "extract").done_units()) == len(SMALL_WARCS)

    starts, blocked = guard_events(guard_log)
    assert blocked == [], blocked
    programs = {Path(arg).name for e in starts for arg in e["cmdline"][1:3]}
    for program in ("m3w", "default_worker.py", "agent.py", "main.py", "log_monitor.py"):
        assert program in programs, f"{program} ran without the guard: {programs}"
    assert "dashboard.py" not in programs  # no API server: it is what probed 169.254.169.254
    session_dirs = {m.group(1) for e in starts for a in e["cmdline"] if (m := re.match(r"--session-dir=(.+)/session_", a))}  # fmt: skip
    (temp_dir,) = session_dirs
    assert Path(temp_dir).parent != ray_default_root / "ray" and not Path(temp_dir).exists()  # own, removed
    assert recorded.read_text().startswith("127.0.0.1:")
    assert not stale.exists() and live.exists()
    live_owner.close()
    shutil.rmtree(live)

    assert listening and all(is_loopback(a) for a in listening), listening
    if strace:
        connects = _traced_connects(trace)
        assert {"raylet", "gcs_server"} <= set(connects), connects  # the native processes were traced too
        assert all(is_loopback(f"{ip}:0") for ips in connects.values() for ip in ips), connects


@pytest.mark.parametrize("target", ["process group", "driver"])
def test_killed_run_leaves_no_ray_process_and_no_late_file(tmp_path, webcorpus, target):
    """`kill -9` mid-run of the m3w process group, or of the driver alone (an OOM kill, `kill -9 PID`): every
    process of the run, Ray's workers included, is gone within two seconds, and no file appears or changes in the
    output folder once the kill has landed (a quarter second: Ray's workers used to write for one or two more).
    After a kill of the driver alone, Ray's two agents (children of the raylet, running no m3w code) take their
    own time: they poll for their parent and try to report to the dead GCS before they exit (~15 s)."""
    out = tmp_path / "documents"
    out.mkdir()
    warcs = ("trafilatura_eval.warc.gz", "postlight_parser.warc.gz", *SMALL_WARCS[1:])
    cmd = m3w("extract", *(str(webcorpus / "warc" / w) for w in warcs), "--out", str(out), "--workers", "2")
    proc = subprocess.Popen(cmd, env=guarded_env(tmp_path / "netguard.jsonl"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not any(out.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # a temp file: a worker is inside a unit
    assert proc.poll() is None, "the run ended before it could be killed"
    pids = session_pids(proc.pid)
    assert any(_cmdline(pid).startswith("ray::m3w.extract") for pid in pids), "no worker inside a unit"
    if target == "process group":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    time.sleep(0.25)
    at_kill = snapshot(out)
    survivors = {pid: _cmdline(pid) for pid in wait_gone(pids, timeout=2.0)}
    agents = {
        pid
        for pid, cmd in survivors.items()
        if cmd.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))
    }
    assert set(survivors) == (agents if target == "driver" else set()), survivors
    time.sleep(3)
    assert snapshot(out) == at_kill
    proc.wait(timeout=10)
    for pid in alive(agents):
        os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_unreachable_cluster_is_one_line_and_exit_2(tmp_path, webcorpus):
    """RAY_ADDRESS naming a port where no Ray listens: one line naming the cause, exit status 2, no traceback,
    in seconds (Ray itself retries for minutes)."""
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(
        m3w("extract", str(webcorpus / "warc" / SMALL_WARCS[0]), "--out", str(tmp_path / "out")),
        env=guarded_env(tmp_path / "netguard.jsonl", RAY_ADDRESS=address),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"cannot reach a Ray cluster at {address}" in lines[0] and "RAY_ADDRESS" in lines[0]
    assert time.monotonic() - started < 60


LATE_WRITER = """
import json, os, sys, time
import ray
from m3w.pipeline.ray_runner import init_ray

init_ray(sys.argv[1])

@ray.remote
class LateWriter:
    def write_later(self, path, delay):
        from m3w.pipeline import io, ray_runner

        def publish_late():  # the body of an m3w task: a local file, then an object on a remote filesystem
            time.sleep(delay)
            refused = []
            for publish in (lambda: io.write_bytes(path, b"late"),
                            lambda: io.write_bytes("memory://m3w-tests/late.txt", b"late")):
                try:
                    publish()
                except RuntimeError as exc:
                    refused.append(str(exc))
            with open(path + ".part", "w") as f:
                json.dump(refused, f)
            os.replace(path + ".part", path + ".refused")  # whole when the test sees it

        ray_runner.ray_task(publish_late)()

writer = LateWriter.options(name=sys.argv[3], namespace="m3w-tests", lifetime="detached").remote()
ray.get(writer.__ray_ready__.remote())
writer.write_later.remote(sys.argv[2], 3.0)
time.sleep(0.5)
os.kill(os.getpid(), 9)
"""


def test_a_worker_outliving_its_driver_commits_nothing(tmp_path, ray_address):
    """On a cluster the workers of a killed driver live on other machines: Ray kills them once it learns the
    job ended, and until then they must not publish output. A detached actor outlives its driver by design;
    its commits after the driver's `kill -9` (a local rename, a remote PUT) are refused, the temp file removed."""
    import ray

    target, name = tmp_path / "late.txt", f"late-{os.getpid()}"
    driver = subprocess.run([sys.executable, "-c", LATE_WRITER, ray_address, str(target), name],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert driver.returncode == -signal.SIGKILL, driver.stderr[-2000:]
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{target}.refused").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = json.loads(Path(f"{target}.refused").read_text())
        assert len(refused) == 2 and all("its driver died" in why for why in refused), refused
        assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["late.txt.refused"]
    finally:
        ray.kill(ray.get_actor(name, namespace="m3w-tests"))
