"""Shared test fixtures: the real webcorpus, one Ray per test session, and loopback HTTP servers."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
WEBCORPUS = Path(os.environ.get("M3W_WEBCORPUS", ROOT.parent / "shared" / "webcorpus"))


@pytest.fixture(scope="session")
def webcorpus() -> Path:
    if not (WEBCORPUS / "warc").is_dir():
        pytest.fail(f"webcorpus not found at {WEBCORPUS} (set M3W_WEBCORPUS)")
    return WEBCORPUS


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray for the whole test session (ray.init takes seconds). Yields its GCS address, so CLI
    subprocesses can join the same Ray with `--ray-address`."""
    import ray

    from pipeline.ray_runner import init_ray

    init_ray(num_cpus=2)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass


def start_http_server(
    directory: Path, handler: type[http.server.BaseHTTPRequestHandler] | None = None
) -> tuple[str, http.server.ThreadingHTTPServer]:
    """Serve `directory` on 127.0.0.1 (a free port) from a daemon thread. Returns (base_url, server)."""
    handler_cls = handler or functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


@pytest.fixture(scope="session")
def serve_dir() -> Iterator[Callable[[Path], str]]:
    """Factory: serve a directory over HTTP on 127.0.0.1 for the rest of the session; returns its base URL."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(directory: Path) -> str:
        url, server = start_http_server(directory)
        servers.append(server)
        return url

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
