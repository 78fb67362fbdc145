"""Process and network helpers for the Ray tests: the processes of one session, their listening sockets, the
network guard (tests/netguard), output-folder snapshots. Linux /proc only; no psutil in the venv."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETGUARD = Path(__file__).resolve().parent / "netguard"


def m3w(*args: str) -> list[str]:
    return [sys.executable, "-m", "m3w", *args]


def guarded_env(guard_log: Path, **extra: str) -> dict[str, str]:
    """The environment of a guarded run: every Python process loads tests/netguard/sitecustomize.py. Nothing
    about Ray leaks in from the test process, whose own local Ray set some of it."""
    leaks = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env = {k: v for k, v in os.environ.items() if k not in leaks}
    env.update(PYTHONPATH=f"{NETGUARD}{os.pathsep}{ROOT}", M3W_NETGUARD_LOG=str(guard_log), **extra)
    return env


def guard_events(guard_log: Path) -> tuple[list[dict], list[dict]]:
    """(start lines, blocked lines) of a guard log."""
    lines = [json.loads(line) for line in guard_log.read_text().splitlines()] if guard_log.exists() else []
    return [e for e in lines if e["event"] == "start"], [e for e in lines if e["event"] == "blocked"]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1 (held open together while picked: one at a time, the kernel may hand
    out the same port twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on; the name may hold spaces


def session_pids(sid: int) -> set[int]:
    """Live (not zombie) processes of session `sid`: a `start_new_session=True` child and all it spawned, Ray
    workers included (they get process groups of their own, not sessions)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[3] == str(sid) and fields[0] != "Z":
                pids.add(int(entry))
    return pids


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (fields := _stat(pid)) is not None and fields[0] != "Z"}


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait until none of `pids` is alive (zombies count as dead); return those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def kill_session(sid: int, grace: float = 10.0) -> None:
    """SIGTERM the session leader, then SIGKILL every process of the session still alive, each by its pid."""
    try:
        os.kill(sid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    left = wait_gone(session_pids(sid) | {sid}, grace)
    for pid in left | session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _decode(hex_addr: str) -> str:
    """An address of /proc/net/tcp{,6}: host-order 32-bit words in hex."""
    words = bytes.fromhex(hex_addr)
    raw = b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4))
    return str(ipaddress.ip_address(raw))


def listening_addresses(pids: set[int]) -> set[str]:
    """'ip:port' of every TCP socket in LISTEN state (and bound UDP socket) that one of `pids` holds."""
    inodes = set().union(*(_socket_inodes(pid) for pid in pids)) if pids else set()
    found = set()
    for table, listening in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        try:
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == listening and cols[9] in inodes:
                host, port = cols[1].split(":")
                found.add(f"{_decode(host)}:{int(port, 16)}")
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (temp files included) → (size, mtime in ns)."""
    files = {}
    for path in folder.rglob("*"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # a temp file renamed under our feet
            continue
        if path.is_file():
            files[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return files
