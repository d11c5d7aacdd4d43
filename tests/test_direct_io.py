"""Whole chunks written by this node go to the cache around the page cache
(O_DIRECT), and are read back that way for their upload; small chunks,
fetched chunks and filesystems that refuse O_DIRECT use the page cache."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from pathlib import Path

import pytest

from datafs.chunks import chunk_id, direct_io
from datafs.chunks.cache import ChunkCache
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.tiers.s3_store import _chunk_file_bytes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore(2) of a
    mapping never touched, so asking brings nothing in)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_a_whole_chunk_written_skips_the_page_cache_and_reads_back(tmp_path: Path):
    cache = ChunkCache(tmp_path, 1 << 30, 0)
    cache.open()
    whole, small = os.urandom(C), os.urandom(64 << 10)
    for data in (whole, small):
        assert cache.put(chunk_id(data), data, defer_sync=True)
    assert resident_pages(cache.path(chunk_id(whole))) == 0
    assert resident_pages(cache.path(chunk_id(small))) == len(small) // mmap.PAGESIZE
    assert cache.verify(chunk_id(whole)) and cache.verify(chunk_id(small))
    with _chunk_file_bytes(cache.path(chunk_id(whole))) as data:  # the upload's read
        assert isinstance(data, memoryview) and data == whole
    assert resident_pages(cache.path(chunk_id(whole))) == 0
    with _chunk_file_bytes(cache.path(chunk_id(small))) as data:
        assert data == small


def test_a_fetched_chunk_stays_in_the_page_cache(tmp_path: Path):
    """A chunk fetched for a reader is read again at once: it is written
    through the page cache."""
    cache = ChunkCache(tmp_path, 1 << 30, 0)
    cache.open()
    data = os.urandom(C)
    assert cache.put(chunk_id(data), data, durable=False)
    assert resident_pages(cache.path(chunk_id(data))) == C // mmap.PAGESIZE


def test_a_filesystem_refusing_o_direct_gets_plain_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Where O_DIRECT is refused (EINVAL, as some FUSE filesystems do), the
    chunk is written and read back all the same, and that directory is not
    asked again."""
    real_open = os.open
    refused = []

    def open_refusing_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io, "_refused", set())
    monkeypatch.setattr(os, "open", open_refusing_direct)
    cache = ChunkCache(tmp_path, 1 << 30, 0)
    cache.open()
    data, other = os.urandom(C), os.urandom(C)
    assert cache.put(chunk_id(data), data, defer_sync=True)
    assert cache.put(chunk_id(other), other, defer_sync=True)
    assert len(refused) == 1  # the second chunk was not tried that way
    assert cache.path(chunk_id(data)).read_bytes() == data
    with _chunk_file_bytes(cache.path(chunk_id(other))) as data:
        assert data == other
    assert len(refused) == 2  # the chunks' directory is asked once too
    assert os.listdir(cache.temp_path().parent) == []  # no temp file left behind


def test_a_file_whose_size_changed_is_read_plainly(tmp_path: Path):
    path = tmp_path / "chunk"
    path.write_bytes(os.urandom(C))
    with direct_io.read_whole(str(path), C - 4096) as data:
        assert data is None
    with direct_io.read_whole(str(path), C) as data:
        assert data == path.read_bytes()


def test_buffers_are_reused_and_few_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Buffers go back to the pool after use, the last one first; beyond
    SPARE_BUFFERS, idle ones are freed."""
    monkeypatch.setattr(direct_io, "_spare", [])
    path = tmp_path / "chunk"
    path.write_bytes(os.urandom(C))
    with direct_io.read_whole(str(path), C) as data:
        first = data.obj
    with direct_io.read_whole(str(path), C) as data:
        assert data.obj is first
    with contextlib.ExitStack() as stack:
        views = [stack.enter_context(direct_io.read_whole(str(path), C)) for _ in range(direct_io.SPARE_BUFFERS + 2)]
        assert len({id(v.obj) for v in views}) == direct_io.SPARE_BUFFERS + 2
    assert len(direct_io._spare) == direct_io.SPARE_BUFFERS
