"""File content on this node: write buffering, reads over uncommitted data, commit.

One `FileContent` exists per inode while it is open. It overlays uncommitted
state on the committed chunk list, per chunk index:
  _Buffer     bytes written since the last commit, over a base (the chunk it replaces)
  _Sealing    a full buffer being hashed and stored in the background
  ChunkRef    a sealed chunk (in the cache, pinned) not yet committed
  None        a hole: reads as zeros, stored as no chunk (also what fallocate's
              PUNCH_HOLE and ZERO_RANGE make of every chunk they cover whole)
Indexes absent from the overlay read the committed chunk list, except that
content at or beyond `cut` (the lowest truncation point since the last commit)
reads as zeros. The committed chunk list is read from the metadata store once
per open file and then kept up to date by this node's own commits, so reads
never ask the metadata engine per request (close-to-open: another node's
commit shows at the next open).

Like a local filesystem's page cache, the overlay is per inode: every process
on this node sees writes at once (O_APPEND and the kernel's size cache rely
on it). `commit()` (on flush, fsync, release, truncate) seals what is left,
then records the new chunk list and size in one metadata transaction: from then
on the content survives a crash of the daemon, and the committed version is
always one complete state of the file. On the embedded engine that commit
also records which of its chunks are not durable yet (durability.py's
journal), so a power loss can cut the file back but never leave it naming
bytes that are not on disk; a small commit runs on the event loop (it touches
no disk: LMDB is not synced per transaction), a large one in a thread.

Writing a chunk touches the disk once: a buffer that fills up is sealed into the
cache under its hash at once (no staging file, no copy), and a random write into
an existing chunk reads the old chunk only when the buffer does not cover it.

Failures are reported where they happen and never half-applied. A writer
that gets more than `SEALS_AHEAD` chunks ahead of their sealing waits for
them, so a cache with no room (full of chunks not uploaded yet) makes
`write()` wait and then fail with ENOSPC, instead of memory filling up and
`close()` failing later. Once a write, truncate or commit of a file fails,
its uncommitted state is dropped at once (buffers freed, sealed chunks
released): the file reads as its last committed version, and every later
write, flush and fsync reports the same error until the last descriptor is
closed, so no writer can go on and commit a file with a hole where the lost
writes were.
"""

from __future__ import annotations

import collections
import errno
import logging
import time
from typing import TYPE_CHECKING, Callable, NoReturn, Union

import trio

from .. import errors, metrics
from ..config import CHUNK_SIZE_BYTES as C
from . import ZERO_CHUNK
from ..meta.calls import MetaCalls
from ..meta.store import ChunkRef, Inode, MetaStore
from ..tiers.chain import ChunkSource

if TYPE_CHECKING:
    from ..durability import Durability

log = logging.getLogger(__name__)

_MISSING = object()


#: A buffer whose writes end below this grows to fit them; past it, it takes
#: the whole chunk at once. A small file's buffer is then its size, not 4 MiB
#: of zeroed memory (measured: 0.74 ms of a 16 KiB file's 0.9 ms write).
SMALL_BUFFER_BYTES = 256 << 10
#: Whole-chunk arrays kept for reuse once their chunk is sealed (per daemon:
#: at most this many x 4 MiB held while no file is written). A new 4 MiB
#: array costs the first touch of its pages, page faults and zeroing, on the
#: event loop, where the writer waits for it: on this project's test machine
#: (a VM) a 1 GiB sequential write spent 1.0-1.2 s in write requests with a
#: new array per chunk, 0.55-0.67 s with reused ones.
SPARE_BUFFERS = 8
#: A read of a chunk that just failed fails again at once for this long, unless
#: the file is opened again: after a failed readahead the kernel reads the
#: page again within the same read(), which would otherwise wait a second
#: full chunk wait.
FAILED_READ_MEMORY_SECONDS = 1.0
#: Full chunks of one file sealed in the background at once; a writer further
#: ahead waits for the oldest (that is where it feels a full cache). As many
#: as the disk threads that seal them.
SEALS_AHEAD = 8
#: A commit that changes or drops at most this many chunk entries runs inline
#: on a local engine (tens of microseconds), a larger one in a worker thread.
INLINE_COMMIT_MAX_CHUNKS = 64


class _SpareArrays:
    """Whole-chunk arrays of sealed chunks, handed to new buffers (see
    SPARE_BUFFERS). An array comes back only from `FileContent._seal_buffer`,
    once the chunk is in the cache and nothing holds the array: its buffer is
    left empty, and a reader that awaited meanwhile looks again (`_read_piece`)."""

    def __init__(self, keep: int = SPARE_BUFFERS):
        self.keep = keep
        self._free: list[bytearray] = []

    def take(self, head: bytearray) -> bytearray:
        """A whole-chunk array that starts with `head` and is zero after it."""
        if self._free:
            grown = self._free.pop()
            memoryview(grown)[len(head):] = memoryview(ZERO_CHUNK)[len(head):]
        else:
            grown = bytearray(C)
        grown[:len(head)] = head
        return grown

    def give(self, data: bytearray) -> None:
        if len(data) == C and len(self._free) < self.keep:
            self._free.append(data)


class _Buffer:
    """A chunk being written: `data` holds written bytes, `covered` says where.
    Bytes past the end of `data` are zeros."""

    __slots__ = ("data", "covered", "base", "base_len", "spares")

    def __init__(self, base: ChunkRef | None, base_len: int, spares: _SpareArrays):
        self.data = bytearray()
        self.covered: list[list[int]] = []  # sorted, disjoint [start, end)
        self.base = base if base_len > 0 else None
        self.base_len = base_len if base else 0
        self.spares = spares

    def grow(self, end: int) -> None:
        if end > len(self.data):
            # A zeroed array and one copy of what is written so far: extending
            # in place with a zeroed `bytes` wrote the chunk's 4 MiB twice more
            # (3.5 ms per chunk on the event loop, measured, against 0.1 ms
            # this way).
            if end > SMALL_BUFFER_BYTES:
                self.data = self.spares.take(self.data)
            else:
                grown = bytearray(end)
                grown[:len(self.data)] = self.data
                self.data = grown

    def piece(self, start: int, stop: int) -> bytes:
        data = bytes(self.data[start:stop])
        return data + bytes(stop - start - len(data))

    def is_zero(self) -> bool:
        return memoryview(ZERO_CHUNK)[:len(self.data)] == self.data

    def write(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        self.grow(end)
        self.data[offset:end] = buf
        merged, placed = [], False
        for start, stop in self.covered:
            if stop < offset or start > end:
                merged.append([start, stop])
            else:
                offset, end = min(offset, start), max(end, stop)
        for i, (start, _) in enumerate(merged):
            if start > end:
                merged.insert(i, [offset, end])
                placed = True
                break
        if not placed:
            merged.append([offset, end])
        self.covered = merged

    def covers(self, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in self.covered)

    def holes(self, length: int) -> list[tuple[int, int]]:
        out, pos = [], 0
        for start, stop in self.covered:
            if start > pos:
                out.append((pos, min(start, length)))
            pos = max(pos, stop)
            if pos >= length:
                break
        if pos < length:
            out.append((pos, length))
        return [(s, e) for s, e in out if s < e]

    def fill(self, base_bytes: bytes) -> None:
        """Copy base content into every uncovered byte; then the buffer is whole."""
        self.grow(min(self.base_len, len(base_bytes)))
        for start, end in self.holes(min(self.base_len, len(base_bytes))):
            self.data[start:end] = base_bytes[start:end]
        self.covered = [[0, C]]
        self.base = None

    def truncate(self, length: int) -> None:
        del self.data[length:]
        self.covered = [[s, min(e, length)] for s, e in self.covered if s < length]
        self.base_len = min(self.base_len, length)


class _Sealing:
    __slots__ = ("buffer", "done", "scope")

    def __init__(self, buffer: _Buffer):
        self.buffer = buffer
        self.done = trio.Event()
        self.scope = trio.CancelScope()  # cancelled when the file's writes are dropped


Entry = Union[_Buffer, _Sealing, ChunkRef, None]


class ContentService:
    """What every FileContent shares: tiers, metadata, limits, background nursery."""

    def __init__(
        self, meta: MetaStore, source: ChunkSource, calls: MetaCalls,
        on_committed: Callable[[list[str], dict[str, int]], None], write_buffer_bytes: int,
        durability: Durability | None = None,
    ):
        self.meta = meta
        self.source = source
        self.calls = calls
        self.durability = durability
        self.on_committed = on_committed
        self.max_buffers = max(2, write_buffer_bytes // C)
        self.buffers = 0
        self.spares = _SpareArrays()
        self.nursery: trio.Nursery | None = None


class FileContent:
    def __init__(self, service: ContentService, ino: int, size: int):
        self.svc = service
        self.ino = ino
        self.size = size
        self.entries: dict[int, Entry] = {}
        self.cut: int | None = None
        self.mtime_ns: int | None = None
        self.committed_mtime_ns = 0  # the mtime the last commit recorded
        self.committed: Inode | None = None  # the inode as the last commit left it
        self.dirty = False
        self.committed_size = size  # what reads fall back to if the writes are dropped
        # (errno, message) of the failure that dropped this file's writes; every
        # write and commit reports it until the last descriptor is closed.
        self.failure: tuple[int, str] | None = None
        self.lock = trio.Lock()
        self._superseded: list[ChunkRef] = []
        self._sealing: collections.deque[_Sealing] = collections.deque()  # background seals, oldest first
        self._failed_reads: dict[int, tuple[float, str]] = {}  # chunk index -> (trio time, error)
        # The committed chunk list; an empty file has none (no chunk lies past
        # the size), which spares a new file's first write a metadata read.
        self._map: dict[int, ChunkRef] | None = {} if size == 0 else None

    # ---- committed state -------------------------------------------------------
    async def _load_map(self) -> dict[int, ChunkRef]:
        if self._map is None:
            chunks = await self.svc.calls(self.svc.meta.chunks, self.ino)
            if self._map is None:  # another task may have loaded it meanwhile
                self._map = chunks
        return self._map

    def _committed(self, index: int) -> tuple[ChunkRef | None, int]:
        """The committed chunk at `index` and how many of its bytes still count
        (the map is loaded: callers await `_load_map` first)."""
        if self.cut is not None and index * C >= self.cut:
            return None, 0
        assert self._map is not None
        ref = self._map.get(index)
        if ref is None:
            return None, 0
        return ref, ref.length if self.cut is None else min(ref.length, self.cut - index * C)

    def _apply_commit(self, changes: dict[int, ChunkRef | None], drop_from: int | None) -> None:
        """Bring the cached chunk list to what the commit just recorded."""
        if self._map is None:
            return
        end_index = (self.size + C - 1) // C
        first_dropped = end_index if drop_from is None else min(end_index, drop_from)
        for index in [i for i in self._map if i >= first_dropped]:
            del self._map[index]
        for index, ref in changes.items():
            if ref is None or index >= end_index:
                self._map.pop(index, None)
            else:
                self._map[index] = ref

    # ---- reads -------------------------------------------------------------------
    def opened(self) -> None:
        """A new open(): reads that failed before are tried afresh."""
        self._failed_reads.clear()

    async def read(self, offset: int, size: int) -> bytes | bytearray | memoryview:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        await self._load_map()
        deadline = self.svc.source.deadline()  # one chunk wait for the whole request
        pieces = []
        pos = offset
        while pos < end:
            index, start = divmod(pos, C)
            stop = min(C, end - index * C)
            pieces.append(await self._read_piece(index, start, stop, deadline))
            pos = index * C + stop
        # Most requests fall inside one chunk: hand that piece on uncopied.
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _read_piece(self, index: int, start: int, stop: int, deadline: float) -> bytes | bytearray | memoryview:
        # The overlay and the committed chunk list are read together, with no
        # await in between: a commit moves buffered chunks from one to the other
        # in one step, so a chunk list fetched before an earlier piece's await
        # can miss a chunk the overlay no longer holds, and read it as zeros.
        entry = self.entries.get(index, _MISSING)
        while isinstance(entry, (_Buffer, _Sealing)):
            buffer = entry.buffer if isinstance(entry, _Sealing) else entry
            if buffer.covers(start, stop) or buffer.base is None:
                return buffer.piece(start, stop)
            base = await self.svc.source.read(buffer.base, 0, buffer.base.length, deadline)
            if self.entries.get(index, _MISSING) is entry:
                buffer.fill(base)
                return buffer.piece(start, stop)
            # Sealed meanwhile (its array may serve another chunk now): look again.
            entry = self.entries.get(index, _MISSING)
        if entry is _MISSING:
            ref, limit = self._committed(index)
        else:
            ref, limit = entry, (entry.length if entry else 0)
        data: bytes | bytearray | memoryview = b""
        if ref is not None and start < limit:
            failed = self._failed_reads.get(index)
            if failed is not None and trio.current_time() - failed[0] < FAILED_READ_MEMORY_SECONDS:
                raise errors.FsError(failed[1])
            try:
                data = await self.svc.source.read(ref, start, min(stop, limit) - start, deadline)
            except errors.FsError as exc:
                self._failed_reads[index] = (trio.current_time(), str(exc))
                raise
            self._failed_reads.pop(index, None)
        if len(data) == stop - start:
            return data  # handed on as it is: no copy
        return b"".join((data, bytes(stop - start - len(data))))  # a hole, or past a short chunk's end: zeros

    @property
    def clean(self) -> bool:
        """Nothing written since the last commit: reads see the committed chunks."""
        return not self.dirty and not self.entries and self.cut is None and self.failure is None

    async def committed_piece(self, index: int) -> bytes | bytearray | memoryview | None:
        """The committed bytes of chunk `index` as reads see them (up to the
        size), or None for a hole or past the end."""
        await self._load_map()
        ref, limit = self._committed(index)
        limit = min(limit, self.size - index * C)
        if ref is None or limit <= 0:
            return None
        return await self.svc.source.read(ref, 0, limit)

    def prefetch(self, first: int, count: int) -> None:
        """Ask the tiers to fetch committed chunks first..first+count-1 ahead of a reader."""
        last = min(first + count, (self.size + C - 1) // C) - 1
        if last < first or self._map is None:
            return
        self.svc.source.prefetch([
            self._map[index] for index in range(first, last + 1)
            if index in self._map and index not in self.entries and (self.cut is None or index * C < self.cut)
        ])

    # ---- writes ------------------------------------------------------------------
    async def write(self, offset: int, buf: bytes) -> int:
        view = memoryview(buf)
        async with self.lock:
            if self.failure is not None:
                await self._raise_failure()
            try:
                pos = 0
                while pos < len(view):
                    index, start = divmod(offset + pos, C)
                    n = min(C - start, len(view) - pos)
                    buffer = await self._buffer_for(index)
                    buffer.write(start, view[pos:pos + n])
                    pos += n
                    self.size = max(self.size, offset + pos)
                    self.dirty = True
                    if buffer.covers(0, C):
                        self._seal_in_background(index, buffer)
                        await self._keep_up_with_seals()
            except Exception as exc:
                await self._fail(exc)
            self.mtime_ns = time.time_ns()
        metrics.WRITE_BYTES.inc(len(view))
        return len(view)

    async def _keep_up_with_seals(self) -> None:
        """Wait while this file is more than SEALS_AHEAD chunks ahead of its
        sealing; raise if a background seal failed."""
        while len(self._sealing) > SEALS_AHEAD and self.failure is None:
            await self._sealing[0].done.wait()
        if self.failure is not None:
            await self._raise_failure()

    # ---- failures ----------------------------------------------------------------
    def _note_failure(self, exc: BaseException) -> None:
        """Remember the first failure; from now on this file's writes are lost."""
        if self.failure is not None:
            return
        if isinstance(exc, errors.FsError):
            code = exc.errno
        elif isinstance(exc, OSError):
            code = exc.errno or errno.EIO
        else:
            code = errno.EIO
            log.error("unexpected error while writing", exc_info=exc, extra={"ino": self.ino})
        self.failure = (code, str(exc) or type(exc).__name__)
        metrics.WRITES_DROPPED.labels(errno.errorcode.get(code, str(code))).inc()
        log.warning(
            "writes to a file failed; its uncommitted writes are dropped and it keeps its last committed content",
            extra={"ino": self.ino, "error": self.failure[1], "errno": errno.errorcode.get(code, code),
                   "committed_size_bytes": self.committed_size, "dropped_size_bytes": self.size},
        )

    async def _fail(self, exc: BaseException) -> NoReturn:
        self._note_failure(exc)
        await self._raise_failure()

    async def _raise_failure(self) -> NoReturn:
        await self._drop_uncommitted()
        assert self.failure is not None
        code, message = self.failure
        raise errors.FsError(message, code)

    async def _drop_uncommitted(self) -> None:
        """Forget every uncommitted write (lock held): free the buffers,
        release the sealed chunks (and so their pins and early uploads), and
        fall back to the committed size."""
        for sealing in list(self._sealing):
            sealing.scope.cancel()
        for index in list(self.entries):
            entry = await self._settle(index)
            if isinstance(entry, _Buffer):
                self._drop_buffer()
            elif isinstance(entry, ChunkRef):
                self.svc.source.release(entry)
        for ref in self._superseded:
            self.svc.source.release(ref)
        self.entries.clear()
        self._superseded.clear()
        self.cut = None
        self.size = self.committed_size
        self.mtime_ns = None
        self.dirty = False

    async def _settle(self, index: int) -> Entry | object:
        entry = self.entries.get(index, _MISSING)
        while isinstance(entry, _Sealing):
            await entry.done.wait()
            entry = self.entries.get(index, _MISSING)
        return entry

    async def _buffer_for(self, index: int) -> _Buffer:
        entry = await self._settle(index)
        if isinstance(entry, _Buffer):
            return entry
        await self._respect_budget(index)  # before the entry is replaced: it may fail
        if entry is _MISSING:
            await self._load_map()
            base, base_len = self._committed(index)
        elif entry is None:
            base, base_len = None, 0
        else:
            base, base_len = entry, entry.length
            self._superseded.append(entry)
        buffer = self.entries[index] = _Buffer(base, base_len, self.svc.spares)
        self.svc.buffers += 1
        return buffer

    async def _respect_budget(self, keep: int) -> None:
        """Over the write-buffer budget, seal this file's other buffers first."""
        if self.svc.buffers < self.svc.max_buffers:
            return
        for index, entry in sorted(self.entries.items()):
            if isinstance(entry, _Buffer) and index != keep:
                self.entries[index] = await self._seal_buffer(index, entry, upload_now=True)
                if self.svc.buffers < self.svc.max_buffers:
                    return

    def _seal_in_background(self, index: int, buffer: _Buffer) -> None:
        if self.svc.nursery is None:
            return
        sealing = self.entries[index] = _Sealing(buffer)
        self._sealing.append(sealing)
        self.svc.nursery.start_soon(self._background_seal, index, sealing)

    async def _background_seal(self, index: int, sealing: _Sealing) -> None:
        """Seal a full buffer; a failure (no room in the cache) is this file's
        failure: the writer waiting on it, or the next write or commit, reports it."""
        result: Entry = sealing.buffer
        try:
            with sealing.scope:
                result = await self._seal_buffer(index, sealing.buffer, upload_now=True)
        except Exception as exc:
            self._note_failure(exc)
        finally:
            self._sealing.remove(sealing)
            if self.entries.get(index) is sealing:
                self.entries[index] = result
            sealing.done.set()

    async def _seal_buffer(self, index: int, buffer: _Buffer, upload_now: bool = False) -> ChunkRef | None:
        """Seal a buffer into a chunk. `upload_now` (a chunk sealed while the file
        is still being written) starts its upload at once; a chunk sealed by the
        commit is queued by the commit itself a moment later."""
        length = min(C, self.size - index * C)
        if length <= 0:
            self._drop_buffer()
            return None
        if not buffer.covers(0, length) and buffer.base is not None:
            buffer.fill(await self.svc.source.read(buffer.base, 0, buffer.base.length))
        # Bytes past `length` are always zero (writes never pass the size and
        # truncate cuts what it drops), so one compare finds holes.
        if buffer.is_zero():
            self._drop_buffer()
            return None  # all zeros: a hole, stored as no chunk
        buffer.grow(length)
        ref = await self.svc.source.seal(memoryview(buffer.data)[:length], upload_now=upload_now)
        self._drop_buffer()
        # The chunk is in the cache: its bytes are read from there now.
        self.svc.spares.give(buffer.data)
        buffer.data = bytearray()
        return ref

    def _drop_buffer(self) -> None:
        self.svc.buffers -= 1

    # ---- truncate ----------------------------------------------------------------
    async def truncate(self, new_size: int) -> None:
        async with self.lock:
            if self.failure is not None:
                await self._raise_failure()
            try:
                await self._truncate(new_size)
            except Exception as exc:
                await self._fail(exc)

    async def _truncate(self, new_size: int) -> None:
        """(The lock is held.)"""
        if new_size < self.size:
            self.cut = new_size if self.cut is None else min(self.cut, new_size)
            keep = (new_size + C - 1) // C
            for index in [i for i in self.entries if i >= keep]:
                entry = await self._settle(index)
                if isinstance(entry, _Buffer):
                    self._drop_buffer()
                elif isinstance(entry, ChunkRef):
                    self._superseded.append(entry)
                self.entries.pop(index, None)
            if new_size % C:
                buffer = await self._buffer_for(new_size // C)
                buffer.truncate(new_size % C)
        self.size = new_size
        self.mtime_ns = time.time_ns()
        self.dirty = True

    # ---- fallocate ---------------------------------------------------------------
    async def allocate(self, end: int, keep_size: bool) -> None:
        """fallocate's mode 0 and KEEP_SIZE: space is not reserved (a range of
        zeros is stored as no chunk until written), so only the size may
        change: without `keep_size` the file grows to `end` (never shrinks: a
        write may have gone further meanwhile). The times change either way,
        as on ext4."""
        async with self.lock:
            if self.failure is not None:
                await self._raise_failure()
            if not keep_size and end > self.size:
                self.size = end
            self._touch()

    async def zero_range(self, offset: int, length: int, keep_size: bool) -> None:
        """Make [offset, offset + length) read as zeros (fallocate's PUNCH_HOLE
        and ZERO_RANGE); without `keep_size` the file grows to cover it. A
        chunk inside the range becomes a hole, so zeros are never uploaded; a
        chunk the range only touches is zeroed in its buffer, which is sealed
        as a hole too if nothing else is left in it."""
        async with self.lock:
            if self.failure is not None:
                await self._raise_failure()
            try:
                await self._zero(offset, min(offset + length, self.size))
            except Exception as exc:
                await self._fail(exc)
            if not keep_size and offset + length > self.size:
                self.size = offset + length
            self._touch()

    def _touch(self) -> None:
        self.mtime_ns = time.time_ns()
        self.dirty = True

    async def _zero(self, start: int, end: int) -> None:
        """(The lock is held; [start, end) lies within the size.)"""
        pos = start
        while pos < end:
            index, first = divmod(pos, C)
            stop = min(C, end - index * C)
            if first == 0 and stop >= min(C, self.size - index * C):
                await self._make_hole(index)
            else:
                await self._zero_piece(index, first, stop)
            pos = index * C + stop

    async def _make_hole(self, index: int) -> None:
        entry = await self._settle(index)
        if isinstance(entry, _Buffer):
            self._drop_buffer()
        elif isinstance(entry, ChunkRef):
            self._superseded.append(entry)
        self.entries[index] = None

    async def _zero_piece(self, index: int, start: int, stop: int) -> None:
        entry = await self._settle(index)
        if entry is _MISSING:
            await self._load_map()
            ref, limit = self._committed(index)
            if ref is None or start >= limit:
                return  # a hole, or past the committed chunk's end: zeros already
        elif entry is None or (isinstance(entry, ChunkRef) and start >= entry.length):
            return
        buffer = await self._buffer_for(index)
        buffer.write(start, memoryview(bytes(stop - start)))
        if buffer.covers(0, C):
            self._seal_in_background(index, buffer)
            await self._keep_up_with_seals()

    # ---- commit ------------------------------------------------------------------
    async def commit(self) -> bool:
        """Seal what is buffered and record it in one metadata transaction.
        Returns whether there was anything to commit. If it fails, the
        uncommitted writes are dropped (see the module doc)."""
        if not self.dirty and self.failure is None:
            # Clean (every close of a file opened to read): nothing to wait for;
            # a write still under way has not returned, so it need not show yet.
            return False
        async with self.lock:
            if self.failure is not None:
                await self._raise_failure()
            if not self.dirty:
                return False
            changes: dict[int, ChunkRef | None] = {}
            recorded = False
            try:
                for index in sorted(self.entries):
                    entry = await self._settle(index)
                    if self.failure is not None:  # a background seal failed
                        await self._raise_failure()
                    if isinstance(entry, _Buffer):
                        entry = self.entries[index] = await self._seal_buffer(index, entry)
                    changes[index] = entry  # type: ignore[assignment]
                drop_from = None if self.cut is None else (self.cut + C - 1) // C
                mtime_ns = self.mtime_ns or time.time_ns()
                journal = None
                if self.svc.durability is not None:
                    journal = self.svc.durability.journal(r.chunk_id for r in changes.values() if r is not None)
                dropped = 0 if drop_from is None else max(0, (self.committed_size + C - 1) // C - drop_from)
                call = self.svc.calls if len(changes) + dropped <= INLINE_COMMIT_MAX_CHUNKS else self.svc.calls.in_thread
                recorded = True
                new_chunks, self.committed = await call(
                    self.svc.meta.commit_content, self.ino, self.size, changes, mtime_ns, drop_from, journal,
                )
            except Exception as exc:
                if recorded and isinstance(exc, errors.MetaUnavailable):
                    # A remote engine may still apply a transaction it did not
                    # confirm: keep its chunks pinned until they are uploaded.
                    refs = [r for r in changes.values() if r is not None]
                    self.svc.on_committed([r.chunk_id for r in refs], {r.chunk_id: r.length for r in refs})
                await self._fail(exc)
            metrics.COMMITS.inc()
            sizes = {r.chunk_id: r.length for r in changes.values() if r is not None}
            self.svc.on_committed(new_chunks, sizes)  # pins them for upload before the seal pins go
            self._apply_commit(changes, drop_from)
            self.committed_mtime_ns = mtime_ns
            self.committed_size = self.size
            for ref in [r for r in changes.values() if r is not None] + self._superseded:
                self.svc.source.release(ref)
            self.entries.clear()
            self._superseded.clear()
            self.cut = None
            self.dirty = False
            return True

    async def discard(self) -> None:
        """Forget uncommitted state (the file was deleted while open)."""
        async with self.lock:
            await self._drop_uncommitted()
