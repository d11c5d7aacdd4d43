"""A node's session in a shared metadata engine, and its housekeeping.

Each node that mounts a shared volume keeps a session record (`s <node>`) whose
heartbeat it refreshes every `heartbeat_seconds`; a session silent for
`timeout_seconds` is dead to the others (clocks are assumed to agree within a
few seconds, as NTP keeps them). From the same loop the node:
- records which inodes it holds open (`O <ino> <node>`), so an inode unlinked
  on another node is not freed under this node's descriptors;
- flushes its inode-count delta (a per-node counter: creates touch no hot key);
- reclaims dead sessions: their open markers go, so the inodes they held
  open-unlinked can be freed; their pending uploads stay, to resume when the
  node comes back (`at_risk` lists them until then).

On an embedded engine (LMDB, one node) there are no sessions: only the
count flush runs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

import trio

from .. import errors, metrics
from .calls import MetaCalls
from .store import MetaStore

log = logging.getLogger(__name__)


class SessionKeeper:
    def __init__(
        self, meta: MetaStore, calls: MetaCalls, *, open_inodes: Callable[[], set[int]],
        info: dict, heartbeat_seconds: float = 5.0, timeout_seconds: float = 60.0,
        markers_interval_seconds: float = 1.0,
    ):
        self.meta = meta
        self.calls = calls
        self.open_inodes = open_inodes
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), **info}
        self.heartbeat_seconds = heartbeat_seconds
        self.timeout_seconds = timeout_seconds
        self.markers_interval_seconds = markers_interval_seconds
        self._marked: set[int] = set()
        #: Live sessions as last read: node id -> record.
        self.live: dict[int, dict] = {}
        #: Live nodes that serve chunks: node id -> HOST:PORT (membership of the peer tier).
        self.peers: dict[int, str] = {}
        #: Pending uploads whose only holder is a node that is gone: (node, chunk).
        self.at_risk: list[tuple[int, str]] = []

    async def start(self) -> None:
        """Before the mount serves: forget what this node's previous run left
        (open markers of a crashed run) and announce the session."""
        if not self.meta.shared:
            return
        await self.calls.in_thread(self.meta.reclaim_session, self.meta.node_id)
        await self.beat()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_beat = 0.0
        while True:
            try:
                if self.meta.shared:
                    await self.sync_markers()
                    if time.monotonic() >= next_beat:
                        await self.beat()
                        next_beat = time.monotonic() + self.heartbeat_seconds
                await self.calls.in_thread(self.meta.flush_counts)
            except errors.MetaUnavailable as exc:
                log.warning("session upkeep failed: metadata engine unavailable", extra={"error": str(exc)})
            await trio.sleep(self.markers_interval_seconds if self.meta.shared else self.heartbeat_seconds)

    async def sync_markers(self) -> None:
        now_open = set(self.open_inodes())
        opened, closed = now_open - self._marked, self._marked - now_open
        if opened or closed:
            await self.calls.in_thread(self.meta.update_open_markers, opened, closed)
            self._marked = now_open

    async def beat(self) -> None:
        await self.calls.in_thread(self.meta.heartbeat, self.info)
        sessions = await self.calls.in_thread(self.meta.sessions)
        now = time.time()
        live, dead = {}, []
        for node, record in sessions.items():
            if now - float(record.get("heartbeat", 0)) > self.timeout_seconds:
                dead.append(node)
            else:
                live[node] = record
        for node in dead:
            if node == self.meta.node_id:
                continue
            dropped = await self.calls.in_thread(self.meta.reclaim_session, node)
            log.warning("reclaimed the session of a node that stopped answering",
                        extra={"node": node, "open_markers": dropped, "host": sessions[node].get("host")})
        self.live = live
        self.peers = {node: record["peer"] for node, record in live.items() if record.get("peer")}
        metrics.SESSIONS_LIVE.set(len(live))
        metrics.PEER_MEMBERS.set(len(self.peers))
        pending = await self.calls.in_thread(self.meta.all_pending)
        self.at_risk = [(node, chunk) for node, chunk, _ in pending if node not in live]

    async def stop(self) -> None:
        """A clean unmount: nothing left open, session gone."""
        if not self.meta.shared:
            return
        await self.calls.in_thread(self.meta.update_open_markers, (), self._marked)
        self._marked = set()
        await self.calls.in_thread(self.meta.end_session)
