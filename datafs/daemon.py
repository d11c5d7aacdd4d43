"""Wiring: open the state, recover, mount, run background tasks in one nursery.

Start-up order matters for "nothing committed is ever lost":
1. lock the state dir (one daemon per state dir: one node);
2. open the metadata engine (embedded LMDB, or a shared PostgreSQL) and the
   volume it holds: the first mount records the object store and chunk size,
   later ones (on any node) take them from there; the state dir remembers
   this node's id, so its pending uploads resume after a restart;
3. check the commits not known durable at the last stop (durability.py: a
   power loss may have taken chunks written within the flush interval; files
   naming lost chunks are cut short, each reported), free inodes orphaned by
   a crash (LMDB: no kernel holds them now; a shared volume leaves that to
   the collector, which knows who holds what open), drop cache files no
   metadata references (sealed but never committed);
4. check the object store, so a bad endpoint fails before the mount appears;
5. mount, then resume pending uploads in the background.
Shutdown (unmount, SIGTERM, SIGINT) commits every file with buffered writes,
gives pending uploads a short grace period, makes everything durable (the
last flush), then exits; what is still pending
is persisted and resumes at the next start. Nothing waits unbounded on the
way: requests waiting for a chunk or for cache space are ended (EIO, ENOSPC)
as soon as the mount is gone or a signal arrives, the last commits wait for
space at most the write-stall timeout, and uploads the grace period. The
daemon then leaves an exit report (`exit.json` in the state dir: what could
not be committed, what is not uploaded yet) that `datafs umount` reads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import resource
import signal
import socket
import time
import uuid

import pyfuse3
import trio

from . import errors, fuse_kernel, fuse_noflush, metrics, mounts, sdnotify
from .control import ControlError, ControlServer
from .chunks.cache import FD_CACHE_SIZE, ChunkCache
from .chunks.ledger import ChunkLedger
from .chunks.content import ContentService
from .config import CHUNK_SIZE_BYTES, Settings
from .durability import Durability
from .errors import MetaUnavailable, UsageError
from .fs import Operations
from .fuse_fallocate import FallocateBridge
from .meta.calls import MetaCalls
from .meta.kv import KV
from .meta.lmdb_kv import LmdbKV
from .meta.sessions import SessionKeeper
from .meta.store import ChunkRef, MetaStore
from .state_files import control_path, exit_report_path, lock_path, node_path, read_daemon_pid
from .tiers.chain import ChunkSource
from .tiers.faults import wrap_if_enabled as _with_test_faults
from .tiers.store import open_store
from .upload import Collector, Uploader

log = logging.getLogger(__name__)

STATUS_INTERVAL_SECONDS = 2.0
#: While requests wait for chunks or space, how often the daemon checks that
#: its mount is still there (after an unmount it ends those waits).
UNMOUNT_CHECK_SECONDS = 1.0
#: pyfuse3 serves each request in a task of its own and ends a task that finds
#: more than `min_tasks` others idle. Its default of 1 makes parallel readers
#: start and end a task every few requests; idle tasks cost a parked coroutine.
FUSE_IDLE_TASKS = 32
#: Requests handled at once (pyfuse3's default).
FUSE_MAX_TASKS = 99


def _raise_open_file_limit() -> None:
    """The chunk cache keeps up to FD_CACHE_SIZE descriptors open; the usual
    soft limit of 1024 would leave nothing for FUSE, LMDB and sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_CACHE_SIZE + 4096
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock_fd: int | None = None
        self.kv: KV | None = None
        self.store = None
        self.mounted = False
        self.volume: dict = {}
        self._upload_rate = 0.0
        self.exit_report: dict | None = None  # set at a clean exit

    # ---- blocking preparation (before trio starts) ---------------------------------
    def acquire_lock(self) -> None:
        state_dir = self.settings.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path(state_dir), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot use state dir {state_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                pid = read_daemon_pid(state_dir)
                raise UsageError(f"state dir {state_dir} is in use by another datafs daemon" + (f" (pid {pid})" if pid else "")) from None
            raise
        self._lock_fd = fd
        self.record_pid()

    def record_pid(self) -> None:
        """Write our pid into the lock file (called again after a fork)."""
        assert self._lock_fd is not None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _open_engine(self) -> KV:
        s = self.settings
        if not s.shared_meta:
            return LmdbKV(s.meta.partition("://")[2] if s.meta else str(s.lmdb_dir))
        from .meta.postgres_kv import PostgresKV, url_has_password

        if url_has_password(s.meta) and not os.environ.get("DATAFS_META"):
            raise UsageError("don't put the metadata password in --meta (it shows in the process list): "
                             "use --meta-password-file, DATAFS_META_PASSWORD, PGPASSWORD or ~/.pgpass")
        return PostgresKV(
            s.meta, volume=s.volume, password=s.database_password(),
            pool_size=s.meta_concurrency, timeout_seconds=s.meta_timeout_seconds,
        )

    def _open_volume(self) -> None:
        """Open the object store, creating the volume at its first mount (only
        once the store answers, so a typo is never recorded), or check this
        mount against the volume's record."""
        s = self.settings
        record = self.meta.volume()
        if record is None:
            if s.shared_meta and not s.store:
                raise UsageError(f"volume {s.volume!r} does not exist yet in {self.kv.describe()}: "
                                 "the first mount must give --store (s3://BUCKET/PREFIX)")
            self._open_store(s.store_url, s.s3_endpoint, s.s3_region)
            record = self.meta.init_volume({
                "name": s.volume, "uuid": str(uuid.uuid4()), "store": s.store_url,
                "s3_endpoint": s.s3_endpoint, "s3_region": s.s3_region,
                "chunk_size": CHUNK_SIZE_BYTES, "created": time.time(),
            })
        if int(record.get("chunk_size", CHUNK_SIZE_BYTES)) != CHUNK_SIZE_BYTES:
            raise UsageError(f"volume {record.get('name')!r} uses {record['chunk_size']}-byte chunks; this datafs uses {CHUNK_SIZE_BYTES}")
        if s.store and record.get("store") and s.store != record["store"]:
            raise UsageError(f"volume {record.get('name')!r} keeps its chunks in {record['store']}, not {s.store}: "
                             "leave out --store (later nodes need only --meta)")
        self.volume = record
        if self.store is None:
            self._open_store(
                record.get("store") or s.store_url,
                s.s3_endpoint or record.get("s3_endpoint", ""), s.s3_region or record.get("s3_region", ""),
            )

    def _open_store(self, url: str, endpoint: str, region: str) -> None:
        self.store = open_store(url, s3_endpoint=endpoint, s3_region=region, s3_timeouts={
            "connect_timeout_seconds": self.settings.s3_connect_timeout_seconds,
            "read_timeout_seconds": self.settings.s3_read_timeout_seconds,
        }, create_under=self.settings.state_dir)
        self.store.check()
        self.store = _with_test_faults(self.store)  # only with DATAFS_FAULTS set (tests)

    def _node_identity(self) -> int:
        """This node's id in the volume, kept in the state dir so that a restart
        resumes the uploads it owes. A state dir is one node of one volume."""
        if not self.meta.shared:
            return 1
        path = node_path(self.settings.state_dir)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if known.get("volume_uuid") == self.volume["uuid"] and known.get("node_id"):
            return int(known["node_id"])
        if known.get("volume_uuid"):
            raise UsageError(f"state dir {self.settings.state_dir} belongs to another volume ({known['volume_uuid']}): "
                             "give each volume its own --state-dir")
        node_id = self.meta.register_node()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"volume_uuid": self.volume["uuid"], "node_id": node_id, "meta": self.kv.describe()}))
        os.replace(tmp, path)
        return node_id

    def prepare(self) -> None:
        s = self.settings
        _raise_open_file_limit()
        self.kv = self._open_engine()
        self.meta = MetaStore(self.kv)
        try:
            self._open_volume()
            self.meta.node_id = self._node_identity()
        except MetaUnavailable as exc:
            raise UsageError(f"metadata engine {self.kv.describe()}: {exc}") from None
        shared = self.meta.shared
        self.calls = MetaCalls(
            remote=self.kv.remote, concurrency=s.meta_concurrency if self.kv.remote else 1,
            timeout_seconds=s.meta_timeout_seconds,
        )

        cache_dir = s.effective_cache_dir
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot use cache dir {cache_dir}: {exc.strerror}") from None
        self.cache = ChunkCache(cache_dir, s.cache_size_bytes, s.cache_min_free_bytes)
        self.cache.open()
        # A shared engine's commit is durable and seen by the fleet at once:
        # there a chunk is fsynced before it (durability.py).
        self.durability = Durability(self.meta, self.cache, self.calls, deferred=not shared,
                                     interval_seconds=s.flush_interval_seconds)
        self._recover()
        self.ledger = ChunkLedger(self.cache)
        self.source = ChunkSource(
            self.cache, self.store, wait_timeout_seconds=s.chunk_wait_timeout_seconds,
            space_wait_seconds=s.write_stall_timeout_seconds, ledger=self.ledger,
            defer_sync=self.durability.deferred,
        )
        self.uploader = Uploader(
            self.meta, self.cache, self.store, self.calls, s.upload_concurrency,
            max_backoff_seconds=s.upload_retry_max_seconds, ledger=self.ledger,
        )
        self.source.connect_uploader(self.uploader)
        orphan_grace = s.orphan_grace_seconds if shared else 0.0
        self.content = ContentService(self.meta, self.source, self.calls, self.uploader.enqueue, s.write_buffer_bytes,
                                      durability=self.durability)
        self.ops = Operations(
            self.meta, self.content, self.calls, statfs_path=cache_dir,
            attr_timeout_seconds=s.attr_timeout_seconds, entry_timeout_seconds=s.entry_timeout_seconds,
            fsync_waits_for=self.uploader.wait_for if s.fsync_waits_upload else None,
            orphan_grace_seconds=orphan_grace, durability=self.durability,
        )
        self.collector = Collector(
            self.meta, self.source, self.calls,
            interval_seconds=min(30.0, max(1.0, orphan_grace)) if shared else 30.0,
            grace_seconds=s.gc_grace_seconds if shared else 0.0, orphan_grace_seconds=orphan_grace,
            held_open=lambda ino: ino in self.ops.open_count or ino in self.ops.lookups,
        )
        self.ops.on_inode_deleted = self.collector.wake
        if not shared:  # nobody else reads this node's chunks: small uploads yield to requests (upload.py)
            self.uploader.idle_seconds = self.ops.idle_seconds
            self.uploader.yield_max_seconds = s.flush_interval_seconds
        self.collector.on_inode_deleted = self.collector.wake
        self.fallocate = FallocateBridge(self.ops.fallocate)
        self.peer_tier = self.peer_server = None
        if s.peer_listen:
            self._prepare_peers()
        self.sessions = SessionKeeper(
            self.meta, self.calls, open_inodes=lambda: set(self.ops.open_count),
            info={"mountpoint": str(s.mountpoint), "state_dir": str(s.state_dir), "peer": s.peer_listen},
            timeout_seconds=s.session_timeout_seconds,
            heartbeat_seconds=max(0.5, min(5.0, s.session_timeout_seconds / 6)),
        )

    def _prepare_peers(self) -> None:
        """The peer tier: a server for the other nodes, and a tier in this
        node's read chain that asks them first. Members come from the live
        sessions, so a node that stops heartbeating drops out by itself."""
        from .peers.client import PeerClient
        from .peers.server import PeerServer
        from .peers.tier import PeerTier

        s = self.settings
        secret = s.fleet_secret()
        host, _, port = s.peer_listen.rpartition(":")
        try:  # fail at mount time, not after the mount is up
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise UsageError(f"cannot listen on --peer-listen {s.peer_listen}: {exc.strerror}") from None
        self.peer_client = PeerClient(secret, io_timeout_seconds=s.peer_timeout_seconds)
        budget = trio.Semaphore(max(1, s.peer_inflight_bytes // CHUNK_SIZE_BYTES))
        self.peer_tier = PeerTier(
            self.meta.node_id, self.peer_client, self.cache, self.ledger,
            members=lambda: self.sessions.peers,
            holders=lambda chunk: self.calls(self.meta.chunk_holders, chunk),
            budget=budget,
        )
        self.source.peers = self.peer_tier
        self.peer_server = PeerServer(host.strip("[]"), int(port), secret, self.cache, on_miss=self._serve_miss,
                                      read_timeout_seconds=s.peer_timeout_seconds, budget=budget)
        enqueue = self.content.on_committed

        def committed(chunks: list[str], *args, **kwargs) -> None:
            enqueue(chunks, *args, **kwargs)
            self.peer_tier.share(chunks)

        self.content.on_committed = committed

    async def _serve_miss(self, chunk: str) -> bool:
        """A peer asks for a chunk this node does not have: the owner brings
        it (from the runner-up's cache after a join, else from the object
        store: once, for everyone); others say no."""
        if self.peer_tier is None or not self.peer_tier.is_owner(chunk):
            return False
        record = await self.calls(self.meta.chunk_record, chunk)
        if record is None:
            return False
        with trio.move_on_after(self.settings.peer_timeout_seconds):
            try:
                await self.source.fetch(ChunkRef(chunk, record[1]))
                return True
            except errors.FsError:
                return False
        return False

    def _recover(self) -> None:
        # First, while every chunk file is as the last run left it: commits
        # whose chunks a power loss took are cut back to what is on disk.
        self.durability.recover(self.store)
        orphans = [] if self.meta.shared else [ino for ino, _ in self.meta.orphans()]
        for ino in orphans:
            self.meta.delete_inode(ino)
        # Chunks this node uploaded early for files it never committed (it
        # was killed): garbage now, collected after the grace period.
        released = self.meta.release_early_uploads(self.meta.node_id)
        if released:
            log.info("uncommitted early uploads handed to the collector", extra={"chunks": released})
        # Chunks no metadata references (sealed, never committed), and chunks
        # whose file has the wrong size (fetched ones are not fsynced, so a
        # power loss can leave them short): drop them; the store has the rest.
        sizes = self.cache.sizes()
        records = self.meta.chunk_records(sizes)
        stray = []
        for chunk, size in sizes.items():
            record = records.get(chunk)
            if record is None or record[1] != size:
                stray.append(chunk)
        for chunk in stray:
            self.cache.remove(chunk)
        if orphans or stray:
            log.info("recovered after an unclean stop", extra={"orphan_inodes": len(orphans), "stray_chunks": len(stray)})

    def mount(self) -> None:
        s = self.settings
        options = fuse_kernel.mount_options(f"datafs:{s.state_dir}", "datafs")
        self.fallocate.install()  # fills a slot pyfuse3 leaves empty, during init()
        fuse_noflush.install()  # read-only files close without a FLUSH round trip
        try:
            pyfuse3.init(self.ops, str(s.mountpoint), options)
        except RuntimeError as exc:
            raise UsageError(f"cannot mount {s.mountpoint}: {exc}") from None
        self.mounted = True

    async def _tune_kernel(self) -> None:
        await fuse_kernel.tune(self.settings.mountpoint, self.settings.read_ahead_kb, self.settings.max_background)

    # ---- the event loop --------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.content.nursery = nursery
            self.source.nursery = nursery
            await self.sessions.start()
            await nursery.start(self.uploader.run)
            await nursery.start(self.collector.run)
            await nursery.start(self.sessions.run)
            if self.peer_server is not None:
                self.peer_tier.nursery = nursery
                try:
                    await nursery.start(self.peer_server.run)
                except OSError as exc:
                    raise UsageError(f"cannot listen on --peer-listen {self.settings.peer_listen}: {exc.strerror}") from None
            nursery.start_soon(self._on_signals)
            await nursery.start(self.durability.run)
            nursery.start_soon(self._tune_kernel)
            nursery.start_soon(self._measure_upload_rate)
            nursery.start_soon(self._end_waits_after_unmount)
            await nursery.start(ControlServer(control_path(self.settings.state_dir), self._control_routes()).run)
            await nursery.start(self.fallocate.run)
            log.info("mounted", extra={
                "mountpoint": str(self.settings.mountpoint), "store": self.store.describe(),
                "meta": self.kv.describe(), "volume": self.volume.get("name"), "node": self.meta.node_id,
            })
            # The kernel mount is up and every task that serves it has started.
            sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=mounted at {self.settings.mountpoint}")
            await pyfuse3.main(min_tasks=FUSE_IDLE_TASKS, max_tasks=FUSE_MAX_TASKS)
            sdnotify.notify("STOPPING=1\nSTATUS=committing open files and finishing uploads")
            await self.fallocate.stop()  # its requests end like pyfuse3's own: before the last commits
            lost = await self._commit_all()
            with trio.move_on_after(self.settings.shutdown_upload_grace_seconds):
                await self.uploader.wait_idle()
            if self.uploader.pending_count:
                log.warning("uploads still pending at exit; they resume at the next start", extra={"chunks": self.uploader.pending_count})
            try:
                await self.durability.flush()
            except (OSError, MetaUnavailable) as exc:
                log.error("the last flush failed: files closed in the last interval may not survive a power loss",
                          extra={"error": str(exc)})
            try:
                with trio.move_on_after(self.settings.meta_timeout_seconds):
                    await self.sessions.stop()
                    await self.calls.in_thread(self.meta.flush_counts)
            except MetaUnavailable as exc:
                log.warning("could not close the session cleanly; it expires by itself", extra={"error": str(exc)})
            self._write_exit_report(lost)
            nursery.cancel_scope.cancel()

    async def _commit_all(self) -> list[dict]:
        """Commit what open files still buffer; a commit waiting for cache space
        waits at most the write-stall timeout in all."""
        self.source.resume_waits()  # ended for the requests; the last commits may wait again
        async with trio.open_nursery() as nursery:
            async def deadline() -> None:
                await trio.sleep(self.settings.write_stall_timeout_seconds)
                self.source.abort_waits()

            nursery.start_soon(deadline)
            lost = await self.ops.commit_all()
            nursery.cancel_scope.cancel()
        return lost

    def _write_exit_report(self, lost: list[dict]) -> None:
        """What `datafs umount` tells the user: files whose writes could not be
        committed (lost), and committed chunks not in the object store yet."""
        snapshot = self.uploader.snapshot()
        report = {
            "pid": os.getpid(), "time": time.time(), "lost": lost,
            **{k: snapshot[k] for k in ("pending_chunks", "pending_bytes", "failing_chunks", "failing_sample")},
        }
        self.exit_report = report
        path = exit_report_path(self.settings.state_dir)
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(report))
            os.replace(tmp, path)
        except OSError as exc:
            log.error("could not write the exit report", extra={"path": str(path), "error": str(exc)})

    async def _end_waits_after_unmount(self) -> None:
        """After an unmount, pyfuse3.main returns only once every request handler
        has: a request waiting for a chunk (or for cache space) would hold the
        daemon, and `datafs umount`, for the whole wait. The kernel has already
        failed those requests, so end the waits as soon as the mount is gone."""
        while True:
            await trio.sleep(UNMOUNT_CHECK_SECONDS)
            if self.source.waiting and not self._still_mounted():
                log.info("unmounted while requests were waiting for chunks or space: ending their waits",
                         extra={"waiting": self.source.waiting})
                self.source.abort_waits()
                return

    def _still_mounted(self) -> bool:
        info = mounts.find_mount(self.settings.mountpoint)
        return info is not None and info.is_datafs and info.state_dir == self.settings.state_dir

    # ---- the control endpoint (datafs status, sync) ----------------------------------
    def _control_routes(self) -> dict:
        return {
            ("GET", "/status"): self._control_status,
            ("POST", "/pending"): self._control_pending,
            ("POST", "/retry"): self._control_retry,
            ("POST", "/interrupt"): self._control_interrupt,
            ("POST", "/fsck"): self._control_fsck,
            ("GET", "/fsck"): self._control_fsck_progress,
            ("GET", "/stats"): self._control_stats,
            ("POST", "/warm"): self._control_warm,
        }

    async def _control_status(self, query: dict, body: dict | None) -> dict:
        """Everything `datafs status` shows, from this daemon's own state. The
        upload numbers come from one snapshot of the uploader (the same state
        the metrics show), so failing chunks are always among the pending ones."""
        try:
            inodes = (await self.calls(self.meta.counts))["inodes"]
        except MetaUnavailable:
            inodes = None  # the engine is away: say so, and report the rest
        snapshot = self.uploader.snapshot()
        pinned_chunks, pinned_bytes = self.cache.pinned()
        unsaved = [c for c in self.ops.contents.values() if c.dirty]
        return {
            "pid": os.getpid(),
            "mountpoint": str(self.settings.mountpoint),
            "state_dir": str(self.settings.state_dir),
            "meta": self.kv.describe(),
            "volume": self.volume.get("name"),
            "volume_uuid": self.volume.get("uuid"),
            "store": self.store.describe(),
            "node": self.meta.node_id,
            "inodes": inodes,
            "pending_chunks": snapshot["pending_chunks"],
            "pending_bytes": snapshot["pending_bytes"],
            "pending_oldest_seconds": snapshot["pending_oldest_seconds"],
            "failing_chunks": snapshot["failing_chunks"],
            "failing_sample": snapshot["failing_sample"],
            "open_files_unsaved": len(unsaved),
            "open_failing_chunks": snapshot["open_failing_chunks"],
            "upload_bytes_per_second": self._upload_rate,
            "cache_bytes": self.cache.size_bytes,
            "cache_limit_bytes": self.cache.limit_bytes,
            "cache_pinned_bytes": pinned_bytes,
            "shared": self.meta.shared,
            "live_nodes": {str(n): r.get("host", "") for n, r in sorted(self.sessions.live.items())},
            "chunks_at_risk": len(self.sessions.at_risk),
            "peer_listen": self.settings.peer_listen,
            "peer_members": {str(n): a for n, a in sorted(self.sessions.peers.items())},
            "shares_pending": len(self.ledger.sharing),
            "at_risk_sample": [{"node": n, "chunk": c} for n, c in self.sessions.at_risk[:5]],
            **self.durability.snapshot(),
        }

    async def _control_stats(self, query: dict, body: dict | None) -> dict:
        """`datafs stats`: the daemon's counters since it started (the CLI
        shows the rates between two answers) and the upload queue now. No
        metadata call, so it answers at once even when the engine is away."""
        snapshot = self.uploader.snapshot()
        return {
            "time": time.monotonic(),
            **metrics.snapshot(),
            "pending_chunks": snapshot["pending_chunks"],
            "pending_bytes": snapshot["pending_bytes"],
            "pending_oldest_seconds": snapshot["pending_oldest_seconds"],
            "failing_chunks": snapshot["failing_chunks"],
            "cache_bytes": self.cache.size_bytes,
            "cache_limit_bytes": self.cache.limit_bytes,
        }

    async def _control_warm(self, query: dict, body: dict | None) -> dict:
        """`datafs warmup`: bring the chunks of one file's byte range into the
        local cache, from a peer or the object store, without sending them
        through the mount (no FUSE replies, nothing in its page cache). Chunks are
        fetched one after another: the command keeps `--parallel` requests
        in flight, so memory stays at that many chunks. Answers the range's
        bytes that are in the cache now, and those that did not fit."""
        body = body or {}
        ino, offset, length = body.get("inode"), body.get("offset", 0), body.get("length", 1 << 62)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (ino, offset, length)) or offset < 0 or length <= 0:
            raise ControlError(400, "warm needs an inode number, and a non-negative offset and positive length if given")
        first, last = offset // CHUNK_SIZE_BYTES, (offset + length - 1) // CHUNK_SIZE_BYTES
        try:
            refs = await self.calls(self.meta.chunks, ino, first, last)
            for ref in refs.values():
                if ref.chunk_id not in self.cache:
                    await self.source.fetch(ref)
        except MetaUnavailable as exc:
            raise ControlError(503, f"the metadata engine does not answer: {exc}") from None
        except errors.FsError as exc:
            raise ControlError(502, f"inode {ino}: {exc}") from None
        kept = sum(ref.length for ref in refs.values() if ref.chunk_id in self.cache)
        return {"bytes": kept, "not_kept_bytes": sum(ref.length for ref in refs.values()) - kept}

    async def _control_pending(self, query: dict, body: dict | None) -> dict:
        """Chunks not yet in the object store: this node's committed ones (from
        the uploader, as status counts them), or (with `inodes`) those of the
        named files, wherever in the fleet they are pending; and how many of
        them this node is still pushing to their owners (`sharing`)."""
        inodes = (body or {}).get("inodes")
        sharing = self.ledger.sharing if self.peer_tier is not None else None
        if inodes is None:
            snapshot = self.uploader.snapshot()
            answer = {
                "chunks": snapshot["pending_chunks"], "bytes": snapshot["pending_bytes"],
                "failing": snapshot["failing_chunks"], "failing_sample": snapshot["failing_sample"],
                "open_files_unsaved": sum(1 for c in self.ops.contents.values() if c.dirty),
            }
            if sharing is not None:
                answer["sharing"] = len(sharing)
            return answer
        if not isinstance(inodes, list) or not all(isinstance(i, int) for i in inodes):
            raise ControlError(400, "inodes must be a list of inode numbers")
        wanted: dict[str, int] = {}
        for ino in inodes:
            for ref in (await self.calls(self.meta.chunks, ino)).values():
                wanted[ref.chunk_id] = ref.length
        pending = {chunk for _, chunk, _ in await self.calls.in_thread(self.meta.all_pending)} & set(wanted)
        failing = {c: e for c, e in self.uploader.failing.items() if c in pending}
        answer = {
            "chunks": len(pending), "bytes": sum(wanted[c] for c in pending),
            "failing": len(failing), "failing_sample": dict(list(failing.items())[:3]),
        }
        if sharing is not None:
            answer["sharing"] = len(sharing & wanted.keys())
        return answer

    async def _control_retry(self, query: dict, body: dict | None) -> dict:
        self.uploader.retry_now()
        return {}

    async def _control_interrupt(self, query: dict, body: dict | None) -> dict:
        """End the waits of reads stuck on chunks (EIO now): `datafs umount`
        asks when readers keep the mount busy. A FUSE request the daemon has
        taken cannot be abandoned by its process, not even with SIGKILL."""
        return {"ended": self.source.interrupt_reads()}

    async def _control_fsck(self, query: dict, body: dict | None) -> dict:
        """`datafs fsck`: check (and with `repair`, fix) the volume beside the
        running mount; answers with the report once the check is done."""
        from .fsck import Fsck, FsckError

        if getattr(self, "_fsck", None) is not None:
            raise ControlError(409, "an fsck is already running on this mount")
        body = body or {}
        self._fsck = Fsck(
            self.meta, self.store, self.cache, self.calls, grace_seconds=self.settings.gc_grace_seconds,
            verify=bool(body.get("verify")), repair=bool(body.get("repair")), enqueue=self.uploader.enqueue,
        )
        try:
            return await self._fsck.run()
        except (FsckError, MetaUnavailable) as exc:
            raise ControlError(503, f"fsck could not finish: {exc}") from None
        finally:
            self._fsck = None

    async def _control_fsck_progress(self, query: dict, body: dict | None) -> dict:
        fsck = getattr(self, "_fsck", None)
        return {"running": fsck is not None, **(fsck.progress if fsck is not None else {})}

    async def _on_signals(self) -> None:
        """SIGTERM/SIGINT unmount cleanly; SIGUSR1 retries failing uploads now."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    self.uploader.retry_now()
                    continue
                log.info("signal received, unmounting", extra={"signal": signal.Signals(signum).name})
                pyfuse3.terminate()
                self.source.abort_waits()  # main() returns once no request is left waiting
                return

    async def _measure_upload_rate(self) -> None:
        """Upload throughput over the last interval, for `datafs status`."""
        last_bytes, last_time = self.uploader.uploaded_bytes, time.monotonic()
        while True:
            await trio.sleep(STATUS_INTERVAL_SECONDS)
            now = time.monotonic()
            self._upload_rate = (self.uploader.uploaded_bytes - last_bytes) / (now - last_time)
            last_bytes, last_time = self.uploader.uploaded_bytes, now

    def close(self) -> None:
        if self.mounted:
            pyfuse3.close(unmount=True)
            self.mounted = False
        if getattr(self, "cache", None) is not None:
            self.cache.close()
        if self.kv is not None:
            self.kv.close()
            self.kv = None
