"""When a committed file survives a power loss, and what a start does about
the ones that did not.

POSIX makes `fsync()` the durability point, not `close()`, and local
filesystems flush the rest within seconds (ext4: 5 s). datafs does the same
on its embedded metadata engine (LMDB, one node):

- `close()` writes the new chunks into the cache without fsync and commits
  the metadata without a sync: the file is visible on the node and survives a
  crash of the daemon (SIGKILL, OOM), since the kernel holds both;
- `fsync()` makes that file's chunks durable (an fsync of each of its own
  chunk files, from several threads; never a syncfs, which would make it pay
  for every other writer on the filesystem), then syncs the metadata;
- everything else becomes durable within the flush interval
  (`--flush-interval`, 5 s): the flusher makes every chunk the cache owes a
  sync durable (one syncfs(2) for a batch, an fsync per file for a few:
  `ChunkCache.sync`), then moves the durable point, then syncs LMDB. A clean
  unmount flushes everything. Chunks of 1 MiB or more start their writeback
  when they are written (cache.py), so a large file's bytes still reach the
  disk while it is being written, and its fsync finds them there.

Never out of order: LMDB's unsynced pages can reach the disk before a
chunk's do, so the metadata on disk after a power loss may name chunks that
are not there. Each commit that references chunks not durable yet records
them in a journal entry (sequence number -> inode, chunk ids) in the same
transaction, so any state of the metadata a power loss leaves names, beside
each such commit, the chunks it may have lost. A flush deletes the entries it
made durable in the same transaction that moves the durable point, and only
after their chunks are durable. At every start, before the mount serves,
`recover` checks the chunks of the entries left: in the cache and hashing to
their name, or in the object store (a store's put is durable when it
returns). A file that references a lost chunk is cut short at the start of
its first lost chunk (the nearest thing to ext4 losing unsynced blocks; never
a file naming bytes that are not there), this node's pending uploads of lost
chunks go, and each damaged file is one WARNING with its inode, counted in
`datafs_recovery_damaged_files_total` and `datafs status`. Then what survived
is made durable and the durable point moves past every entry. After a crash
of the daemon alone nothing is lost: the check finds every chunk, and costs
reading back at most one interval of writes.

Why the entries, not a sync per commit: the fsync at each close was a small
file's largest cost (about 3 ms each in the issue's measurement), and an LMDB
sync per transaction (MDB_NOMETASYNC: 1.0 to 2.6 ms each, measured here)
would stall the event loop at every create and close; the journal is one key
in a transaction that runs anyway.

The durable point is exact, not a timer: it stands at the last commit every
one of whose chunks is durable, so an fsync of the oldest file moves it as
far as the files after it allow, and a chunk evicted and written again (owed
a sync again) holds it back until the next flush.

A shared engine (PostgreSQL) commits durably and visibly to the whole fleet
at once: another node may read the chunk as soon as the commit returns, so
there a chunk is fsynced before its commit (`deferred` is off), no journal
is kept, and fsync has nothing left to do.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Awaitable, Callable, Iterable

import trio

from . import errors, metrics
from .chunks.cache import ChunkCache
from .meta.calls import MetaCalls
from .meta.store import MetaStore
from .tiers.store import ObjectStore

log = logging.getLogger(__name__)

#: Threads that fsync one file's chunk files at once.
FSYNC_THREADS = 8


class Durability:
    def __init__(self, meta: MetaStore, cache: ChunkCache, calls: MetaCalls, *,
                 deferred: bool, interval_seconds: float = 5.0):
        self.meta = meta
        self.cache = cache
        self.calls = calls
        #: Chunks are written without fsync and made durable later (embedded
        #: engine); off: fsynced before their commit (shared engine).
        self.deferred = deferred
        self.interval_seconds = interval_seconds
        # Journal entries not yet behind the durable point: seq -> chunk ids
        # owed a sync when the commit was made (oldest first: seqs only grow).
        self._entries: dict[int, list[str]] = {}
        self._next_seq = 1
        self.durable_point = 0
        self._advancing = trio.Lock()  # one move of the durable point at a time
        self._limiter = trio.CapacityLimiter(1)  # the flusher's thread
        self._fsync_limiter = trio.CapacityLimiter(FSYNC_THREADS)  # fsyncs of files: never behind a flush
        #: Files cut short by the last start's recovery (for `datafs status`).
        self.damaged_at_start: list[dict] = []

    # ---- commits -------------------------------------------------------------------
    def journal(self, chunk_ids: Iterable[str]) -> tuple[int, list[str]] | None:
        """The journal entry for a commit of these chunks: a new sequence
        number and the chunks not durable yet; None if all are. Event loop."""
        if not self.deferred:
            return None
        owed = [chunk for chunk in dict.fromkeys(chunk_ids) if self.cache.is_unsynced(chunk)]
        if not owed:
            return None
        seq = self._next_seq
        self._next_seq += 1
        self._entries[seq] = owed
        return seq, owed

    # ---- making things durable -------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: every interval, make everything written so far durable.
        Nothing to do on a shared engine: its commits are durable already."""
        task_status.started()
        while self.deferred:
            await trio.sleep(self.interval_seconds)
            try:
                await self.flush()
            except (OSError, errors.MetaUnavailable) as exc:
                log.error("flush failed: written files are not durable against power loss yet; retried at the next interval",
                          extra={"error": str(exc)})

    async def flush(self) -> None:
        """Make every chunk owed a sync durable, move the durable point past
        every commit that is now wholly durable, and sync the metadata."""
        chunks = list(self.cache.unsynced())

        async def sync_chunks() -> None:
            if chunks:
                await trio.to_thread.run_sync(self.cache.sync, chunks, limiter=self._limiter)

        await self._make_durable("flush", sync_chunks)

    async def sync_file(self, ino: int) -> None:
        """fsync(): the file's chunks durable, then the metadata (all of it:
        commits of other files it covers are in the journal, so a power loss
        can only cut those back, never this one)."""
        owed = {}
        if self.deferred and self.cache.owes_syncs():
            chunks = await self.calls.in_thread(self.meta.chunks, ino)  # a large file has many
            owed = {ref.chunk_id: ref.length for ref in chunks.values() if self.cache.is_unsynced(ref.chunk_id)}
        await self._make_durable("fsync", functools.partial(self._fsync_files, list(owed)))

    async def _make_durable(self, op: str, sync_chunks: Callable[[], Awaitable[None]]) -> None:
        """Sync the chunks (`sync_chunks`), then the durable point and the
        metadata, in that order; counted in the metrics under `op`."""
        started = time.monotonic()
        try:
            await sync_chunks()
            await self._advance()
            await self.calls.in_thread(self.meta.sync)
        except BaseException:
            metrics.FLUSHES.labels(op, "error").inc()
            raise
        metrics.FLUSHES.labels(op, "ok").inc()
        metrics.FLUSH_SECONDS.labels(op).observe(time.monotonic() - started)

    async def _fsync_files(self, chunks: list[str]) -> None:
        """One file's fsync pays for its own chunk files only, never for
        whatever else is dirty on the cache's filesystem (syncfs). Several
        threads at once: the filesystem commits their fsyncs together (a
        4 MiB chunk per fsync, one after the other, cost a large file's fsync
        a journal commit per chunk)."""
        if not chunks:
            return
        groups = [chunks[i::FSYNC_THREADS] for i in range(min(FSYNC_THREADS, len(chunks)))]
        async with trio.open_nursery() as nursery:
            for group in groups:
                nursery.start_soon(functools.partial(
                    trio.to_thread.run_sync, self.cache.sync, group, False, limiter=self._fsync_limiter))

    async def _advance(self) -> None:
        """Move the durable point to the last commit before the first one
        whose chunks are still owed a sync."""
        async with self._advancing:
            point = self.durable_point
            for seq, chunks in self._entries.items():
                if any(self.cache.is_unsynced(chunk) for chunk in chunks):
                    break
                point = seq
            if point == self.durable_point:
                return
            self.durable_point = await self.calls.in_thread(self.meta.advance_durable_point, point)
            for seq in [s for s in self._entries if s <= point]:
                del self._entries[seq]

    # ---- start -------------------------------------------------------------------------
    def recover(self, store: ObjectStore) -> list[dict]:
        """Before the mount serves (blocking): check the chunks of every
        journal entry left by the last run, cut back the files that lost
        some, make what survived durable, and move the durable point past it
        all. Returns the damaged files (inode, size before and after)."""
        entries = self.meta.journal_entries()
        last = max([self.meta.durable_point()] + [seq for seq, _, _ in entries])
        self._next_seq = last + 1
        self.durable_point = last
        damaged: list[dict] = []
        if entries:
            chunks = sorted({chunk for _, _, ids in entries for chunk in ids})
            lost = {chunk for chunk in chunks if not self._survived(chunk, store)}
            if lost:
                for ino in sorted({ino for _, ino, ids in entries if lost.intersection(ids)}):
                    cut = self.meta.cut_at_lost_chunk(ino, lost)
                    if cut is None:
                        continue  # deleted since, or its lost chunks replaced since
                    damaged.append({"ino": ino, "size_bytes": cut[0], "cut_to_bytes": cut[1]})
                    log.warning("file cut short after a power loss: chunks written within the flush interval "
                                "before it were lost", extra=damaged[-1])
                dropped = self.meta.forget_lost_chunks(lost)
                # Every commit naming a chunk not durable yet has an entry, so
                # no file outside them can name a lost chunk; if one does, say so.
                named = sorted(c for c, (refs, _) in self.meta.chunk_records(lost).items() if refs > 0)
                if named:
                    log.error("chunks lost in a power loss are still named by files the journal did not list; "
                              "datafs fsck lists them", extra={"chunks": len(named), "sample": named[:3]})
                log.warning("chunks lost in a power loss before they were durable", extra={
                    "chunks": len(lost), "damaged_files": len(damaged), "pending_uploads_dropped": dropped,
                })
            # What survived is durable before the entries naming it go.
            self.cache.sync([chunk for chunk in chunks if chunk not in lost])
            self.meta.advance_durable_point(last)
            self.meta.sync()
            log.info("checked the commits not known durable at the last stop",
                     extra={"commits": len(entries), "chunks": len(chunks), "lost_chunks": len(lost)})
        metrics.DAMAGED_FILES.inc(len(damaged))
        self.damaged_at_start = damaged
        return damaged

    def _survived(self, chunk: str, store: ObjectStore) -> bool:
        """The chunk is in the cache whole, or in the object store. A store
        that cannot answer fails the start: cutting files back on a guess
        would lose data the store may hold."""
        if self.cache.verify(chunk, report=False):
            return True
        try:
            return store.exists(chunk)
        except errors.StoreError as exc:
            raise errors.UsageError(
                f"after an unclean stop, cannot ask the object store whether chunk {chunk} survived: {exc}; "
                "mount again once it answers") from None

    # ---- status ------------------------------------------------------------------------
    def snapshot(self) -> dict:
        chunks, size = self.cache.owed()
        return {
            "not_durable_chunks": chunks,
            "not_durable_bytes": size,
            "durable_point": self.durable_point,
            "last_commit": self._next_seq - 1,
            "damaged_at_start": len(self.damaged_at_start),
        }
