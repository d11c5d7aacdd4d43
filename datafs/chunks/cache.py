"""The local chunk cache: one file per chunk on the node's NVMe.

Layout: <dir>/chunks/<first 2 hex>/<chunk id>, temporary files in <dir>/tmp.
A chunk enters atomically (temp file, fsync, rename), so a crash leaves either
the whole chunk or none of it. The cache keeps a byte limit and a free-disk
floor by evicting least-recently-used chunks, but never one that is pinned:
pins are held for chunks that exist nowhere else (sealed but not committed, or
committed but not yet uploaded). Pins and eviction take the same lock, so a
chunk cannot be evicted between being pinned and being used.

Methods that touch the disk block; callers run them in worker threads.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
import uuid
from pathlib import Path

from .. import metrics

log = logging.getLogger(__name__)

_FD_CACHE_SIZE = 64


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
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()
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
        fd = self._fd(chunk_id)
        if fd is None:
            return None
        try:
            return os.pread(fd, size, offset)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            # Closed by eviction or the fd cache meanwhile: read through a fresh fd.
            try:
                with open(self.path(chunk_id), "rb") as f:
                    f.seek(offset)
                    return f.read(size)
            except FileNotFoundError:
                return None

    def _fd(self, chunk_id: str) -> int | None:
        """An open descriptor for a cached chunk, from a small LRU of them."""
        with self._lock:
            if chunk_id not in self._lru:
                return None
            self._lru.move_to_end(chunk_id)
            fd = self._fds.get(chunk_id)
            if fd is not None:
                self._fds.move_to_end(chunk_id)
        if fd is None:
            try:
                fd = os.open(self.path(chunk_id), os.O_RDONLY)
            except FileNotFoundError:
                self._forget(chunk_id)
                return None
            # Readers come in 1 MiB requests; ask the kernel to read the whole
            # chunk ahead now instead of a small window per request.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            with self._lock:
                if chunk_id in self._fds:  # another thread opened it meanwhile
                    os.close(fd)
                    fd = self._fds[chunk_id]
                else:
                    self._fds[chunk_id] = fd
                    while len(self._fds) > _FD_CACHE_SIZE:
                        os.close(self._fds.popitem(last=False)[1])
        return fd

    def remove(self, chunk_id: str) -> None:
        self._forget(chunk_id, unlink=True)

    def _forget(self, chunk_id: str, unlink: bool = False) -> None:
        with self._lock:
            if unlink:
                self.path(chunk_id).unlink(missing_ok=True)
            size = self._lru.pop(chunk_id, None)
            if size is not None:
                self.size_bytes -= size
            fd = self._fds.pop(chunk_id, None)
        if fd is not None:
            os.close(fd)
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
                    fd = self._fds.pop(chunk_id, None)
                    if fd is not None:
                        os.close(fd)
                    # Unlinked under the lock: a concurrent put of the same id
                    # must not have its fresh file removed by this eviction.
                    self.path(chunk_id).unlink(missing_ok=True)
                    return chunk_id, size
        return None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
