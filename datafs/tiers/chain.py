"""The read-through chain and the sealing of new chunks.

A chunk is looked for in the local cache, then fetched from the object store
(peers slot in before the store). A fetch is single-flight: concurrent readers
of one chunk share one request. Every fetched chunk is verified against its
BLAKE3 id before it is cached or returned; a mismatch is logged loudly and
fetched again. A chunk that metadata references but the store does not have
yet (still uploading from another node) is polled for with backoff until
`wait_timeout_seconds`, then the read fails with EIO.

Prefetch: a reader that stays sequential asks for a window of following chunks;
they are fetched into the cache in the background, at most `prefetch_chunks` at
a time (that bounds the memory in flight), so a cold sequential read keeps many
requests to the store in flight instead of one.

Sealing is the write side: hash a buffer, hold the id (so the collector does
not delete it before the metadata commit), pin it in the cache (so nothing
evicts the only copy), store it, and hand it to the uploader at once: chunks
are immutable, so they can go to the object store while the file is still
being written. Once the store has a sealed chunk its pin goes, so a file
larger than the cache can be written while uploads keep up; the hold stays
until the commit `release`s it.

All blocking work runs in worker threads, each resource behind its own limiter.
"""

from __future__ import annotations

import collections
import errno
import logging
import random
import time
from typing import Awaitable, Callable

import trio

from .. import errors, metrics
from ..chunks import chunk_id as hash_chunk
from ..chunks.cache import ChunkCache
from ..meta.store import ChunkRef
from .store import ObjectStore

log = logging.getLogger(__name__)

#: Reads up to this size are first tried on the event loop from memory (no
#: thread hop, which costs more than the copy); larger ones go to a worker
#: thread, where the copy runs beside the loop instead of blocking it.
INLINE_READ_MAX_BYTES = 128 << 10


class ChunkSource:
    def __init__(
        self, cache: ChunkCache, store: ObjectStore, *,
        wait_timeout_seconds: float = 300.0, fetch_concurrency: int = 16, disk_concurrency: int = 8,
        prefetch_chunks: int = 16, space_wait_seconds: float = 60.0,
    ):
        self.cache = cache
        self.store = store
        self.wait_timeout_seconds = wait_timeout_seconds
        self.disk_limiter = trio.CapacityLimiter(disk_concurrency)
        self.store_limiter = trio.CapacityLimiter(fetch_concurrency)
        self._inflight: dict[str, trio.Event] = {}
        self._opening: set[str] = set()  # cached chunks being opened ahead of a reader
        # Chunks the garbage collector is deleting right now: a seal of the
        # same id waits until the deletion is done, then writes it afresh.
        self.deleting: dict[str, trio.Event] = {}
        self.prefetch_slots = prefetch_chunks
        # Back-pressure: when the cache is full of pinned (not yet uploaded)
        # chunks, a writer waits this long for uploads to free space, then ENOSPC.
        self.space_wait_seconds = space_wait_seconds
        self.wait_for_uploads: Callable[[], Awaitable[None]] | None = None
        # Called with each newly sealed chunk id (the uploader starts on it).
        self.on_sealed: Callable[[str], None] = lambda chunk: None
        # Seal holds not yet released, per chunk; and the held chunks the
        # object store already has, whose cache pins were dropped.
        self._held: collections.Counter[str] = collections.Counter()
        self._stored: set[str] = set()
        self.nursery: trio.Nursery | None = None

    def connect_uploader(self, uploader) -> None:
        """Wire the uploader in: sealed chunks go to it, stalled writers wait on it."""
        self.wait_for_uploads = uploader.wait_progress
        self.on_sealed = uploader.upload_sealed
        uploader.on_stored = self.mark_stored
        uploader.still_sealed = self.is_sealed

    # ---- reads -----------------------------------------------------------------
    async def read(self, ref: ChunkRef, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a chunk (shorter if the chunk is)."""
        end = min(offset + size, ref.length)
        if offset >= end:
            return b""
        data = None
        if end - offset <= INLINE_READ_MAX_BYTES:
            data = self.cache.read_resident(ref.chunk_id, offset, end - offset)
        if data is None:
            data = await trio.to_thread.run_sync(self.cache.read, ref.chunk_id, offset, end - offset, limiter=self.disk_limiter)
        if data is not None:
            metrics.READ_BYTES.labels("cache").inc(len(data))
            return data
        whole = await self.fetch(ref)
        metrics.READ_BYTES.labels(self.store.tier).inc(end - offset)
        return whole[offset:end]

    async def fetch(self, ref: ChunkRef) -> bytes:
        """Bring a chunk into the cache (single-flight) and return its bytes."""
        while True:
            event = self._inflight.get(ref.chunk_id)
            if event is None:
                break
            await event.wait()
            data = await trio.to_thread.run_sync(self.cache.read, ref.chunk_id, 0, ref.length, limiter=self.disk_limiter)
            if data is not None:
                return data
        event = self._inflight[ref.chunk_id] = trio.Event()
        try:
            data = await self._fetch_verified(ref)
            await trio.to_thread.run_sync(self.cache.put, ref.chunk_id, data, False, limiter=self.disk_limiter)
            return data
        finally:
            del self._inflight[ref.chunk_id]
            event.set()

    def prefetch(self, refs: list[ChunkRef]) -> None:
        """Start background fetches of chunks not cached yet, within the budget;
        chunks that are cached but not open yet get their disk reads started."""
        if self.nursery is None:
            return
        on_disk = []
        for ref in refs:
            if ref.chunk_id in self._inflight:
                continue
            if ref.chunk_id in self.cache:
                if ref.chunk_id not in self._opening and not self.cache.is_open(ref.chunk_id):
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
        """Open cached chunks ahead of a sequential reader (the cache asks the
        kernel to read each whole file on open), so the disk works ahead of
        the reader instead of one 1 MiB request at a time."""
        try:
            for chunk in chunk_ids:
                await trio.to_thread.run_sync(self.cache.open_ahead, chunk, limiter=self.disk_limiter)
        finally:
            self._opening.difference_update(chunk_ids)

    async def _prefetch_one(self, ref: ChunkRef) -> None:
        try:
            await self.fetch(ref)
            metrics.PREFETCHED_CHUNKS.inc()
        except Exception as exc:  # the reader's own fetch will report it
            log.debug("prefetch failed", extra={"chunk": ref.chunk_id, "error": str(exc)})
        finally:
            self.prefetch_slots += 1

    async def _fetch_verified(self, ref: ChunkRef) -> bytes:
        deadline = time.monotonic() + self.wait_timeout_seconds
        delay = 0.05
        while True:
            started = time.monotonic()
            try:
                data = await trio.to_thread.run_sync(self.store.get, ref.chunk_id, limiter=self.store_limiter)
                actual = await trio.to_thread.run_sync(hash_chunk, data, limiter=self.disk_limiter)
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
            except errors.StoreError as exc:
                if not exc.temporary or time.monotonic() + delay > deadline:
                    metrics.CHUNK_FETCHES.labels(self.store.tier, "error").inc()
                    log.error("chunk unavailable", extra={"chunk": ref.chunk_id, "error": str(exc)})
                    raise errors.FsError(f"chunk {ref.chunk_id}: {exc}") from exc
                if isinstance(exc, errors.ChunkMissing):
                    log.info("waiting for chunk to appear in the object store", extra={"chunk": ref.chunk_id})
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)

    # ---- writes ------------------------------------------------------------------
    async def seal(self, data: bytes | bytearray | memoryview, upload_now: bool = False) -> ChunkRef:
        """Hash and store a chunk in the local cache; the returned id is held
        until the caller passes it to `release` after the metadata commit.
        `upload_now` hands it to the uploader at once (see the module doc)."""
        chunk = await trio.to_thread.run_sync(hash_chunk, data, limiter=self.disk_limiter)
        self._hold(chunk)
        try:
            while chunk in self.deleting:
                await self.deleting[chunk].wait()
            await self._store_with_backpressure(chunk, data)
        except BaseException:
            self._release(chunk)
            raise
        metrics.CHUNKS_SEALED.inc()
        if upload_now:
            self.on_sealed(chunk)
        return ChunkRef(chunk, len(data))

    def _hold(self, chunk: str) -> None:
        self._held[chunk] += 1
        if chunk not in self._stored:
            self.cache.pin(chunk)

    def _release(self, chunk: str) -> None:
        if chunk not in self._stored:
            self.cache.unpin(chunk)
        self._held[chunk] -= 1
        if self._held[chunk] <= 0:
            del self._held[chunk]
            self._stored.discard(chunk)

    def mark_stored(self, chunk: str) -> None:
        """The object store has this chunk now: a held chunk needs no cache pin."""
        if chunk in self._held and chunk not in self._stored:
            self._stored.add(chunk)
            for _ in range(self._held[chunk]):
                self.cache.unpin(chunk)

    def is_held(self, chunk: str) -> bool:
        """Sealed for a commit that has not happened yet, or pinned: not garbage."""
        return chunk in self._held or self.cache.is_pinned(chunk)

    def is_sealed(self, chunk: str) -> bool:
        return chunk in self._held

    async def _store_with_backpressure(self, chunk: str, data: bytes | bytearray | memoryview) -> None:
        """Put a chunk in the cache. If the cache (its byte limit, or the disk) is
        full of chunks that exist nowhere else yet, wait for uploads to unpin
        some; after `space_wait_seconds`, fail with ENOSPC. Committed data is
        never evicted to make room."""
        deadline = time.monotonic() + self.space_wait_seconds
        while True:
            if chunk in self.cache:
                return
            if await trio.to_thread.run_sync(self.cache.make_room, len(data), limiter=self.disk_limiter):
                try:
                    await trio.to_thread.run_sync(self.cache.put, chunk, data, limiter=self.disk_limiter)
                    return
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
            if self.wait_for_uploads is None or time.monotonic() >= deadline:
                raise errors.NoSpace("the local cache is full of chunks that are not uploaded yet")
            metrics.WRITE_STALLS.inc()
            log.info("cache full of chunks not yet uploaded; writer waits for uploads", extra={"chunk": chunk})
            with trio.move_on_after(1.0):
                await self.wait_for_uploads()

    def release(self, ref: ChunkRef) -> None:
        """Drop the hold `seal` took (after the commit, or when the file is discarded)."""
        self._release(ref.chunk_id)
