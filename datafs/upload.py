"""Background upload of committed chunks, and garbage collection of unreferenced ones.

Durability order: a chunk is in the local cache before the metadata commit
that references it (durable before it, or, on the embedded engine, recorded
in the same commit's journal entry until the flush makes it durable:
durability.py), and that same commit records it as pending upload. So the
pending set lives in the metadata store: a crash or restart loses nothing,
and `Uploader.run` resumes whatever is pending. A store's put is durable when
it returns, so an uploaded chunk's cache file is owed no sync any more. A pending chunk stays
pinned in the cache until the store has it. Uploads never give up on a
committed chunk: temporary and permanent failures alike are retried with capped
exponential backoff and jitter, and reported in logs, metrics and `status`.
The uploader is the one source of those numbers: `snapshot()` and the
`datafs_uploads_*` gauges come from the same state (pending: committed chunks
not in the store yet; failing: those whose last attempt failed, plus early
uploads of files still open). Before a chunk leaves, its cache file is
verified against its name, so a file damaged on the local disk is never
uploaded under that name.

Chunks also start uploading as soon as they are sealed, before their file is
committed (`upload_sealed`): that overlaps uploading with writing, and lets a
file larger than the cache be written, because a sealed chunk the store has
needs no cache pin. Such an early upload is retried only while the chunk is
still held for its commit (it stops the moment the ledger says the last hold
went); the commit then queues it as usual, and the durable path finds it in
the store and only marks it uploaded. A file that is never committed (deleted
while open, a failed close, or a crash) may leave its early chunks in the
store unreferenced.

A HEAD before a large chunk's PUT saves the bytes when the store has them,
but costs as much CPU as a tenth of the PUT, on both sides. So it is asked
only when the volume records the chunk as uploaded once (a copy of a file;
another node's upload); a chunk nobody has uploaded through a commit can be
in the store only from an early upload, and is PUT at once. On the embedded
engine a committed chunk whose early upload finished is only marked
uploaded, since nothing can delete it in between (this node's collector
leaves held and pending chunks alone, and no other node collects). A shared
volume's other collectors can, so there the commit's upload looks again.

On a shared engine the pending set is per node (`u <node> <chunk>`): each node
uploads what it committed, and the first upload of a chunk clears it for every
node. A chunk is marked uploaded only if its pending token is the one read
before the upload began: a deletion that raced with the upload (below) changes
the token, and the upload runs again.

On the embedded engine no other node reads this node's chunks, so an upload
that costs CPU more than bandwidth (a chunk under 1 MiB: the request's own
overhead, ~1.5 ms of boto3 and as much of the server on one machine, is most
of it) yields to FUSE requests: it waits while requests keep coming, at most
`yield_max_seconds` (the flush interval), so a burst of small files is not
slowed by their uploads, which follow right after. Measured here, 2,000 x
16 KiB files into a SeaweedFS-backed mount on 2 cores: 3.3-3.7 s with the
uploads waiting, 10.5-13.3 s with them competing. `datafs sync`, an fsync
with --fsync-waits-upload, and unmount do not wait.

The collector deletes chunks whose reference count fell to zero, after a grace
period on a shared volume (another node may be about to commit the same bytes,
sealed before the count fell). It claims a chunk (DELETING) in one
transaction, deletes the object, and forgets the chunk in another; a commit
that re-references it in between rescues it and re-uploads it from its own
cache. Locally it skips pinned chunks (being sealed for a new commit, or
uploading), and marks the ones it is deleting so a concurrent seal of the same
bytes waits and writes afresh. It also frees orphaned inodes (no name left)
that a shared volume keeps for `orphan_grace_seconds`, once no node holds
them open.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from typing import Callable, Iterable, Mapping

import trio

from . import errors, metrics
from .chunks.cache import ChunkCache
from .chunks.ledger import ChunkLedger
from .meta.calls import MetaCalls
from .meta.store import UPLOAD_DONE, MetaStore
from .tiers.chain import ChunkSource
from .tiers.store import ObjectStore

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0
#: Below this size a chunk is PUT without asking the store first: the HEAD
#: would cost as much as the PUT it might save (keys are content hashes, so
#: a PUT of a chunk the store has rewrites the same bytes).
CHECK_BEFORE_PUT_MIN_BYTES = 1 << 20
#: Finished uploads are marked in the metadata in batches gathered this long:
#: one transaction per batch instead of one per chunk (on a shared engine each
#: is a round trip that can also conflict with the namespace's transactions).
MARK_BATCH_SECONDS = 0.05
#: Requests this far apart are a pause a yielding upload may run in.
YIELD_PAUSE_SECONDS = 0.2
YIELD_POLL_SECONDS = 0.05
#: Chunks under this size yield (their upload costs CPU more than bandwidth).
YIELD_MAX_CHUNK_BYTES = 1 << 20
#: Garbage a collector pass had to leave (pinned until its upload ends, or
#: held by a writer) is looked at again this soon.
GARBAGE_IN_USE_RECHECK_SECONDS = 1.0


class Uploader:
    def __init__(
        self, meta: MetaStore, cache: ChunkCache, store: ObjectStore, calls: MetaCalls, concurrency: int = 16,
        max_backoff_seconds: float = MAX_BACKOFF_SECONDS, *, ledger: ChunkLedger,
    ):
        self.meta = meta
        self.cache = cache
        self.ledger = ledger
        self.store = store
        self.calls = calls
        self.concurrency = concurrency
        self.max_backoff_seconds = max_backoff_seconds
        self.limiter = trio.CapacityLimiter(concurrency)
        self._queue: collections.deque[str] = collections.deque()
        # Committed chunks not in the store yet: chunk -> (size, queued at, ns).
        self._queued: dict[str, tuple[int, int]] = {}
        self._queued_bytes = 0
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._retry_now = trio.Event()
        self.failing: dict[str, str] = {}
        self.uploaded_bytes = 0
        # Yielding to requests (see the module doc): seconds since the last
        # FUSE request, and the longest a small upload waits for a pause.
        self.idle_seconds: Callable[[], float] | None = None
        self.yield_max_seconds = 0.0
        self._awaited: collections.Counter[str] = collections.Counter()  # chunks someone waits for
        self._early: dict[str, tuple[trio.Event, trio.CancelScope]] = {}  # early uploads in flight
        self._stored_early: set[str] = set()  # committed chunks whose early upload finished
        self._marks: list[tuple[str, bytes, trio.Event, list]] = []
        self._mark_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        metrics.UPLOADS_PENDING_OLDEST_SECONDS.set_function(self._oldest_pending_seconds)

    @property
    def pending_count(self) -> int:
        return len(self._queued)

    def enqueue(self, chunk_ids: Iterable[str], sizes: Mapping[str, int] | None = None,
                since_ns: Mapping[str, int] | None = None) -> None:
        """Queue newly committed chunks (with their sizes, for status); pins
        them until they are uploaded."""
        now = time.time_ns()
        added = False
        for chunk in chunk_ids:
            if chunk in self._queued:
                continue
            if self.ledger.in_store(chunk):
                self._stored_early.add(chunk)
            size = (sizes or {}).get(chunk, 0)
            self.ledger.pending(chunk)
            self._queued[chunk] = (size, (since_ns or {}).get(chunk, now))
            self._queued_bytes += size
            self._queue.append(chunk)
            added = True
        self._publish()
        if added:
            self._wake.set()

    def _dequeue(self, chunk: str) -> None:
        size, _ = self._queued.pop(chunk, (0, 0))
        self._queued_bytes -= size

    def _publish(self) -> None:
        """Set the gauges from the same state `snapshot` reads."""
        failing_committed = sum(1 for chunk in self.failing if chunk in self._queued)
        metrics.UPLOADS_PENDING.set(len(self._queued))
        metrics.UPLOADS_PENDING_BYTES.set(self._queued_bytes)
        metrics.UPLOADS_FAILING.labels("committed").set(failing_committed)
        metrics.UPLOADS_FAILING.labels("open").set(len(self.failing) - failing_committed)

    def upload_sealed(self, chunk: str) -> None:
        """Start uploading a chunk that is sealed but not yet committed."""
        if self._nursery is None or chunk in self._early or chunk in self._queued:
            return
        self._early[chunk] = (trio.Event(), trio.CancelScope())
        self._nursery.start_soon(self._upload_early, chunk)

    async def _stop_when_released(self, chunk: str, scope: trio.CancelScope) -> None:
        """No commit holds this chunk any more (a failed or discarded file, not
        a committed one): stop its early upload now."""
        await self.ledger.released(chunk).wait()
        if chunk not in self._queued:
            scope.cancel()

    async def _upload_early(self, chunk: str) -> None:
        done, scope = self._early[chunk]
        try:
            async with trio.open_nursery() as watch:
                watch.start_soon(self._stop_when_released, chunk, scope)
                await self._upload_early_in(chunk, scope)
                watch.cancel_scope.cancel()
            if chunk not in self._queued and not self.ledger.is_sealed(chunk):
                # Discarded before it was committed: not a failure to report.
                if self.failing.pop(chunk, None) is not None:
                    self._publish()
        finally:
            del self._early[chunk]
            done.set()

    async def _upload_early_in(self, chunk: str, scope: trio.CancelScope) -> None:
        with scope:
            # Noted first: if this node dies before the commit, the object
            # must not stay in the store with nothing naming it.
            try:
                size = self.cache.path(chunk).stat().st_size
                await self.calls(self.meta.note_early_upload, chunk, size)
            except (OSError, errors.MetaUnavailable) as exc:
                log.info("early upload skipped; the commit uploads the chunk", extra={"chunk": chunk, "error": str(exc)})
                return
            if await self._upload(chunk, keep_trying=lambda: self.ledger.is_sealed(chunk) and chunk not in self._queued):
                self.ledger.stored(chunk)
                if chunk in self._queued:  # committed meanwhile (else `enqueue` asks the ledger)
                    self._stored_early.add(chunk)
                self._signal_progress()

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def wait_idle(self) -> None:
        """Return once nothing is pending (used by clean shutdown)."""
        while self._queued:
            await self._progress.wait()

    def retry_now(self) -> None:
        """Cut every backoff short (`datafs sync` asks through the control
        endpoint; SIGUSR1 does the same): the
        operator says the store is reachable again."""
        self._retry_now.set()
        self._retry_now = trio.Event()

    async def wait_progress(self) -> None:
        """Return after the next chunk finishes uploading."""
        await self._progress.wait()

    async def wait_for(self, chunk_ids: set[str]) -> None:
        """Return once none of `chunk_ids` is pending (fsync with upload wait)."""
        self._awaited.update(chunk_ids)
        try:
            while chunk_ids & self._queued.keys():
                await self._progress.wait()
        finally:
            self._awaited.subtract(chunk_ids)
            self._awaited += collections.Counter()  # drop the zeros

    async def _yield_to_requests(self, chunk: str) -> None:
        """A small chunk's upload waits for a pause in FUSE requests, at most
        `yield_max_seconds`; `retry_now` (datafs sync) and a waiter end it."""
        if self.idle_seconds is None or self.yield_max_seconds <= 0:
            return
        if self._queued.get(chunk, (0, 0))[0] >= YIELD_MAX_CHUNK_BYTES:
            return  # bandwidth-bound: it starts at once
        hurry = self._retry_now
        with trio.move_on_after(self.yield_max_seconds):
            while self.idle_seconds() < YIELD_PAUSE_SECONDS and chunk not in self._awaited and not hurry.is_set():
                with trio.move_on_after(YIELD_POLL_SECONDS):
                    await hurry.wait()

    def _oldest_pending_seconds(self) -> float:
        """For the gauge, read by the metrics server's thread while the event
        loop may change the queue: a copy that raced a change is taken again."""
        for _ in range(5):
            try:
                oldest = min((since for _, since in list(self._queued.values())), default=None)
            except RuntimeError:  # the dict changed size during the copy
                continue
            return 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)
        return 0.0

    def snapshot(self, now_ns: int | None = None) -> dict:
        """Numbers for `datafs status`, `datafs sync` and the exit report, all
        from one state: failing committed chunks are counted in pending."""
        now_ns = now_ns or time.time_ns()
        committed = {c: e for c, e in self.failing.items() if c in self._queued}
        early = {c: e for c, e in self.failing.items() if c not in self._queued}
        return {
            "pending_chunks": len(self._queued),
            "pending_bytes": self._queued_bytes,
            "pending_oldest_seconds": max(((now_ns - since) / 1e9 for _, since in self._queued.values()), default=0.0),
            "failing_chunks": len(committed),
            "failing_sample": dict(list((committed or early).items())[:3]),
            "open_failing_chunks": len(early),
            "uploaded_bytes": self.uploaded_bytes,
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        pending = await self.calls.in_thread(self.meta.pending_uploads)
        if pending:
            log.info("resuming pending uploads", extra={"chunks": len(pending), "size_bytes": sum(p[1] for p in pending)})
        self.enqueue([chunk for chunk, _, _ in pending], {c: size for c, size, _ in pending}, {c: ts for c, _, ts in pending})
        send, receive = trio.open_memory_channel[str](self.concurrency)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.concurrency):
                nursery.start_soon(self._worker, receive.clone())
            nursery.start_soon(self._marker)
            task_status.started()
            async with send:
                while True:
                    while self._queue:
                        await send.send(self._queue.popleft())
                    self._wake = trio.Event()
                    await self._wake.wait()

    async def _mark(self, chunk: str, token: bytes) -> str:
        """Mark one chunk uploaded, in the next batch."""
        done, box = trio.Event(), []
        self._marks.append((chunk, token, done, box))
        self._mark_wake.set()
        await done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    async def _marker(self) -> None:
        while True:
            await self._mark_wake.wait()
            self._mark_wake = trio.Event()
            await trio.sleep(MARK_BATCH_SECONDS)
            batch, self._marks = self._marks, []
            try:
                results = await self.calls.in_thread(self.meta.mark_uploaded_many, [(c, t) for c, t, _, _ in batch])
            except (errors.MetaUnavailable, OSError) as exc:
                results = {c: exc for c, _, _, _ in batch}
            for chunk, _, done, box in batch:
                box.append(results[chunk])
                done.set()

    async def _worker(self, receive: trio.MemoryReceiveChannel[str]) -> None:
        async with receive:
            async for chunk in receive:
                early = self._early.get(chunk)
                if early is not None:  # let it finish: then the store has it, or it stops retrying
                    await early[0].wait()
                in_store = chunk in self._stored_early and not self.meta.shared  # see the module doc
                self._stored_early.discard(chunk)
                if not in_store:
                    await self._yield_to_requests(chunk)
                await self._upload(chunk, in_store=in_store)
                self._dequeue(chunk)
                self.ledger.stored(chunk, pending=True)
                self._publish()
                self._signal_progress()

    def _verified_put(self, chunk: str, path) -> bool:
        """Put the cache file in the store if it holds its chunk (worker thread)."""
        if not self.cache.verify(chunk):
            return False
        self.store.put_file(chunk, path)
        return True

    async def _upload(self, chunk: str, keep_trying: Callable[[], bool] = lambda: True, *, in_store: bool = False) -> bool:
        """Put one chunk in the store (unless it is there) and mark it uploaded.
        `in_store`: the store has it for sure, the first attempt only marks.
        Retries until it succeeds or `keep_trying()` says to stop; returns success."""
        delay = 0.2
        while keep_trying():
            started = time.monotonic()
            try:
                # Read before the upload: marking it done checks it is unchanged.
                token, uploaded_once = await self.calls(self.meta.upload_state, chunk)
                path = self.cache.path(chunk)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:  # evicted after an early upload: the store should have it
                    size = CHECK_BEFORE_PUT_MIN_BYTES
                if in_store:
                    in_store = False  # a retry (the mark failed) uploads again
                elif size < CHECK_BEFORE_PUT_MIN_BYTES or not uploaded_once or not await trio.to_thread.run_sync(
                    self.store.exists, chunk, limiter=self.limiter,
                ):
                    # One thread hop for both: a small chunk's upload is mostly hops.
                    if not await trio.to_thread.run_sync(self._verified_put, chunk, path, limiter=self.limiter):
                        raise errors.StoreError(
                            f"the cache file of chunk {chunk} is missing or damaged and the object store does not have it",
                            temporary=False,
                        )
                    metrics.UPLOAD_BYTES.inc(size)
                    self.uploaded_bytes += size
                if token is not None:  # an early upload usually is not pending yet: no write
                    if await self._mark(chunk, token) != UPLOAD_DONE:
                        raise errors.StoreError("the chunk was being deleted or re-queued during its upload", temporary=True)
                metrics.UPLOADS.labels("ok").inc()
                metrics.UPLOAD_SECONDS.observe(time.monotonic() - started)
                if self.failing.pop(chunk, None) is not None:
                    log.warning("chunk upload recovered", extra={"chunk": chunk})
                    self._publish()
                return True
            except (errors.StoreError, errors.MetaUnavailable, OSError) as exc:
                metrics.UPLOADS.labels("error").inc()
                first = chunk not in self.failing
                self.failing[chunk] = str(exc)
                if first:
                    self._publish()
                (log.warning if first else log.debug)(
                    "chunk upload failed, will retry", extra={"chunk": chunk, "error": str(exc), "retry_in_seconds": round(delay, 2)}
                )
                with trio.move_on_after(delay * random.uniform(0.5, 1.0)):
                    await self._retry_now.wait()
                delay = min(delay * 2, self.max_backoff_seconds)
        return False


class Collector:
    """Deletes chunks no file references any more, from the cache and the
    store, and frees orphaned inodes that no node holds open."""

    def __init__(
        self, meta: MetaStore, source: ChunkSource, calls: MetaCalls, interval_seconds: float = 30.0, *,
        grace_seconds: float = 0.0, orphan_grace_seconds: float = 0.0,
        held_open: Callable[[int], bool] = lambda ino: False,
        on_inode_deleted: Callable[[], None] = lambda: None,
    ):
        self.meta = meta
        self.source = source
        self.calls = calls
        self.interval_seconds = interval_seconds
        self.grace_ns = int(grace_seconds * 1e9)
        self.orphan_grace_ns = int(orphan_grace_seconds * 1e9)
        self.held_open = held_open
        self.on_inode_deleted = on_inode_deleted
        self._wake = trio.Event()
        self._left_in_use = False  # the last pass left garbage that was held, pinned or being deleted

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                if self.orphan_grace_ns:
                    await self.free_orphans()
                await self.collect()
            except errors.MetaUnavailable as exc:
                log.warning("garbage collection skipped: metadata engine unavailable", extra={"error": str(exc)})
            # Garbage still pinned (its upload, queued before the delete, has
            # not finished) is looked at again soon, not a whole interval later.
            with trio.move_on_after(GARBAGE_IN_USE_RECHECK_SECONDS if self._left_in_use else self.interval_seconds):
                await self._wake.wait()
            self._wake = trio.Event()

    async def free_orphans(self) -> int:
        """Free inodes with no name left once the grace period is over and no
        node (this one included) holds them open."""
        freed = 0
        for ino, age_ns in await self.calls.in_thread(self.meta.orphans):
            if age_ns < self.orphan_grace_ns or self.held_open(ino):
                continue
            if await self.calls.in_thread(self.meta.delete_inode, ino, self.orphan_grace_ns):
                freed += 1
        if freed:
            self.on_inode_deleted()
        return freed

    async def collect(self) -> int:
        deleted = 0
        cache, store = self.source.cache, self.source.store
        ledger = self.source.ledger
        self._left_in_use = False
        for chunk in await self.calls.in_thread(self.meta.garbage, 1024, self.grace_ns):
            if ledger.in_use(chunk):
                self._left_in_use = True
                continue
            with ledger.deleting(chunk):
                try:
                    if await self.calls.in_thread(self.meta.begin_delete, chunk, self.grace_ns):
                        await trio.to_thread.run_sync(cache.remove, chunk)
                        await trio.to_thread.run_sync(store.delete, chunk)
                        if await self.calls.in_thread(self.meta.finish_delete, chunk):
                            metrics.GC_CHUNKS.inc()
                            deleted += 1
                except (errors.StoreError, errors.MetaUnavailable, OSError) as exc:
                    log.warning("garbage collection of a chunk failed", extra={"chunk": chunk, "error": str(exc)})
        return deleted
