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
from . import ownership
from .client import PeerClient, PeerError

log = logging.getLogger(__name__)


class PeerTier:
    tier = "peer"

    def __init__(
        self, node_id: int, client: PeerClient, cache: ChunkCache, *,
        members: Callable[[], dict[int, str]],
        holders: Callable[[str], Awaitable[list[int]]],
        share_concurrency: int = 4, hash_limiter: trio.CapacityLimiter | None = None,
    ):
        self.node_id = node_id
        self.client = client
        self.cache = cache
        self.members = members
        self.holders = holders
        self.hash_limiter = hash_limiter or trio.CapacityLimiter(2)
        self.share_limiter = trio.CapacityLimiter(share_concurrency)
        self.sharing: set[str] = set()
        self.nursery: trio.Nursery | None = None

    def owner(self, chunk: str) -> int | None:
        return ownership.owner(chunk, self.members())

    def is_owner(self, chunk: str) -> bool:
        members = self.members()
        return not members or ownership.owner(chunk, members) == self.node_id

    async def fetch(self, chunk: str, length: int, *, pending: bool = False) -> bytes | None:
        """The chunk from a peer, verified; None when no peer could give it.
        `pending`: the object store does not have it yet, so ask its holders."""
        members = self.members()
        candidates = []
        owner = ownership.owner(chunk, members)
        if owner is not None and owner != self.node_id:
            candidates.append(owner)
        if pending:
            for node in await self.holders(chunk):
                if node != self.node_id and node in members and node not in candidates:
                    candidates.append(node)
        for node in candidates:
            started = time.monotonic()
            try:
                data = await self.client.get(members[node], chunk, length)
            except PeerError as exc:
                metrics.CHUNK_FETCHES.labels(self.tier, "error").inc()
                log.info("peer could not give a chunk", extra={"chunk": chunk, "node": node, "error": str(exc)})
                continue
            actual = await trio.to_thread.run_sync(hash_chunk, data, limiter=self.hash_limiter)
            if actual != chunk:
                metrics.CHUNK_FETCHES.labels(self.tier, "corrupt").inc()
                log.error("a peer sent bytes that do not match their chunk id",
                          extra={"chunk": chunk, "node": node, "actual": actual})
                continue
            metrics.CHUNK_FETCHES.labels(self.tier, "ok").inc()
            metrics.CHUNK_FETCH_SECONDS.labels(self.tier).observe(time.monotonic() - started)
            return bytes(data)
        return None

    # ---- sharing ------------------------------------------------------------------------
    def share(self, chunk_ids: list[str]) -> None:
        """Push newly committed chunks to their owners, in the background."""
        if self.nursery is None:
            return
        for chunk in chunk_ids:
            owner = self.owner(chunk)
            if owner is None or owner == self.node_id or chunk in self.sharing:
                continue
            self.sharing.add(chunk)
            metrics.PEER_SHARES_PENDING.set(len(self.sharing))
            self.nursery.start_soon(self._share_one, chunk, owner)

    async def _share_one(self, chunk: str, owner: int) -> None:
        try:
            async with self.share_limiter:
                address = self.members().get(owner)
                if address is None:
                    return
                data = await trio.to_thread.run_sync(self._read_whole, chunk, limiter=self.hash_limiter)
                if data is None:
                    return
                await self.client.put(address, chunk, data)
                metrics.PEER_SHARES.labels("ok").inc()
        except PeerError as exc:
            metrics.PEER_SHARES.labels("error").inc()
            log.info("sharing a chunk with its owner failed; it reads it from the store",
                     extra={"chunk": chunk, "node": owner, "error": str(exc)})
        finally:
            self.sharing.discard(chunk)
            metrics.PEER_SHARES_PENDING.set(len(self.sharing))

    def _read_whole(self, chunk: str) -> bytes | None:
        try:
            return self.cache.path(chunk).read_bytes()
        except FileNotFoundError:
            return None
