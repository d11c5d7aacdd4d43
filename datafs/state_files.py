"""The files a daemon keeps in its state dir that commands read: its lock
(whose holder is the running daemon, and which holds its pid), control
socket, node identity and exit report.

Apart from daemon.py, which imports the whole filesystem (pyfuse3, trio,
boto3, the metadata engines: 0.44 s at each command's start, measured),
so that `datafs umount`, `status` and `fsck` start without it.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


def lock_path(state_dir: Path) -> Path:
    return state_dir / "daemon.lock"


def daemon_running(state_dir: Path) -> bool:
    """Whether a daemon holds this state dir's lock (robust to pid reuse)."""
    try:
        fd = os.open(lock_path(state_dir), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def control_path(state_dir: Path) -> Path:
    return state_dir / "control.sock"


def node_path(state_dir: Path) -> Path:
    return state_dir / "node.json"


def exit_report_path(state_dir: Path) -> Path:
    return state_dir / "exit.json"


def read_exit_report(state_dir: Path, pid: int) -> dict | None:
    """The report the daemon `pid` left when it exited, or None (it crashed)."""
    try:
        report = json.loads(exit_report_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("pid") == pid else None


def read_daemon_pid(state_dir: Path) -> int | None:
    try:
        return int(lock_path(state_dir).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None
