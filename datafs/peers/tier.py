"""The peer tier in the read-through chain, and sharing after a commit.

Read: a chunk missing from the local cache is asked of its owner (the live
member that rendezvous hashing picks); the owner serves it from its cache or
fetches it from the object store itself, once for the whole datacenter. If
the owner fails, or the chunk is not uploaded yet, the nodes that hold it
(recorded in the metadata as holders of a pending upload) are asked. Every
body is verified against the chunk id before it is used: a peer that sends
wrong bytes is logged, counted, and skipped. If no peer can give it, the
caller goes on to the object store: a peer that is down or slow only costs
the client's bounded timeouts.

Write: after a commit, each new chunk is pushed to its owner (when that is
another node), in the background and bounded in concurrency, so the owner
can serve it at once, before the upload to the object store ends.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import trio

from .. import metrics
from ..chunks import chunk_id as hash_chunk
from ..chunks.cache import ChunkCache
from ..chunks.ledger import ChunkLedger
from . import ownership
from .client import PeerClient, PeerError

log = logging.getLogger(__name__)


class PeerTier:
    tier = "peer"

    def __init__(
        self, node_id: int, client: PeerClient, cache: ChunkCache, ledger: ChunkLedger, *,
        members: Callable[[], dict[int, str]],
        holders: Callable[[str], Awaitable[list[int]]],
        share_concurrency: int = 4,
        budget: trio.Semaphore | None = None,
    ):
        self.node_id = node_id
        self.client = client
        self.cache = cache
        self.ledger = ledger
        self.members = members
        self.holders = holders
        self.share_limiter = trio.CapacityLimiter(share_concurrency)
        # Chunk bodies in memory at once for peer traffic (fetches here, the
        # server's PUTs there; shares are sent from the cache file):
        # `peer_inflight_bytes` in whole chunks.
        self.budget = budget or trio.Semaphore(16)
        self.nursery: trio.Nursery | None = None

    def owner(self, chunk: str) -> int | None:
        return ownership.owner(chunk, self.members())

    def is_owner(self, chunk: str) -> bool:
        members = self.members()
        return not members or ownership.owner(chunk, members) == self.node_id

    def plan(self, chunk: str, holders: list[int] = ()) -> list[tuple[int, bool]]:
        """Whom to ask for `chunk`, in order, and whether each may only answer
        from its cache. The owner (when another node) may fetch it from the
        object store for everyone. The runner-up is asked for its cached copy:
        after a join the new owner is empty but the previous one, now the
        runner-up, still holds the chunk; and when the owner is down every
        node asks the same second choice. Holders of a chunk not uploaded yet
        come last."""
        members = self.members()
        ranking = ownership.ranked(chunk, members)
        plan: list[tuple[int, bool]] = []
        if ranking and ranking[0] != self.node_id:
            plan.append((ranking[0], False))
        runner_up = next((n for n in ranking[1:] if n != self.node_id), None)
        if runner_up is not None:
            plan.append((runner_up, True))
        asked = {node for node, _ in plan}
        for node in holders:
            if node != self.node_id and node in members and node not in asked:
                plan.append((node, True))
                asked.add(node)
        return plan

    async def fetch(self, chunk: str, length: int, *, pending: bool = False) -> bytes | bytearray | None:
        """The chunk from a peer, verified; None when no peer could give it.
        `pending`: the object store may not have it yet, so ask its holders too."""
        members = self.members()
        first = self.plan(chunk)
        data = await self._ask(chunk, length, first, members)
        if data is None and pending:
            asked = {node for node, _ in first}
            extra = [step for step in self.plan(chunk, await self.holders(chunk)) if step[0] not in asked]
            data = await self._ask(chunk, length, extra, members)
        return data

    async def _ask(self, chunk: str, length: int, plan: list[tuple[int, bool]],
                   members: dict[int, str]) -> bytes | bytearray | None:
        for node, cached_only in plan:
            address = members.get(node)
            if address is None:
                continue
            started = time.monotonic()
            try:
                async with self.budget:  # received and hashed on one worker thread
                    data, actual = await self.client.get(address, chunk, length, cached_only=cached_only,
                                                         verify=hash_chunk)
            except PeerError as exc:
                if not exc.absent:
                    metrics.CHUNK_FETCHES.labels(self.tier, "error").inc()
                    log.info("peer could not give a chunk", extra={"chunk": chunk, "node": node, "error": str(exc)})
                continue
            if actual != chunk:
                metrics.CHUNK_FETCHES.labels(self.tier, "corrupt").inc()
                log.error("a peer sent bytes that do not match their chunk id",
                          extra={"chunk": chunk, "node": node, "actual": actual})
                continue
            metrics.CHUNK_FETCHES.labels(self.tier, "ok").inc()
            metrics.CHUNK_FETCH_SECONDS.labels(self.tier).observe(time.monotonic() - started)
            return data
        return None

    # ---- sharing ------------------------------------------------------------------------
    def share(self, chunk_ids: list[str]) -> None:
        """Push newly committed chunks to their owners, in the background."""
        if self.nursery is None:
            return
        for chunk in chunk_ids:
            owner = self.owner(chunk)
            if owner is None or owner == self.node_id or not self.ledger.share_started(chunk):
                continue
            self.nursery.start_soon(self._share_one, chunk, owner)

    async def _share_one(self, chunk: str, owner: int) -> None:
        try:
            async with self.share_limiter:
                address = self.members().get(owner)
                if address is None:
                    return
                await self.client.put(address, chunk, path=self.cache.path(chunk))  # sendfile from the cache
                metrics.PEER_SHARES.labels("ok").inc()
        except PeerError as exc:
            metrics.PEER_SHARES.labels("error").inc()
            log.info("sharing a chunk with its owner failed; it reads it from the store",
                     extra={"chunk": chunk, "node": owner, "error": str(exc)})
        finally:
            self.ledger.share_ended(chunk)
