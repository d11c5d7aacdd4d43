"""What the harness asks of the machine: the page cache, the mount table,
processes it started.

Kept apart from the targets because all of them use it the same way, and so
the rules live in one place: the page cache is dropped only through
/proc/sys/vm/drop_caches (a failure becomes a note on the result, never a
crash), and processes are only ever ended by the PIDs the harness started.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

from datafs.mounts import pid_alive, processes, stat_fields


def drop_page_cache() -> str | None:
    """Write dirty pages back, then drop the page cache, dentries and inodes.

    Returns None on success, else a short note for the result row: without
    root (or in a container that forbids it) the figure is still measured,
    just not from a cold page cache, and the table must say so.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"page cache not dropped ({exc.strerror or exc})"
    return None


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path` (e.g. `fuse.juicefs`), or None."""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and _unescape(fields[4]) == target:
                    return right.split()[0]
    except OSError:
        return None
    return None


def lazy_unmount(path: Path) -> None:
    """Detach a mount whose daemon is gone or stuck, so nothing is left behind."""
    for tool in (["fusermount3", "-u", "-z"], ["fusermount", "-u", "-z"], ["umount", "-l"]):
        try:
            subprocess.run(tool + [str(path)], capture_output=True, timeout=30)
            return
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue


def wait_gone(pid: int, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def end_daemon(state_dir: Path, mountpoint: Path) -> None:
    """After an unmount that failed or never ran: kill a datafs daemon still
    holding `state_dir` (SIGKILL, by its PID) and detach its mount."""
    from datafs.state_files import daemon_running, read_daemon_pid

    # The pid in the lock file is the daemon's only while the lock is held: a
    # stale pid may belong to anyone by now.
    pid = read_daemon_pid(state_dir)
    if pid and daemon_running(state_dir) and pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_gone(pid, 30)
    if mount_fstype(mountpoint):
        lazy_unmount(mountpoint)


def session_members(session_id: int) -> list[int]:
    """PIDs in the session `session_id`: a process the harness started with
    `start_new_session=True`, and every child it forked (JuiceFS forks its
    mount process from a watchdog)."""
    return processes(session=session_id)


def kill_session(session_id: int, timeout_seconds: float = 10) -> None:
    """SIGKILL, by PID, every process left in a session the harness created."""
    for pid in session_members(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in session_members(session_id):
        wait_gone(pid, timeout_seconds)


def peak_rss_bytes(pid: int | None) -> int | None:
    """A process's peak resident set (VmHWM), or None if it is gone."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a process has used so far, or None if it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- bytes not on the disk yet ---------------------------------------------------------------
_CACHESTAT_SYSCALL = 451  # cachestat(2), Linux 6.5; the same number on x86-64 and arm64
_PAGE_BYTES = os.sysconf("SC_PAGESIZE")
_libc = ctypes.CDLL(None, use_errno=True)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def _file_unsynced_bytes(fd: int) -> int | None:
    """Bytes of an open file in the page cache that the disk does not have
    yet (dirty or under writeback), or None if the kernel has no cachestat."""
    whole, stat = _CachestatRange(0, 0), _Cachestat()
    if _libc.syscall(_CACHESTAT_SYSCALL, fd, ctypes.byref(whole), ctypes.byref(stat), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            return None
        raise OSError(err, os.strerror(err))
    return (stat.nr_dirty + stat.nr_writeback) * _PAGE_BYTES


def unsynced_bytes(root: Path) -> int | None:
    """Bytes under `root` (a target's own files: its cache, staging and
    metadata; mounts below it are skipped) that are only in memory. Right
    after an fsync() returned, anything here is data the filesystem said was
    durable and a power loss would lose. None if this kernel cannot tell."""
    total = 0
    seen: set[tuple[int, int]] = set()  # JuiceFS links a staged block into its cache: count it once
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not os.path.ismount(os.path.join(directory, d))]
        for name in names:
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # gone meanwhile (an upload finished), a socket, a link
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                found = _file_unsynced_bytes(fd)
            finally:
                os.close(fd)
            if found is None:
                return None
            total += found
    return total
