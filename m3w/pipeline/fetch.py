"""A safe HTTP fetcher for URLs that strangers chose (image and video URLs found on web pages).

Why not img2dataset's downloader or plain `requests`: they let the OS resolve the host name when the socket
connects, so a check done before the request can be bypassed by DNS rebinding, and they follow redirects (even to
`file://` in img2dataset's case) without re-checking them. Here every hop is:

1. scheme-checked (http/https only),
2. resolved once by us, with every address vetted (loopback, private, link-local, multicast, reserved, unspecified,
   IPv4 and IPv6, IPv4-mapped IPv6 included),
3. connected to that vetted IP literal (urllib3 pool pinned to the IP, with the real Host header and TLS SNI /
   certificate check against the host name), so the address we checked is the address we talk to.

Bodies are streamed with a byte cap and an overall deadline on top of the connect/read timeouts. X-Robots-Tag
opt-outs (`noai`, `noimageai`) are honoured before the body is read; robots.txt is optional and cached per host.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.robotparser
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import urllib3

# Statuses a fetch can end in (a subset of schemas.images.STATUSES; decoding adds the image ones).
OK = "ok"
HTTP_ERROR = "http_error"
TIMEOUT = "timeout"
OPTED_OUT = "opted_out"
BLOCKED_ADDRESS = "blocked_address"
TOO_LARGE = "too_large"
BAD_URL = "bad_url"


@dataclass
class FetchConfig:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    # A server trickling one byte per read timeout would never time out; this bounds a whole fetch.
    total_timeout: float = 30.0
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    # Opens loopback and private networks (tests, intranet mirrors). Link-local (cloud metadata at
    # 169.254.169.254), multicast, reserved and unspecified addresses stay refused even then.
    allow_private: bool = False
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    user_agent: str = "m3w/0.1 (+https://github.com/m3w/m3w; image-text dataset builder)"
    # X-Robots-Tag directives that mean "do not use this for AI training".
    opt_out_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])
    check_robots_txt: bool = False
    robots_cache_size: int = 10_000
    verify_tls: bool = True
    ca_certs: str | None = None  # a CA bundle (PEM) instead of the system's, e.g. for an internal mirror
    max_pools: int = 512  # cached keep-alive connection pools (one per host IP)
    pool_connections: int = 32  # connections kept per pool; match the fetch threads per task

    @property
    def user_agent_token(self) -> str:
        return self.user_agent.split("/", 1)[0].lower()


@dataclass
class FetchResult:
    url: str
    status: str
    final_url: str | None = None
    http_status: int | None = None
    content: bytes | None = None
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    redirects: int = 0

    @property
    def ok(self) -> bool:
        return self.status == OK


class FetchError(Exception):
    """A fetch that ends in a non-ok status; carries that status."""

    def __init__(self, status: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.http_status = http_status


def address_refusal(ip: str, allow_private: bool) -> str | None:
    """Why connecting to `ip` is refused, or None when it is a public address (or allowed private one)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is not None:
            reason = address_refusal(str(embedded), allow_private)
            return f"{reason} (embedded in {addr})" if reason else None
    if addr.is_loopback:  # before the reserved check: ::1 sits inside the reserved ::/8
        return None if allow_private else f"{addr} is loopback"
    # Never allowed, whatever the flag: these are never legitimate image hosts.
    for name in ("is_link_local", "is_multicast", "is_unspecified", "is_reserved"):
        if getattr(addr, name):
            return f"{addr} is {name[3:].replace('_', '-')}"
    if not addr.is_global:
        return None if allow_private else f"{addr} is private/non-global"
    return None


def resolve_vetted(host: str, port: int, allow_private: bool) -> list[str]:
    """Resolve `host` once and return the addresses to connect to, in resolver order. Refuse the host if *any*
    of its addresses is refused: a name that mixes public and internal answers is a rebinding setup."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(BAD_URL, f"cannot resolve {host!r}: {exc}") from None
    ips = list(dict.fromkeys(info[4][0] for info in infos))
    if not ips:
        raise FetchError(BAD_URL, f"{host!r} has no address")
    for ip in ips:
        reason = address_refusal(ip, allow_private)
        if reason:
            raise FetchError(BLOCKED_ADDRESS, f"{host} resolves to a refused address: {reason}")
    return ips


def opted_out(headers: urllib3.HTTPHeaderDict, directives: list[str], ua_token: str) -> str | None:
    """The X-Robots-Tag directive that opts this response out, if any. `X-Robots-Tag: otherbot: noai` applies
    to otherbot only; a directive without a user-agent prefix applies to everyone."""
    wanted = {d.lower() for d in directives}
    for value in headers.getlist("X-Robots-Tag"):
        agent = None
        head, sep, rest = value.partition(":")
        if sep and "," not in head and head.strip().lower() not in wanted:
            agent, value = head.strip().lower(), rest
        if agent not in (None, "*", ua_token):
            continue
        for directive in value.split(","):
            if directive.strip().lower() in wanted:
                return directive.strip().lower()
    return None


class SafeFetcher:
    """Fetches URLs with the checks above. Thread-safe: share one per process (keeps connections alive)."""

    def __init__(self, config: FetchConfig | None = None) -> None:
        self.config = config or FetchConfig()
        self._pools: OrderedDict[tuple, urllib3.HTTPConnectionPool] = OrderedDict()
        self._robots: OrderedDict[tuple, urllib.robotparser.RobotFileParser | None] = OrderedDict()
        self._lock = threading.Lock()
        self._robots_locks: dict[tuple, threading.Lock] = {}

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    def __enter__(self) -> SafeFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(self, url: str, max_bytes: int | None = None, check_robots: bool = True) -> FetchResult:
        """GET `url`, following vetted redirects. Never raises for a bad URL or a network failure: the
        outcome is in `status` / `error`."""
        result = FetchResult(url=url, status=OK)
        deadline = time.monotonic() + self.config.total_timeout
        current = url
        try:
            for hop in range(self.config.max_redirects + 1):
                result.redirects = hop
                if check_robots and self.config.check_robots_txt and not self._robots_allow(current):
                    raise FetchError(OPTED_OUT, f"disallowed by robots.txt: {current[:200]}")
                response = self._request(current, deadline, first=hop == 0)
                body_read = False
                try:
                    result.http_status = response.status
                    result.headers = {k.lower(): v for k, v in response.headers.items()}
                    location = response.headers.get("Location")
                    if response.status in (301, 302, 303, 307, 308) and location:
                        current = urljoin(current, location.strip())
                        continue
                    result.final_url = current
                    if not 200 <= response.status < 300:
                        raise FetchError(HTTP_ERROR, f"HTTP {response.status}", response.status)
                    directive = opted_out(
                        response.headers, self.config.opt_out_directives, self.config.user_agent_token
                    )
                    if directive:
                        raise FetchError(OPTED_OUT, f"X-Robots-Tag: {directive}", response.status)
                    result.content = self._read_body(response, max_bytes or self.config.max_bytes, deadline)
                    body_read = True
                    return result
                finally:
                    if not body_read:  # an unread body (redirect, error, refusal) would poison keep-alive
                        response.close()
                    response.release_conn()
            raise FetchError(HTTP_ERROR, f"more than {self.config.max_redirects} redirects")
        except FetchError as exc:
            result.status, result.error = exc.status, str(exc)
            result.http_status = exc.http_status if exc.http_status is not None else result.http_status
        # NewConnectionError (refused, unreachable) subclasses ConnectTimeoutError but is no timeout.
        except urllib3.exceptions.NewConnectionError as exc:
            result.status, result.error = HTTP_ERROR, f"connection failed: {exc}"
        except urllib3.exceptions.TimeoutError as exc:
            result.status, result.error = TIMEOUT, f"timeout: {exc}"
        except urllib3.exceptions.HTTPError as exc:  # connection refused/reset, TLS, protocol errors
            result.status, result.error = HTTP_ERROR, f"connection error: {type(exc).__name__}: {exc}"
        except (ValueError, UnicodeError) as exc:  # a URL the HTTP layer cannot send (control chars, bad IDN)
            result.status, result.error = BAD_URL, f"bad URL: {type(exc).__name__}: {exc}"
        except OSError as exc:  # socket errors urllib3 does not wrap
            result.status, result.error = HTTP_ERROR, f"connection error: {type(exc).__name__}: {exc}"
        result.final_url = result.final_url or current
        return result

    def _request(self, url: str, deadline: float, first: bool) -> urllib3.BaseHTTPResponse:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in self.config.allowed_schemes:
            # A page naming a bad URL is a bad URL; a server redirecting us there is an attack on the fetcher.
            status = BAD_URL if first else BLOCKED_ADDRESS
            raise FetchError(status, f"scheme {scheme or '(none)'!r} not allowed: {url[:200]}")
        try:
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise FetchError(BAD_URL, f"bad URL {url[:200]!r}: {exc}") from None
        if not host:
            raise FetchError(BAD_URL, f"no host in {url[:200]!r}")
        host = host.encode("idna").decode("ascii")  # IDN → punycode: DNS, Host, SNI, certificate all agree
        ips = resolve_vetted(host, port, self.config.allow_private)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(TIMEOUT, f"total timeout {self.config.total_timeout}s exceeded")
        timeout = urllib3.Timeout(
            connect=min(self.config.connect_timeout, remaining), read=min(self.config.read_timeout, remaining)
        )
        bracketed = f"[{host}]" if ":" in host else host  # IPv6 literals keep their brackets
        host_header = bracketed if parts.port is None else f"{bracketed}:{parts.port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Host": host_header, "User-Agent": self.config.user_agent, "Accept": "*/*"}
        for i, ip in enumerate(ips):
            try:
                return self._pool(scheme, ip, port, host).urlopen(
                    "GET",
                    path,
                    headers=headers,
                    redirect=False,
                    retries=False,
                    preload_content=False,
                    timeout=timeout,
                    assert_same_host=False,
                )
            except urllib3.exceptions.NewConnectionError:  # refused/unreachable: try the next vetted address
                if i == len(ips) - 1:
                    raise
        raise AssertionError("unreachable: resolve_vetted returns at least one address")

    def _pool(self, scheme: str, ip: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        """A keep-alive pool connected to the vetted `ip` only (never re-resolving `host`)."""
        key = (scheme, ip, port, host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            kwargs = {"maxsize": self.config.pool_connections, "block": False, "retries": False}
            if scheme == "https":
                pool = urllib3.HTTPSConnectionPool(
                    ip,
                    port,
                    server_hostname=host,
                    assert_hostname=host if self.config.verify_tls else False,
                    cert_reqs="CERT_REQUIRED" if self.config.verify_tls else "CERT_NONE",
                    ca_certs=self.config.ca_certs,
                    **kwargs,
                )
            else:
                pool = urllib3.HTTPConnectionPool(ip, port, **kwargs)
            self._pools[key] = pool
            while len(self._pools) > self.config.max_pools:
                self._pools.popitem(last=False)[1].close()
            return pool

    @staticmethod
    def _read_body(response: urllib3.BaseHTTPResponse, max_bytes: int, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > max_bytes:
            raise FetchError(TOO_LARGE, f"Content-Length {declared} > {max_bytes} bytes", response.status)
        chunks, size = [], 0
        for chunk in response.stream(64 * 1024):
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(TOO_LARGE, f"body over {max_bytes} bytes", response.status)
            if time.monotonic() > deadline:
                raise FetchError(TIMEOUT, "total timeout exceeded while reading the body", response.status)
            chunks.append(chunk)
        return b"".join(chunks)

    def _robots_allow(self, url: str) -> bool:
        """robots.txt verdict for our user agent, fetched once per (scheme, host, port) and cached. A missing
        or unreachable robots.txt allows everything, as crawlers conventionally do."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname, parts.port)
        with self._lock:
            host_lock = self._robots_locks.setdefault(key, threading.Lock())
        with host_lock:  # one robots.txt fetch per host even when many threads ask at once
            if key not in self._robots:
                robots_url = f"{parts.scheme}://{parts.netloc}/robots.txt"
                fetched = self.fetch(robots_url, max_bytes=512 * 1024, check_robots=False)
                parser = None
                if fetched.ok and fetched.content is not None:
                    parser = urllib.robotparser.RobotFileParser(robots_url)
                    parser.parse(fetched.content.decode("utf-8", "replace").splitlines())
                with self._lock:
                    self._robots[key] = parser
                    while len(self._robots) > self.config.robots_cache_size:
                        self._robots.popitem(last=False)
            parser = self._robots[key]
        return parser is None or parser.can_fetch(self.config.user_agent_token, url)


def safe_fetch(url: str, config: FetchConfig | None = None) -> FetchResult:
    """Fetch one URL with every safety check (for callers with a few URLs, e.g. video files)."""
    with SafeFetcher(config) as fetcher:
        return fetcher.fetch(url)
