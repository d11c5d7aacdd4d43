"""A read out of sequence (a random reader, page faults of a mapped file)
puts its whole chunk in the kernel's page cache, through the real mount; a
file open for writing gets no such push, and whatever was pushed never hides
a later write or truncate."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

from datafs.config import CHUNK_SIZE_BYTES as C

from .conftest import Mount, read_fresh, resident_pages, write

CHUNK_PAGES = C // mmap.PAGESIZE


def _drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def _random_read(path: Path, offset: int, size: int = 4096) -> bytes:
    """One read, with the kernel's own readahead off, so that only what the
    daemon pushes can bring more of the file into memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _wait_resident(path: Path, start: int, length: int, pages: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        found = resident_pages(path, start, length)
        if found >= pages or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_a_read_out_of_sequence_brings_its_whole_chunk_into_the_page_cache(datafs_mount: Mount):
    path = datafs_mount.path / "weights.bin"
    data = os.urandom(3 * C)
    write(path, data)
    _drop_page_cache()
    assert resident_pages(path) == 0

    offset = C + C // 2  # in the second chunk: not where a sequential reader starts
    assert _random_read(path, offset) == data[offset:offset + 4096]
    assert _wait_resident(path, C, C, CHUNK_PAGES) == CHUNK_PAGES
    # Only that chunk: its neighbours were not asked for.
    assert resident_pages(path, 0, C) == 0 and resident_pages(path, 2 * C, C) == 0
    assert read_fresh(path) == data

    # The pages pushed are the file's: a later write and truncate show.
    with open(path, "r+b") as f:
        f.seek(C + 100)
        f.write(b"written after the push")
    data = data[:C + 100] + b"written after the push" + data[C + 122:]
    assert read_fresh(path) == data
    os.truncate(path, C + 10)
    assert read_fresh(path) == data[:C + 10]


def test_a_file_open_for_writing_gets_no_push(datafs_mount: Mount):
    path = datafs_mount.path / "open.bin"
    data = os.urandom(2 * C)
    write(path, data)
    _drop_page_cache()
    with open(path, "r+b"):
        offset = C + 8192
        assert _random_read(path, offset) == data[offset:offset + 4096]
        time.sleep(1.0)  # a push, if one were sent, lands well within this
        assert resident_pages(path, C, C) < CHUNK_PAGES // 2
    # Closed again: the next read out of sequence pushes.
    _drop_page_cache()
    assert _random_read(path, C + 8192) == data[C + 8192:C + 12288]
    assert _wait_resident(path, C, C, CHUNK_PAGES) == CHUNK_PAGES
