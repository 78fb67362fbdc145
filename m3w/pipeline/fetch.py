"""A safe, polite HTTP fetcher for URLs that strangers chose (image and video URLs found on web pages).

Why not img2dataset's downloader or plain `requests`: they let the OS resolve the host name when the socket
connects, so a check done before the request can be bypassed by DNS rebinding; they follow redirects (even to
`file://` in img2dataset's case) without re-checking them; and their timeouts bound each socket read, not a
fetch, so a server sending one byte per read timeout holds a thread forever. Here every hop is:

1. scheme-checked (http/https only),
2. resolved once by us (through a replaceable resolver), with every address vetted: loopback, private,
   link-local, multicast, reserved and unspecified addresses, IPv4 and IPv6, embedded IPv4 included, are refused
   unless an explicit allow-list entry (`127.0.0.1:8080`, `10.0.0.0/8`) admits that address and port;
   link-local (cloud metadata), multicast, reserved and unspecified addresses are refused even then,
3. connected to that vetted IP literal (http.client over our own socket, with the real Host header and TLS SNI /
   certificate check against the host name), so the address we checked is the address we talk to.

The total deadline holds whatever the server does (slow headers, stall after headers, a drip, an endless chunked
body): a watchdog thread shuts the socket down when a fetch's deadline passes, which wakes any blocked read, and
every read also gets a socket timeout no longer than the time left. Bodies are capped in bytes (decoded size, for
the rare server that gzips anyway).

Polite crawling: a per-host limit on requests in flight and on the request rate (per process: the fetcher is
shared by a process's threads and tasks), a configurable User-Agent on every request (robots.txt and redirects
included), X-Robots-Tag opt-outs (`noai`, `noimageai`) honoured before the body is read, and robots.txt
(optional) fetched once per host and cached, read as RFC 9309 says: 4xx allows everything, an unreachable
robots.txt (5xx, network error) disallows everything for now, which ends as a transient status to retry later.

Transient failures (a temporary DNS failure, connection refused or reset, network unreachable) are retried within
the fetch with exponential backoff, up to `tries`; a name that does not exist (NXDOMAIN) is final.
"""

from __future__ import annotations

import errno
import heapq
import http.client
import ipaddress
import itertools
import math
import queue
import select
import socket
import ssl
import threading
import time
import urllib.robotparser
import warnings
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

# Statuses a fetch can end in (a subset of schemas.images.STATUSES; decoding adds the image ones).
OK = "ok"
HTTP_ERROR = "http_error"
TIMEOUT = "timeout"
OPTED_OUT = "opted_out"
BLOCKED_ADDRESS = "blocked_address"
TOO_LARGE = "too_large"
BAD_URL = "bad_url"

REDIRECT_CODES = (301, 302, 303, 307, 308)
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: crawlers must parse at least 500 KiB
READ_SIZE = 64 * 1024
PATH_SAFE = "!#$%&'()*+,/:;=?@[]~"  # characters left as they are in a request target
# gaierror codes that say "try again later"; any other resolver error (NXDOMAIN, no address) is final.
TRANSIENT_DNS_ERRORS = {socket.EAI_AGAIN} | ({socket.EAI_SYSTEM} if hasattr(socket, "EAI_SYSTEM") else set())
TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH,
                    errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}  # fmt: skip


class InsecureFetchWarning(UserWarning):
    """TLS certificate checks are off (`verify_tls: false`)."""


@dataclass
class FetchConfig:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0  # longest wait for any single read
    total_timeout: float = 30.0  # a whole fetch (redirects and body included), enforced by a watchdog
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    # Loopback and private addresses admitted, each `IP`, `IP:PORT`, `[IPv6]:PORT`, `CIDR` or `CIDR:PORT`
    # (tests, intranet mirrors). Nothing private is reachable without an entry; link-local (cloud metadata at
    # 169.254.169.254), multicast, reserved and unspecified addresses stay refused even with one.
    allow_hosts: list[str] = field(default_factory=list)
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    user_agent: str = "m3w/0.1 (+https://github.com/m3w/m3w; image-text dataset builder)"
    # X-Robots-Tag directives that mean "do not use this for AI training".
    opt_out_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])
    check_robots_txt: bool = False
    robots_cache_size: int = 10_000
    max_connections_per_host: int = 8  # requests in flight to one host per process; 0: no limit
    max_requests_per_second_per_host: float = 0.0  # request starts to one host per process; 0: no limit
    retry_backoff: float = 1.0  # seconds before the first in-fetch retry of a transient failure, doubling
    verify_tls: bool = True
    ca_certs: str | None = None  # a CA bundle (PEM) instead of the system's, e.g. for an internal mirror
    max_pools: int = 512  # hosts (IP, port, name) with idle keep-alive connections kept
    pool_connections: int = 32  # idle keep-alive connections kept per host; match the fetch threads

    def __post_init__(self) -> None:
        for entry in self.allow_hosts:
            parse_allow_entry(entry)  # a typo fails when the config loads, not at the first private URL

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
    attempts: int = 1  # tries made by this fetch (transient failures are retried)
    transient: bool = False  # a failure worth retrying soon (DNS hiccup, refused, reset)

    @property
    def ok(self) -> bool:
        return self.status == OK


class FetchError(Exception):
    """A fetch that ends in a non-ok status; carries that status."""

    def __init__(
        self, status: str, message: str, http_status: int | None = None, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.http_status = http_status
        self.transient = transient


# ------------------------------------------------------------------------------------------- address vetting


@dataclass(frozen=True)
class AllowEntry:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int | None  # None: any port

    def admits(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        return ip.version == self.network.version and ip in self.network and self.port in (None, port)


def parse_allow_entry(text: str) -> AllowEntry:
    """`127.0.0.1:8080`, `127.0.0.1`, `[::1]:8080`, `::1`, `10.0.0.0/8`, `10.0.0.0/8:443`, `[fd00::/8]:443`."""
    spec, port = text.strip(), None
    if spec.startswith("["):
        inner, bracket, rest = spec[1:].partition("]")
        spec, port = (
            (inner, rest[1:]) if bracket and rest.startswith(":") else (inner if bracket else "?", None)
        )
        if bracket and rest and not rest.startswith(":"):
            spec = "?"
    elif spec.count(":") == 1:
        spec, port = spec.split(":")
    try:
        network = ipaddress.ip_network(spec, strict=False)
        port_number = None if port is None else int(port)
    except ValueError:
        raise ValueError(f"allow_hosts entry {text!r} is not IP[:PORT], [IPv6]:PORT or CIDR[:PORT]") from None
    if port_number is not None and not 0 < port_number < 65536:
        raise ValueError(f"allow_hosts entry {text!r}: port out of range")
    return AllowEntry(network, port_number)


def address_refusal(ip: str, port: int, allow: Iterable[AllowEntry] = ()) -> str | None:
    """Why connecting to `ip`:`port` is refused, or None when it is public or an `allow` entry admits it."""
    allow = tuple(allow)
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is not None:
            reason = address_refusal(str(embedded), port, allow)
            return f"{reason} (embedded in {addr})" if reason else None
    # Never allowed, whatever the list: these are never legitimate image hosts. Loopback first: ::1 sits
    # inside the reserved ::/8.
    if not addr.is_loopback:
        for name in ("is_link_local", "is_multicast", "is_unspecified", "is_reserved"):
            if getattr(addr, name):
                return f"{addr} is {name[3:].replace('_', '-')}"
    if addr.is_global:
        return None
    if any(entry.admits(addr, port) for entry in allow):
        return None
    kind = "loopback" if addr.is_loopback else "private/non-global"
    return f"{addr}:{port} is {kind} and not in allow_hosts"


Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of `host`, in the resolver's order. Raises socket.gaierror."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def resolve_vetted(host: str, port: int, allow: Iterable[AllowEntry], resolver: Resolver) -> list[str]:
    """Resolve `host` once and return the addresses to connect to. Refuse the host if *any* of its addresses is
    refused: a name that mixes public and internal answers is a rebinding setup."""
    try:
        ips = resolver(host, port)
    except socket.gaierror as exc:
        if exc.errno in TRANSIENT_DNS_ERRORS:
            raise FetchError(
                HTTP_ERROR, f"temporary DNS failure for {host!r}: {exc}", transient=True
            ) from None
        raise FetchError(BAD_URL, f"cannot resolve {host!r}: {exc}") from None
    except UnicodeError as exc:
        raise FetchError(BAD_URL, f"cannot resolve {host!r}: {exc}") from None
    if not ips:
        raise FetchError(BAD_URL, f"{host!r} has no address")
    allow = tuple(allow)
    for ip in ips:
        reason = address_refusal(ip, port, allow)
        if reason:
            raise FetchError(BLOCKED_ADDRESS, f"{host} resolves to a refused address: {reason}")
    return ips


def opted_out(headers: http.client.HTTPMessage, directives: list[str], ua_token: str) -> str | None:
    """The X-Robots-Tag directive that opts this response out, if any. `X-Robots-Tag: otherbot: noai` applies
    to otherbot only; a directive without a user-agent prefix applies to everyone."""
    wanted = {d.lower() for d in directives}
    for value in headers.get_all("X-Robots-Tag") or []:
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


# ------------------------------------------------------------------------------------------------ deadlines


class _Watchdog:
    """One daemon thread per process that shuts down the sockets of fetches past their deadline.

    A blocked `recv` (or TLS handshake, or `connect`) returns as soon as its socket is shut down, whatever the
    server sends or withholds. The shutdown happens under the lock that `disarm` takes, so once `disarm` returns
    the socket can be closed (or reused) without a late shutdown hitting a recycled file descriptor.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list[Any]] = []  # [deadline, seq, socket or None (disarmed), fired]
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, deadline: float) -> list[Any]:
        entry = [deadline, next(self._seq), sock, False]
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    def disarm(self, entry: list[Any]) -> bool:
        """Stop watching; True when the deadline had already fired (the socket is shut down)."""
        with self._cond:
            entry[2] = None
            return entry[3]

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                entry = heapq.heappop(self._heap)
                entry[3] = True
                try:  # the plain-socket shutdown: SSLSocket.shutdown would tear down TLS state under a reader
                    socket.socket.shutdown(entry[2], socket.SHUT_RDWR)
                except OSError:
                    pass


_WATCHDOG = _Watchdog()


# ---------------------------------------------------------------------------------------------- politeness


class HostLimiter:
    """Per-host politeness in one process: at most `max_concurrent` requests in flight to a host, and request
    starts at least 1/`rate` seconds apart. The empty host (data: URIs) is never limited."""

    def __init__(self, max_concurrent: int = 0, rate: float = 0.0) -> None:
        self.max_concurrent = max_concurrent
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.cond = threading.Condition()
        self._active: Counter = Counter()
        self._next_start: dict[str, float] = {}

    def try_acquire(self, host: str) -> float:
        """Take a slot for `host`: 0.0 when taken, else the seconds worth waiting (inf: until a release).
        Call with `cond` held."""
        if not host:
            return 0.0
        if self.max_concurrent and self._active[host] >= self.max_concurrent:
            return math.inf
        now = time.monotonic()
        start = self._next_start.get(host, 0.0)
        if start > now:
            return start - now
        self._active[host] += 1
        if self.interval:
            self._next_start[host] = max(now, start) + self.interval
        return 0.0

    def acquire(self, host: str) -> None:
        with self.cond:
            while (wait := self.try_acquire(host)) > 0:
                self.cond.wait(None if wait == math.inf else wait)

    def release(self, host: str) -> None:
        if not host:
            return
        with self.cond:
            self._active[host] -= 1
            if self._active[host] <= 0:
                del self._active[host]
                if self._next_start.get(host, 0.0) <= time.monotonic():
                    self._next_start.pop(host, None)  # keeps the table as small as the hosts in flight
            self.cond.notify_all()


def host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "") if "://" in url else ""
    except ValueError:
        return ""


T = TypeVar("T")
R = TypeVar("R")


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# ----------------------------------------------------------------------------------------------- the fetcher


@dataclass
class _Target:
    scheme: str
    host: str  # IDNA-encoded
    port: int
    ips: list[str]
    path: str
    host_header: str


class _Exchange:
    """One request/response on a connection from the pool, under the fetch's watchdog."""

    def __init__(self, conn: http.client.HTTPConnection, key: tuple, watch: list[Any]) -> None:
        self.conn = conn
        self.key = key
        self.watch = watch
        self.response: http.client.HTTPResponse | None = None
        self.body_read = False  # the whole body was read: the connection may be kept alive


class SafeFetcher:
    """Fetches URLs with the checks above. Thread-safe: share one per process (keeps connections alive, holds the
    robots.txt cache and the per-host limits). `resolver` replaces DNS resolution (tests, a custom resolver)."""

    def __init__(self, config: FetchConfig | None = None, resolver: Resolver | None = None) -> None:
        self.config = config or FetchConfig()
        self.resolver = resolver or system_resolver
        self.allow = tuple(parse_allow_entry(e) for e in self.config.allow_hosts)
        self.limiter = HostLimiter(
            self.config.max_connections_per_host, self.config.max_requests_per_second_per_host
        )
        self._idle: OrderedDict[tuple, list[http.client.HTTPConnection]] = OrderedDict()
        self._robots: OrderedDict[tuple, urllib.robotparser.RobotFileParser | FetchError | None] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self._robots_locks: dict[tuple, threading.Lock] = {}
        self._local = threading.local()  # the host whose slot this thread holds (map_polite)
        self._tls: ssl.SSLContext | None = None

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()

    def __enter__(self) -> SafeFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ----------------------------------------------------------------------------------------------

    def fetch(
        self, url: str, max_bytes: int | None = None, check_robots: bool = True, tries: int = 1
    ) -> FetchResult:
        """GET `url`, following vetted redirects; a transient failure is retried (with backoff) up to `tries`
        times. Never raises for a bad URL or a network failure: the outcome is in `status` / `error`."""
        host = host_of(url)
        held = getattr(self._local, "host", None) == host
        if not held:
            self.limiter.acquire(host)
        try:
            for attempt in range(1, max(1, tries) + 1):
                result = self._fetch_once(url, max_bytes or self.config.max_bytes, check_robots)
                result.attempts = attempt
                if result.ok or not result.transient or attempt >= tries:
                    return result
                time.sleep(self.config.retry_backoff * 2 ** (attempt - 1))
            raise AssertionError("unreachable: the loop returns on its last try")
        finally:
            if not held:
                self.limiter.release(host)

    def map_polite(
        self, fn: Callable[[T], R], items: Iterable[T], url_of: Callable[[T], str], threads: int
    ) -> Iterator[R]:
        """`fn(item)` for each item on `threads` threads, yielding results as they complete (not in order).

        A thread takes the next item whose host has a free slot (round-robin over hosts), so URLs of a busy or
        rate-limited host wait without holding threads that other hosts could use. `fn` runs with its host's
        slot held: the fetches it makes for that host do not take another one.
        """
        by_host: OrderedDict[str, deque[T]] = OrderedDict()
        total = 0
        for item in items:
            by_host.setdefault(host_of(url_of(item)), deque()).append(item)
            total += 1
        results: queue.SimpleQueue[R | _Raised] = queue.SimpleQueue()
        limiter = self.limiter

        def take() -> tuple[str, T] | None:
            with limiter.cond:
                while by_host:
                    soonest = math.inf
                    for _ in range(len(by_host)):
                        host, pending = next(iter(by_host.items()))
                        wait = limiter.try_acquire(host)
                        if wait == 0:
                            item = pending.popleft()
                            if pending:
                                by_host.move_to_end(host)  # round-robin: the next take starts elsewhere
                            else:
                                del by_host[host]
                            return host, item
                        soonest = min(soonest, wait)
                        by_host.move_to_end(host)
                    limiter.cond.wait(None if soonest == math.inf else soonest)
            return None

        def work() -> None:
            while (taken := take()) is not None:
                host, item = taken
                self._local.host = host
                try:
                    results.put(fn(item))
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
                    results.put(_Raised(exc))
                finally:
                    self._local.host = None
                    limiter.release(host)

        workers = [threading.Thread(target=work, name="fetch", daemon=True)
                   for _ in range(max(1, min(threads, total)))]  # fmt: skip
        for worker in workers:
            worker.start()
        for _ in range(total):
            result = results.get()
            if isinstance(result, _Raised):
                raise result.exc
            yield result
        for worker in workers:
            worker.join()

    # -- one try -------------------------------------------------------------------------------------------------

    def _fetch_once(self, url: str, max_bytes: int, check_robots: bool) -> FetchResult:
        result = FetchResult(url=url, status=OK)
        deadline = time.monotonic() + self.config.total_timeout
        current = url
        try:
            for hop in range(self.config.max_redirects + 1):
                result.redirects = hop
                target = self._target(current, first=hop == 0)
                if check_robots and self.config.check_robots_txt:
                    self._check_robots(current, target)
                exchange = self._open(target, deadline)
                try:
                    response = exchange.response
                    assert response is not None
                    result.http_status = response.status
                    result.headers = {k.lower(): v for k, v in response.getheaders()}
                    location = response.getheader("Location")
                    if response.status in REDIRECT_CODES and location:
                        current = urljoin(current, location.strip())
                        continue
                    result.final_url = current
                    if not 200 <= response.status < 300:
                        raise FetchError(HTTP_ERROR, f"HTTP {response.status}", response.status)
                    directive = opted_out(
                        response.msg, self.config.opt_out_directives, self.config.user_agent_token
                    )
                    if directive:
                        raise FetchError(OPTED_OUT, f"X-Robots-Tag: {directive}", response.status)
                    result.content = self._read_body(exchange, max_bytes, deadline)
                    return result
                finally:
                    self._close(exchange)
            raise FetchError(HTTP_ERROR, f"more than {self.config.max_redirects} redirects")
        except FetchError as exc:
            result.status, result.error, result.transient = exc.status, str(exc), exc.transient
            result.http_status = exc.http_status if exc.http_status is not None else result.http_status
        except Exception as exc:  # noqa: BLE001 - every network/protocol failure becomes a status
            result.status, result.error, result.transient = self._classify(exc, deadline)
        if result.status == TIMEOUT:
            result.http_status = None
        result.final_url = result.final_url or current
        if not result.ok:
            result.content = None
        return result

    def _classify(self, exc: Exception, deadline: float) -> tuple[str, str, bool]:
        """(status, message, transient) of an exception raised while talking to a server."""
        message = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:  # whatever broke, it broke because the watchdog shut the socket
            return TIMEOUT, f"total timeout {self.config.total_timeout}s exceeded ({message})", False
        if isinstance(exc, TimeoutError):
            return TIMEOUT, f"timeout: {message}", False
        if isinstance(exc, ssl.SSLError):
            return HTTP_ERROR, f"TLS error: {message}", False
        if isinstance(exc, OSError) and (isinstance(exc, ConnectionError) or exc.errno in TRANSIENT_ERRNOS):
            return HTTP_ERROR, f"connection failed: {message}", True  # refused, reset, unreachable
        if isinstance(exc, http.client.InvalidURL):
            return BAD_URL, f"bad URL: {message}", False
        if isinstance(exc, (http.client.HTTPException, OSError)):
            return HTTP_ERROR, f"connection error: {message}", False
        if isinstance(exc, (ValueError, UnicodeError)):  # a URL the HTTP layer cannot send (control chars)
            return BAD_URL, f"bad URL: {message}", False
        raise exc

    def _target(self, url: str, first: bool) -> _Target:
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
        try:
            host = host.encode("idna").decode("ascii")  # IDN → punycode: DNS, Host, SNI, certificate agree
        except UnicodeError as exc:
            raise FetchError(BAD_URL, f"bad host name {host[:100]!r}: {exc}") from None
        ips = resolve_vetted(host, port, self.allow, self.resolver)
        bracketed = f"[{host}]" if ":" in host else host  # IPv6 literals keep their brackets
        host_header = bracketed if parts.port is None else f"{bracketed}:{parts.port}"
        # What browsers send for spaces and non-ASCII characters in a path; existing %-escapes are kept.
        path = quote(parts.path or "/", safe=PATH_SAFE) + (
            f"?{quote(parts.query, safe=PATH_SAFE)}" if parts.query else ""
        )
        return _Target(scheme, host, port, ips, path, host_header)

    # -- connections -----------------------------------------------------------------------------------------

    def _open(self, target: _Target, deadline: float) -> _Exchange:
        """Send the request and read the response head on a pooled or new connection to a vetted address."""
        headers = {"Host": target.host_header, "User-Agent": self.config.user_agent, "Accept": "*/*"}
        for i, ip in enumerate(target.ips):
            key = (target.scheme, ip, target.port, target.host)
            conn = self._checkout(key)
            if conn is not None and conn.sock is not None:
                try:
                    return self._send(
                        conn, key, _WATCHDOG.arm(conn.sock, deadline), target, headers, deadline
                    )
                except (ConnectionError, http.client.BadStatusLine):
                    if time.monotonic() >= deadline:
                        raise
                    # A kept-alive connection the server closed meanwhile: retry on a fresh one.
            conn = http.client.HTTPConnection(target.host, target.port)
            try:
                watch = self._connect(conn, target, ip, deadline)
            except OSError:
                if i == len(target.ips) - 1 or time.monotonic() >= deadline:
                    raise
                continue  # refused or unreachable: the next vetted address
            return self._send(conn, key, watch, target, headers, deadline)
        raise AssertionError("unreachable: the last address returns or raises")

    def _send(
        self,
        conn: http.client.HTTPConnection,
        key: tuple,
        watch: list[Any],
        target: _Target,
        headers: dict[str, str],
        deadline: float,
    ) -> _Exchange:
        exchange = _Exchange(conn, key, watch)
        try:
            self._set_read_timeout(conn, deadline)
            conn.request("GET", target.path, headers=headers)
            exchange.response = conn.getresponse()
        except BaseException:
            self._close(exchange)
            raise
        return exchange

    def _connect(self, conn: http.client.HTTPConnection, target: _Target, ip: str, deadline: float) -> list:
        """Connect `conn` to the vetted `ip` (TLS with the real host name); returns the armed watchdog entry."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no time left to connect")
        sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        watch = _WATCHDOG.arm(sock, deadline)
        try:
            sock.settimeout(min(self.config.connect_timeout, remaining))
            sock.connect((ip, target.port))  # an IP literal: no second resolution, no rebinding
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if target.scheme == "https":
                _WATCHDOG.disarm(watch)
                sock = self._tls_context().wrap_socket(
                    sock, server_hostname=target.host, do_handshake_on_connect=False
                )
                watch = _WATCHDOG.arm(sock, deadline)
                sock.settimeout(min(self.config.read_timeout, max(deadline - time.monotonic(), 0.001)))
                sock.do_handshake()
        except BaseException:
            _WATCHDOG.disarm(watch)
            sock.close()
            raise
        conn.sock = sock
        return watch

    def _tls_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                context = ssl.create_default_context(cafile=self.config.ca_certs)
                if not self.config.verify_tls:
                    warnings.warn("TLS certificate checks are off (verify_tls: false)", InsecureFetchWarning,
                                  stacklevel=4)  # fmt: skip
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                self._tls = context
            return self._tls

    def _set_read_timeout(self, conn: http.client.HTTPConnection, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("total timeout exceeded")
        if conn.sock is not None:
            conn.sock.settimeout(min(self.config.read_timeout, remaining))

    def _checkout(self, key: tuple) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                conns = self._idle.get(key)
                if not conns:
                    return None
                conn = conns.pop()
                if not conns:
                    del self._idle[key]
            sock = conn.sock
            # An idle socket that is readable has been closed (or sent garbage) by the server: drop it. (poll, not
            # select: a process with many connections has descriptors above select's 1024.)
            if sock is not None:
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                if not poller.poll(0):
                    return conn
            conn.close()

    def _close(self, exchange: _Exchange) -> None:
        """Disarm the watchdog; keep the connection alive when its response was read whole, else close it."""
        fired = _WATCHDOG.disarm(exchange.watch)
        conn, response = exchange.conn, exchange.response
        keep = (not fired and exchange.body_read and response is not None and response.isclosed()
                and conn.sock is not None)  # fmt: skip
        if not keep:
            if response is not None:
                response.close()
            conn.close()
            return
        with self._lock:
            conns = self._idle.setdefault(exchange.key, [])
            self._idle.move_to_end(exchange.key)
            if len(conns) < self.config.pool_connections:
                conns.append(conn)
                conn = None
            while len(self._idle) > self.config.max_pools:
                for old in self._idle.popitem(last=False)[1]:
                    old.close()
        if conn is not None:
            conn.close()

    def _read_body(self, exchange: _Exchange, max_bytes: int, deadline: float) -> bytes:
        response = exchange.response
        assert response is not None
        declared = response.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > max_bytes:
            raise FetchError(TOO_LARGE, f"Content-Length {declared} > {max_bytes} bytes", response.status)
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        # Servers may compress even when asked not to (no Accept-Encoding): decode with the same byte cap.
        decoder = (
            zlib.decompressobj(zlib.MAX_WBITS | 32) if encoding in ("gzip", "x-gzip", "deflate") else None
        )
        chunks, size = [], 0
        while True:
            self._set_read_timeout(exchange.conn, deadline)
            chunk = response.read1(READ_SIZE)
            if not chunk:
                break
            if decoder is not None:
                chunk = decoder.decompress(chunk, max_bytes - size + 1)
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(TOO_LARGE, f"body over {max_bytes} bytes", response.status)
            chunks.append(chunk)
        if decoder is not None:
            chunks.append(decoder.flush())
            if sum(map(len, chunks)) > max_bytes:
                raise FetchError(TOO_LARGE, f"body over {max_bytes} bytes", response.status)
        if time.monotonic() >= deadline:  # the watchdog ended a close-delimited body: not a whole body
            raise TimeoutError("total timeout exceeded while reading the body")
        if response.length:
            raise http.client.IncompleteRead(b"", response.length)
        response.read()  # the body is complete: this only marks the response closed, so the connection is reused
        exchange.body_read = True
        return b"".join(chunks)

    # -- robots.txt ------------------------------------------------------------------------------------------

    def _check_robots(self, url: str, target: _Target) -> None:
        """Raise unless robots.txt lets our user agent fetch `url`. robots.txt is fetched once per (scheme, host,
        port) and cached: 2xx is parsed, 4xx allows everything, an unreachable one (5xx, network error, timeout)
        disallows everything (RFC 9309 §2.3.1), which ends as a transient failure to retry on a later run."""
        key = (target.scheme, target.host, target.port)
        with self._lock:
            host_lock = self._robots_locks.setdefault(key, threading.Lock())
        with host_lock:  # one robots.txt fetch per host even when many threads ask at once
            if key not in self._robots:
                parts = urlsplit(url)
                robots_url = f"{parts.scheme}://{parts.netloc}/robots.txt"
                fetched = self._fetch_once(robots_url, ROBOTS_MAX_BYTES, check_robots=False)
                verdict: urllib.robotparser.RobotFileParser | FetchError | None = None
                if fetched.ok and fetched.content is not None:
                    verdict = urllib.robotparser.RobotFileParser(robots_url)
                    verdict.parse(fetched.content.decode("utf-8", "replace").splitlines())
                elif not (fetched.http_status and 400 <= fetched.http_status < 500):
                    verdict = FetchError(HTTP_ERROR, f"robots.txt unreachable ({fetched.error}): not fetching "
                                         "from this host for now", transient=False)  # fmt: skip
                with self._lock:
                    self._robots[key] = verdict
                    while len(self._robots) > self.config.robots_cache_size:
                        self._robots.popitem(last=False)
            verdict = self._robots[key]
        if isinstance(verdict, FetchError):
            raise FetchError(verdict.status, str(verdict))
        if verdict is not None and not verdict.can_fetch(self.config.user_agent_token, url):
            raise FetchError(OPTED_OUT, f"disallowed by robots.txt: {url[:200]}")


_SHARED: OrderedDict[str, SafeFetcher] = OrderedDict()
_SHARED_LOCK = threading.Lock()


def shared_fetcher(config: FetchConfig) -> SafeFetcher:
    """The process's fetcher for `config`: Ray reuses worker processes across tasks, so keep-alive connections,
    the robots.txt cache and the per-host limits carry over from one task to the next."""
    key = repr(config)
    with _SHARED_LOCK:
        fetcher = _SHARED.get(key)
        if fetcher is None:
            fetcher = _SHARED[key] = SafeFetcher(config)
            while len(_SHARED) > 4:
                _SHARED.popitem(last=False)[1].close()
        _SHARED.move_to_end(key)
        return fetcher


def safe_fetch(url: str, config: FetchConfig | None = None, resolver: Resolver | None = None) -> FetchResult:
    """Fetch one URL with every safety check (for callers with a few URLs, e.g. video files)."""
    with SafeFetcher(config, resolver) as fetcher:
        return fetcher.fetch(url)
