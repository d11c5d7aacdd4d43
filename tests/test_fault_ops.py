"""Faults below the FUSE boundary, with the Operations called directly (no
kernel): write-time ENOSPC and what a failed close leaves, bounded and
interruptible chunk waits, the cache limit under concurrency, damaged cache
files, and upload numbers that agree with each other. The same faults
through the real mount are in test_faults.py."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
import trio

from datafs.chunks import cache as cache_module
from datafs.chunks import chunk_id
from datafs.chunks.cache import ChunkCache
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.errors import StoreError
from datafs.meta.store import ROOT_INODE

from .test_operations import Ctx, Stack, stack  # noqa: F401 (a fixture)


def leftovers(s: Stack) -> dict:
    """Everything a dropped write could leave behind: should all be empty."""
    return {
        "pinned": s.cache.pinned(),
        "buffers": s.svc.buffers,
        "held": s.source.ledger.holds,
        "early": list(s.uploader._early),
        "failing": dict(s.uploader.failing),
    }


CLEAN = {"pinned": (0, 0), "buffers": 0, "held": {}, "early": [], "failing": {}}


class DownStore:
    """Switch for a FaultyStore whose puts fail for as long as it is down."""

    def __init__(self, store):
        self.store = store
        self.down = True
        original = store.put_file

        def put_file(chunk, path):
            if self.down:
                raise StoreError("connection refused", temporary=True)
            original(chunk, path)

        store.put_file = put_file


async def release(s: Stack, fh: int) -> None:
    """Close the last descriptor of a file whose writes failed: release reports
    the error again (the kernel ignores it) and forgets the failure."""
    with pytest.raises(pyfuse3.FUSEError):
        await s.ops.release(fh)


async def write_in_pieces(s: Stack, fh: int, data: bytes, piece: int = 1 << 20) -> int:
    """Write like dd; returns how many bytes were accepted before an error."""
    for off in range(0, len(data), piece):
        try:
            await s.ops.write(fh, off, data[off:off + piece])
        except pyfuse3.FUSEError:
            return off
    return len(data)


async def test_full_cache_fails_the_write_not_the_close_and_leaves_nothing_behind(tmp_path, nursery):
    s = Stack(tmp_path, nursery, cache_limit=4 * C)
    s.source.space_wait_seconds = 0.5
    down = DownStore(s.store)
    await nursery.start(s.uploader.run)
    before = os.urandom(1000)
    ino_before = await s.write_file(b"before", before)
    fi, attrs = await s.ops.create(ROOT_INODE, b"big", 0o644, os.O_RDWR, Ctx())
    with trio.fail_after(20):
        accepted = await write_in_pieces(s, fi.fh, os.urandom(40 * C))
    assert accepted < 12 * C  # a few chunks past a 4-chunk cache, not all 40
    with pytest.raises(pyfuse3.FUSEError) as again:
        await s.ops.write(fi.fh, accepted, b"x")
    assert again.value.errno == errno.ENOSPC  # the error sticks
    with trio.fail_after(2):  # and close reports it at once, without a second wait
        with pytest.raises(pyfuse3.FUSEError) as closed:
            await s.ops.flush(fi.fh)
    assert closed.value.errno == errno.ENOSPC
    assert (await s.ops.getattr(attrs.st_ino, Ctx())).st_size == 0  # the committed version, no phantom size
    await release(s, fi.fh)
    await trio.sleep(0.1)
    state = leftovers(s)
    # Only `before` is left: committed, pinned until its upload, which fails.
    assert state == {**CLEAN, "pinned": (1, len(before)), "failing": {chunk_id(before): "connection refused"}}
    # The store is still down, but a small file fits (the failed file's chunks were released).
    with trio.fail_after(5):
        await s.write_file(b"small", b"four")
    down.down = False
    s.uploader.retry_now()
    with trio.fail_after(20):
        await s.uploader.wait_idle()
    assert leftovers(s) == CLEAN
    assert await s.read_file(ino_before) == before
    assert s.cache.size_bytes <= s.cache.limit_bytes


async def test_a_dropped_write_fails_every_descriptor_until_the_last_close(tmp_path, nursery):
    s = Stack(tmp_path, nursery, cache_limit=2 * C)
    s.source.space_wait_seconds = 0.3
    DownStore(s.store)
    await nursery.start(s.uploader.run)
    fi, attrs = await s.ops.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, Ctx())
    other = await s.ops.open(attrs.st_ino, os.O_RDWR, Ctx())
    with trio.fail_after(20):
        accepted = await write_in_pieces(s, fi.fh, os.urandom(20 * C))
    assert accepted < 20 * C
    for fh in (fi.fh, other.fh):
        with pytest.raises(pyfuse3.FUSEError):
            await s.ops.write(fh, 0, b"later")  # nobody can go on and commit a file with a hole
    await release(s, fi.fh)
    with pytest.raises(pyfuse3.FUSEError):
        await s.ops.flush(other.fh)
    await release(s, other.fh)
    fh = (await s.ops.open(attrs.st_ino, os.O_RDWR, Ctx())).fh  # a new open starts afresh
    await s.ops.write(fh, 0, b"fresh")
    await s.ops.flush(fh)
    await s.ops.release(fh)
    assert await s.read_file(attrs.st_ino) == b"fresh"


async def test_an_overwrite_that_fails_keeps_the_previous_version(tmp_path, nursery):
    s = Stack(tmp_path, nursery, cache_limit=3 * C)
    s.source.space_wait_seconds = 0.3
    await nursery.start(s.uploader.run)
    old = os.urandom(C + 5)
    ino = await s.write_file(b"f", old)
    await s.uploader.wait_idle()
    DownStore(s.store)
    fi = await s.ops.open(ino, os.O_RDWR, Ctx())
    with trio.fail_after(20):
        await write_in_pieces(s, fi.fh, os.urandom(12 * C))
    with pytest.raises(pyfuse3.FUSEError):
        await s.ops.flush(fi.fh)
    assert (await s.ops.getattr(ino, Ctx())).st_size == len(old)
    assert await s.ops.read(fi.fh, 0, 100) == old[:100]
    await release(s, fi.fh)
    assert await s.read_file(ino) == old


async def test_a_read_that_cannot_get_its_chunk_fails_within_the_chunk_wait(tmp_path, nursery):
    s = Stack(tmp_path, nursery, wait_timeout=0.5)
    await nursery.start(s.uploader.run)
    ino = await s.write_file(b"f", os.urandom(2 * C))
    await s.uploader.wait_idle()
    s.evict_all()
    s.store.get_missing = 10**6  # as if it were never uploaded
    fi = await s.ops.open(ino, os.O_RDONLY, Ctx())
    results = []

    async def reader(off: int) -> None:
        started = trio.current_time()
        try:
            await s.ops.read(fi.fh, off, 1 << 20)
        except pyfuse3.FUSEError as exc:
            results.append((exc.errno, trio.current_time() - started))

    with trio.fail_after(5):
        async with trio.open_nursery() as readers:
            for off in (0, 1 << 20, C - 10, C + 5):  # several readers of one chunk, one across two
                readers.start_soon(reader, off)
    assert [code for code, _ in results] == [errno.EIO] * 4
    assert max(took for _, took in results) < 1.5


async def test_waits_end_at_once_when_the_mount_stops(tmp_path, nursery):
    s = Stack(tmp_path, nursery, wait_timeout=60)
    await nursery.start(s.uploader.run)
    ino = await s.write_file(b"f", os.urandom(C))
    await s.uploader.wait_idle()
    s.evict_all()
    s.store.get_missing = 10**6
    fi = await s.ops.open(ino, os.O_RDONLY, Ctx())
    failed = trio.Event()

    async def reader() -> None:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await s.ops.read(fi.fh, 0, 4096)
        assert exc.value.errno == errno.EIO
        failed.set()

    nursery.start_soon(reader)
    with trio.fail_after(5):
        while not s.source.waiting:
            await trio.sleep(0.01)
    s.source.abort_waits()
    with trio.fail_after(2):
        await failed.wait()


def test_cache_limit_holds_under_concurrent_writers(tmp_path):
    cache = ChunkCache(tmp_path / "cache", 4 * C, 0)
    cache.open()
    over = []
    chunks = [os.urandom(C) for _ in range(24)]

    def put(data: bytes) -> None:
        cache.put(chunk_id(data), data)
        if cache.size_bytes > cache.limit_bytes:
            over.append(cache.size_bytes)

    threads = [threading.Thread(target=put, args=(data,)) for data in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not over and cache.size_bytes <= 4 * C
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "chunks").rglob("*/*"))
    assert on_disk == cache.size_bytes
    # Only pinned chunks left: a put that does not fit writes nothing and says so.
    while cache.size_bytes + C <= cache.limit_bytes:
        more = os.urandom(C)
        cache.put(chunk_id(more), more)
    for chunk in cache.ids():
        cache.pin(chunk)
    extra = os.urandom(C)
    assert cache.put(chunk_id(extra), extra) is False
    assert chunk_id(extra) not in cache


def test_a_cache_file_changed_behind_our_back_is_never_returned(tmp_path):
    cache = ChunkCache(tmp_path / "cache", 1 << 30, 0)
    cache.open()
    data = os.urandom(C)
    chunk = chunk_id(data)
    cache.put(chunk, data)
    assert cache.read(chunk, 0, 10) == data[:10]  # its descriptor is cached now
    with open(cache.path(chunk), "r+b") as f:
        f.seek(5)
        f.write(b"XXXX")
    assert cache.read(chunk, 0, 10) is None  # failed verification: dropped, not returned
    assert chunk not in cache and not cache.path(chunk).exists()
    # A file from an earlier run (not verified yet) is hashed on first open.
    other = os.urandom(1000)
    cache.put(chunk_id(other), other)
    fresh = ChunkCache(tmp_path / "cache", 1 << 30, 0)
    fresh.open()
    with open(fresh.path(chunk_id(other)), "r+b") as f:
        f.write(b"Y")
    assert fresh.read(chunk_id(other), 0, 10) is None


def _resident(path: Path, offset: int) -> bool:
    """Whether the page at `offset` of `path` is in memory, asked with
    mincore(2), which (unlike a read) starts no read-ahead of its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        page = mmap.PAGESIZE
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped)) + offset // page * page
        vector = (ctypes.c_ubyte * 1)()
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(page), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return bool(vector[0] & 1)


def test_a_chunk_file_dropped_from_memory_is_read_back_whole(tmp_path, monkeypatch):
    """After the kernel drops a cached chunk's pages, random 4 KiB reads would
    each wait for the disk: the first one asks for the whole file again."""
    monkeypatch.setattr(cache_module, "READ_AHEAD_AGAIN_SECONDS", 0.0)
    cache = ChunkCache(tmp_path / "cache", 1 << 30, 0)
    cache.open()
    data = os.urandom(C)
    chunk = chunk_id(data)
    cache.put(chunk, data)
    assert cache.read(chunk, 0, 10) == data[:10]  # open now
    path = cache.path(chunk)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert not _resident(path, C - 4096)
    assert cache.read_resident(chunk, 4096, 4096) is None  # not in memory: found out
    assert cache.read(chunk, 4096, 4096) == data[4096:8192]
    deadline = time.monotonic() + 10
    while not _resident(path, C - 4096):  # the far end of the file comes in too
        assert time.monotonic() < deadline, "the chunk file was not read ahead whole"
        time.sleep(0.01)
    assert cache.read_resident(chunk, C - 4096, 4096) == data[-4096:]


async def test_a_damaged_cache_file_is_read_again_from_the_store(stack, caplog):
    data = os.urandom(C + 7)
    small = os.urandom(16 << 10)  # read on the event loop, not in a disk thread
    ino = await stack.write_file(b"f", data)
    small_ino = await stack.write_file(b"small", small)
    await stack.uploader.wait_idle()
    for chunk, good in ((chunk_id(data[:C]), data[:C]), (chunk_id(small), small)):
        # Replaced, not written in place: the embedded store hard-links the
        # cache file, so an in-place write would damage the store's copy too.
        damaged = stack.cache.path(chunk).with_suffix(".tmp")
        damaged.write_bytes(b"\0" * 64 + good[64:])
        os.replace(damaged, stack.cache.path(chunk))
    stack.cache.remove(chunk_id(data[C:]))  # and one deleted
    assert await stack.read_file(ino) == data
    assert await stack.read_file(small_ino) == small
    assert caplog.text.count("cache file failed verification") == 2


async def test_status_numbers_agree_and_early_failures_go_with_their_file(tmp_path, nursery):
    s = Stack(tmp_path, nursery)
    down = DownStore(s.store)
    await nursery.start(s.uploader.run)
    await s.write_file(b"committed", os.urandom(C + 1))
    fi, _ = await s.ops.create(ROOT_INODE, b"open", 0o644, os.O_RDWR, Ctx())
    await s.ops.write(fi.fh, 0, os.urandom(2 * C))  # two full chunks: uploading early
    with trio.fail_after(10):
        while len(s.uploader.failing) < 4:
            await trio.sleep(0.01)
    snap = s.uploader.snapshot()
    assert snap["pending_chunks"] == 2 and snap["pending_bytes"] == C + 1
    assert snap["failing_chunks"] == 2 and snap["open_failing_chunks"] == 2
    await s.ops.contents[_ino(s, b"open")].discard()
    await trio.sleep(0.05)
    snap = s.uploader.snapshot()
    assert snap["open_failing_chunks"] == 0 and snap["failing_chunks"] == 2  # gone with the file, at once
    down.down = False
    s.uploader.retry_now()
    with trio.fail_after(10):
        await s.uploader.wait_idle()
    assert s.uploader.snapshot()["failing_chunks"] == 0


def _ino(s: Stack, name: bytes) -> int:
    return s.meta.lookup(ROOT_INODE, name).ino
