"""Shared test fixtures: the real webcorpus, one Ray per test session, and loopback HTTP servers."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
WEBCORPUS = Path(os.environ.get("M3W_WEBCORPUS", ROOT.parent / "shared" / "webcorpus"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The S3 API server of the object-storage tests (moto in server mode, as s3fs's own tests run it) listens here.
# Its endpoint is fixed before any Ray worker starts, so workers inherit it, and every s3:// access of the
# test session goes to 127.0.0.1, never to AWS.
S3_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update(AWS_ENDPOINT_URL_S3=S3_ENDPOINT, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")  # fmt: skip


@pytest.fixture(scope="session")
def webcorpus() -> Path:
    if not (WEBCORPUS / "warc").is_dir():
        pytest.fail(f"webcorpus not found at {WEBCORPUS} (set M3W_WEBCORPUS)")
    return WEBCORPUS


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """A bucket on an S3 API server on 127.0.0.1, started for the session and stopped by its pid. Yields
    "s3://<bucket>"."""
    import fsspec

    port = S3_ENDPOINT.rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the S3 API server did not start on {S3_ENDPOINT}")
                time.sleep(0.1)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("m3w-test")
        yield "s3://m3w-test"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One private local Ray for the whole test session (ray.init takes seconds), whatever RAY_ADDRESS says.
    Yields its GCS address, so CLI subprocesses can join the same Ray with `--ray-address`."""
    import ray

    from m3w.pipeline.ray_runner import init_ray

    init_ray("local", num_cpus=2)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops SYNs under concurrent clients (1 s stalls)


def start_http_server(
    directory: Path, handler: type[http.server.BaseHTTPRequestHandler] | None = None
) -> tuple[str, http.server.ThreadingHTTPServer]:
    """Serve `directory` on 127.0.0.1 (a free port) from a daemon thread. Returns (base_url, server)."""
    handler_cls = handler or functools.partial(_QuietHandler, directory=str(directory))
    server = _Server(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


@dataclass
class Route:
    """One canned response of `serve_routes`: status, headers, body, a delay before answering, and whether to
    send Content-Length (without it the body ends when the connection closes)."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    send_length: bool = True


@pytest.fixture
def serve_routes() -> Iterator[Callable[[dict[str, Route]], tuple[str, Counter]]]:
    """Factory: serve {path: Route} over HTTP/1.1 on 127.0.0.1; returns (base_url, hits per path). Unknown
    paths get 404. The servers stop at the end of the test."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(routes: dict[str, Route]) -> tuple[str, Counter]:
        hits: Counter = Counter()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (cap, timeout)
                    pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                hits[self.path] += 1
                route = routes.get(self.path, Route(b"not found", 404))
                time.sleep(route.delay)
                self.send_response(route.status)
                for key, value in route.headers.items():
                    self.send_header(key, value)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
                pass

        url, server = start_http_server(Path("."), Handler)
        servers.append(server)
        return url, hits

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


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


@pytest.fixture(scope="session")
def shards_corpus(tmp_path_factory, webcorpus, ray_address):
    """Webcorpus pages through extract → filter → images (loopback image server): the shard-stage input."""
    from shards_corpus import build_corpus

    return build_corpus(tmp_path_factory.mktemp("shards_corpus"), webcorpus, start_http_server)


@pytest.fixture(scope="session")
def cc_crawl(tmp_path_factory, webcorpus, serve_dir) -> tuple[str, str, int]:
    """A Common Crawl-like tree served on 127.0.0.1: `crawl-data/CC-MAIN-2099-01/warc.paths.gz` listing every
    webcorpus WARC (symlinked under `crawl-data/.../segments/0/warc/`). Returns (base_url, crawl_id, n_warcs);
    use with `m3w extract --crawl CRAWL_ID --cc-base-url BASE_URL [--limit N]`."""
    import gzip

    crawl_id = "CC-MAIN-2099-01"
    root = tmp_path_factory.mktemp("cc")
    warc_dir = root / "crawl-data" / crawl_id / "segments" / "0" / "warc"
    warc_dir.mkdir(parents=True)
    rel_paths = []
    for warc in sorted((webcorpus / "warc").glob("*.warc.gz")):
        (warc_dir / warc.name).symlink_to(warc.resolve())
        rel_paths.append(f"crawl-data/{crawl_id}/segments/0/warc/{warc.name}")
    with gzip.open(root / "crawl-data" / crawl_id / "warc.paths.gz", "wt") as f:
        f.write("\n".join(rel_paths) + "\n")
    return serve_dir(root), crawl_id, len(rel_paths)


@pytest.fixture(scope="session")
def webcorpus_documents(tmp_path_factory, webcorpus, ray_address) -> Path:
    """Every webcorpus WARC through `run_extract`, once per session: the documents/ the filter tests read."""
    from m3w.pipeline.extract import run_extract

    out = tmp_path_factory.mktemp("webcorpus_documents")
    summary = run_extract(
        sorted(str(p) for p in (webcorpus / "warc").glob("*.warc.gz")), out, ray_address=ray_address
    )
    assert summary.failed == 0, summary.failures
    return out
