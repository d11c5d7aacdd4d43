"""One compile for many workers: when workers start together on a key with no
usable archive, the first takes a lease and compiles; the others wait a bounded
time for its archive, then load it instead of compiling the same graphs.

The lease is a small file beside the archive, `.<key>.zip.lease`, created with
O_EXCL (on a shared datafs volume the metadata engine makes that exclusive
across nodes too). It names its holder (host, pid) and the holder's thread
touches it every HEARTBEAT_SECONDS while the worker compiles.

Invariants:
- Waiting is bounded: a waiter stops when the archive changes (then loads it),
  when the lease is released, when its holder is dead (a process of this host
  that no longer exists, or a heartbeat older than STALE_SECONDS on any host),
  or after its own wait budget. It then goes on alone: the worst case is what
  happens without a lease, every worker compiling.
- Nothing here raises into the app: a lease that cannot be created, read or
  removed is logged and treated as absent.
- A holder releases its lease after publishing (also when the app's body
  raised); a holder that dies leaves a lease that goes stale within
  STALE_SECONDS, and the next worker takes it over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from ..mounts import pid_alive

log = logging.getLogger(__name__)

WAIT_ENV = "DATAFS_INDUCTOR_WAIT_SECONDS"
DEFAULT_WAIT_SECONDS = 600.0
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 30.0
POLL_SECONDS = 0.25
PROGRESS_SECONDS = 30.0


def wait_budget_seconds() -> float:
    """DATAFS_INDUCTOR_WAIT_SECONDS, default 600; 0 turns leases off (every worker compiles)."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WAIT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"invalid {WAIT_ENV} {raw!r}: expected seconds, such as 600 (0 turns waiting off)") from None
    if value < 0:
        raise ValueError(f"invalid {WAIT_ENV} {raw!r}: expected seconds >= 0")
    return value


def lease_path(archive: Path) -> Path:
    return archive.parent / f".{archive.name}.lease"


class Lease:
    """A lease this process holds; `release()` is idempotent."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"datafs-lease-{path.name}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError as exc:
                log.debug("could not refresh the compile lease %s: %s", self.path, exc)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_SECONDS + 1)
        holder = read_holder(self.path)
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def try_acquire(archive: Path) -> Lease | None:
    """Take the lease if nobody holds it (or its holder is dead); None if someone does."""
    path = lease_path(archive)
    token = secrets.token_hex(8)
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token, "started": time.time()})
    for _ in range(2):  # a second try after removing a dead holder's lease
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            why = dead_reason(path, holder)
            if why is None:
                return None
            log.info("taking over the compile lease %s: %s", path, why)
            if read_holder(path) == holder:  # still the dead one: remove it (a racing taker may win instead)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            continue
        except OSError as exc:
            log.info("no compile lease for %s (%s): compiling without one", archive, exc)
            return None
        try:
            os.write(fd, body.encode())
        finally:
            os.close(fd)
        return Lease(path, token)
    return None


def read_holder(path: Path) -> dict | None:
    """The lease's holder, {} if the file is there but not (yet) readable, None if there is no lease."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}  # being written right now, or torn by a crash: the heartbeat age decides
    return holder if isinstance(holder, dict) else {}


def dead_reason(path: Path, holder: dict | None) -> str | None:
    """Why the lease's holder is gone, or None while it is alive."""
    if holder is None:
        return "it was released"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not pid_alive(holder["pid"]):
            return f"its holder, pid {holder['pid']} of this host, has exited"
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return "it was released"
    if age > STALE_SECONDS:
        return f"its holder ({holder.get('host', '?')} pid {holder.get('pid', '?')}) has not refreshed it for {age:.0f} s"
    return None


def wait_for_holder(archive: Path, changed: Callable[[], bool], budget_seconds: float) -> str:
    """Wait until `changed()` (the holder published), the lease ends or the budget is spent; say which."""
    path = lease_path(archive)
    started = time.monotonic()
    deadline = started + budget_seconds
    next_progress = started + PROGRESS_SECONDS
    holder = read_holder(path)
    log.info("another worker (%s pid %s) is compiling %s: waiting up to %.0f s for its archive",
             (holder or {}).get("host", "?"), (holder or {}).get("pid", "?"), archive.name, budget_seconds)
    while True:
        if changed():
            return "published"
        why = dead_reason(path, read_holder(path))
        if why is not None:
            return "published" if changed() else why
        now = time.monotonic()
        if now >= deadline:
            return f"no archive after {budget_seconds:.0f} s"
        if now >= next_progress:
            log.info("still waiting for %s to be published (%.0f s of %.0f s)", archive.name, now - started, budget_seconds)
            next_progress += PROGRESS_SECONDS
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - now)))
