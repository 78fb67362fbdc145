"""A lease: one writer at a time on a shared folder (the image store), on a local disk or object storage.

`fcntl` locks exist only on one POSIX filesystem. A lease is an object (`schemas/manifest.py`) created only if
absent, renewed by a background thread while its holder runs, and deleted when it is done. A holder that died
leaves a lease that expires after `ttl` seconds; one that died on this very host (its pid is gone) is taken
over at once, so a killed local job can be re-run immediately.

This keeps two well-behaved jobs from fetching the same URLs twice; the data stays correct even without it
(a URL fetched twice has two index rows, and the one with the most attempts wins).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from m3w.errors import UserError
from m3w.pipeline import io
from m3w.schemas import manifest as spec


class LeaseHeld(UserError, RuntimeError):
    """Another live job holds the lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """`with Lease(folder_url):` holds `folder_url/_lease.json` for the duration of the block."""

    def __init__(self, folder: str, ttl: float = 120.0) -> None:
        self.url = io.join(folder, spec.LEASE_FILENAME)
        self.ttl = ttl
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> dict[str, Any]:
        return {
            "schema": spec.LEASE_SCHEMA_VERSION,
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires": time.time() + self.ttl,
            "command": " ".join(sys.argv)[:300],
        }

    def _stale(self, held: dict[str, Any]) -> bool:
        if held.get("expires", 0) < time.time():
            return True
        return held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", 0)))

    def acquire(self) -> None:
        data = json.dumps(self._body()).encode()
        for _ in range(3):
            if io.create_exclusive(self.url, data):
                break
            try:
                held = io.read_json(self.url)
            except FileNotFoundError:  # released between our two calls: try again
                continue
            except ValueError:
                held = {}  # unreadable: treat as stale
            if held and not self._stale(held):
                raise LeaseHeld(
                    f"{io.parent_of(self.url)} is in use by another job (host {held.get('host')}, pid "
                    f"{held.get('pid')}: {held.get('command')!r}) until "
                    f"{time.strftime('%H:%M:%S', time.localtime(held.get('expires', 0)))}; if that job is "
                    f"gone, wait for the lease to expire or delete {self.url}"
                )
            io.remove(self.url)  # stale: take it over
        else:
            raise LeaseHeld(f"could not take the lease {self.url}: other jobs keep taking it")
        self._thread = threading.Thread(target=self._renew, name="m3w-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                io.write_json(self.url, self._body())
            except OSError:  # a transient store error: the next renewal tries again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = io.read_json(self.url)
        except (FileNotFoundError, ValueError):
            return
        if held.get("owner") == self.owner:
            io.remove(self.url)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
