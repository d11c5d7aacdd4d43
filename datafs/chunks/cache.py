"""The local chunk cache: one file per chunk on the node's NVMe.

Layout: <dir>/chunks/<first 2 hex>/<chunk id>, temporary files in <dir>/tmp.
A chunk enters atomically (temp file, fsync, rename), so a crash leaves either
the whole chunk or none of it. The cache keeps a byte limit and a free-disk
floor by evicting least-recently-used chunks, but never one that is pinned:
pins are held for chunks that exist nowhere else (sealed but not committed, or
committed but not yet uploaded). Pins and eviction take the same lock, so a
chunk cannot be evicted between being pinned and being used.

Open descriptors are kept in a small LRU. Each counts its users, and one that
is evicted or forgotten is closed only once its last reader is done: a
descriptor number closed under a reader could be reused by another open, and
the read would return another chunk's bytes.

Methods that touch the disk block; callers run them in worker threads, except
`read_resident`, which never waits for the disk and runs on the event loop.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import uuid
from pathlib import Path

from .. import metrics

log = logging.getLogger(__name__)

#: Open chunk descriptors kept (4 GiB of chunks). Random readers of a large
#: file touch every chunk; a smaller LRU reopened (and re-read ahead) a chunk
#: on most reads. The daemon raises its open-file limit to fit (daemon.py).
FD_CACHE_SIZE = 1024


class _Open:
    """A cached chunk's descriptor, with its readers counted."""

    __slots__ = ("fd", "users", "retired")

    def __init__(self, fd: int):
        self.fd = fd
        self.users = 0
        self.retired = False


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
        self.size_bytes = 0

    # ---- start-up ----------------------------------------------------------------
    def open(self) -> None:
        """Create the layout, drop stale temp files, index what is on disk (oldest first)."""
        self._chunks_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._tmp_dir.iterdir():
            stale.unlink(missing_ok=True)
        found = []
        for sub in self._chunks_dir.iterdir():
            for entry in os.scandir(sub):
                st = entry.stat()
                found.append((st.st_atime_ns, entry.name, st.st_size))
        found.sort()
        with self._lock:
            for _, name, size in found:
                self._lru[name] = size
                self.size_bytes += size
        metrics.CACHE_BYTES.set(self.size_bytes)

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

    def __contains__(self, chunk_id: str) -> bool:
        with self._lock:
            return chunk_id in self._lru

    # ---- data ------------------------------------------------------------------------
    def put(self, chunk_id: str, data: bytes | bytearray | memoryview, durable: bool = True) -> bool:
        """Store a chunk unless present. Returns True if it was written.
        `durable` fsyncs it first: needed for new chunks (nowhere else yet), not
        for chunks fetched from a tier that keeps them (a crash only costs a re-fetch)."""
        with self._lock:
            if chunk_id in self._lru:
                self._lru.move_to_end(chunk_id)
                return False
        self.make_room(len(data))
        tmp = self.temp_path()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.adopt(chunk_id, tmp, len(data))
        return True

    def adopt(self, chunk_id: str, tmp: Path, size: int) -> None:
        """Rename a complete, fsynced temp file into place as `chunk_id`."""
        final = self.path(chunk_id)
        final.parent.mkdir(exist_ok=True)
        with self._lock:
            os.rename(tmp, final)
            if chunk_id not in self._lru:
                self.size_bytes += size
            self._lru[chunk_id] = size
            self._lru.move_to_end(chunk_id)
        metrics.CACHE_BYTES.set(self.size_bytes)

    def read(self, chunk_id: str, offset: int, size: int) -> bytes | None:
        """Bytes [offset, offset+size) of a cached chunk, or None if it is not here."""
        handle = self._acquire(chunk_id)
        if handle is None:
            return None
        try:
            return os.pread(handle.fd, size, offset)
        finally:
            self._done(handle)

    def read_resident(self, chunk_id: str, offset: int, size: int) -> bytes | None:
        """The bytes if the chunk is open and they are in memory now (RWF_NOWAIT),
        else None: never waits for the disk, so it can run on the event loop and
        spare small reads the hop to a worker thread."""
        with self._lock:
            handle = self._fds.get(chunk_id)
            if handle is None:
                return None
            handle.users += 1
        try:
            buf = bytearray(size)
            try:
                got = os.preadv(handle.fd, [buf], offset, os.RWF_NOWAIT)
            except OSError:  # EAGAIN: not in memory; EOPNOTSUPP: no RWF_NOWAIT here
                return None
            return bytes(buf) if got == size else None
        finally:
            self._done(handle)

    def is_open(self, chunk_id: str) -> bool:
        with self._lock:
            return chunk_id in self._fds

    def open_ahead(self, chunk_id: str) -> None:
        """Open a cached chunk before it is read, starting its disk read-ahead."""
        handle = self._acquire(chunk_id)
        if handle is not None:
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
        retired = []
        with self._lock:
            handle = self._fds.get(chunk_id)
            if handle is None:
                handle = self._fds[chunk_id] = _Open(fd)
                fd = -1
                while len(self._fds) > FD_CACHE_SIZE:
                    retired.append(self._fds.popitem(last=False)[1])
            handle.users += 1
        if fd >= 0:  # another thread opened it meanwhile
            os.close(fd)
        for old in retired:
            self._retire(old)
        return handle

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
            handle = self._fds.pop(chunk_id, None)
        if handle is not None:
            self._retire(handle)
        metrics.CACHE_BYTES.set(self.size_bytes)

    # ---- eviction ----------------------------------------------------------------------
    def free_disk_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def make_room(self, incoming_bytes: int) -> bool:
        """Evict unpinned chunks, oldest first, until `incoming_bytes` fit under
        the limit and above the free-space floor. Returns False if only pinned
        chunks are left and it still does not fit (the caller may wait for
        uploads to unpin some, or go ahead and let the disk decide)."""
        need_free = self.min_free_bytes + incoming_bytes
        free = self.free_disk_bytes()
        while self.size_bytes + incoming_bytes > self.limit_bytes or free < need_free:
            victim = self._pick_victim()
            if victim is None:
                return False
            chunk_id, size = victim
            metrics.CACHE_EVICTIONS.inc()
            log.debug("evicted chunk", extra={"chunk": chunk_id, "size_bytes": size})
            free += size
        return True

    def _pick_victim(self) -> tuple[str, int] | None:
        with self._lock:
            for chunk_id, size in self._lru.items():
                if self._pins.get(chunk_id, 0) == 0:
                    del self._lru[chunk_id]
                    self.size_bytes -= size
                    handle = self._fds.pop(chunk_id, None)
                    if handle is not None:
                        self._retire_locked(handle)
                    # Unlinked under the lock: a concurrent put of the same id
                    # must not have its fresh file removed by this eviction.
                    self.path(chunk_id).unlink(missing_ok=True)
                    return chunk_id, size
        return None

    def close(self) -> None:
        with self._lock:
            for handle in self._fds.values():
                self._retire_locked(handle)
            self._fds.clear()
