"""The Operations class called directly (no kernel), over the in-memory metadata
engine and stores that fail on purpose: the errno contract at the FUSE
boundary, read-through verification, waiting for chunks, upload retries, GC."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from datafs.chunks import chunk_id
from datafs.chunks.cache import ChunkCache
from datafs.chunks.content import ContentService
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.durability import Durability
from datafs.errors import ChunkMissing, StoreError
from datafs.fs import FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH, FALLOC_FL_ZERO_RANGE as ZERO, Operations
from datafs.meta.calls import MetaCalls
from datafs.meta.kv import open_kv
from datafs.meta.store import ROOT_INODE, ChunkRef, MetaStore
from datafs.tiers.chain import FETCH_CONCURRENCY, ChunkSource
from datafs.tiers.file_store import FileStore
from datafs.upload import Collector, Uploader


class FaultyStore(FileStore):
    """A file:// store with switches for the failures real stores have."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.put_failures = 0
        self.get_missing = 0
        self.corrupt_gets = 0
        self.crash_gets = False
        self.puts = 0

    def put_file(self, chunk, path):
        if self.put_failures:
            self.put_failures -= 1
            raise StoreError("503 SlowDown", temporary=True)
        self.puts += 1
        super().put_file(chunk, path)

    def get(self, chunk):
        if self.crash_gets:
            raise RuntimeError("bug in a tier")
        if self.get_missing:
            self.get_missing -= 1
            raise ChunkMissing(chunk)
        data = super().get(chunk)
        if self.corrupt_gets:
            self.corrupt_gets -= 1
            return b"X" + data[1:]
        return data


class Ctx:
    uid = os.getuid()
    gid = os.getgid()
    pid = os.getpid()
    umask = 0o022


class Stack:
    """`durable_later`: chunks are written without fsync and made durable by
    flushes (the embedded engine's way, durability.py); else fsynced at once."""

    def __init__(self, tmp: Path, nursery: trio.Nursery, wait_timeout: float = 5.0, cache_limit: int = 1 << 40,
                 meta: MetaStore | None = None, durable_later: bool = False):
        if meta is None:
            meta = MetaStore(open_kv("memory://"))
            meta.init_root()
        self.meta = meta
        self.store = FaultyStore(tmp / "store")
        self.store.check()
        self.cache = ChunkCache(tmp / "cache", cache_limit, 0)
        self.cache.open()
        calls = MetaCalls()
        self.durability = Durability(self.meta, self.cache, calls, deferred=durable_later, interval_seconds=3600)
        self.source = ChunkSource(self.cache, self.store, wait_timeout_seconds=wait_timeout, defer_sync=durable_later)
        self.uploader = Uploader(self.meta, self.cache, self.store, calls, concurrency=4, ledger=self.source.ledger)
        self.source.connect_uploader(self.uploader)
        self.collector = Collector(self.meta, self.source, calls, interval_seconds=3600)
        self.svc = ContentService(self.meta, self.source, calls, self.uploader.enqueue, 64 << 20,
                                  durability=self.durability)
        self.svc.nursery = nursery
        self.ops = Operations(
            self.meta, self.svc, calls, statfs_path=tmp, attr_timeout_seconds=1, entry_timeout_seconds=1,
            on_inode_deleted=self.collector.wake, durability=self.durability,
        )

    async def write_file(self, name: bytes, data: bytes) -> int:
        fi, attrs = await self.ops.create(ROOT_INODE, name, 0o644, os.O_RDWR, Ctx())
        for off in range(0, len(data), 128 << 10):
            await self.ops.write(fi.fh, off, data[off:off + (128 << 10)])
        await self.ops.flush(fi.fh)
        await self.ops.release(fi.fh)
        return attrs.st_ino

    async def read_file(self, ino: int) -> bytes:
        fi = await self.ops.open(ino, os.O_RDONLY, Ctx())
        size = (await self.ops.getattr(ino, Ctx())).st_size
        out = bytearray()
        while len(out) < size:
            out += await self.ops.read(fi.fh, len(out), 1 << 20)
        await self.ops.release(fi.fh)
        return bytes(out)

    def evict_all(self) -> None:
        for chunk in self.cache.ids():
            self.cache.remove(chunk)


@pytest.fixture
async def stack(tmp_path, nursery):
    s = Stack(tmp_path, nursery)
    await nursery.start(s.uploader.run)
    return s


async def test_round_trip_across_chunk_boundaries(stack):
    data = os.urandom(2 * C + 12345)
    ino = await stack.write_file(b"f", data)
    assert await stack.read_file(ino) == data
    await stack.uploader.wait_idle()
    stack.evict_all()  # now every read goes to the store and is verified
    assert await stack.read_file(ino) == data


async def test_overwrite_inside_chunk_reads_old_bytes_around_it(stack):
    data = bytearray(os.urandom(C + 100))
    ino = await stack.write_file(b"f", bytes(data))
    await stack.uploader.wait_idle()
    stack.evict_all()
    fi = await stack.ops.open(ino, os.O_RDWR, Ctx())
    await stack.ops.write(fi.fh, C - 2, b"abcd")
    data[C - 2:C + 2] = b"abcd"
    assert await stack.ops.read(fi.fh, C - 10, 20) == bytes(data[C - 10:C + 10])  # before commit
    await stack.ops.release(fi.fh)
    assert await stack.read_file(ino) == bytes(data)


async def test_truncate_then_extend_reads_zeros(stack):
    data = os.urandom(C + 500)
    ino = await stack.write_file(b"f", data)
    attrs = pyfuse3.EntryAttributes()
    fields = SimpleNamespace(
        update_size=True, update_mode=False, update_uid=False, update_gid=False,
        update_atime=False, update_mtime=False, update_ctime=False,
    )
    attrs.st_size = 100
    await stack.ops.setattr(ino, attrs, fields, None, Ctx())
    attrs.st_size = C + 10
    await stack.ops.setattr(ino, attrs, fields, None, Ctx())
    assert await stack.read_file(ino) == data[:100] + bytes(C + 10 - 100)


async def test_zero_chunks_are_stored_as_holes(stack):
    ino = await stack.write_file(b"zeros", bytes(2 * C))
    assert stack.meta.chunks(ino, 0, 10) == {}
    assert await stack.read_file(ino) == bytes(2 * C)


async def test_fallocate_zeros_are_holes_and_upload_nothing(stack):
    data = bytearray(os.urandom(3 * C + 100))
    ino = await stack.write_file(b"f", bytes(data))
    await stack.uploader.wait_idle()
    puts = stack.store.puts
    fi = await stack.ops.open(ino, os.O_RDWR, Ctx())
    await stack.ops.fallocate(fi.fh, PUNCH | KEEP, C, C)  # one chunk, whole
    await stack.ops.fallocate(fi.fh, ZERO, 0, C // 2)  # another in two halves: its buffer ends all zeros
    await stack.ops.fallocate(fi.fh, ZERO | KEEP, C // 2, C // 2)
    await stack.ops.fallocate(fi.fh, PUNCH | KEEP, 3 * C, 100)  # the short last chunk
    await stack.ops.fallocate(fi.fh, 0, 3 * C, 2 * C)  # the file grows by zeros
    await stack.ops.fallocate(fi.fh, KEEP, 0, 9 * C)
    assert (await stack.ops.getattr(ino, Ctx())).st_size == 5 * C
    await stack.ops.release(fi.fh)
    await stack.uploader.wait_idle()
    assert list(stack.meta.chunks(ino)) == [2]
    assert stack.store.puts == puts
    assert await stack.read_file(ino) == bytes(2 * C) + bytes(data[2 * C:3 * C]) + bytes(2 * C)


async def test_fallocate_errno_contract(stack):
    ino = await stack.write_file(b"f", b"x" * 100)
    fi = await stack.ops.open(ino, os.O_RDWR, Ctx())
    refused = [
        (PUNCH, 0, 10, errno.EOPNOTSUPP),  # a hole keeps the size
        (PUNCH | ZERO | KEEP, 0, 10, errno.EOPNOTSUPP),
        (0x08, 0, C, errno.EOPNOTSUPP),  # COLLAPSE_RANGE
        (0, 0, 0, errno.EINVAL),
        (KEEP, -1, 10, errno.EINVAL),
        (KEEP, 0, 1 << 60, errno.ENOSPC),  # more than the cache disk holds
    ]
    for mode, offset, length, code in refused:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await stack.ops.fallocate(fi.fh, mode, offset, length)
        assert exc.value.errno == code, (mode, offset, length)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await stack.ops.fallocate(999, 0, 0, 10)
    assert exc.value.errno == errno.EBADF
    await stack.ops.release(fi.fh)
    assert await stack.read_file(ino) == b"x" * 100


async def test_identical_files_share_chunks(stack):
    data = os.urandom(C + 7)
    await stack.write_file(b"a", data)
    await stack.write_file(b"b", data)
    await stack.uploader.wait_idle()
    assert stack.store.puts == 2
    assert len(stack.cache.ids()) == 2


async def test_errno_contract(stack):
    await stack.write_file(b"f", b"x")
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await stack.ops.lookup(ROOT_INODE, b"missing", Ctx())
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await stack.ops.mkdir(ROOT_INODE, b"f", 0o755, Ctx())
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await stack.ops.create(ROOT_INODE, b"n" * 256, 0o644, os.O_RDWR, Ctx())
    assert exc.value.errno == errno.ENAMETOOLONG
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await stack.ops.getxattr(ROOT_INODE, b"user.none", Ctx())
    assert exc.value.errno == pyfuse3.ENOATTR
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await stack.ops.read(999, 0, 10)
    assert exc.value.errno == errno.EBADF


async def test_unexpected_exception_becomes_eio_and_daemon_keeps_serving(stack, caplog):
    ino = await stack.write_file(b"f", os.urandom(1000))
    await stack.uploader.wait_idle()
    stack.evict_all()
    stack.store.crash_gets = True
    fi = await stack.ops.open(ino, os.O_RDONLY, Ctx())
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await stack.ops.read(fi.fh, 0, 100)
    assert exc.value.errno == errno.EIO
    assert "unexpected error in request" in caplog.text
    stack.store.crash_gets = False
    assert len(await stack.ops.read(fi.fh, 0, 100)) == 100


async def test_corrupt_object_is_detected_and_fetched_again(stack, caplog):
    data = os.urandom(5000)
    ino = await stack.write_file(b"f", data)
    await stack.uploader.wait_idle()
    stack.evict_all()
    stack.store.corrupt_gets = 1
    assert await stack.read_file(ino) == data
    assert "failed verification" in caplog.text


async def test_persistently_corrupt_object_is_eio_never_bad_data(tmp_path, nursery):
    s = Stack(tmp_path, nursery, wait_timeout=0.5)
    await nursery.start(s.uploader.run)
    ino = await s.write_file(b"f", os.urandom(5000))
    await s.uploader.wait_idle()
    s.evict_all()
    s.store.corrupt_gets = 10**6
    fi = await s.ops.open(ino, os.O_RDONLY, Ctx())
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await s.ops.read(fi.fh, 0, 100)
    assert exc.value.errno == errno.EIO


async def test_read_waits_for_a_chunk_that_is_still_uploading(stack):
    data = os.urandom(3000)
    ino = await stack.write_file(b"f", data)
    await stack.uploader.wait_idle()
    stack.evict_all()
    stack.store.get_missing = 3  # absent for the first polls, as if another node were uploading
    assert await stack.read_file(ino) == data
    assert stack.store.get_missing == 0


async def test_uploads_retry_temporary_failures_and_unpin(stack):
    stack.store.put_failures = 2
    ino = await stack.write_file(b"f", os.urandom(C + 1))
    with trio.fail_after(20):
        await stack.uploader.wait_idle()
    assert stack.meta.pending_uploads() == []
    assert not stack.uploader.failing
    assert all(not stack.cache.is_pinned(c) for c in stack.cache.ids())
    assert await stack.read_file(ino)


async def test_uploader_resumes_pending_after_restart(tmp_path, nursery):
    s = Stack(tmp_path, nursery)  # uploader deliberately not started: a "crash" before upload
    data = os.urandom(2000)
    await s.write_file(b"f", data)
    assert len(s.meta.pending_uploads()) == 1
    await nursery.start(s.uploader.run)
    with trio.fail_after(10):
        await s.uploader.wait_idle()
    assert s.meta.pending_uploads() == []
    assert s.store.exists(chunk_id(data))


async def test_garbage_left_pinned_by_its_upload_is_collected_when_the_upload_ends(stack, nursery, monkeypatch):
    """A file deleted while its chunks are still uploading: the collector's
    pass at the delete must leave them (pinned until the store has them), and
    looks again soon after, not a whole interval (an hour here) later."""
    uploading, release = threading.Event(), threading.Event()
    put = stack.store.put_file

    def slow_put(chunk, path):
        uploading.set()
        release.wait(10)
        return put(chunk, path)

    monkeypatch.setattr(stack.store, "put_file", slow_put)
    await nursery.start(stack.collector.run)
    data = os.urandom(C + 9)
    ino = await stack.write_file(b"f", data)
    await trio.to_thread.run_sync(uploading.wait, 10)
    await stack.ops.unlink(ROOT_INODE, b"f", Ctx())
    stack.ops.forget([(ino, 1)])
    await trio.testing.wait_all_tasks_blocked()
    assert set(stack.cache.ids()) == {chunk_id(data[:C]), chunk_id(data[C:])}  # pinned: left alone
    release.set()
    with trio.fail_after(10):
        while stack.cache.ids():
            await trio.sleep(0.05)


async def test_unlinked_open_file_stays_usable_then_is_collected(stack):
    data = os.urandom(C + 9)
    ino = await stack.write_file(b"f", data)
    await stack.ops.lookup(ROOT_INODE, b"f", Ctx())
    fi = await stack.ops.open(ino, os.O_RDWR, Ctx())
    await stack.ops.unlink(ROOT_INODE, b"f", Ctx())
    assert await stack.ops.read(fi.fh, 0, 10) == data[:10]
    await stack.ops.write(fi.fh, 0, b"new")
    assert await stack.ops.read(fi.fh, 0, 3) == b"new"
    await stack.ops.release(fi.fh)
    assert stack.meta.get_inode(ino).nlink == 0  # the kernel still has a lookup
    stack.ops.forget([(ino, 2)])  # create and lookup each counted one
    await trio.sleep(0.1)
    with pytest.raises(Exception):
        stack.meta.get_inode(ino)
    await stack.uploader.wait_idle()
    assert await stack.collector.collect() >= 2
    assert stack.cache.ids() == []
    assert not any((stack.store.root / "chunks").rglob("*/*/*"))


async def test_readdir_counts_lookups(stack, monkeypatch):
    for i in range(5):
        await stack.ops.mkdir(ROOT_INODE, f"d{i}".encode(), 0o755, Ctx())
    before = dict(stack.ops.lookups)
    seen = []

    def reply(token, name, attrs, next_id):
        seen.append(name)
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await stack.ops.opendir(ROOT_INODE, Ctx())
    await stack.ops.readdir(fh, 0, None)
    await stack.ops.releasedir(fh)
    assert seen == [f"d{i}".encode() for i in range(5)]
    assert all(stack.ops.lookups[ino] == before.get(ino, 0) + 1 for ino in before)


async def test_statfs_reports_cache_volume(stack, tmp_path):
    out = await stack.ops.statfs(Ctx())
    disk = os.statvfs(tmp_path)
    assert out.f_blocks == disk.f_blocks and out.f_bsize == disk.f_bsize


async def test_mknod_fifo_and_setgid_directory(stack):
    attrs = await stack.ops.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o600, 0, Ctx())
    assert stat.S_ISFIFO(attrs.st_mode)
    d = await stack.ops.mkdir(ROOT_INODE, b"shared", 0o2775, Ctx())
    stack.meta.setattr(d.st_ino, gid=4242)
    child = await stack.ops.mkdir(d.st_ino, b"sub", 0o755, Ctx())
    assert child.st_gid == 4242 and child.st_mode & stat.S_ISGID


async def test_sequential_reader_prefetches_following_chunks(stack):
    stack.source.nursery = stack.svc.nursery
    data = os.urandom(6 * C)
    ino = await stack.write_file(b"f", data)
    await stack.uploader.wait_idle()
    stack.evict_all()
    fi = await stack.ops.open(ino, os.O_RDONLY, Ctx())
    step = 1 << 20
    for off in range(0, 2 * C, step):  # two chunks, read sequentially
        assert await stack.ops.read(fi.fh, off, step) == data[off:off + step]
    with trio.fail_after(10):
        while len(stack.cache.ids()) < 6:
            await trio.sleep(0.01)
    stack.store.crash_gets = True  # everything left must come from the cache now
    rest = b"".join([await stack.ops.read(fi.fh, off, step) for off in range(2 * C, 6 * C, step)])
    assert rest == data[2 * C:]


async def test_random_reader_does_not_prefetch(stack):
    stack.source.nursery = stack.svc.nursery
    data = os.urandom(6 * C)
    ino = await stack.write_file(b"f", data)
    await stack.uploader.wait_idle()
    stack.evict_all()
    fi = await stack.ops.open(ino, os.O_RDONLY, Ctx())
    for off in (5 * C, 1 * C + 7, 3 * C + 99):
        assert await stack.ops.read(fi.fh, off, 4096) == data[off:off + 4096]
    await trio.sleep(0.2)
    assert len(stack.cache.ids()) == 3


async def test_full_cache_of_unuploaded_chunks_makes_writers_wait(tmp_path, nursery):
    s = Stack(tmp_path, nursery, cache_limit=2 * C)
    s.store.put_failures = 3  # uploads fail for a while (~1.4 s of backoff)
    await nursery.start(s.uploader.run)
    data = os.urandom(4 * C)
    with trio.fail_after(30):
        ino = await s.write_file(b"f", data)  # needs 4 chunks in a 2-chunk cache
        await s.uploader.wait_idle()
    assert await s.read_file(ino) == data


async def test_full_cache_that_never_drains_is_enospc_and_keeps_committed_data(tmp_path, nursery):
    s = Stack(tmp_path, nursery, cache_limit=2 * C)
    s.source.space_wait_seconds = 0.5
    first = os.urandom(2 * C)
    ino = await s.write_file(b"first", first)  # committed; its upload never happens
    fi, _ = await s.ops.create(ROOT_INODE, b"second", 0o644, os.O_RDWR, Ctx())
    await s.ops.write(fi.fh, 0, os.urandom(C))
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await s.ops.flush(fi.fh)
    assert exc.value.errno == errno.ENOSPC
    assert await s.read_file(ino) == first
    assert len(s.meta.pending_uploads()) == 2


async def test_full_chunks_upload_while_the_file_is_still_open(stack, nursery):
    await nursery.start(stack.uploader.run)
    data = os.urandom(2 * C + 5)
    fi, attrs = await stack.ops.create(ROOT_INODE, b"big", 0o644, os.O_RDWR, Ctx())
    await stack.ops.write(fi.fh, 0, data)
    first, second = chunk_id(data[:C]), chunk_id(data[C:2 * C])
    with trio.fail_after(10):
        while not (stack.store.exists(first) and stack.store.exists(second)):
            await trio.sleep(0.01)
    assert not stack.meta.pending_uploads()  # nothing committed yet: the file is open
    await stack.ops.release(fi.fh)
    await stack.uploader.wait_idle()
    assert stack.store.puts == 3  # the commit found the early two in the store: no second put
    assert await stack.read_file(attrs.st_ino) == data


async def test_chunk_evicted_after_an_early_upload_still_completes_its_commit(stack, nursery):
    await nursery.start(stack.uploader.run)
    data = os.urandom(C + 5)
    fi, attrs = await stack.ops.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, Ctx())
    await stack.ops.write(fi.fh, 0, data)
    first = chunk_id(data[:C])
    with trio.fail_after(10):
        while not stack.store.exists(first) or stack.cache.is_pinned(first):
            await trio.sleep(0.01)
    stack.cache.remove(first)  # unpinned once stored: the cache may drop it before the commit
    await stack.ops.release(fi.fh)
    with trio.fail_after(10):
        await stack.uploader.wait_idle()
    assert not stack.uploader.failing
    stack.evict_all()
    assert await stack.read_file(attrs.st_ino) == data


async def test_a_whole_request_in_memory_is_served_without_a_thread(stack, monkeypatch):
    """Once a chunk file is open and its pages are in memory, reads up to the
    largest request the kernel sends (1 MiB) are answered on the event loop:
    no worker thread, whose hop costs more than the copy."""
    data = os.urandom(C)
    ino = await stack.write_file(b"f", data)
    (ref,) = stack.meta.chunks(ino, 0, 1 << 62).values()
    assert await stack.source.read(ref, 0, 4096) == data[:4096]  # opens it
    stack.cache.read_ahead(ref.chunk_id)
    # A chunk written here skipped the page cache: a plain read brings its pages in.
    assert stack.cache.path(ref.chunk_id).read_bytes() == data
    monkeypatch.setattr(stack.cache, "read", lambda *args: pytest.fail("read through a worker thread"))
    for offset in (1 << 20, 3 << 20):
        assert await stack.source.read(ref, offset, 1 << 20) == data[offset:offset + (1 << 20)]


async def test_readers_around_a_fetch_share_its_single_get(stack):
    """Readers that arrive while a fetch of their chunk is in flight, and one
    that arrives the moment it has finished (its bytes handed over, the cache
    write still going), all take that fetch's bytes: one GET in all."""
    data = os.urandom(C)
    ino = await stack.write_file(b"f", data)
    await stack.uploader.wait_idle()
    stack.evict_all()
    (ref,) = stack.meta.chunks(ino, 0, 1 << 62).values()
    gets, in_get, release_get = [], threading.Event(), threading.Event()
    putting, release_put = threading.Event(), threading.Event()
    real_get, real_put = stack.store.get, stack.cache.put

    def slow_get(chunk):
        gets.append(chunk)
        in_get.set()
        release_get.wait(10)
        return real_get(chunk)

    def slow_put(*args, **kwargs):
        putting.set()
        release_put.wait(10)
        return real_put(*args, **kwargs)

    stack.store.get, stack.cache.put = slow_get, slow_put
    got = []

    async def read(offset):
        got.append(await stack.source.read(ref, offset, 4096) == data[offset:offset + 4096])

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, 0)
            await trio.to_thread.run_sync(in_get.wait, 10)
            for offset in (4096, 8192):  # while the GET is in flight
                nursery.start_soon(read, offset)
            await trio.testing.wait_all_tasks_blocked()
            release_get.set()
            await trio.to_thread.run_sync(putting.wait, 10)
            await read(1 << 20)  # after the bytes, before the cache has them
            release_put.set()
    assert got == [True] * 4
    assert gets == [ref.chunk_id]
    assert ref.chunk_id in stack.cache


async def test_a_reader_waiting_for_old_bytes_sees_the_chunk_sealed_meanwhile(stack):
    """A reader of a partly written chunk waits for the chunk's old bytes;
    meanwhile the writer fills the chunk, it is sealed, and its array goes to
    the next file written. The reader gets the new bytes, not that file's
    (nor zeros)."""
    old, new = os.urandom(C), os.urandom(C)
    ino = await stack.write_file(b"f", old)
    await stack.uploader.wait_idle()
    stack.evict_all()
    in_get, release_get = threading.Event(), threading.Event()
    real_get = stack.store.get

    def slow_get(chunk):
        in_get.set()
        release_get.wait(10)
        return real_get(chunk)

    stack.store.get = slow_get
    fi = await stack.ops.open(ino, os.O_RDWR, Ctx())
    await stack.ops.write(fi.fh, 0, new[:4096])
    content = stack.ops.contents[ino]
    got = []

    async def read():
        got.append(await stack.ops.read(fi.fh, 8192, 4096))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.to_thread.run_sync(in_get.wait, 10)
            for off in range(4096, C, 1 << 20):
                await stack.ops.write(fi.fh, off, new[off:off + (1 << 20)])
            while not isinstance(content.entries.get(0), ChunkRef):  # sealed
                await trio.sleep(0.01)
            stack.store.get = real_get
            await stack.write_file(b"g", os.urandom(C))  # takes the sealed chunk's array
            release_get.set()
    assert got == [new[8192:12288]]
    await stack.ops.release(fi.fh)
    assert await stack.read_file(ino) == new


async def test_read_only_open_and_close_records_nothing(stack, monkeypatch):
    """Closing a file that was only read is no commit: no metadata write
    transaction, and no wait behind the file's lock (held here by a writer
    that has not changed anything yet)."""
    data = os.urandom(50_000)
    ino = await stack.write_file(b"f", data)
    writes = []
    transact = stack.meta.kv.transact
    monkeypatch.setattr(stack.meta.kv, "transact", lambda fn: (writes.append(fn), transact(fn))[1])
    fi = await stack.ops.open(ino, os.O_RDONLY, Ctx())
    assert await stack.ops.read(fi.fh, 0, 1 << 20) == data
    lock, done = stack.ops.contents[ino].lock, trio.Event()

    async def writer_holding_the_lock(task_status=trio.TASK_STATUS_IGNORED):
        async with lock:
            task_status.started()
            await done.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(writer_holding_the_lock)
        with trio.fail_after(5):
            await stack.ops.flush(fi.fh)
            await stack.ops.release(fi.fh)
        done.set()
    assert writes == []
    assert await stack.read_file(ino) == data


async def test_parallel_readers_of_different_files_fetch_at_once(stack, monkeypatch):
    """Readers of cold small files each wait for their own GET; those GETs
    are in flight together, not one after the other (the store here answers
    only once all of them have asked): 32, as many as `find | xargs -P 32`
    has readers."""
    import threading

    files = {}
    for i in range(FETCH_CONCURRENCY):  # as many readers as fetches run at once
        data = os.urandom(16 << 10)
        files[await stack.write_file(b"f%d" % i, data)] = data
    await stack.uploader.wait_idle()
    stack.evict_all()
    everyone = threading.Barrier(len(files), timeout=10)
    get = stack.store.get

    def get_when_all_asked(chunk):
        everyone.wait()  # BrokenBarrierError (EIO) unless all GETs run at once
        return get(chunk)

    monkeypatch.setattr(stack.store, "get", get_when_all_asked)
    got = {}

    async def read(ino):
        got[ino] = await stack.read_file(ino)

    with trio.fail_after(30):
        async with trio.open_nursery() as readers:
            for ino in files:
                readers.start_soon(read, ino)
    assert got == files
    assert sorted(stack.cache.ids()) == sorted(chunk_id(d) for d in files.values())


async def test_fetch_returns_once_the_chunk_is_cached_even_behind_a_reader(stack):
    """A reader waiting on another's fetch goes on with the bytes before they
    are written to the cache; `fetch` (what the peer server calls before it
    answers from the cache file) waits until they are there."""
    data = os.urandom(C)
    ino = await stack.write_file(b"f", data)
    await stack.uploader.wait_idle()
    stack.evict_all()
    (ref,) = stack.meta.chunks(ino, 0, 1 << 62).values()
    writing, release = threading.Event(), threading.Event()
    real_put = stack.cache.put

    def slow_put(*args, **kwargs):
        writing.set()
        release.wait(10)
        return real_put(*args, **kwargs)

    stack.cache.put = slow_put
    order = []

    async def reader():
        assert await stack.source.read(ref, 0, 4096) == data[:4096]

    async def waiter():
        await trio.to_thread.run_sync(writing.wait, 10)
        assert await stack.source.fetch(ref) == data
        order.append(ref.chunk_id in stack.cache)

    async def second_reader():
        await trio.to_thread.run_sync(writing.wait, 10)
        assert await stack.source.read(ref, 4096, 4096) == data[4096:8192]  # not held up by the write
        order.append("read")
        release.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(waiter)
            nursery.start_soon(second_reader)
    assert order == ["read", True]


async def test_small_uploads_wait_for_a_pause_in_requests_and_no_longer(stack):
    """Embedded engine: a small chunk's upload (CPU-bound) yields to requests,
    for at most its bound; datafs sync (retry_now) and a pause end the wait,
    and a large chunk never waits."""
    stack.uploader.idle_seconds = lambda: 0.0  # requests keep coming
    stack.uploader.yield_max_seconds = 30
    small, large = os.urandom(2000), os.urandom(3 << 19)
    await stack.write_file(b"small", small)
    await stack.write_file(b"large", large)
    with trio.fail_after(5):
        while not stack.store.exists(chunk_id(large)):
            await trio.sleep(0.02)
    assert not stack.store.exists(chunk_id(small))
    stack.uploader.retry_now()  # datafs sync
    with trio.fail_after(5):
        await stack.uploader.wait_idle()

    paused = os.urandom(3000)
    await stack.write_file(b"paused", paused)
    await trio.sleep(0.2)
    assert not stack.store.exists(chunk_id(paused))
    stack.uploader.idle_seconds = lambda: 1.0  # a pause
    with trio.fail_after(5):
        await stack.uploader.wait_idle()

    stack.uploader.idle_seconds = lambda: 0.0
    stack.uploader.yield_max_seconds = 0.3  # the bound: uploaded though requests never stop
    bounded = os.urandom(4000)
    await stack.write_file(b"bounded", bounded)
    with trio.fail_after(5):
        await stack.uploader.wait_idle()
    assert stack.store.exists(chunk_id(bounded))
