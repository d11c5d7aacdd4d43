"""Shared fixtures: real datafs mounts through FUSE, driven by the real CLI.

A mount is started with `python -m datafs mount` (the daemon forks and the
command returns once the kernel mount is up) and always torn down: `datafs
umount`, then, if that failed, SIGKILL of the daemon by PID and a lazy unmount.
A missing /dev/fuse fails the tests that need a mount: it must never be skipped
in CI, where a skip would hide a broken product.

Before a live mount is torn down, `datafs fsck` checks its volume and any
finding fails the test (as S3QL's suite does); a test that damages a volume
on purpose sets `mount.fsck_after = False`.

PostgreSQL, for the shared metadata engine: one real server for the whole
session (`pg_server`, on PG_PORT) and a fresh database per test (`pg_url`). A
missing PostgreSQL fails those tests, as a missing /dev/fuse does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import mmap
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from datafs.state_files import read_daemon_pid
from devtools.postgres import PostgresDatabase, PostgresServer
from datafs.mounts import pid_alive

REPO = Path(__file__).resolve().parent.parent
#: tests/ owns 19450-19459 for PostgreSQL: the session server here, the
#: launcher's own tests (test_pgserver.py) on the ports after it.
PG_PORT = int(os.environ.get("DATAFS_TEST_PG_PORT", "19450"))  # another port for a second concurrent run


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DATAFS_")}
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "datafs", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"datafs {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@dataclasses.dataclass
class Mount:
    path: Path
    state_dir: Path
    extra_args: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Run `datafs fsck` on the live mount at cleanup and fail the test on any
    #: finding, as S3QL's suite does; tests that damage the volume on purpose
    #: set it to False.
    fsck_after: bool = True

    @property
    def pid(self) -> int | None:
        return read_daemon_pid(self.state_dir)

    @property
    def log(self) -> str:
        try:
            return (self.state_dir / "datafs.log").read_text()
        except OSError:
            return ""

    def mount(self) -> "Mount":
        if not os.path.exists("/dev/fuse"):
            pytest.fail("/dev/fuse is missing: real-mount tests cannot run (they must not be skipped)")
        run_cli("mount", str(self.path), "--state-dir", str(self.state_dir), *self.extra_args, env=self.env)
        return self

    def umount(self) -> None:
        run_cli("umount", str(self.path))

    def remount(self) -> "Mount":
        self.umount()
        return self.mount()

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would; the kernel mount is left dead."""
        pid = self.pid
        assert pid, "daemon pid unknown"
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)

    def fsck(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_cli("fsck", str(self.path), *args, check=False, timeout=timeout)

    def _fsck_complaint(self) -> str | None:
        """What `datafs fsck` found on this live mount, or None when clean."""
        pid = self.pid
        if not (self.fsck_after and pid and pid_alive(pid)):
            return None
        try:
            result = self.fsck(timeout=120)
        except subprocess.TimeoutExpired:
            return f"datafs fsck {self.path} did not finish in 120 s"
        if result.returncode == 0:
            return None
        return f"datafs fsck {self.path} after the test exited {result.returncode}:\n{result.stdout}{result.stderr}"

    def cleanup(self) -> str | None:
        """Unmount, whatever it takes. Returns fsck's complaint, if any."""
        complaint = None
        if self._mounted_in_table():
            complaint = self._fsck_complaint()
            result = run_cli("umount", str(self.path), check=False, timeout=60)
            if result.returncode != 0:
                pid = self.pid
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    _wait_gone(pid)
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        pid = self.pid
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
        return complaint

    def _mounted_in_table(self) -> bool:
        target = f" {self.path} "
        with open("/proc/self/mountinfo") as f:
            return any(target in line for line in f)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Make any number of mounts, each with its own mountpoint and state dir."""
    made: list[Mount] = []

    def make(name: str = "node", extra_args: list[str] | None = None, env: dict[str, str] | None = None,
             state_dir: Path | None = None) -> Mount:
        path = tmp_path / f"{name}-mnt"
        path.mkdir(exist_ok=True)
        mount = Mount(path, state_dir or tmp_path / f"{name}-state", list(extra_args or []), dict(env or {}))
        made.append(mount)
        return mount.mount()

    yield make
    complaints = [c for c in (mount.cleanup() for mount in reversed(made)) if c]
    if complaints:
        pytest.fail("\n".join(complaints), pytrace=False)


@pytest.fixture
def datafs_mount(mount_factory: Callable[..., Mount]) -> Mount:
    return mount_factory()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_fresh(path: Path) -> bytes:
    """Open anew (close-to-open across nodes) and read everything."""
    with open(path, "rb") as f:
        return f.read()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident_pages(path: Path, start: int = 0, length: int | None = None) -> int:
    """How many pages of the file (of [start, start + length), page-aligned)
    are in the page cache: mincore(2) of a mapping never touched, so asking
    brings nothing in. Works on the mount's files too."""
    if length is None:
        length = path.stat().st_size - start
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            assert _libc.mincore(addr, length, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec)
        finally:
            _libc.munmap(addr, length)
    finally:
        os.close(fd)


def seaweed_fixture(base_port: int):
    """A module-scoped fixture: one SeaweedFS S3 server for the module's tests,
    on loopback ports base_port..base_port+7 that no other module uses."""

    @pytest.fixture(scope="module")
    def s3(tmp_path_factory):
        from devtools.seaweed import SeaweedServer

        server = SeaweedServer(tmp_path_factory.mktemp("weed"), base_port)
        server.start()
        yield server
        server.stop()

    return s3


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (fast, not crash-safe:
    fsync off). Tests may restart() it, or pause() it if they resume() it."""
    server = PostgresServer(PG_PORT)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A fresh, empty database for one test: `.url` (no password in it), `.env`
    ({"PGPASSWORD": ...}, for a daemon's environment) and `.name`. Dropped after
    the test, with any connection still open to it."""
    database = pg_server.create_database(f"test_{uuid.uuid4().hex[:12]}")
    yield database
    pg_server.resume()  # a backend stopped by pause() could not be terminated
    pg_server.drop_database(database.name)
