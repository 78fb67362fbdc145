"""A network guard for every Python process of a test run: put this directory on PYTHONPATH and set
M3W_NETGUARD_LOG to a file.

Python imports `sitecustomize` at start-up, so the m3w driver, Ray's workers and Ray's own Python daemons
(dashboard agent, runtime env agent, log monitor, ...) all load this module: each appends a "start" line to the
log, and every connect, datagram or name lookup aimed outside loopback (127.0.0.0/8, ::1) is refused with
ENETUNREACH and appended as a "blocked" line. Nothing leaves the machine even outside a network namespace, and
the test reads what would have. Native code (raylet, gcs_server, gRPC's C core) is not covered: see
tests/test_ray_local.py for how those are checked.
"""

import errno
import ipaddress
import json
import os
import socket
import sys

LOG = os.environ.get("M3W_NETGUARD_LOG")


def _cmdline() -> list[str]:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:4]
    except OSError:
        return sys.argv[:3]


def _write(event: str, **fields) -> None:
    line = json.dumps({"event": event, "pid": os.getpid(), "cmdline": _cmdline(), **fields})
    with open(LOG, "a", encoding="utf-8") as f:  # one short append per line: atomic across processes
        f.write(line + "\n")


def _is_loopback_host(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("", "localhost", "0.0.0.0", "::", socket.gethostname()):  # no DNS query for these
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a name: resolving it may ask a DNS server
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _allowed(family, address) -> bool:
    if family == getattr(socket, "AF_UNIX", None) or isinstance(address, (str, bytes)):
        return True
    return _is_loopback_host(address[0])


def _refuse(call: str, address) -> None:
    _write("blocked", call=call, address=repr(address))
    raise OSError(errno.ENETUNREACH, f"netguard: {call} to {address!r} refused (outside loopback)")


def _guard_method(name: str):
    original = getattr(socket.socket, name)

    def guarded(self, *args):
        target = args[-1] if name == "sendto" else args[0]  # connect(address), sendto(data, [flags,] address)
        if not _allowed(self.family, target):
            _refuse(f"socket.{name}", target)
        return original(self, *args)

    return guarded


def _guard_lookup(name: str):
    original = getattr(socket, name)

    def guarded(host, *args, **kwargs):
        if host is not None and not _is_loopback_host(host):
            _refuse(f"socket.{name}", host)
        return original(host, *args, **kwargs)

    return guarded


if LOG:
    for _method in ("connect", "connect_ex", "sendto"):
        setattr(socket.socket, _method, _guard_method(_method))
    _create_connection = socket.create_connection

    def _guarded_create_connection(address, *args, **kwargs):
        if not _is_loopback_host(address[0]):
            _refuse("socket.create_connection", address)
        return _create_connection(address, *args, **kwargs)

    socket.create_connection = _guarded_create_connection
    for _lookup in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        setattr(socket, _lookup, _guard_lookup(_lookup))
    _write("start")
