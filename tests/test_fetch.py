"""The safe fetcher against a real HTTP server on 127.0.0.1: statuses, caps, redirects, opt-outs, and the
address checks (including DNS rebinding, with a resolver that changes its answer)."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import urllib3
from conftest import Route

from m3w.pipeline.fetch import FetchConfig, SafeFetcher, address_refusal, safe_fetch

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "webcorpus" / "photos" / "sklearn_china.jpg"


def loopback(**kwargs) -> FetchConfig:
    return FetchConfig(
        allow_private=True, connect_timeout=2.0, read_timeout=1.0, total_timeout=10.0, **kwargs
    )


@pytest.mark.parametrize(
    "ip, refused_by_default, refused_with_flag",
    [
        ("8.8.8.8", False, False),
        ("2606:4700:4700::1111", False, False),
        ("127.0.0.1", True, False),
        ("::1", True, False),
        ("10.1.2.3", True, False),
        ("172.16.0.1", True, False),
        ("192.168.1.1", True, False),
        ("100.64.0.1", True, False),  # carrier-grade NAT
        ("fc00::1", True, False),  # IPv6 unique local
        ("::ffff:10.0.0.1", True, False),  # IPv4-mapped IPv6
        ("2002:7f00:1::", True, False),  # 6to4 wrapping 127.0.0.1
        ("169.254.169.254", True, True),  # cloud metadata: never
        ("fe80::1", True, True),
        ("224.0.0.1", True, True),
        ("ff02::1", True, True),
        ("0.0.0.0", True, True),
        ("240.0.0.1", True, True),
        ("::ffff:169.254.169.254", True, True),
    ],
)
def test_address_refusal_table(ip: str, refused_by_default: bool, refused_with_flag: bool) -> None:
    assert (address_refusal(ip, allow_private=False) is not None) == refused_by_default
    assert (address_refusal(ip, allow_private=True) is not None) == refused_with_flag


def test_loopback_refused_unless_allowed(serve_routes) -> None:
    body = PHOTO.read_bytes()
    base, hits = serve_routes({"/a.jpg": Route(body, headers={"Content-Type": "image/jpeg"})})
    port = base.rsplit(":", 1)[1]
    for url in (f"{base}/a.jpg", f"http://localhost:{port}/a.jpg", f"http://[::1]:{port}/a.jpg"):
        result = safe_fetch(url)
        assert result.status == "blocked_address", (url, result)
        assert result.content is None
    assert hits["/a.jpg"] == 0  # refused before connecting
    result = safe_fetch(f"{base}/a.jpg", loopback())
    assert result.ok and result.content == body and result.http_status == 200
    assert result.headers["content-type"] == "image/jpeg"


def test_http_statuses_timeouts_and_caps(serve_routes) -> None:
    big = b"\xff" * 3000
    base, hits = serve_routes(
        {
            "/500": Route(b"oops", 500),
            "/slow": Route(b"late", delay=3.0),
            "/big": Route(big),
            "/big-unsized": Route(big, send_length=False),
            "/small-unsized": Route(b"x" * 100, send_length=False),
        }
    )
    with SafeFetcher(loopback(max_bytes=1000)) as fetcher:
        assert (fetcher.fetch(f"{base}/missing").status, fetcher.fetch(f"{base}/missing").http_status) == (
            "http_error",
            404,
        )
        assert fetcher.fetch(f"{base}/500").http_status == 500
        slow = fetcher.fetch(f"{base}/slow")
        assert slow.status == "timeout", slow
        big_result = fetcher.fetch(f"{base}/big")
        assert big_result.status == "too_large" and "Content-Length" in big_result.error
        unsized = fetcher.fetch(f"{base}/big-unsized")
        assert unsized.status == "too_large" and "body over 1000" in unsized.error
        assert fetcher.fetch(f"{base}/small-unsized").content == b"x" * 100
        assert fetcher.fetch(f"{base}/big", max_bytes=5000).content == big  # per-call cap (video files)
    assert hits["/slow"] == 1


def test_redirects_are_rechecked_and_bounded(serve_routes) -> None:
    body = PHOTO.read_bytes()
    base, hits = serve_routes(
        {
            "/img.jpg": Route(body),
            "/moved": Route(status=301, headers={"Location": "/img.jpg"}),
            "/to-metadata": Route(
                status=302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}
            ),
            "/to-file": Route(status=302, headers={"Location": "file:///etc/passwd"}),
            "/loop": Route(status=302, headers={"Location": "/loop"}),
        }
    )
    with SafeFetcher(loopback(max_redirects=3)) as fetcher:
        moved = fetcher.fetch(f"{base}/moved")
        assert (
            moved.ok
            and moved.content == body
            and moved.final_url == f"{base}/img.jpg"
            and moved.redirects == 1
        )
        metadata = fetcher.fetch(f"{base}/to-metadata")
        assert metadata.status == "blocked_address" and "169.254.169.254" in metadata.error
        to_file = fetcher.fetch(f"{base}/to-file")
        assert to_file.status == "blocked_address" and "file" in to_file.error and to_file.content is None
        loop = fetcher.fetch(f"{base}/loop")
        assert loop.status == "http_error" and "more than 3 redirects" in loop.error
    assert hits["/loop"] == 4  # the first request + 3 hops, then it stops
    assert safe_fetch("file:///etc/passwd").status == "bad_url"
    assert safe_fetch("ftp://example.com/a.jpg").status == "bad_url"


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
    result = safe_fetch(f"{base}/img.jpg", loopback())
    assert result.status == status, result
    assert (result.content is None) == (status == "opted_out")  # an opted-out body is never read


def test_robots_txt_is_optional_and_cached(serve_routes) -> None:
    robots = b"User-agent: m3w\nDisallow: /private/\n\nUser-agent: *\nDisallow: /\n"
    base, hits = serve_routes(
        {"/robots.txt": Route(robots), "/private/a.jpg": Route(b"a"), "/pub/b.jpg": Route(b"b")}
    )
    with SafeFetcher(loopback(check_robots_txt=True)) as fetcher:
        for _ in range(3):
            assert fetcher.fetch(f"{base}/private/a.jpg").status == "opted_out"
            assert fetcher.fetch(f"{base}/pub/b.jpg").content == b"b"
    assert hits["/robots.txt"] == 1 and hits["/private/a.jpg"] == 0  # asked before requesting the image
    assert safe_fetch(f"{base}/private/a.jpg", loopback()).ok  # off by default


def test_dns_rebinding_cannot_reach_loopback(serve_routes, monkeypatch) -> None:
    """The host resolves to a public address when vetted and to 127.0.0.1 afterwards. The fetcher must connect
    to the address it vetted (and never resolve twice), so the loopback server sees no request."""
    base, hits = serve_routes({"/secret": Route(b"internal data")})
    port = int(base.rsplit(":", 1)[1])
    real_getaddrinfo = socket.getaddrinfo
    calls: list[str] = []

    def rebinding(host, *args, **kwargs):
        if host != "rebind.test":
            return real_getaddrinfo(host, *args, **kwargs)
        calls.append(host)
        ip = "93.184.216.34" if len(calls) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    result = safe_fetch(
        f"http://rebind.test:{port}/secret", FetchConfig(connect_timeout=0.5, total_timeout=2)
    )
    assert result.status in ("timeout", "http_error"), result  # the public address is unreachable here
    assert result.content is None
    assert hits["/secret"] == 0
    assert calls == ["rebind.test"]

    # A name answering with a mix of public and internal addresses is refused outright.
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, *a, **k: [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ],
    )
    assert safe_fetch(f"http://mixed.test:{port}/secret").status == "blocked_address"
    assert hits["/secret"] == 0


def _make_tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf certificate for DNS:localhost signed by it (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=m3w test CA")  # fmt: skip
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    )
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
    try:
        trusted = loopback(ca_certs=str(ca))
        result = safe_fetch(f"https://localhost:{port}/a.jpg", trusted)
        assert result.ok and result.content == PHOTO.read_bytes(), result
        wrong_name = safe_fetch(f"https://127.0.0.1:{port}/a.jpg", trusted)  # the cert names localhost only
        assert wrong_name.status == "http_error" and "doesn't match 'localhost'" in wrong_name.error, (
            wrong_name
        )
        untrusted = safe_fetch(f"https://localhost:{port}/a.jpg", loopback())  # system CAs: not our test CA
        assert untrusted.status == "http_error" and "CERTIFICATE_VERIFY_FAILED" in untrusted.error
        with pytest.warns(urllib3.exceptions.InsecureRequestWarning):  # an explicit, loud opt-out
            assert safe_fetch(f"https://localhost:{port}/a.jpg", loopback(verify_tls=False)).ok
        assert (
            safe_fetch(f"https://localhost:{port}/a.jpg", FetchConfig(ca_certs=str(ca))).status
            == "blocked_address"
        )
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "url",
    ["http://[::1/a", "http://127.0.0.1:99999/", "http:///x", "//host/x", "javascript:alert(1)", "",
     "http://bücher.invalid/a.jpg", "http://xn--.invalid/", "http://" + "a" * 70 + ".invalid/"],
)  # fmt: skip
def test_malformed_urls_end_as_bad_url_without_raising(url: str) -> None:
    result = safe_fetch(url)
    assert result.status == "bad_url" and result.error, result


def test_numeric_host_spellings_are_vetted(serve_routes) -> None:
    base, hits = serve_routes({"/x": Route(b"x")})
    port = base.rsplit(":", 1)[1]
    for host in ("2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]"):  # all spell 127.0.0.1
        assert safe_fetch(f"http://{host}:{port}/x").status == "blocked_address", host
    assert hits["/x"] == 0
