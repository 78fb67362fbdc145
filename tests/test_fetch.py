"""The safe fetcher against real HTTP servers on 127.0.0.1: statuses, caps, redirects, opt-outs, the address
allow-list (including DNS rebinding, with a resolver that changes its answer), deadlines against hostile servers,
transient failures, and politeness (per-host limits, User-Agent, robots.txt)."""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import WEBCORPUS, Route

from m3w.pipeline.fetch import (
    FetchConfig,
    HostLimiter,
    InsecureFetchWarning,
    SafeFetcher,
    address_refusal,
    parse_allow_entry,
    safe_fetch,
    system_resolver,
)

PHOTO = WEBCORPUS / "photos" / "sklearn_china.jpg"


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def loopback(base: str, **kwargs) -> FetchConfig:
    """A config that admits exactly the test server's address and port."""
    settings = {"connect_timeout": 2.0, "read_timeout": 1.0, "total_timeout": 10.0, **kwargs}
    return FetchConfig(allow_hosts=[f"127.0.0.1:{port_of(base)}"], **settings)


def names(mapping: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    """A resolver with fixed answers for test names; IP literals resolve to themselves."""

    def resolve(host: str, port: int) -> list[str]:
        return mapping[host] if host in mapping else system_resolver(host, port)

    return resolve


# ------------------------------------------------------------------------------------------ the allow-list


@pytest.mark.parametrize(
    "ip, port, allow, refused",
    [
        ("8.8.8.8", 80, [], False),
        ("2606:4700:4700::1111", 443, [], False),
        ("127.0.0.1", 80, [], True),
        ("::1", 80, [], True),
        ("10.1.2.3", 80, [], True),
        ("172.16.0.1", 80, [], True),
        ("192.168.1.1", 80, [], True),
        ("100.64.0.1", 80, [], True),  # carrier-grade NAT
        ("fc00::1", 80, [], True),  # IPv6 unique local
        ("::ffff:10.0.0.1", 80, [], True),  # IPv4-mapped IPv6
        ("2002:7f00:1::", 80, [], True),  # 6to4 wrapping 127.0.0.1
        ("127.0.0.1", 8080, ["127.0.0.1:8080"], False),
        ("127.0.0.1", 8081, ["127.0.0.1:8080"], True),  # another port of the same address
        ("::1", 8080, ["127.0.0.1:8080"], True),  # the other loopback is another address
        ("::1", 8080, ["[::1]:8080"], False),
        ("::ffff:127.0.0.1", 8080, ["127.0.0.1:8080"], False),  # the same address, spelt as IPv6
        ("10.9.8.7", 443, ["10.0.0.0/8"], False),
        ("10.9.8.7", 443, ["10.0.0.0/8:80"], True),
        ("192.168.1.1", 80, ["10.0.0.0/8"], True),
        ("fd12::5", 80, ["[fd00::/8]:80"], False),
        ("169.254.169.254", 80, ["169.254.0.0/16"], True),  # cloud metadata: never
        ("fe80::1", 80, ["fe80::/10"], True),
        ("224.0.0.1", 80, ["224.0.0.0/4"], True),
        ("ff02::1", 80, [], True),
        ("0.0.0.0", 80, ["0.0.0.0/0"], True),
        ("240.0.0.1", 80, [], True),
        ("::ffff:169.254.169.254", 80, [], True),
    ],
)
def test_address_refusal_table(ip: str, port: int, allow: list[str], refused: bool) -> None:
    reason = address_refusal(ip, port, [parse_allow_entry(e) for e in allow])
    assert (reason is not None) == refused, reason


@pytest.mark.parametrize("entry", ["127.0.0.1:http", "localhost:80", "10.0.0.0/33", "1.2.3.4:70000", "[::1"])
def test_bad_allow_entries_fail_when_the_config_loads(entry: str) -> None:
    with pytest.raises(ValueError, match="allow_hosts entry"):
        FetchConfig(allow_hosts=[entry])


def test_loopback_refused_unless_its_address_and_port_are_allowed(serve_routes) -> None:
    body = PHOTO.read_bytes()
    base, hits = serve_routes({"/a.jpg": Route(body, headers={"Content-Type": "image/jpeg"})})
    port = port_of(base)
    for url in (f"{base}/a.jpg", f"http://localhost:{port}/a.jpg", f"http://[::1]:{port}/a.jpg"):
        result = safe_fetch(url)
        assert result.status == "blocked_address", (url, result)
        assert result.content is None
    other_port = FetchConfig(allow_hosts=[f"127.0.0.1:{port + 1}"])
    assert safe_fetch(f"{base}/a.jpg", other_port).status == "blocked_address"
    assert hits["/a.jpg"] == 0  # refused before connecting
    result = safe_fetch(f"{base}/a.jpg", loopback(base))
    assert result.ok and result.content == body and result.http_status == 200
    assert result.headers["content-type"] == "image/jpeg"
    assert safe_fetch(f"{base}/a.jpg", FetchConfig(allow_hosts=["127.0.0.0/8"])).ok  # a CIDR, any port


def test_redirects_to_internal_addresses_are_refused_before_connecting(serve_routes, monkeypatch) -> None:
    """Allowing the test server admits that address and port only: every hop is vetted again."""
    body = PHOTO.read_bytes()
    routes = {"/img.jpg": Route(body), "/moved": Route(status=301, headers={"Location": "/img.jpg"})}
    targets = {
        "/to-10": "http://10.0.0.1/x",
        "/to-192": "http://192.168.1.1/x",
        "/to-v6-loopback": "http://[::1]:{port}/img.jpg",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-name": "http://intranet.test/x",  # resolves to 10.x
        "/to-other-port": "http://127.0.0.1:{other}/img.jpg",
        "/to-file": "file:///etc/passwd",
    }
    routes.update({path: Route(status=302) for path in targets})
    base, hits = serve_routes(routes)
    port = port_of(base)
    for path, location in targets.items():
        routes[path].headers["Location"] = location.format(port=port, other=port + 1)
    connects: list[tuple] = []
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda s, a: (connects.append(a), real_connect(s, a))[1])
    resolver = names({"intranet.test": ["10.20.30.40"]})
    with SafeFetcher(loopback(base), resolver=resolver) as fetcher:
        moved = fetcher.fetch(f"{base}/moved")
        assert moved.ok and moved.content == body and moved.final_url == f"{base}/img.jpg"
        assert moved.redirects == 1
        for path in targets:
            result = fetcher.fetch(f"{base}{path}")
            assert result.status == "blocked_address", (path, result)
            assert result.content is None and result.redirects == 1
    assert {address[0] for address in connects} == {"127.0.0.1"}  # no other address was ever connected to
    assert hits["/img.jpg"] == 1


def test_redirects_are_bounded(serve_routes) -> None:
    base, hits = serve_routes({"/loop": Route(status=302, headers={"Location": "/loop"})})
    loop = safe_fetch(f"{base}/loop", loopback(base, max_redirects=3))
    assert loop.status == "http_error" and "more than 3 redirects" in loop.error
    assert hits["/loop"] == 4  # the first request + 3 hops, then it stops
    assert safe_fetch("file:///etc/passwd").status == "bad_url"
    assert safe_fetch("ftp://example.com/a.jpg").status == "bad_url"


def test_dns_rebinding_cannot_reach_loopback(serve_routes) -> None:
    """The host resolves to a public address when vetted and to 127.0.0.1 afterwards. The fetcher must connect
    to the address it vetted (and never resolve twice), so the loopback server sees no request."""
    base, hits = serve_routes({"/secret": Route(b"internal data")})
    port = port_of(base)
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["93.184.216.34" if len(calls) == 1 else "127.0.0.1"]  # public, unreachable from the tests

    config = FetchConfig(connect_timeout=0.5, total_timeout=2)
    result = safe_fetch(f"http://rebind.test:{port}/secret", config, resolver=rebinding)
    assert result.status in ("timeout", "http_error") and result.content is None, result
    assert hits["/secret"] == 0 and calls == ["rebind.test"]
    # A name answering with a mix of public and internal addresses is refused outright.
    mixed = names({"mixed.test": ["93.184.216.34", "127.0.0.1"]})
    assert safe_fetch(f"http://mixed.test:{port}/secret", resolver=mixed).status == "blocked_address"
    assert hits["/secret"] == 0


@pytest.mark.parametrize(
    "url",
    ["http://[::1/a", "http://127.0.0.1:99999/", "http:///x", "//host/x", "javascript:alert(1)", "",
     "http://bücher.invalid/a.jpg", "http://xn--.invalid/", "http://" + "a" * 70 + ".invalid/"],
)  # fmt: skip
def test_malformed_urls_end_as_bad_url_without_raising(url: str) -> None:
    def no_invalid_names(host: str, port: int) -> list[str]:
        if host.endswith(".invalid"):  # RFC 6761: never resolves; answered here, without a DNS query
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return system_resolver(host, port)

    result = safe_fetch(url, resolver=no_invalid_names)
    assert result.status == "bad_url" and result.error, result


def test_numeric_host_spellings_are_vetted(serve_routes) -> None:
    base, hits = serve_routes({"/x": Route(b"x")})
    port = port_of(base)
    for host in ("2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]"):  # all spell 127.0.0.1
        assert safe_fetch(f"http://{host}:{port}/x").status == "blocked_address", host
    assert hits["/x"] == 0


# ------------------------------------------------------------------------------------ statuses and limits


def test_http_statuses_timeouts_and_caps(serve_routes) -> None:
    big = b"\xff" * 3000
    bomb = gzip.compress(b"\0" * 5_000_000)
    base, hits = serve_routes(
        {
            "/500": Route(b"oops", 500),
            "/slow": Route(b"late", delay=3.0),
            "/big": Route(big),
            "/big-unsized": Route(big, send_length=False),
            "/small-unsized": Route(b"x" * 100, send_length=False),
            "/gzipped": Route(gzip.compress(b"y" * 900), headers={"Content-Encoding": "gzip"}),
            "/gzip-bomb": Route(bomb, headers={"Content-Encoding": "gzip"}),
            "/with%20space%20%C3%BC.jpg": Route(b"spaced"),
        }
    )
    with SafeFetcher(loopback(base, max_bytes=1000)) as fetcher:
        missing = fetcher.fetch(f"{base}/missing")
        assert (missing.status, missing.http_status, missing.transient) == ("http_error", 404, False)
        assert fetcher.fetch(f"{base}/500").http_status == 500
        slow = fetcher.fetch(f"{base}/slow")
        assert slow.status == "timeout" and slow.attempts == 1, slow  # timeouts wait for a later run
        big_result = fetcher.fetch(f"{base}/big")
        assert big_result.status == "too_large" and "Content-Length" in big_result.error
        unsized = fetcher.fetch(f"{base}/big-unsized")
        assert unsized.status == "too_large" and "body over 1000" in unsized.error
        assert fetcher.fetch(f"{base}/small-unsized").content == b"x" * 100
        assert fetcher.fetch(f"{base}/big", max_bytes=5000).content == big  # per-call cap (video files)
        assert fetcher.fetch(f"{base}/gzipped").content == b"y" * 900  # decoded, under the same cap
        assert fetcher.fetch(f"{base}/gzip-bomb").status == "too_large"
        assert (
            fetcher.fetch(f"{base}/with space ü.jpg").content == b"spaced"
        )  # sent %-encoded, as browsers do
    assert hits["/slow"] == 1


def test_keep_alive_survives_a_server_closing_idle_connections(serve_routes) -> None:
    """The fetcher reuses connections; when the server has closed an idle one, the next fetch still works."""
    base, hits = serve_routes({"/a": Route(b"a"), "/b": Route(b"b")})
    with SafeFetcher(loopback(base)) as fetcher:
        assert fetcher.fetch(f"{base}/a").content == b"a"
        (conn,) = fetcher._idle[("http", "127.0.0.1", port_of(base), "127.0.0.1")]
        conn.sock.shutdown(socket.SHUT_RDWR)  # as a server's idle timeout would end it
        assert fetcher.fetch(f"{base}/b").content == b"b"
        assert fetcher.fetch(f"{base}/a").content == b"a"
    assert hits == Counter({"/a": 2, "/b": 1})


@pytest.mark.parametrize(
    "header, status",
    [
        ("noai", "opted_out"),
        ("noindex, noimageai", "opted_out"),
        ("NOAI", "opted_out"),
        ("m3w: noai", "opted_out"),  # addressed to our user agent
        ("otherbot: noai", "ok"),  # addressed to someone else
        ("noindex", "ok"),
    ],
)
def test_x_robots_tag_opt_out(serve_routes, header: str, status: str) -> None:
    base, hits = serve_routes({"/img.jpg": Route(b"jpegbytes", headers={"X-Robots-Tag": header})})
    result = safe_fetch(f"{base}/img.jpg", loopback(base))
    assert result.status == status, result
    assert (result.content is None) == (status == "opted_out")  # an opted-out body is never read


# ------------------------------------------------------------------------------- deadlines, hostile servers


@contextlib.contextmanager
def hostile_server(behave: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A raw TCP server on 127.0.0.1: reads the request, then `behave(conn, stop)` writes what it likes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            behave(conn, stop)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def _drip(data: bytes, every: float) -> Callable[[socket.socket, threading.Event], None]:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(data)
        while not stop.wait(every):
            conn.sendall(b"a")

    return behave


def _endless_chunks(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while not stop.wait(0.02):
        conn.sendall(b"4\r\nabcd\r\n")


def _stall(data: bytes) -> Callable[[socket.socket, threading.Event], None]:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(data)
        stop.wait()

    return behave


HOSTILE = {
    "stall before headers": _stall(b""),
    "slow headers": _drip(b"HTTP/1.1 200 OK\r\nX-Slow: ", 0.2),
    "stall after headers": _stall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc"),
    "drip": _drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", 0.2),
    "drip without length": _drip(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", 0.2),
    "endless chunked body": _endless_chunks,
}


@pytest.mark.parametrize("behaviour", list(HOSTILE))
def test_the_total_deadline_holds_whatever_the_server_does(behaviour: str) -> None:
    """read_timeout (10 s) never fires here: only the total deadline (1.5 s) can end these fetches."""
    with hostile_server(HOSTILE[behaviour]) as base:
        config = loopback(base, read_timeout=10.0, total_timeout=1.5)
        start = time.monotonic()
        result = safe_fetch(f"{base}/x.jpg", config)
        elapsed = time.monotonic() - start
    assert result.status == "timeout" and result.content is None, result
    assert 1.4 <= elapsed <= 1.5 + 1.0, elapsed


def test_a_slow_url_does_not_hold_back_the_others(serve_routes) -> None:
    """map_polite yields results as they complete: fast URLs are done long before a drip times out."""
    base, _ = serve_routes({f"/{i}": Route(str(i).encode()) for i in range(12)})
    with hostile_server(HOSTILE["drip"]) as slow_base:
        config = FetchConfig(allow_hosts=["127.0.0.1"], read_timeout=10.0, total_timeout=2.0)
        urls = [f"{slow_base}/drip"] + [f"{base}/{i}" for i in range(12)]
        start = time.monotonic()
        done: list[tuple[str, str, float]] = []
        with SafeFetcher(config) as fetcher:
            for result in fetcher.map_polite(fetcher.fetch, urls, str, threads=4):
                done.append((result.url, result.status, time.monotonic() - start))
    assert done[-1][:2] == (f"{slow_base}/drip", "timeout")
    assert all(status == "ok" and at < 1.0 for _, status, at in done[:-1]), done


# ------------------------------------------------------------------------------------- transient failures


def test_temporary_dns_failure_is_retried_then_succeeds(serve_routes) -> None:
    """EAI_AGAIN ("Temporary failure in name resolution") is transient: retried within the fetch's tries, and
    the fetch succeeds once the name resolves. NXDOMAIN is final at once."""
    base, hits = serve_routes({"/a.jpg": Route(b"image")})
    port = port_of(base)
    calls: Counter = Counter()

    def flaky(host: str, port: int) -> list[str]:
        calls[host] += 1
        if host == "gone.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if calls[host] <= 2:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return ["127.0.0.1"]

    with SafeFetcher(loopback(base, retry_backoff=0.05), resolver=flaky) as fetcher:
        once = fetcher.fetch(f"http://images.test:{port}/a.jpg")
        assert once.status == "http_error" and once.http_status is None and once.transient, once
        assert "temporary DNS failure" in once.error
        result = fetcher.fetch(f"http://images.test:{port}/a.jpg", tries=3)
        assert result.ok and result.content == b"image" and result.attempts == 2, result
        gone = fetcher.fetch(f"http://gone.test:{port}/a.jpg", tries=3)
        assert (gone.status, gone.attempts, gone.transient) == ("bad_url", 1, False), gone
    assert calls == Counter({"images.test": 3, "gone.test": 1}) and hits["/a.jpg"] == 1


def test_refused_and_reset_connections_are_transient_and_retried() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    refused = safe_fetch(
        f"http://127.0.0.1:{port}/x", FetchConfig(allow_hosts=["127.0.0.1"], retry_backoff=0.01)
    )
    assert (refused.status, refused.http_status, refused.transient) == ("http_error", None, True), refused

    def reset(conn: socket.socket, stop: threading.Event) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # close → RST

    with hostile_server(reset) as base, SafeFetcher(loopback(base, retry_backoff=0.01)) as fetcher:
        result = fetcher.fetch(f"{base}/x", tries=3)
    assert (result.status, result.transient, result.attempts) == ("http_error", True, 3), result


# -------------------------------------------------------------------------------------------- politeness


def _counting_server(delay: float) -> tuple[str, dict, Callable[[], None]]:
    """HTTP/1.1 server recording, per request: path, User-Agent, start time; and the most requests in flight."""
    state: dict = {"requests": [], "in_flight": 0, "max_in_flight": 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            with lock:
                state["requests"].append((self.path, self.headers.get("User-Agent"), time.monotonic()))
                state["in_flight"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            time.sleep(delay)
            with lock:
                state["in_flight"] -= 1
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/final")
                body = b""
            elif self.path == "/robots.txt":
                self.send_response(200)
                body = b"User-agent: *\nAllow: /\n"
            else:
                self.send_response(200)
                body = self.path.encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", state, stop


def test_per_host_concurrency_and_rate_limits() -> None:
    base, state, stop = _counting_server(delay=0.1)
    try:
        limited = loopback(base, max_connections_per_host=3)
        with SafeFetcher(limited) as fetcher:
            results = list(fetcher.map_polite(fetcher.fetch, [f"{base}/c{i}" for i in range(15)], str, 12))
        assert all(r.ok for r in results) and len(results) == 15
        assert state["max_in_flight"] == 3
        state["requests"].clear()
        rated = loopback(base, max_requests_per_second_per_host=20, max_connections_per_host=0)
        with SafeFetcher(rated) as fetcher:
            results = list(fetcher.map_polite(fetcher.fetch, [f"{base}/r{i}" for i in range(9)], str, 9))
        starts = sorted(t for _, _, t in state["requests"])
        assert all(r.ok for r in results)
        assert starts[-1] - starts[0] >= 8 / 20 - 0.02  # 9 starts, 50 ms apart at least
    finally:
        stop()


def test_a_rate_limited_host_does_not_hold_threads_others_could_use() -> None:
    """Two hosts at 3 requests/s each, on 2 threads: the 6 URLs of `localhost` come first in the input, yet the
    2 URLs of 127.0.0.1 are done after one rate interval, not after the 6 others."""
    base, _, stop = _counting_server(delay=0.0)
    try:
        config = FetchConfig(allow_hosts=["127.0.0.1"], max_requests_per_second_per_host=3)
        busy_urls = [f"http://localhost:{port_of(base)}/{i}" for i in range(6)]
        other_urls = [f"{base}/{i}" for i in range(2)]
        start, finished = time.monotonic(), {}
        with SafeFetcher(config, resolver=names({"localhost": ["127.0.0.1"]})) as fetcher:
            for result in fetcher.map_polite(fetcher.fetch, busy_urls + other_urls, str, threads=2):
                assert result.ok, result
                finished[result.url] = time.monotonic() - start
        assert max(finished[u] for u in other_urls) < 0.8
        assert max(finished[u] for u in busy_urls) >= 5 / 3 - 0.05  # 6 starts, 1/3 s apart
    finally:
        stop()


def test_user_agent_on_every_request_and_robots_txt_once_per_host() -> None:
    base, state, stop = _counting_server(delay=0.0)
    try:
        config = loopback(base, user_agent="TestBot/2.0 (+https://example.org/bot)", check_robots_txt=True)
        with SafeFetcher(config) as fetcher:
            assert fetcher.fetch(f"{base}/redirect").content == b"/final"
            urls = [f"{base}/img{i}.jpg" for i in range(6)]
            assert all(r.ok for r in fetcher.map_polite(fetcher.fetch, urls, str, threads=6))
    finally:
        stop()
    paths = Counter(path for path, _, _ in state["requests"])
    assert paths["/robots.txt"] == 1 and paths["/redirect"] == 1 and paths["/final"] == 1
    assert {agent for _, agent, _ in state["requests"]} == {"TestBot/2.0 (+https://example.org/bot)"}


def test_robots_txt_rules_cache_and_failures(serve_routes) -> None:
    robots = b"User-agent: m3w\nDisallow: /private/\n\nUser-agent: *\nDisallow: /\n"
    base, hits = serve_routes(
        {"/robots.txt": Route(robots), "/private/a.jpg": Route(b"a"), "/pub/b.jpg": Route(b"b")}
    )
    with SafeFetcher(loopback(base, check_robots_txt=True)) as fetcher:
        for _ in range(3):
            assert fetcher.fetch(f"{base}/private/a.jpg").status == "opted_out"
            assert fetcher.fetch(f"{base}/pub/b.jpg").content == b"b"
    assert hits["/robots.txt"] == 1 and hits["/private/a.jpg"] == 0  # asked before requesting the image
    assert safe_fetch(f"{base}/private/a.jpg", loopback(base)).ok  # off by default

    # RFC 9309: a missing robots.txt (4xx) allows everything; an unreachable one (5xx) disallows for now,
    # which is a retryable failure (http_error without an HTTP status), not an opt-out.
    missing, _ = serve_routes({"/a.jpg": Route(b"a")})
    assert safe_fetch(f"{missing}/a.jpg", loopback(missing, check_robots_txt=True)).ok
    broken, broken_hits = serve_routes({"/robots.txt": Route(b"", 503), "/a.jpg": Route(b"a")})
    result = safe_fetch(f"{broken}/a.jpg", loopback(broken, check_robots_txt=True))
    assert (result.status, result.http_status) == ("http_error", None) and "robots.txt" in result.error
    assert broken_hits["/a.jpg"] == 0


def test_host_limiter_never_limits_data_uris() -> None:
    limiter = HostLimiter(max_concurrent=1, rate=1.0)
    with limiter.cond:
        assert limiter.try_acquire("a.test") == 0.0
        assert limiter.try_acquire("a.test") == float("inf")
        assert all(limiter.try_acquire("") == 0.0 for _ in range(5))
    limiter.release("a.test")
    with limiter.cond:
        assert 0 < limiter.try_acquire("a.test") <= 1.0  # free again, but not before the rate allows


# -------------------------------------------------------------------------------------------------- TLS


def _make_tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf certificate for DNS:localhost signed by it (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=m3w test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr",
            "-subj", "/CN=localhost")  # fmt: skip
    (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "leaf.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return tmp_path / "ca.pem", tmp_path / "leaf.pem", tmp_path / "leaf.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_https_connects_to_the_vetted_ip_and_verifies_the_real_host(tmp_path) -> None:
    """TLS goes to the pinned IP literal, yet SNI and certificate checks use the URL's host name."""
    ca, cert, key = _make_tls_files(tmp_path)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.jpg").write_bytes(PHOTO.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    base = f"https://127.0.0.1:{port}"
    localhost = names({"localhost": ["127.0.0.1"]})
    try:
        trusted = loopback(base, ca_certs=str(ca))
        result = safe_fetch(f"https://localhost:{port}/a.jpg", trusted, localhost)
        assert result.ok and result.content == PHOTO.read_bytes(), result
        wrong_name = safe_fetch(f"{base}/a.jpg", trusted)  # the cert names localhost only
        assert wrong_name.status == "http_error" and "TLS error" in wrong_name.error, wrong_name
        assert "127.0.0.1" in wrong_name.error
        untrusted = safe_fetch(f"https://localhost:{port}/a.jpg", loopback(base), localhost)  # system CAs
        assert untrusted.status == "http_error" and "CERTIFICATE_VERIFY_FAILED" in untrusted.error
        with pytest.warns(InsecureFetchWarning):  # an explicit, loud opt-out
            assert safe_fetch(
                f"https://localhost:{port}/a.jpg", loopback(base, verify_tls=False), localhost
            ).ok
        blocked = safe_fetch(f"https://localhost:{port}/a.jpg", FetchConfig(ca_certs=str(ca)), localhost)
        assert blocked.status == "blocked_address"
    finally:
        server.shutdown()
        server.server_close()
