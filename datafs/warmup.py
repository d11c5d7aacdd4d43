"""`datafs warmup`: pre-read files into the node's cache before it serves.

The built-in form of `find PATH -type f | xargs -P 32 cat > /dev/null`: files are
read through the mount by a pool of readers, largest first so the long ones
start early, with a progress bar and a bytes-per-second summary. Reading
through the mount is what fills the local chunk cache (and the page cache).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from pathlib import Path

from .progress import ByteProgress

READ_SIZE_BYTES = 4 << 20


def collect_files(paths: list[Path]) -> list[tuple[Path, int]]:
    out = []
    for path in paths:
        if path.is_file():
            out.append((path, path.stat().st_size))
            continue
        for root, _, names in os.walk(path):
            for name in names:
                full = Path(root) / name
                try:
                    st = full.lstat()
                except OSError:
                    continue
                if full.is_file() and not full.is_symlink():
                    out.append((full, st.st_size))
    out.sort(key=lambda item: item[1], reverse=True)
    return out


def _read_all(path: Path, progress: ByteProgress) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_SIZE_BYTES):
            total += len(chunk)
            progress.add_bytes(len(chunk))
    return total


def warmup(paths: list[Path], parallel: int = 32, quiet: bool = False) -> dict:
    files = collect_files(paths)
    total = sum(size for _, size in files)
    started = time.monotonic()
    errors: list[str] = []
    done_bytes = 0
    with ByteProgress(total, desc="warmup", disable=quiet or not sys.stderr.isatty(), file=sys.stderr) as progress:
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {pool.submit(_read_all, path, progress): path for path, _ in files}
            for future in concurrent.futures.as_completed(futures):
                try:
                    done_bytes += future.result()
                except OSError as exc:
                    errors.append(f"{futures[future]}: {exc.strerror}")
    seconds = time.monotonic() - started
    return {
        "files": len(files), "bytes": done_bytes, "seconds": seconds,
        "bytes_per_second": done_bytes / seconds if seconds > 0 else 0.0, "errors": errors,
    }
