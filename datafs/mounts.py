"""Reading the kernel's tables: what is mounted where, and which processes live."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass
class MountInfo:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor"

    @property
    def is_datafs(self) -> bool:
        return self.fstype in ("fuse.datafs", "fuse") and self.source.startswith("datafs")

    @property
    def state_dir(self) -> Path | None:
        """datafs mounts carry their state dir in the source field: datafs:/var/lib/datafs."""
        prefix = "datafs:"
        return Path(self.source[len(prefix):]) if self.source.startswith(prefix) else None


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _mount_table() -> dict[str, MountInfo]:
    """Mount point -> its mount (the last one, if stacked)."""
    table = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            table[_unescape(fields[4])] = MountInfo(_unescape(fields[4]), rest[0], _unescape(rest[1]), fields[2])
    return table


def find_mount(path: Path | str) -> MountInfo | None:
    """The mount whose mount point is exactly `path` (the last one, if stacked)."""
    return _mount_table().get(os.path.abspath(path))


def mount_containing(path: Path | str) -> MountInfo | None:
    """The innermost mount that `path` (existing or not) lies under."""
    table = _mount_table()
    target = Path(os.path.abspath(path))
    for candidate in (target, *target.parents):
        if str(candidate) in table:
            return table[str(candidate)]
    return None


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return stat_fields(pid) is not None


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid,
    pgrp, session, ...), or None if the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields


def processes(*, parent: int | None = None, session: int | None = None) -> list[int]:
    """Live processes (zombies excluded) whose parent is `parent`, or that are
    in the session `session`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(entry)
        if fields is None:
            continue
        if (parent is None or int(fields[1]) == parent) and (session is None or int(fields[3]) == session):
            found.append(int(entry))
    return found