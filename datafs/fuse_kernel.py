"""What a datafs mount asks of the kernel: mount options, cache lifetimes,
readahead and the number of background requests in flight.

Kept apart from the daemon, and light to import (no metadata engine, no
object store), so the benchmark's pyfuse3 passthrough can mount with exactly
the same kernel settings: the ceiling it measures is then the cost of a Python
FUSE daemon, not of different tuning. `config.py` takes its defaults from here,
so every CLI command imports this module: pyfuse3 and trio (90 ms of a
command's 0.46 s start, measured) are imported only by the functions that
mount.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from . import mounts

log = logging.getLogger(__name__)

#: Kernel attribute and entry cache lifetimes (the `attr_timeout_seconds` and
#: `entry_timeout_seconds` settings default to these).
ATTR_TIMEOUT_SECONDS = 1.0
ENTRY_TIMEOUT_SECONDS = 1.0
#: The mount's readahead: sequential reads then arrive in large requests.
READ_AHEAD_KB = 16384
#: The kernel's default of 12 background requests (readahead) in flight
#: leaves a sequential reader waiting on one 1 MiB request after another;
#: JuiceFS asks for 50.
MAX_BACKGROUND = 64
#: Where the kernel's FUSE control filesystem (fusectl) lists connections.
FUSECTL_DIR = Path("/sys/fs/fuse/connections")


def mount_options(fsname: str, subtype: str) -> set[str]:
    """pyfuse3's defaults (default_permissions: the kernel checks modes), no
    atime updates, and, as root, access for every user."""
    import pyfuse3

    options = set(pyfuse3.default_options)
    options |= {f"fsname={fsname}", f"subtype={subtype}", "noatime"}
    if os.geteuid() == 0:
        options.add("allow_other")
    return options


async def tune(mountpoint: Path, read_ahead_kb: int, max_background: int) -> None:
    """Raise the mount's readahead and its background request limit. The
    kernel resets the readahead while it handles FUSE_INIT, which comes after
    the main loop starts, so call this from a task once `pyfuse3.main()` runs."""
    import trio

    info = mounts.find_mount(mountpoint)
    if info is None:
        return
    path = Path("/sys/class/bdi") / info.device / "read_ahead_kb"
    wanted = str(read_ahead_kb)
    for _ in range(50):
        await trio.sleep(0.05)
        try:
            path.write_text(wanted)
            if path.read_text().strip() == wanted:
                break
        except OSError as exc:
            log.info("could not set readahead", extra={"path": str(path), "error": exc.strerror})
            break
    await trio.to_thread.run_sync(set_max_background, info.device, max_background)


def set_max_background(device: str, limit: int) -> None:
    """Set the connection's background request limit through fusectl
    (mounting it where the init system has not), and the congestion
    threshold at three quarters of it, as the kernel's defaults are."""
    major, minor = (int(part) for part in device.split(":"))
    connection = FUSECTL_DIR / str(major << 20 | minor)
    try:
        if not connection.is_dir() and not os.path.ismount(FUSECTL_DIR):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL_DIR)],
                           capture_output=True, timeout=10, check=True)
        # Raise the limit before the threshold: the kernel refuses a threshold above it.
        (connection / "max_background").write_text(str(limit))
        (connection / "congestion_threshold").write_text(str(max(1, limit * 3 // 4)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("could not set the FUSE background limit", extra={"path": str(connection), "error": str(exc)})
