"""The local chunk cache: one file per chunk on the node's NVMe.

Layout: <dir>/chunks/<first 2 hex>/<chunk id>, temporary files in <dir>/tmp.
A chunk enters atomically (temp file, rename), so a crash of the daemon leaves
either the whole chunk or none of it. A new chunk that exists nowhere else is
made durable against power loss either before its rename (fsync: what a
remote metadata engine needs, whose commit the fleet sees at once), or later:
the cache then owes it a sync (`unsynced`), which `sync` pays in a batch
(durability.py decides when). A chunk owed a sync leaves the owed set only
once its file is durable, once the object store has the chunk (a store's
put is durable), or once the file is gone (evicted after its upload, or
dropped): what is owed is exact, so a flush is never skipped for a chunk
that still needs one. The cache keeps a byte limit and a free-disk
floor by evicting least-recently-used chunks, but never one that is pinned:
pins are held for chunks that exist nowhere else (sealed but not committed, or
committed but not yet uploaded). Pins and eviction take the same lock, so a
chunk cannot be evicted between being pinned and being used.

The limit holds at every moment, not only after the next write: a chunk
enters only once its bytes are reserved (room made and counted under the
lock), so concurrent writers cannot all pass the check and then overshoot
together. When only pinned chunks are left, `put` writes nothing and says so.

Cache files are not trusted blindly: each is hashed against its name the
first time it is opened after a start, and again whenever its identity,
size or mtime changed since it was last verified (someone wrote or replaced
it behind the daemon's back). A file that fails is dropped, so the read
goes to the object store instead of returning bad bytes.

Open descriptors are kept in a small LRU. Each counts its users, and one that
is evicted or forgotten is closed only once its last reader is done: a
descriptor number closed under a reader could be reused by another open, and
the read would return another chunk's bytes.

Methods that touch the disk block; callers run them in worker threads, except
`read_resident`, which never waits for the disk and runs on the event loop.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable

from .. import metrics
from . import chunk_id as hash_chunk
from . import direct_io

log = logging.getLogger(__name__)

#: Open chunk descriptors kept (4 GiB of chunks). Random readers of a large
#: file touch every chunk; a smaller LRU reopened (and re-read ahead) a chunk
#: on most reads. The daemon raises its open-file limit to fit (daemon.py).
FD_CACHE_SIZE = 1024
#: A batch of at least this many chunks is made durable with one syncfs(2) of
#: the cache's filesystem instead of an fsync per file and directory.
#: Measured on this project's test machine (ext4, virtio disk, best of 3),
#: 16 KiB chunks, fsync each vs one syncfs: 8: 2.2 vs 0.6 ms; 128: 41 vs 4 ms;
#: 2,000: 460 vs 32 ms; 4 x 4 MiB: 21 vs 11 ms. syncfs also writes back
#: whatever else is dirty on that filesystem, so the few chunks of one
#: fsync() keep to their own files: a busy neighbour cannot slow them.
SYNCFS_MIN_CHUNKS = 8

#: A chunk written without fsync at least this large has its writeback
#: started at once (sync_file_range(2), which does not wait): a large file's
#: bytes then go to the disk while it is still being written, as they did
#: when each chunk was fsynced, and its fsync() or the next flush finds them
#: there. Smaller chunks are left to the flush, which writes them in a batch.
WRITE_BEHIND_MIN_BYTES = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def syncfs(path: Path) -> None:
    """syncfs(2) of the filesystem holding `path`: every dirty page and inode
    of that filesystem, one journal commit. Raises OSError (a writeback error
    since the last sync is reported here, since Linux 5.8)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: How often a chunk file found out of memory is asked back in whole.
READ_AHEAD_AGAIN_SECONDS = 1.0


class _Open:
    """A cached chunk's descriptor, with its readers counted, the file's
    stamp when it was verified, and when its whole file was last asked into
    memory (`advised`; 0 after a read found it gone, e.g. after the kernel
    dropped its page cache)."""

    __slots__ = ("fd", "users", "retired", "stamp", "advised")

    def __init__(self, fd: int, stamp: tuple[int, int, int]):
        self.fd = fd
        self.users = 0
        self.retired = False
        self.stamp = stamp
        self.advised = time.monotonic()

    def read_ahead_due(self) -> bool:
        return time.monotonic() - self.advised > READ_AHEAD_AGAIN_SECONDS


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file is rewritten or replaced (a hard link, which
    the embedded store makes, changes none of it)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ChunkCache:
    def __init__(self, root: Path, limit_bytes: int, min_free_bytes: int):
        self.root = Path(root)
        self.limit_bytes = limit_bytes
        self.min_free_bytes = min_free_bytes
        self._chunks_dir = self.root / "chunks"
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._pins: collections.Counter[str] = collections.Counter()
        self._fds: collections.OrderedDict[str, _Open] = collections.OrderedDict()
        # Stamps of files verified against their name (written here, or hashed).
        self._verified: dict[str, tuple[int, int, int]] = {}
        # Chunks written without fsync that must become durable: id -> (size,
        # write number). The write number tells a sync that raced with an
        # eviction and a rewrite of the same chunk that the new file is
        # still owed one.
        self._unsynced: dict[str, tuple[int, int]] = {}
        self._unsynced_bytes = 0
        self._writes = 0
        self._new_directories = True  # fan-out directories created since the last sync
        self._fanout: set[str] = set()  # fan-out directories known to exist
        self.size_bytes = 0
        self.reserved_bytes = 0  # room made for chunks being written now

    # ---- start-up ----------------------------------------------------------------
    def open(self) -> None:
        """Create the layout, drop stale temp files, index what is on disk (oldest first)."""
        self._chunks_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp_dir.iterdir():
            stale.unlink(missing_ok=True)
        found = []
        for sub in self._chunks_dir.iterdir():
            self._fanout.add(sub.name)
            for entry in os.scandir(sub):
                st = entry.stat()
                found.append((st.st_atime_ns, entry.name, st.st_size))
        found.sort()
        with self._lock:
            for _, name, size in found:
                self._lru[name] = size
                self.size_bytes += size
        metrics.CACHE_BYTES.set(self.size_bytes)
        self._export_gauges()

    def _export_gauges(self) -> None:
        """Gauges read at scrape time, so pins and puts pay nothing for them."""
        metrics.CACHE_LIMIT_BYTES.set(self.limit_bytes)
        metrics.CACHE_CHUNKS.set_function(lambda: len(self._lru))
        metrics.CACHE_PINNED_BYTES.set_function(lambda: self.pinned()[1])
        metrics.CHUNKS_NOT_DURABLE.set_function(lambda: self.owed()[0])
        metrics.CHUNKS_NOT_DURABLE_BYTES.set_function(lambda: self.owed()[1])

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._lru)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._lru)

    def path(self, chunk_id: str) -> Path:
        return self._chunks_dir / chunk_id[:2] / chunk_id

    def temp_path(self) -> Path:
        return self._tmp_dir / uuid.uuid4().hex

    # ---- pins ----------------------------------------------------------------------
    def pin(self, chunk_id: str) -> None:
        with self._lock:
            self._pins[chunk_id] += 1

    def unpin(self, chunk_id: str) -> None:
        with self._lock:
            self._pins[chunk_id] -= 1
            if self._pins[chunk_id] <= 0:
                del self._pins[chunk_id]

    def is_pinned(self, chunk_id: str) -> bool:
        with self._lock:
            return self._pins.get(chunk_id, 0) > 0

    def pinned(self) -> tuple[int, int]:
        """(chunks, bytes) pinned in the cache now: held for a commit or an upload."""
        with self._lock:
            chunks = [c for c in self._pins if c in self._lru]
            return len(chunks), sum(self._lru[c] for c in chunks)

    def __contains__(self, chunk_id: str) -> bool:
        with self._lock:
            return chunk_id in self._lru

    # ---- data ------------------------------------------------------------------------
    def put(self, chunk_id: str, data: bytes | bytearray | memoryview, durable: bool = True, *,
            defer_sync: bool = False, direct: bool | None = None) -> bool:
        """Store a chunk unless present. Returns whether the chunk is in the
        cache now: False means it does not fit (only pinned chunks are left to
        evict) and nothing was written. A full disk raises OSError(ENOSPC).
        `durable`: the chunk exists nowhere else yet and must survive a power
        loss; it is fsynced before its rename, or, with `defer_sync`, written
        now and owed a sync (`unsynced`, paid by `sync`). Chunks fetched from
        a tier that keeps them need neither (a crash only costs a re-fetch).
        `direct`: a whole chunk goes around the page cache (direct_io.py):
        nobody reads its file soon from memory. By default, a durable one: it
        is read back once, for its upload."""
        with self._lock:
            if chunk_id in self._lru:
                self._lru.move_to_end(chunk_id)
                return True
        size = len(data)
        if not self.reserve(size):
            return False
        try:
            tmp = self.temp_path()
            if direct is None:
                direct = durable
            fd = direct_io.create(str(tmp), data) if direct and direct_io.usable(str(tmp.parent), size) else None
            written = fd is not None
            if fd is None:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view and not written:
                    view = view[os.write(fd, view):]
                if durable and not defer_sync:
                    os.fsync(fd)
                elif durable and size >= WRITE_BEHIND_MIN_BYTES and _sync_file_range is not None:
                    _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a hint: its result does not matter
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            stamp = _stamp(os.fstat(fd))  # a rename changes none of it
            os.close(fd)
            self.adopt(chunk_id, tmp, size, stamp, owed_sync=durable and defer_sync)
        finally:
            self.unreserve(size)
        return True

    def reserve(self, size_bytes: int) -> bool:
        """Make room for `size_bytes` (evicting unpinned chunks, oldest first)
        and count them as used until `unreserve`; False if it does not fit."""
        free = self.free_disk_bytes()
        with self._lock:
            free -= self.reserved_bytes
            while (self.size_bytes + self.reserved_bytes + size_bytes > self.limit_bytes
                   or free < self.min_free_bytes + size_bytes):
                victim = self._pick_victim_locked()
                if victim is None:
                    return False
                free += victim[1]
            self.reserved_bytes += size_bytes
            return True

    def unreserve(self, size_bytes: int) -> None:
        with self._lock:
            self.reserved_bytes -= size_bytes

    def adopt(self, chunk_id: str, tmp: Path, size: int, stamp: tuple[int, int, int], owed_sync: bool = False) -> None:
        """Rename a complete temp file, whose `stamp` the caller took while it
        was open, into place as `chunk_id`: fsynced already, or (`owed_sync`)
        recorded as owed a sync."""
        final = self.path(chunk_id)
        if chunk_id[:2] not in self._fanout:
            try:
                final.parent.mkdir()
                self._new_directories = True  # its entry in chunks/ needs a sync too
            except FileExistsError:
                pass
            self._fanout.add(chunk_id[:2])
        with self._lock:
            os.rename(tmp, final)
            if chunk_id not in self._lru:
                self.size_bytes += size
            self._lru[chunk_id] = size
            self._lru.move_to_end(chunk_id)
            self._verified[chunk_id] = stamp
            if owed_sync:
                self._drop_unsynced_locked(chunk_id)
                self._writes += 1
                self._unsynced[chunk_id] = (size, self._writes)
                self._unsynced_bytes += size
        metrics.CACHE_BYTES.set(self.size_bytes)

    # ---- durability --------------------------------------------------------------------
    def is_unsynced(self, chunk_id: str) -> bool:
        """Whether the chunk's file is owed a sync (not durable yet)."""
        with self._lock:
            return chunk_id in self._unsynced

    def owes_syncs(self) -> bool:
        with self._lock:
            return bool(self._unsynced)

    def owed(self) -> tuple[int, int]:
        """(chunks, bytes) owed a sync now."""
        with self._lock:
            return len(self._unsynced), self._unsynced_bytes

    def unsynced(self) -> dict[str, int]:
        """Chunks owed a sync now, with their sizes."""
        with self._lock:
            return {chunk: size for chunk, (size, _) in self._unsynced.items()}

    def sync(self, chunk_ids: Iterable[str], whole_filesystem: bool = True) -> tuple[int, int]:
        """Make the files of these chunks (those in the cache) durable, whether
        or not they are owed a sync (at start nothing is known to be): an
        fsync of each file and of their directories, or, for a large batch
        and if `whole_filesystem` allows, one syncfs(2). Returns (chunks,
        bytes) that were owed and are paid now. A write error raises
        OSError; what it covered stays owed."""
        with self._lock:
            wanted = {chunk: self._unsynced.get(chunk) for chunk in chunk_ids if chunk in self._lru}
        if not wanted:
            return 0, 0
        if whole_filesystem and len(wanted) >= SYNCFS_MIN_CHUNKS and _syncfs is not None:
            syncfs(self.root)
        else:
            directories = set()
            if self._new_directories:  # a new fan-out directory's own entry
                self._new_directories = False
                directories.add(self._chunks_dir)
            for chunk in wanted:
                path = self.path(chunk)
                try:
                    fsync_path(path)
                except FileNotFoundError:
                    continue  # evicted or dropped meanwhile: nothing left to sync
                directories.add(path.parent)
            for directory in directories:
                fsync_path(directory)
        chunks = size = 0
        with self._lock:
            for chunk, owed in wanted.items():
                if owed is not None and self._unsynced.get(chunk) == owed:
                    self._drop_unsynced_locked(chunk)
                    chunks += 1
                    size += owed[0]
        return chunks, size

    def sync_not_needed(self, chunk_id: str) -> None:
        """The chunk is durable elsewhere (the object store has it): its file
        here is owed no sync any more."""
        with self._lock:
            self._drop_unsynced_locked(chunk_id)

    def _drop_unsynced_locked(self, chunk_id: str) -> None:
        owed = self._unsynced.pop(chunk_id, None)
        if owed is not None:
            self._unsynced_bytes -= owed[0]

    def read(self, chunk_id: str, offset: int, size: int) -> bytes | None:
        """Bytes [offset, offset+size) of a cached chunk, or None if it is not here."""
        for _ in range(2):
            handle = self._acquire(chunk_id)
            if handle is None:
                return None
            try:
                if _stamp(os.fstat(handle.fd)) == handle.stamp:
                    if not handle.advised:
                        self._read_ahead_whole(handle)
                    return os.pread(handle.fd, size, offset)
            finally:
                self._done(handle)
            # Changed since it was verified: close it; the next open verifies it.
            self._forget_descriptor(chunk_id, handle)
        return None

    def read_resident(self, chunk_id: str, offset: int, size: int) -> bytearray | None:
        """The bytes if the chunk is open and they are in memory now (RWF_NOWAIT),
        else None: never waits for the disk, so it can run on the event loop and
        spare reads the hop to a worker thread. The array read into is returned
        as it is: pyfuse3 replies from any buffer, so a 1 MiB read costs one copy."""
        with self._lock:
            handle = self._fds.get(chunk_id)
            if handle is None:
                return None
            handle.users += 1
        try:
            buf = bytearray(size)
            try:
                if _stamp(os.fstat(handle.fd)) != handle.stamp:
                    return None  # changed behind our back: `read` re-verifies it
                got = os.preadv(handle.fd, [buf], offset, os.RWF_NOWAIT)
            except OSError:  # EAGAIN: not in memory; EOPNOTSUPP: no RWF_NOWAIT here
                # The file was read ahead whole when it was opened, so its
                # pages were dropped since: `read` asks for all of it again
                # instead of one random 4 KiB request after another.
                if handle.read_ahead_due():
                    handle.advised = 0
                return None
            return buf if got == size else None
        finally:
            self._done(handle)

    @staticmethod
    def _read_ahead_whole(handle: _Open) -> None:
        handle.advised = time.monotonic()
        os.posix_fadvise(handle.fd, 0, 0, os.POSIX_FADV_WILLNEED)

    def wants_read_ahead(self, chunk_id: str) -> bool:
        """Whether `read_ahead` would do anything: the chunk is cached and
        either not open yet or not asked into memory within the last
        READ_AHEAD_AGAIN_SECONDS (its pages may have been dropped since)."""
        with self._lock:
            handle = self._fds.get(chunk_id)
            if handle is None:
                return chunk_id in self._lru
            return handle.read_ahead_due()

    def read_ahead(self, chunk_id: str) -> None:
        """Ask the kernel to read a cached chunk's whole file into memory
        before it is read (opening it does), so the disk works ahead of a
        sequential reader instead of one 1 MiB request at a time."""
        handle = self._acquire(chunk_id)
        if handle is None:
            return
        try:
            if handle.read_ahead_due():
                self._read_ahead_whole(handle)
        finally:
            self._done(handle)

    def _acquire(self, chunk_id: str) -> _Open | None:
        """The open descriptor of a cached chunk (from a small LRU), counted as
        in use until `_done`; None if the chunk is not cached."""
        with self._lock:
            if chunk_id not in self._lru:
                return None
            self._lru.move_to_end(chunk_id)
            handle = self._fds.get(chunk_id)
            if handle is not None:
                self._fds.move_to_end(chunk_id)
                handle.users += 1
                return handle
        try:
            fd = os.open(self.path(chunk_id), os.O_RDONLY)
        except FileNotFoundError:
            self._forget(chunk_id)
            return None
        # Readers come in 1 MiB requests; ask the kernel to read the whole
        # chunk ahead now instead of a small window per request.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        stamp = _stamp(os.fstat(fd))
        with self._lock:
            known = self._verified.get(chunk_id)
        if stamp != known and not self._verify(chunk_id, fd, stamp):
            os.close(fd)
            return None
        retired = []
        with self._lock:
            handle = self._fds.get(chunk_id)
            if handle is None:
                handle = self._fds[chunk_id] = _Open(fd, stamp)
                fd = -1
                while len(self._fds) > FD_CACHE_SIZE:
                    retired.append(self._fds.popitem(last=False)[1])
            handle.users += 1
        if fd >= 0:  # another thread opened it meanwhile
            os.close(fd)
        for old in retired:
            self._retire(old)
        return handle

    def _verify(self, chunk_id: str, fd: int, stamp: tuple[int, int, int], report: bool = True) -> bool:
        """Hash a cache file against its name; drop it if it does not match."""
        data = os.pread(fd, stamp[1] + 1, 0)
        if len(data) == stamp[1] and hash_chunk(data) == chunk_id:
            with self._lock:
                self._verified[chunk_id] = stamp
            return True
        if not report:  # the caller reports it in its own terms
            self.remove(chunk_id)
            return False
        pinned = self.is_pinned(chunk_id)
        log.error(
            "cache file failed verification, dropped" + (" (it was the only copy: not uploaded yet)" if pinned else ""),
            extra={"chunk": chunk_id, "path": str(self.path(chunk_id)), "size_bytes": len(data)},
        )
        metrics.CACHE_CORRUPT.inc()
        self.remove(chunk_id)
        return False

    def verify(self, chunk_id: str, report: bool = True) -> bool:
        """Whether the cache file is there and holds its chunk (hashed unless it
        is unchanged since it was written or verified); a bad one is dropped,
        and logged unless `report` is off. The uploader checks this before a
        chunk leaves for the object store; recovery after a power loss too."""
        try:
            fd = os.open(self.path(chunk_id), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            stamp = _stamp(os.fstat(fd))
            with self._lock:
                if self._verified.get(chunk_id) == stamp:
                    return True
            return self._verify(chunk_id, fd, stamp, report)
        finally:
            os.close(fd)

    def _forget_descriptor(self, chunk_id: str, handle: _Open) -> None:
        """Close a chunk's cached descriptor (now or after its last reader)."""
        with self._lock:
            if self._fds.get(chunk_id) is handle:
                del self._fds[chunk_id]
                self._retire_locked(handle)

    def _done(self, handle: _Open) -> None:
        with self._lock:
            handle.users -= 1
            close = handle.retired and handle.users == 0
        if close:
            os.close(handle.fd)

    def _retire(self, handle: _Open) -> None:
        with self._lock:
            self._retire_locked(handle)

    @staticmethod
    def _retire_locked(handle: _Open) -> None:
        """Close a descriptor that left the LRU, now or when its last reader is done."""
        handle.retired = True
        if handle.users == 0:
            os.close(handle.fd)

    def remove(self, chunk_id: str) -> None:
        self._forget(chunk_id, unlink=True)

    def _forget(self, chunk_id: str, unlink: bool = False) -> None:
        with self._lock:
            if unlink:
                self.path(chunk_id).unlink(missing_ok=True)
            size = self._lru.pop(chunk_id, None)
            if size is not None:
                self.size_bytes -= size
            self._verified.pop(chunk_id, None)
            self._drop_unsynced_locked(chunk_id)  # nothing left to sync
            handle = self._fds.pop(chunk_id, None)
        if handle is not None:
            self._retire(handle)
        metrics.CACHE_BYTES.set(self.size_bytes)

    # ---- eviction ----------------------------------------------------------------------
    def free_disk_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def make_room(self, incoming_bytes: int = 0) -> bool:
        """Evict unpinned chunks, oldest first, until `incoming_bytes` more fit
        under the limit and above the free-space floor (0: bring the cache back
        within them). Returns False if only pinned chunks are left and it still
        does not fit."""
        if not self.reserve(incoming_bytes):
            return False
        self.unreserve(incoming_bytes)
        return True

    def _pick_victim_locked(self) -> tuple[str, int] | None:
        for chunk_id, size in self._lru.items():
            if self._pins.get(chunk_id, 0) == 0:
                del self._lru[chunk_id]
                self.size_bytes -= size
                self._verified.pop(chunk_id, None)
                # Only a chunk the store has is unpinned: its copy there is
                # durable (stores promise that of a finished put).
                self._drop_unsynced_locked(chunk_id)
                handle = self._fds.pop(chunk_id, None)
                if handle is not None:
                    self._retire_locked(handle)
                # Unlinked under the lock: a concurrent put of the same id
                # must not have its fresh file removed by this eviction.
                self.path(chunk_id).unlink(missing_ok=True)
                metrics.CACHE_EVICTIONS.inc()
                metrics.CACHE_BYTES.set(self.size_bytes)
                log.debug("evicted chunk", extra={"chunk": chunk_id, "size_bytes": size})
                return chunk_id, size
        return None

    def close(self) -> None:
        with self._lock:
            for handle in self._fds.values():
                self._retire_locked(handle)
            self._fds.clear()
