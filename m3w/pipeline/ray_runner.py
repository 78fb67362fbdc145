"""Run a stage's units as Ray tasks: a private local Ray by default, a cluster via `--ray-address` / `RAY_ADDRESS`.

Every stage has the same shape: a list of units (one input → one output), a pure function per unit that writes
its output atomically and returns counts, and a manifest. `run_units` skips done units, retries failed ones,
bounds the tasks in flight, records each result as it arrives (so a killed job loses only units in flight), and
shows a progress bar with rates, live while units run (`report_progress`).

How m3w starts Ray, and why (read from Ray 2.60's source):
- Local (no address): always a fresh Ray private to this process (`address="local"`: never the cluster a
  `ray_current_cluster` file names), in its own short temp dir, on 127.0.0.1 only, with no API server (see
  `_without_api_server`), no usage stats. Its processes die with the driver: all of them are in the driver's
  process group, Ray has the kernel kill its daemons when the driver dies (parent-death signal), and every
  worker that runs one of our units asks for the same signal against its raylet.
- Cluster (`--ray-address` / `RAY_ADDRESS`): Ray's token auth is picked up from where `ray start` keeps it
  (`~/.ray/auth_token`, or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN). The cluster is checked with one short gRPC call
  first, so a wrong address or token is one clear `RayConnectError` instead of minutes of retries.
- Everywhere: a worker commits an output (the final rename) only while its job is alive (`_check_job_alive`),
  so a worker of a killed driver on a cluster never publishes a file.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from m3w.errors import UserError
from m3w.pipeline import io
from m3w.pipeline.manifest import Manifest

# Environment every Ray process of a local run inherits (the driver starts them all, the raylet its workers).
LOCAL_RAY_ENV = {
    # No usage reports (ray/_common/usage/usage_lib.py).
    "RAY_USAGE_STATS_ENABLED": "0",
    # Single-node mode: Ray keeps 127.0.0.1 as the node address instead of asking which interface routes to
    # 8.8.8.8 (services.get_node_ip_address); the same flag in ray_constants.ENABLE_RAY_CLUSTER.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Workers stay in the driver's process group (Ray 2.60 gives each its own), so `kill -9 -PGID` of an m3w
    # run ends every process of it in one step, as it does gcs_server, raylet and the agents.
    "RAY_process_group_cleanup_enabled": "0",
}
LOOPBACK = "127.0.0.1"
# Ray puts unix sockets under the temp dir (`<dir>/session_<date>_<pid>/sockets/plasma_store`); a socket path
# may not exceed 107 bytes, so the private temp dir must stay short.
MAX_TEMP_DIR_CHARS = 40
TEMP_DIR_PREFIX = "m3w-ray-"
# In a local Ray's temp dir: the pid of the m3w process that owns it, a file that process holds locked (flock)
# for as long as it lives. The lock, not the pid, says whether the owner is alive: a process in another PID
# namespace sharing /tmp (a container, `unshare --pid`) sees every pid of ours as gone.
OWNER_FILE = "m3w.pid"
_owner_lock: Any = None  # this process's locked OWNER_FILE, open until it exits
CONNECT_TIMEOUT_S = 10.0
PROGRESS_INTERVAL_S = 1.0  # how often a running unit sends its progress counters to the driver
TaskFn = TypeVar("TaskFn", bound=Callable[..., Any])
AUTH_TOKEN_VARS = "RAY_AUTH_TOKEN_PATH (a file holding the token) or RAY_AUTH_TOKEN"


class RayConnectError(UserError):
    """Ray could not be reached or refused us: one line naming the likely cause (the CLI exits with status 2)."""


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in (LOOPBACK, "localhost", "::1")


def _single_node_mode() -> None:
    import ray._private.ray_constants as ray_constants

    os.environ.update(LOCAL_RAY_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False  # read once at import; ray may have been imported before us


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` (else RAY_ADDRESS), or start a private local Ray when neither is set.

    `address="local"` always starts a local Ray; `num_cpus` sizes a local Ray only (a cluster has its own).
    Raises `RayConnectError` when a cluster cannot be reached or rejects our auth token.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        _start_local_ray(num_cpus)
    else:
        _connect(address)


def _private_temp_dir() -> str:
    """A fresh temp dir for one local Ray: under Ray's own temp root (RAY_TMPDIR, TMPDIR) when the socket paths
    fit, else under /tmp. Removed when the process exits; those of killed runs go at the next start."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    if len(os.path.join(root, f"{TEMP_DIR_PREFIX}xxxxxxxx")) > MAX_TEMP_DIR_CHARS or not os.access(
        root, os.W_OK
    ):
        root = "/tmp"
    for stale in Path(root).glob(f"{TEMP_DIR_PREFIX}*"):
        if _owner_is_gone(stale):
            shutil.rmtree(stale, ignore_errors=True)
    temp_dir = tempfile.mkdtemp(prefix=TEMP_DIR_PREFIX, dir=root)
    _lock_owner_file(Path(temp_dir))
    return temp_dir


def _lock_owner_file(temp_dir: Path) -> None:
    """Write OWNER_FILE locked: it is locked under a temp name and renamed into place, so no other process ever
    sees it unlocked while this one lives."""
    global _owner_lock
    fd, tmp = tempfile.mkstemp(dir=temp_dir, prefix=".owner-")
    owner = os.fdopen(fd, "w")
    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    owner.write(str(os.getpid()))
    owner.flush()
    os.replace(tmp, temp_dir / OWNER_FILE)
    _owner_lock = owner  # the lock goes when the process does, however it ends


def _owner_is_gone(temp_dir: Path) -> bool:
    """Whether the m3w process that made this temp dir has exited: nothing holds its owner file's lock (a dir of
    another user, or one still being set up, is never touched)."""
    try:
        if temp_dir.stat().st_uid != os.getuid():
            return False
        with open(temp_dir / OWNER_FILE) as owner:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when closed
    except OSError:  # locked (its owner lives), no owner file yet, another user's dir, ...
        return False
    return True


@contextlib.contextmanager
def _without_api_server() -> Iterator[None]:
    """Start Ray without its API server process (ray/dashboard/dashboard.py).

    With `include_dashboard=False` Ray 2.60 still starts that process, only to run its usage-stats module, and that
    module probes the cloud metadata services (169.254.169.254 twice, a DNS lookup of metadata.google.internal)
    before it even checks whether usage stats are enabled (dashboard/modules/usage_stats/usage_stats_head.py:
    `get_cluster_config_to_report`). No Ray setting turns that off, and a private local Ray loses nothing
    without the process: no job, state or metrics API is served by it with the dashboard off.
    """
    from ray._private import services

    start_api_server = services.start_api_server
    services.start_api_server = lambda *args, **kwargs: (None, None)  # (dashboard url, process info)
    try:
        yield
    finally:
        services.start_api_server = start_api_server


def _start_local_ray(num_cpus: int | None) -> None:
    import ray

    _single_node_mode()
    # Ray's default for a new local Ray, said explicitly so Ray does not warn about it on every run: other users
    # of this machine cannot reach its loopback ports without the token (~/.ray/auth_token, made if missing).
    if os.environ.get("RAY_AUTH_MODE") is None:
        _enable_token_auth()
    temp_dir = _private_temp_dir()
    with _without_api_server():
        ray.init(
            address="local",  # never the cluster recorded in ray_current_cluster, never RAY_ADDRESS
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            _temp_dir=temp_dir,
            configure_logging=False,
        )

    def cleanup() -> None:  # atexit runs this before Ray's own shutdown hook (registered earlier)
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    atexit.register(cleanup)


# ---------------------------------------------------------------------------------------------------- cluster


def _token_source() -> str | None:
    """Where Ray's token loader (C++ AuthenticationTokenLoader) finds a token, in its order; None when nowhere."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}"
    default = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return default if os.path.isfile(default) and os.path.getsize(default) else None


def _use_token_if_available() -> None:
    """Send the auth token when one is where `ray start` keeps it and RAY_AUTH_MODE is not set.

    A Ray 2.60 driver given an explicit address never enables token auth by itself (ray/_private/worker.py:
    only `address="auto"` does), so without this a token-protected cluster answers every call with
    InvalidAuthToken. The mode is read from the environment by Ray's C++ config, which the driver's workers and
    a re-read (`Config.initialize`) both see.
    """
    if os.environ.get("RAY_AUTH_MODE") is None and _token_source():
        _enable_token_auth()


def _enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and the Ray processes it starts; Ray's C++ config, read once, is
    re-read so this process's own clients send the token too."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def _check_cluster(address: str) -> None:
    """One gRPC call to the cluster's GCS (its id), so a wrong address or token fails in seconds, in one line."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = init_grpc_channel(address)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_S, wait_for_ready=False
        )
    except grpc.RpcError as exc:
        code, details = exc.code(), (exc.details() or "").splitlines()[:1]
        mode = os.environ.get("RAY_AUTH_MODE", "")
        if (
            code == grpc.StatusCode.UNAUTHENTICATED
            and mode.lower() == "token"
            and (source := _token_source())
        ):
            raise RayConnectError(
                f"the Ray cluster at {address} rejected the auth token from {source}: set {AUTH_TOKEN_VARS} "
                "to the head node's token (`ray get-auth-token` on the head prints it)"
            ) from None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            why = f"RAY_AUTH_MODE={mode} sends none" if mode and mode.lower() != "token" else "none was found"
            raise RayConnectError(
                f"the Ray cluster at {address} requires an auth token and {why}: copy the head node's "
                f"~/.ray/auth_token to ~/.ray/auth_token here, or set {AUTH_TOKEN_VARS}"
            ) from None
        raise RayConnectError(
            f"cannot reach a Ray cluster at {address} ({code.name.lower()}: {' '.join(details)}): check "
            "--ray-address / RAY_ADDRESS, and that `ray start --head` runs there and its port is open"
        ) from None
    finally:
        channel.close()


def _connect(address: str) -> None:
    import ray

    if _is_loopback(address):
        _single_node_mode()  # the cluster's nodes are on 127.0.0.1: so is this driver
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address.startswith("ray://"):  # Ray Client addresses go through a proxy with its own errors
        _use_token_if_available()
        _check_cluster(address)
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError) as exc:
        raise RayConnectError(
            f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}"
        ) from None


# ---------------------------------------------------------------------------------------------------- workers

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_progress: Counter | None = None  # the running unit's progress since its last report; None outside a unit
_progress_lock = threading.Lock()


def report_progress(**counts: int) -> None:
    """Add to the running unit's live progress (e.g. `pages=1, warc_bytes=n`), shown on the driver's progress
    bar within a second. Costs a dict update; a no-op outside a Ray unit (tests, benchmarks)."""
    with _progress_lock:
        if _progress is not None:
            _progress.update(counts)


def _take_progress() -> dict[str, int]:
    global _progress
    with _progress_lock:
        taken, _progress = _progress, Counter()
    return dict(taken or {})


def _die_with_raylet() -> None:
    """Ask Linux to SIGKILL this worker when its parent, the raylet, dies (set once per worker process).

    Without it a worker notices a dead raylet only at its next check, a second or two later, and keeps writing
    meanwhile: after a `kill -9` of a local driver (which takes its raylet along), or of a cluster's raylet.
    """
    if not sys.platform.startswith("linux") or getattr(_die_with_raylet, "armed", False):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:  # armed now; if the raylet died before that, this worker was re-parented already: stop here
        with open(f"/proc/{os.getppid()}/comm") as f:
            orphan = f.read().strip() != "raylet"
    except OSError:
        orphan = True
    if orphan:
        os._exit(1)
    _die_with_raylet.armed = True  # type: ignore[attr-defined]


def _check_job_alive() -> None:
    """Raise unless the GCS says this worker's job (its driver) is still running: called before each commit."""
    import ray

    job_id = ray.get_runtime_context().get_job_id()
    jobs = ray._private.worker.global_worker.gcs_client.get_all_job_info(
        job_or_submission_id=job_id,
        skip_submission_job_info_field=True,
        skip_is_running_tasks_field=True,
        timeout=CONNECT_TIMEOUT_S,
    )
    if not jobs or any(info.is_dead for info in jobs.values()):
        raise RuntimeError(f"job {job_id} is gone (its driver died): output not committed")


def _arm_worker() -> None:
    """What every m3w Ray task runs first: it dies with its raylet, and commits outputs only while its job lives."""
    _die_with_raylet()
    io.commit_check = _check_job_alive


def ray_task(fn: TaskFn) -> TaskFn:
    """`fn` as the body of a Ray task of m3w (`ray.remote(...)(ray_task(fn))`), armed like every unit of
    `run_units`: no output of it is published after its driver died."""

    @functools.wraps(fn)
    def armed(*args: Any, **kwargs: Any) -> Any:
        _arm_worker()
        return fn(*args, **kwargs)

    return armed  # type: ignore[return-value]


def _run_unit(fn: Callable[[Any], tuple[str | None, dict[str, int]]], args: Any) -> Iterator[tuple[str, Any]]:
    """Ray streaming task: run one unit, yielding ("progress", counts) about once a second while it runs, then
    ("done", fn's result) or ("failed", error). Exceptions come back as values so one bad unit never kills
    the job. The unit runs in a thread so that this generator can report while it works."""
    global _progress
    _arm_worker()
    outcome: list[tuple[str, Any]] = []

    def work() -> None:
        try:
            outcome.append(("done", fn(args)))
        except UserError as exc:  # a reason for the user (input, store): its one line says it all
            outcome.append(("failed", f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - any failure of a unit is recorded, not raised
            outcome.append(("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"))

    with _progress_lock:
        _progress = Counter()
    thread = threading.Thread(target=work, name="m3w-unit", daemon=True)
    thread.start()
    while True:
        thread.join(PROGRESS_INTERVAL_S)
        finished = not thread.is_alive()
        if counts := _take_progress():
            yield "progress", counts
        if finished:
            break
    with _progress_lock:
        _progress = None
    yield outcome[0]


# ---------------------------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Unit:
    """One input of a stage. `id` names it in the manifest; `args` is what the unit function receives."""

    id: str
    args: Any


@dataclass
class RunSummary:
    done: int
    failed: int
    skipped: int
    counts: Counter
    seconds: float
    failures: dict[str, str]
    outputs: dict[str, Any] = field(default_factory=dict)  # unit id → what its function returned as output


def _format_progress(progress: Counter, counts: Counter, rate_key: str | None, elapsed: float) -> str:
    """'1,234 pages (410/s), 56.7 MB (19.0 MB/s), 12.5 documents/s': live progress, then the finished rate."""
    parts = []
    for key, value in sorted(progress.items()):
        if key.endswith("bytes"):
            parts.append(f"{value / 1e6:,.1f} MB ({value / 1e6 / elapsed:.1f} MB/s)")
        else:
            parts.append(f"{value:,} {key} ({value / elapsed:.0f}/s)")
    if rate_key:
        parts.append(f"{counts[rate_key] / elapsed:.1f} {rate_key}/s")
    return ", ".join(parts)


def run_units(
    fn: Callable[[Any], tuple[str | None, dict[str, int]]],
    units: Sequence[Unit],
    manifest: Manifest | None,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    desc: str = "units",
    rate_key: str | None = None,
    num_cpus_per_task: float = 1.0,
    num_gpus_per_task: float = 0.0,
    memory_per_task: int | None = None,
) -> RunSummary:
    """Run `fn` over the units not yet done in `manifest`, at most `workers` at a time, and record each result.

    `fn(args) -> (output, counts)` must write its output atomically; `output` (a relative path, or any JSON
    value describing the outputs) is recorded with the counts. `rate_key` names the count shown as a rate on
    the progress bar (e.g. "pages" → pages/s); counters the unit passes to `report_progress` are shown live,
    with their rates. Without a manifest (steps whose outputs are their own proof of completion, like the
    image store's rows files) nothing is recorded and nothing skipped.
    """
    import ray

    start = time.monotonic()
    done_before = manifest.done_units(manifest.config_hash or None) if manifest else set()
    todo = [u for u in units if u.id not in done_before]
    skipped = len(units) - len(todo)
    summary = RunSummary(0, 0, skipped, Counter(), 0.0, {})
    if not todo:
        summary.seconds = time.monotonic() - start
        return summary

    if manifest:
        io.remove_temp_files(manifest.dir)  # a killed run's partial outputs: this run rewrites those units
    init_ray(ray_address)
    started = time.monotonic()  # rates count from here, not from before Ray started
    workers = max(1, workers or int(ray.available_resources().get("CPU", 1)))
    # The task name shows in Ray's dashboard and worker logs: which stage a busy worker is running.
    options: dict[str, Any] = {
        "num_cpus": num_cpus_per_task,
        "num_gpus": num_gpus_per_task,
        "max_retries": 0,
        "num_returns": "streaming",
        "name": f"m3w.{desc.split(':')[0].replace(' ', '.')}",
    }
    if memory_per_task:
        options["memory"] = memory_per_task
    remote = ray.remote(_run_unit).options(**options)
    fn_ref = ray.put(fn)

    pending: dict[Any, Unit] = {}  # ObjectRefGenerator → unit
    progress: Counter = Counter()
    queue = list(todo)
    shown = 0.0  # when the live postfix was last redrawn (tqdm's mininterval governs only update())
    bar = tqdm(total=len(todo), desc=desc, unit="unit", dynamic_ncols=True, mininterval=1.0)
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                unit = queue.pop(0)
                pending[remote.remote(fn_ref, unit.args)] = unit
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_INTERVAL_S)
            for stream in ready:
                try:
                    status, value = ray.get(next(stream))
                except StopIteration:
                    status, value = "failed", "the worker ended without a result"
                except Exception as exc:  # noqa: BLE001 - a dead worker (OOM, segfault) fails the unit only
                    status, value = "failed", f"{type(exc).__name__}: {exc}"
                if status == "progress":
                    progress.update(value)
                    continue
                unit = pending.pop(stream)
                if status == "done":
                    output, counts = value
                    if manifest:
                        manifest.done(unit.id, output, counts)
                    summary.done += 1
                    summary.counts.update(counts)
                    summary.outputs[unit.id] = output
                else:
                    if manifest:
                        manifest.failed(unit.id, value)
                    summary.failed += 1
                    summary.failures[unit.id] = value
                bar.update(1)
            now = time.monotonic()
            if (progress or rate_key) and (now - shown >= PROGRESS_INTERVAL_S or not (queue or pending)):
                shown = now
                bar.set_postfix_str(
                    _format_progress(progress, summary.counts, rate_key, max(now - started, 1e-9))
                )
    finally:
        bar.close()
        for stream in pending:
            ray.cancel(stream, force=True)
    summary.seconds = time.monotonic() - start
    return summary
