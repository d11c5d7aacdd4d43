"""What this node knows about each chunk's state, in one place.

A chunk on a node can be, at once or in turn:
- held: sealed for a commit that has not happened yet (a writer's chunk
  between `seal` and the metadata commit); the collector must not delete it;
- pinned: in the cache and nowhere else yet, so never evicted. Held chunks
  the store does not have yet are pinned, and so are committed chunks pending
  upload (the metadata's pending set survives a crash; the pins are rebuilt
  from it);
- stored: the object store has it (a held chunk then needs no pin, and its
  cache file no sync: the store's copy is durable);
- shared: being pushed to its owner by the peer tier;
- deleting: the collector is deleting it; a seal of the same bytes waits,
  then writes it afresh.

The read-through chain (`tiers/chain.py`), the uploader and the collector
(`upload.py`) and the peer tier consult and change these states here, instead
of calling back into each other. Event-loop only: no locks.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import trio

from .. import metrics
from .cache import ChunkCache


class ChunkLedger:
    def __init__(self, cache: ChunkCache):
        self.cache = cache
        self._holds: collections.Counter[str] = collections.Counter()
        self._stored: set[str] = set()  # held chunks the store has: their pins are gone
        self._released: dict[str, trio.Event] = {}  # held chunks: set when the last hold goes
        self._deleting: dict[str, trio.Event] = {}
        self.sharing: set[str] = set()

    # ---- held: sealed for a commit ------------------------------------------------------
    def hold(self, chunk: str) -> None:
        self._holds[chunk] += 1
        if chunk not in self._stored:
            self.cache.pin(chunk)
        if chunk not in self._released:
            self._released[chunk] = trio.Event()

    def release(self, chunk: str) -> None:
        """Drop one hold (after the commit, or when the file is discarded)."""
        if chunk not in self._stored:
            self.cache.unpin(chunk)
        self._holds[chunk] -= 1
        if self._holds[chunk] <= 0:
            del self._holds[chunk]
            self._stored.discard(chunk)
            self._released.pop(chunk).set()

    def is_sealed(self, chunk: str) -> bool:
        return chunk in self._holds

    def released(self, chunk: str) -> trio.Event:
        """An event set when no commit holds `chunk` any more (set already if none does)."""
        event = self._released.get(chunk)
        if event is None:
            event = trio.Event()
            event.set()
        return event

    @property
    def holds(self) -> dict[str, int]:
        return dict(self._holds)

    # ---- pending upload and stored --------------------------------------------------------
    def pending(self, chunk: str) -> None:
        """Committed, not in the store yet: pinned until `stored(..., pending=True)`."""
        self.cache.pin(chunk)

    def stored(self, chunk: str, *, pending: bool = False) -> None:
        """The object store has `chunk` now: its pending pin (if `pending`) and
        the pins of its holds go, and so does its cache file's owed sync (the
        store's copy is durable; recovery after a power loss looks there)."""
        self.cache.sync_not_needed(chunk)
        if pending:
            self.cache.unpin(chunk)
        if chunk in self._holds and chunk not in self._stored:
            self._stored.add(chunk)
            for _ in range(self._holds[chunk]):
                self.cache.unpin(chunk)

    def in_store(self, chunk: str) -> bool:
        """Held, and the store has it (its early upload finished)."""
        return chunk in self._stored

    # ---- garbage ----------------------------------------------------------------------------
    def in_use(self, chunk: str) -> bool:
        """Held for a commit, pinned, or being deleted already: not for the collector."""
        return chunk in self._holds or self.cache.is_pinned(chunk) or chunk in self._deleting

    @contextlib.contextmanager
    def deleting(self, chunk: str) -> Iterator[None]:
        """The collector deletes `chunk` inside this block; seals of it wait."""
        done = self._deleting[chunk] = trio.Event()
        try:
            yield
        finally:
            del self._deleting[chunk]
            done.set()

    async def wait_not_deleting(self, chunk: str) -> None:
        while chunk in self._deleting:
            await self._deleting[chunk].wait()

    # ---- shared with the owner ------------------------------------------------------------
    def share_started(self, chunk: str) -> bool:
        """Mark `chunk` as being pushed to its owner; False if it already is."""
        if chunk in self.sharing:
            return False
        self.sharing.add(chunk)
        metrics.PEER_SHARES_PENDING.set(len(self.sharing))
        return True

    def share_ended(self, chunk: str) -> None:
        self.sharing.discard(chunk)
        metrics.PEER_SHARES_PENDING.set(len(self.sharing))
