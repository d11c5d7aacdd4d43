"""`datafs warmup`: pre-read files into the node's cache before it serves.

What `find PATH -type f | xargs -P 32 cat > /dev/null` would do, without
the bytes going through the mount: for a file on a datafs mount, the
command asks the mount's daemon (control socket, POST /warm) to bring each
16 MiB of the file into the local chunk cache, from a peer or the object
store, and nothing is sent back: no 1 MiB FUSE replies, no copy into the
mount's page cache (the first read of each page is a local-cache read).
Files elsewhere (another filesystem), and every file when the control
socket is not the caller's to use (it is the daemon user's alone: asking by
inode skips the files' permissions), are read through. A pool of workers
keeps `parallel` requests in flight, largest files first so the long ones
start early, with a progress bar and a bytes-per-second summary.
"""

from __future__ import annotations

import concurrent.futures
import os
import stat
import sys
import time
from pathlib import Path

from . import mounts
from .progress import ByteProgress

READ_SIZE_BYTES = 4 << 20
#: What one request to the daemon brings into the cache: four chunks, so a
#: large file is spread over several workers and the progress bar moves.
WARM_SLICE_BYTES = 16 << 20


def collect_files(paths: list[Path]) -> list[tuple[Path, os.stat_result]]:
    """Regular files named or under the directories named (symlinks inside
    them are not followed), each with its stat, largest first."""
    out = []
    for path in paths:
        if path.is_file():
            out.append((path, path.stat()))
            continue
        for root, _, names in os.walk(path):
            for name in names:
                full = Path(root) / name
                try:
                    st = full.lstat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append((full, st))
    out.sort(key=lambda item: item[1].st_size, reverse=True)
    return out


def _read_all(path: Path, progress: ByteProgress) -> tuple[int, int]:
    """Read the file through: (bytes read, 0), as `_warm_slice` answers."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_SIZE_BYTES):
            total += len(chunk)
            progress.add_bytes(len(chunk))
    return total, 0


def _control_socket(path: Path, dev: int, cache: dict[int, Path | None]) -> Path | None:
    """The control socket of the datafs daemon serving `path` (on device
    `dev`), or None (another filesystem, or a socket the caller may not
    use); looked up once per device."""
    from .state_files import control_path

    if dev not in cache:
        info = mounts.mount_containing(path)
        socket = control_path(info.state_dir) if info is not None and info.is_datafs and info.state_dir else None
        cache[dev] = socket if socket is not None and os.access(socket, os.R_OK | os.W_OK) else None
    return cache[dev]


def _warm_slice(socket: Path, path: Path, ino: int, offset: int, length: int, progress: ByteProgress) -> tuple[int, int]:
    """Have the daemon cache [offset, offset + length) of the file; (bytes
    cached, bytes that did not fit). OSError for what the command reports."""
    from .control import ControlError, ControlUnavailable, request

    try:
        answer = request(socket, "POST", "/warm", {"inode": ino, "offset": offset, "length": length}, timeout=None)
    except ControlUnavailable as exc:
        raise OSError(0, f"the datafs daemon does not answer ({exc.reason})") from None
    except ControlError as exc:
        raise OSError(0, exc.message) from None
    progress.add_bytes(answer["bytes"] + answer["not_kept_bytes"])
    return answer["bytes"], answer["not_kept_bytes"]


def warmup(paths: list[Path], parallel: int = 32, quiet: bool = False) -> dict:
    files = collect_files(paths)
    total = sum(st.st_size for _, st in files)
    started = time.monotonic()
    errors: dict[Path, str] = {}
    not_kept: dict[Path, int] = {}
    done_bytes = 0
    sockets: dict[int, Path | None] = {}
    with ByteProgress(total, desc="warmup", disable=quiet or not sys.stderr.isatty(), file=sys.stderr) as progress:
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {}
            for path, st in files:
                socket = _control_socket(path, st.st_dev, sockets)
                if socket is None:
                    futures[pool.submit(_read_all, path, progress)] = path
                    continue
                for offset in range(0, max(st.st_size, 1), WARM_SLICE_BYTES):
                    futures[pool.submit(_warm_slice, socket, path, st.st_ino, offset, WARM_SLICE_BYTES, progress)] = path
            for future in concurrent.futures.as_completed(futures):
                path = futures[future]
                try:
                    cached, missed = future.result()
                except OSError as exc:
                    errors.setdefault(path, exc.strerror or str(exc))
                    continue
                done_bytes += cached
                if missed:
                    not_kept[path] = not_kept.get(path, 0) + missed
    seconds = time.monotonic() - started
    messages = [f"{path}: {error}" for path, error in errors.items()]
    messages += [f"{path}: {size} bytes did not fit in the local cache (see --cache-size)" for path, size in not_kept.items()]
    return {
        "files": len(files), "bytes": done_bytes, "seconds": seconds,
        "bytes_per_second": done_bytes / seconds if seconds > 0 else 0.0, "errors": messages,
    }
