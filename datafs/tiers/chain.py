"""The read-through chain and the sealing of new chunks.

A chunk is looked for in the local cache, then asked of each tier below it in
turn (`_tiers`: the peer tier, that is its owner, the runner-up's cache, or
the nodes holding it before it is uploaded, `peers/tier.py`; then the object
store), with one retry loop over them (`_fetch_verified`). A fetch is single-flight: concurrent readers
of one chunk share one request and its outcome. Every fetched chunk is
verified against its BLAKE3 id before it is cached or returned; a mismatch is
logged loudly and fetched again. A chunk that metadata references but the
store does not have yet (still uploading from another node), or a store that
does not answer, is retried with backoff until the reader's deadline,
`wait_timeout_seconds` after its request began; then the read fails with EIO.
A fetched chunk that does not fit in the cache (full of chunks not uploaded
yet) is returned without being cached.

Every wait here (for a chunk, for cache space) is interruptible: when the
mount goes away or the daemon is told to stop, `abort_waits` ends them at
once with an error, so no request, and no unmount, waits behind them.

Prefetch: a reader that stays sequential asks for a window of following chunks;
they are fetched into the cache in the background, at most `prefetch_chunks` at
a time (that bounds the memory in flight), so a cold sequential read keeps many
requests to the store in flight instead of one.

A chunk fetched for a reader is read moments later, whole (a prefetched one
by the reader that asked for it): its bytes stay in memory until they have
been read once or newer fetches push them out (`_RecentChunks`), and its
cache file is written around the page cache (direct_io.py), since nobody
reads that file soon. A chunk fetched for a peer is sent from its file at
once, so that one goes through the page cache.

Sealing is the write side: hash a buffer, hold the id in the ledger (so the
collector does not delete it before the metadata commit, and the cache does
not evict the only copy), store it (fsynced first, or, with `defer_sync` on
the embedded engine, owed a sync that durability.py pays within the flush
interval), and hand it to the uploader at once: chunks
are immutable, so they can go to the object store while the file is still
being written. Once the store has a sealed chunk its pin goes, so a file
larger than the cache can be written while uploads keep up; the hold stays
until the commit `release`s it. When the cache is full of pinned chunks the
sealer waits for uploads; it fails with ENOSPC once no upload has finished
for `space_wait_seconds` (uploads that keep finishing keep it waiting: that is
back-pressure, not an error).

Blocking work runs in worker threads, each resource behind its own limiter;
the exceptions, served on the event loop because a hop costs more, are reads
already in memory and small chunks written to the page cache (see the
constants below).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import random
import time
from typing import Awaitable, Callable, Iterator

import trio

from .. import errors, metrics
from ..chunks import CHUNK_SIZE_BYTES
from ..chunks import chunk_id as hash_chunk
from ..chunks.cache import ChunkCache
from ..chunks.ledger import ChunkLedger
from ..meta.calls import _ABANDON_KW
from ..meta.store import ChunkRef
from .store import ObjectStore

log = logging.getLogger(__name__)

#: Reads up to this size (the largest request the kernel sends) are first
#: tried on the event loop from memory: the thread hop costs more than the
#: copy. A sequential reader of the local cache, whose chunk files are read
#: ahead whole, is then served without hops (measured, fio 4 MiB reads of a
#: cached 256 MiB file, page cache dropped: 850-1,060 MiB/s with only reads up
#: to 128 KiB served this way, 900-1,410 with every read up to 1 MiB).
INLINE_READ_MAX_BYTES = 1 << 20
#: Chunks fetched from the tiers below the cache at once. Each reader of a
#: cold small file waits on a GET of its own, and the wait is mostly the
#: store's latency: 32 parallel readers of 2,000 x 16 KiB files read from
#: SeaweedFS in 4.8 s with 32, 6.0 s with 16 (median of 3 runs each). The
#: S3 client's pool (64) holds these and the uploads.
FETCH_CONCURRENCY = 32
#: Chunks prefetched at once for all readers: two sequential readers' full
#: windows (fs.PREFETCH_MAX_WINDOW_CHUNKS each). With one window's worth,
#: two files read side by side (a model's shards, `datafs warmup`) shared it
#: and each ran half a window ahead.
PREFETCH_CHUNKS = 32
#: A writer stalled on a full cache asks failing uploads to retry this often,
#: so a store that came back is noticed before the writer gives up.
STALL_RETRY_KICK_SECONDS = 5.0
#: Buffers up to this size are hashed on the event loop when sealed (BLAKE3
#: of 64 KiB: about 20 us, a fifth of a thread hop).
INLINE_HASH_MAX_BYTES = 64 << 10
#: Chunks up to this size, owed a sync rather than fsynced (`defer_sync`),
#: are written to the cache on the event loop: a write into the page cache,
#: like the LMDB commit that follows it on the loop, which waits for the disk
#: no more than that commit does. The thread hop cost 0.2 ms of a small
#: file's close (2,000 x 16 KiB files created in 1.9 s with it, 1.6 s
#: without). A chunk that must be fsynced first always goes to a thread.
INLINE_STORE_MAX_BYTES = INLINE_HASH_MAX_BYTES
#: Chunks up to this size are read from their cache file on the event loop
#: even when the bytes are not in memory: an open and a pread of one small
#: file, the disk wait of an LMDB lookup after the page cache was dropped
#: (those run on the loop already; S3QL reads its whole block cache this
#: way). A thread hop costs more here than it spares: each one is a handoff
#: and several GIL round trips, and on 2 cores it took 0.3 ms of CPU per
#: read (`xargs -P 32 cat` of 2,000 x 16 KiB cached files, page cache
#: dropped: 1.26-1.35 s and 1.4 s of daemon CPU with hops, 0.96 s and 0.7 s
#: without). Larger chunks still go to a thread, where parallel reads keep a
#: disk busy.
INLINE_DISK_READ_MAX_CHUNK_BYTES = INLINE_STORE_MAX_BYTES
#: Bound once: cache hits are the hottest read path, and a label lookup costs
#: as much as the two counters it would save.
_READ_FROM_CACHE = metrics.READ_BYTES.labels("cache")


class _RecentChunks:
    """Chunks fetched for readers, kept in memory until their bytes have
    been read once (a sequential reader is done with the chunk then) or, up
    to `limit_bytes`, newer ones push them out, oldest first. Runs on the
    event loop only."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.size_bytes = 0
        # chunk id -> [bytes, how many of them readers took so far]
        self._chunks: collections.OrderedDict[str, list] = collections.OrderedDict()

    def add(self, chunk_id: str, data: bytes | bytearray) -> None:
        if chunk_id in self._chunks or len(data) > self.limit_bytes:
            return
        self._chunks[chunk_id] = [data, 0]
        self.size_bytes += len(data)
        while self.size_bytes > self.limit_bytes:
            self._drop(next(iter(self._chunks)))

    def read(self, chunk_id: str, offset: int, size: int) -> memoryview | None:
        """A view of bytes [offset, offset + size) if the chunk is here."""
        entry = self._chunks.get(chunk_id)
        if entry is None:
            return None
        data = entry[0]
        entry[1] += size
        if entry[1] >= len(data):
            self._drop(chunk_id)
        return memoryview(data)[offset:offset + size]

    def _drop(self, chunk_id: str) -> None:
        self.size_bytes -= len(self._chunks.pop(chunk_id)[0])


class _Fetch:
    """One fetch in flight; the readers waiting on it share its outcome."""

    __slots__ = ("done", "kept", "data", "tier", "error")

    def __init__(self) -> None:
        self.done = trio.Event()  # the bytes (or the error) are here
        self.kept = trio.Event()  # and the attempt to cache them is over
        self.data: bytes | bytearray | None = None
        self.tier = ""  # the tier that served it
        self.error: BaseException | None = None


class ChunkSource:
    def __init__(
        self, cache: ChunkCache, store: ObjectStore, *,
        wait_timeout_seconds: float = 300.0, fetch_concurrency: int = FETCH_CONCURRENCY, disk_concurrency: int = 8,
        prefetch_chunks: int = PREFETCH_CHUNKS, space_wait_seconds: float = 60.0, ledger: ChunkLedger | None = None,
        defer_sync: bool = False,
    ):
        self.cache = cache
        # New chunks are written without fsync and owed a sync (durability.py).
        self.defer_sync = defer_sync
        self.store = store
        self.wait_timeout_seconds = wait_timeout_seconds
        self.disk_limiter = trio.CapacityLimiter(disk_concurrency)
        self.store_limiter = trio.CapacityLimiter(fetch_concurrency)
        self._inflight: dict[str, _Fetch] = {}
        self._opening: set[str] = set()  # cached chunks being opened ahead of a reader
        # Each chunk's state on this node (held, pinned, stored, deleting,
        # shared): the uploader, the collector and the peer tier use the same one.
        self.ledger = ledger or ChunkLedger(cache)
        self.prefetch_slots = prefetch_chunks
        # Twice what may be fetched ahead at once: every prefetched chunk
        # waits here for its reader, who may still be reading the one before.
        self._recent = _RecentChunks(2 * prefetch_chunks * CHUNK_SIZE_BYTES)
        # Back-pressure: when the cache is full of pinned (not yet uploaded)
        # chunks, a writer waits this long for uploads to free space, then ENOSPC.
        self.space_wait_seconds = space_wait_seconds
        # Sealed chunks start uploading at once; a writer stalled on a full
        # cache waits for uploads (`connect_uploader`).
        self.uploader = None
        # Waits in progress, by kind ("read": for a chunk, "space": for cache
        # room), and whether new ones fail at once (the mount is stopping).
        self._waits: dict[trio.CancelScope, str] = {}
        self.aborting = False
        self.nursery: trio.Nursery | None = None
        # The peer tier, when this node runs one (--peer-listen).
        self.peers = None

    def connect_uploader(self, uploader) -> None:
        """Sealed chunks go to the uploader, stalled writers wait on it."""
        self.uploader = uploader

    # ---- waits ----------------------------------------------------------------
    @contextlib.contextmanager
    def _wait(self, deadline: float, kind: str = "read") -> Iterator[trio.CancelScope]:
        """A scope for one wait: it ends at `deadline` (trio time) or when
        `abort_waits` is called; the caller checks `cancelled_caught`."""
        scope = trio.CancelScope(deadline=deadline)
        if self.aborting:
            scope.cancel()
        self._waits[scope] = kind
        try:
            with scope:
                yield scope
        finally:
            del self._waits[scope]

    @property
    def waiting(self) -> int:
        """How many requests wait for a chunk or for cache space right now."""
        return len(self._waits)

    def abort_waits(self) -> None:
        """End every wait now, and fail new ones at once (the mount is going away)."""
        self.aborting = True
        for scope in list(self._waits):
            scope.cancel()

    def interrupt_reads(self) -> int:
        """End the waits of readers now (their reads fail with EIO), and only
        those: `datafs umount` of a mount kept busy by readers stuck on
        chunks. Returns how many were ended."""
        readers = [scope for scope, kind in self._waits.items() if kind == "read"]
        for scope in readers:
            scope.cancel()
        return len(readers)

    def resume_waits(self) -> None:
        self.aborting = False

    def _gave_up(self, ref: ChunkRef, why: str) -> errors.FsError:
        metrics.CHUNK_FETCHES.labels(self.store.tier, "error").inc()
        if self.aborting:
            why = f"{why}; the mount is stopping"
        log.error("chunk unavailable", extra={"chunk": ref.chunk_id, "error": why})
        return errors.FsError(f"chunk {ref.chunk_id}: {why}")

    # ---- reads -----------------------------------------------------------------
    def deadline(self) -> float:
        """The deadline of a read that starts now (trio time)."""
        return trio.current_time() + self.wait_timeout_seconds

    async def read(self, ref: ChunkRef, offset: int, size: int,
                   deadline: float | None = None) -> bytes | bytearray | memoryview:
        """Bytes [offset, offset+size) of a chunk (shorter if the chunk is);
        EIO if the chunk cannot be had by `deadline` (default: the chunk wait).
        A view of a fetched chunk is not copied: the caller copies it or
        hands it to the kernel."""
        end = min(offset + size, ref.length)
        if offset >= end:
            return b""
        data: bytes | bytearray | memoryview | None = self._recent.read(ref.chunk_id, offset, end - offset)
        if data is None and end - offset <= INLINE_READ_MAX_BYTES:
            data = self.cache.read_resident(ref.chunk_id, offset, end - offset)
        # No thread hop just to learn it is not here; and with no await
        # between this check and `_fetch`, a fetch that finishes meanwhile is
        # either in the cache here or still in flight there: never fetched twice.
        if data is None and ref.chunk_id in self.cache:
            read = functools.partial(self.cache.read, ref.chunk_id, offset, end - offset)
            if ref.length <= INLINE_DISK_READ_MAX_CHUNK_BYTES:
                data = read()
            else:
                data = await trio.to_thread.run_sync(read, limiter=self.disk_limiter)
        if data is not None:
            _READ_FROM_CACHE.inc(len(data))
            metrics.CACHE_HITS.inc()
            metrics.CACHE_HIT_BYTES.inc(len(data))
            return data
        metrics.CACHE_MISSES.inc()
        metrics.CACHE_MISS_BYTES.inc(end - offset)
        whole, tier = await self._fetch(ref, deadline, for_reader=True)
        metrics.READ_BYTES.labels(tier).inc(end - offset)
        view = self._recent.read(ref.chunk_id, offset, end - offset)  # counts this read there
        return view if view is not None else memoryview(whole)[offset:end]

    async def fetch(self, ref: ChunkRef, deadline: float | None = None, for_reader: bool = False) -> bytes | bytearray:
        """Bring a chunk into the cache (single-flight) and return its bytes.
        On return the chunk is in the cache (unless it did not fit): the peer
        server answers from the cache file right after. `for_reader`: a
        reader on this node reads it next (see the module doc)."""
        return (await self._fetch(ref, deadline, cached=True, for_reader=for_reader))[0]

    async def _fetch(self, ref: ChunkRef, deadline: float | None, cached: bool = False,
                     for_reader: bool = False) -> tuple[bytes | bytearray, str]:
        """The chunk's bytes and the tier that served them; with `cached`, not
        before the chunk is in the cache (a reader needs only the bytes).
        The first caller's `for_reader` decides where the bytes are kept."""
        if deadline is None:
            deadline = self.deadline()
        while True:
            pending = self._inflight.get(ref.chunk_id)
            if pending is None:
                break
            with self._wait(deadline) as scope:
                await (pending.kept if cached else pending.done).wait()
            if scope.cancelled_caught:
                raise self._gave_up(ref, f"not available after {self.wait_timeout_seconds:g} s")
            if pending.data is not None:
                return pending.data, pending.tier
            if pending.error is not None and (trio.current_time() >= deadline or self.aborting):
                raise errors.FsError(str(pending.error))
            # It failed for a reader with an earlier deadline: try on our own.
        pending = self._inflight[ref.chunk_id] = _Fetch()
        try:
            data, tier = await self._fetch_verified(ref, deadline)
            # Readers waiting for it go on with the bytes in memory now (often
            # a sequential reader behind a prefetch); it stays in flight until
            # it is in the cache, so nobody fetches it again meanwhile.
            pending.data, pending.tier = data, tier
            if for_reader:
                self._recent.add(ref.chunk_id, data)
            pending.done.set()
            # No room (the cache is full of chunks not uploaded yet), or the
            # cache's disk fails: the reader gets the bytes all the same, they
            # are just not kept.
            put = functools.partial(self.cache.put, ref.chunk_id, data, False, direct=for_reader)
            try:
                await trio.to_thread.run_sync(put, limiter=self.disk_limiter)
            except OSError as exc:
                log.warning("could not keep a fetched chunk in the cache", extra={"chunk": ref.chunk_id, "error": str(exc)})
            return data, tier
        except Exception as exc:
            pending.error = exc
            raise
        finally:
            del self._inflight[ref.chunk_id]
            pending.done.set()
            pending.kept.set()

    def prefetch(self, refs: list[ChunkRef]) -> None:
        """Start background fetches of chunks not cached yet, within the budget;
        cached chunks not read ahead lately get their disk reads started."""
        if self.nursery is None:
            return
        on_disk = []
        for ref in refs:
            if ref.chunk_id in self._inflight:
                continue
            if ref.chunk_id in self.cache:
                if ref.chunk_id not in self._opening and self.cache.wants_read_ahead(ref.chunk_id):
                    on_disk.append(ref.chunk_id)
                continue
            if self.prefetch_slots <= 0:
                break
            self.prefetch_slots -= 1
            self.nursery.start_soon(self._prefetch_one, ref)
        # Only for a reader served from the cache: while fetches are in flight
        # their hashing and cache writes need the disk threads more (measured:
        # opening ahead during a cold read cost it a fifth of its speed).
        if on_disk and not self._inflight:
            self._opening.update(on_disk)
            self.nursery.start_soon(self._read_ahead_on_disk, on_disk)

    async def _read_ahead_on_disk(self, chunk_ids: list[str]) -> None:
        """Have the kernel read cached chunks ahead of a sequential reader,
        whole, including chunks open since long ago whose pages were dropped."""
        try:
            for chunk in chunk_ids:
                await trio.to_thread.run_sync(self.cache.read_ahead, chunk, limiter=self.disk_limiter)
        finally:
            self._opening.difference_update(chunk_ids)

    async def _prefetch_one(self, ref: ChunkRef) -> None:
        try:
            if ref.chunk_id in self.cache:  # a reader fetched it since it was asked for
                return
            await self.fetch(ref, for_reader=True)
            metrics.PREFETCHED_CHUNKS.inc()
        except Exception as exc:  # the reader's own fetch will report it
            log.debug("prefetch failed", extra={"chunk": ref.chunk_id, "error": str(exc)})
        finally:
            self.prefetch_slots += 1

    def _tiers(self) -> list[tuple[str, Callable[[ChunkRef, float], Awaitable[bytes | bytearray | None]]]]:
        """The tiers below the cache, in the order a chunk is asked of them."""
        tiers = [] if self.peers is None else [(self.peers.tier, self._from_peers)]
        return tiers + [(self.store.tier, self._from_store)]

    async def _fetch_verified(self, ref: ChunkRef, deadline: float) -> tuple[bytes | bytearray, str]:
        """The chunk from the first tier that has it, verified, and that tier.
        When none has it for now (not uploaded yet, a store failing for a
        while), back off and go round again, until the reader's deadline; a
        permanent failure ends it at once. This is the chain's one retry loop."""
        delay = 0.05
        while True:
            failure: errors.StoreError | None = None
            for tier, fetch in self._tiers():
                try:
                    data = await fetch(ref, deadline)
                except errors.StoreError as exc:
                    if not exc.temporary:
                        raise self._gave_up(ref, str(exc)) from exc
                    if isinstance(exc, errors.ChunkMissing):
                        log.info("waiting for chunk to appear in the object store", extra={"chunk": ref.chunk_id})
                    failure = exc
                    continue
                if data is not None:
                    return data, tier
            with self._wait(deadline) as scope:
                await trio.sleep(delay * random.uniform(0.5, 1.0))
            if scope.cancelled_caught:
                raise self._gave_up(ref, f"{failure or 'no tier has it'} (gave up after {self.wait_timeout_seconds:g} s)")
            delay = min(delay * 2, 5.0)

    async def _from_peers(self, ref: ChunkRef, deadline: float) -> bytes | bytearray | None:
        """The owner (or, on the owner itself, the runner-up's cache); then, if
        the chunk is not uploaded yet, the nodes holding it (one metadata read).
        None when no peer could give it by `deadline`."""
        with self._wait(deadline):
            return await self.peers.fetch(ref.chunk_id, ref.length, pending=True)
        return None

    async def _from_store(self, ref: ChunkRef, deadline: float) -> bytes:
        """One GET, verified; a StoreError says whether trying again may help
        (wrong bytes are ChunkCorrupt: temporary, fetched again)."""
        started = time.monotonic()
        with self._wait(deadline) as scope:
            # Abandoned at the deadline: a store that hangs must not hold the
            # reader (the thread ends with boto's own timeout).
            data, actual = await trio.to_thread.run_sync(
                self._get_and_hash, ref.chunk_id, limiter=self.store_limiter, **{_ABANDON_KW: True},
            )
        if scope.cancelled_caught:
            raise self._gave_up(ref, f"the object store did not answer within {self.wait_timeout_seconds:g} s")
        if actual != ref.chunk_id:
            metrics.CHUNK_FETCHES.labels(self.store.tier, "corrupt").inc()
            log.error(
                "chunk failed verification, fetching again",
                extra={"chunk": ref.chunk_id, "actual": actual, "tier": self.store.tier, "size_bytes": len(data)},
            )
            raise errors.ChunkCorrupt(ref.chunk_id, self.store.describe())
        metrics.CHUNK_FETCHES.labels(self.store.tier, "ok").inc()
        metrics.CHUNK_FETCH_SECONDS.labels(self.store.tier).observe(time.monotonic() - started)
        return data

    def _get_and_hash(self, chunk_id: str) -> tuple[bytes, str]:
        """GET a chunk and hash it on the same worker thread: a second trip
        through the event loop cost more than the hashing (BLAKE3, GIL
        released) when the loop was busy serving the reader."""
        data = self.store.get(chunk_id)
        return data, hash_chunk(data)

    # ---- writes ------------------------------------------------------------------
    async def seal(self, data: bytes | bytearray | memoryview, upload_now: bool = False) -> ChunkRef:
        """Hash and store a chunk in the local cache; the returned id is held
        until the caller passes it to `release` after the metadata commit.
        `upload_now` hands it to the uploader at once (see the module doc)."""
        if len(data) <= INLINE_HASH_MAX_BYTES:
            chunk = hash_chunk(data)
        else:
            chunk = await trio.to_thread.run_sync(hash_chunk, data, limiter=self.disk_limiter)
        self.ledger.hold(chunk)
        try:
            await self.ledger.wait_not_deleting(chunk)
            await self._store_with_backpressure(chunk, data)
        except BaseException:
            self.ledger.release(chunk)
            raise
        metrics.CHUNKS_SEALED.inc()
        if upload_now and self.uploader is not None:
            self.uploader.upload_sealed(chunk)
        return ChunkRef(chunk, len(data))

    async def _store_with_backpressure(self, chunk: str, data: bytes | bytearray | memoryview) -> None:
        """Put a chunk in the cache. If the cache (its byte limit, or the disk) is
        full of chunks that exist nowhere else yet, wait for uploads to unpin
        some; once no upload has finished for `space_wait_seconds`, or the
        mount is stopping, fail with ENOSPC. Committed data is never evicted
        to make room."""
        deadline = trio.current_time() + self.space_wait_seconds
        next_kick = 0.0
        stalled = False
        put = functools.partial(self.cache.put, chunk, data, defer_sync=self.defer_sync)
        inline = self.defer_sync and len(data) <= INLINE_STORE_MAX_BYTES
        while True:
            try:
                if put() if inline else await trio.to_thread.run_sync(put, limiter=self.disk_limiter):
                    return
            except OSError as exc:  # the disk under the cache is full
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
            now = trio.current_time()
            if self.uploader is None or now >= deadline or self.aborting:
                log.warning("cache full of chunks not uploaded yet; the write fails with ENOSPC", extra={
                    "chunk": chunk, "waited_seconds": self.space_wait_seconds, "stopping": self.aborting,
                })
                raise errors.NoSpace(
                    f"the local cache is full of chunks not in the object store yet, and no upload "
                    f"finished for {self.space_wait_seconds:g} s"
                )
            if not stalled:
                stalled = True
                metrics.WRITE_STALLS.inc()
                log.info("cache full of chunks not yet uploaded; writer waits for uploads", extra={"chunk": chunk})
            if now >= next_kick:  # a store that came back is noticed now, not after the upload backoff
                self.uploader.retry_now()
                next_kick = now + STALL_RETRY_KICK_SECONDS
            with self._wait(min(deadline, now + 1.0), "space") as scope:
                await self.uploader.wait_progress()
            if not scope.cancelled_caught:  # an upload finished: space may be free, the clock restarts
                deadline = trio.current_time() + self.space_wait_seconds

    def release(self, ref: ChunkRef) -> None:
        """Drop the hold `seal` took (after the commit, or when the file is discarded)."""
        self.ledger.release(ref.chunk_id)
