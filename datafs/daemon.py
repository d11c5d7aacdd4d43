"""Wiring: open the state, recover, mount, run background tasks in one nursery.

Start-up order matters for "nothing committed is ever lost":
1. lock the state dir (one daemon per state dir);
2. open metadata, free inodes orphaned by a crash (no kernel holds them now),
   drop cache files no metadata references (sealed but never committed);
3. check the object store, so a bad endpoint fails before the mount appears;
4. mount, then resume pending uploads in the background.
Shutdown (unmount, SIGTERM, SIGINT) commits every file with buffered writes,
gives pending uploads a short grace period, then exits; what is still pending
is persisted and resumes at the next start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import resource
import signal
import time
from pathlib import Path

import pyfuse3
import trio

from . import mounts
from .chunks.cache import FD_CACHE_SIZE, ChunkCache
from .chunks.content import ContentService
from .config import Settings
from .errors import UsageError
from .fs import Operations
from .meta.lmdb_kv import LmdbKV
from .meta.store import MetaStore
from .tiers.chain import ChunkSource
from .tiers.store import open_store
from .upload import Collector, Uploader

log = logging.getLogger(__name__)

SHUTDOWN_UPLOAD_GRACE_SECONDS = 10.0
STATUS_INTERVAL_SECONDS = 2.0
META_SYNC_INTERVAL_SECONDS = 5.0


def lock_path(state_dir: Path) -> Path:
    return state_dir / "daemon.lock"


def status_path(state_dir: Path) -> Path:
    return state_dir / "status.json"


def daemon_running(state_dir: Path) -> bool:
    """Whether a daemon holds this state dir's lock (robust to pid reuse)."""
    try:
        fd = os.open(lock_path(state_dir), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def read_daemon_pid(state_dir: Path) -> int | None:
    try:
        return int(lock_path(state_dir).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


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
        self.kv: LmdbKV | None = None
        self.mounted = False

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

    def prepare(self) -> None:
        s = self.settings
        _raise_open_file_limit()
        self.kv = LmdbKV(str(s.lmdb_dir))
        self.meta = MetaStore(self.kv)
        self.meta.init_root()
        self.store = open_store(s.store_url, s3_endpoint=s.s3_endpoint, s3_region=s.s3_region)
        self.store.check()
        cache_dir = s.effective_cache_dir
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot use cache dir {cache_dir}: {exc.strerror}") from None
        self.cache = ChunkCache(cache_dir, s.cache_size_bytes, s.cache_min_free_bytes)
        self.cache.open()
        self._recover()
        self.meta_limiter = trio.CapacityLimiter(1)
        self.source = ChunkSource(self.cache, self.store, wait_timeout_seconds=s.chunk_wait_timeout_seconds)
        self.uploader = Uploader(self.meta, self.cache, self.store, self.meta_limiter, s.upload_concurrency)
        self.source.connect_uploader(self.uploader)
        self.collector = Collector(self.meta, self.source, self.meta_limiter)
        self.content = ContentService(self.meta, self.source, self.meta_limiter, self.uploader.enqueue, s.write_buffer_bytes)
        self.ops = Operations(
            self.meta, self.content, self.meta_limiter, statfs_path=cache_dir,
            attr_timeout_seconds=s.attr_timeout_seconds, entry_timeout_seconds=s.entry_timeout_seconds,
            on_inode_deleted=self.collector.wake,
            fsync_waits_for=self.uploader.wait_for if s.fsync_waits_upload else None,
        )

    def _recover(self) -> None:
        orphans = self.meta.orphans()
        for ino in orphans:
            self.meta.delete_inode(ino)
        # Chunks no metadata references (sealed, never committed), and chunks
        # whose file has the wrong size (fetched ones are not fsynced, so a
        # power loss can leave them short): drop them; the store has the rest.
        stray = []
        for chunk, size in self.cache.sizes().items():
            record = self.meta.chunk_record(chunk)
            if record is None or record[1] != size:
                stray.append(chunk)
        for chunk in stray:
            self.cache.remove(chunk)
        if orphans or stray:
            log.info("recovered after an unclean stop", extra={"orphan_inodes": len(orphans), "stray_chunks": len(stray)})

    def mount(self) -> None:
        s = self.settings
        options = set(pyfuse3.default_options)
        options |= {f"fsname=datafs:{s.state_dir}", "subtype=datafs", "noatime"}
        if os.geteuid() == 0:
            options.add("allow_other")
        try:
            pyfuse3.init(self.ops, str(s.mountpoint), options)
        except RuntimeError as exc:
            raise UsageError(f"cannot mount {s.mountpoint}: {exc}") from None
        self.mounted = True

    async def _tune_readahead(self) -> None:
        """Raise the mount's readahead so sequential reads arrive in large
        requests. The kernel resets it while it handles FUSE_INIT, which comes
        after the main loop starts, so set it once that is done."""
        info = mounts.find_mount(self.settings.mountpoint)
        if info is None:
            return
        path = Path("/sys/class/bdi") / info.device / "read_ahead_kb"
        wanted = str(self.settings.read_ahead_kb)
        for _ in range(50):
            await trio.sleep(0.05)
            try:
                path.write_text(wanted)
                if path.read_text().strip() == wanted:
                    return
            except OSError as exc:
                log.info("could not set readahead", extra={"path": str(path), "error": exc.strerror})
                return

    # ---- the event loop --------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.content.nursery = nursery
            self.source.nursery = nursery
            await nursery.start(self.uploader.run)
            await nursery.start(self.collector.run)
            nursery.start_soon(self._on_signals)
            nursery.start_soon(self._sync_periodically)
            nursery.start_soon(self._tune_readahead)
            nursery.start_soon(self._write_status_periodically)
            log.info("mounted", extra={"mountpoint": str(self.settings.mountpoint), "store": self.store.describe()})
            await pyfuse3.main()
            await self.ops.commit_all()
            with trio.move_on_after(SHUTDOWN_UPLOAD_GRACE_SECONDS):
                await self.uploader.wait_idle()
            if self.uploader.pending_count:
                log.warning("uploads still pending at exit; they resume at the next start", extra={"chunks": self.uploader.pending_count})
            nursery.cancel_scope.cancel()

    async def _on_signals(self) -> None:
        """SIGTERM/SIGINT unmount cleanly; SIGUSR1 retries failing uploads now."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    self.uploader.retry_now()
                    continue
                log.info("signal received, unmounting", extra={"signal": signal.Signals(signum).name})
                pyfuse3.terminate()
                return

    async def _sync_periodically(self) -> None:
        while True:
            await trio.sleep(META_SYNC_INTERVAL_SECONDS)
            await trio.to_thread.run_sync(self.meta.sync, limiter=self.meta_limiter)

    async def _write_status_periodically(self) -> None:
        """Publish live numbers (upload throughput, failing chunks) for `datafs status`."""
        path = status_path(self.settings.state_dir)
        last_bytes, last_time = self.uploader.uploaded_bytes, time.monotonic()
        while True:
            await trio.sleep(STATUS_INTERVAL_SECONDS)
            now = time.monotonic()
            snapshot = self.uploader.snapshot()
            snapshot["upload_bytes_per_second"] = (snapshot["uploaded_bytes"] - last_bytes) / (now - last_time)
            snapshot["cache_bytes"] = self.cache.size_bytes
            snapshot["written_at"] = time.time()
            last_bytes, last_time = snapshot["uploaded_bytes"], now
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot))
            tmp.rename(path)

    def close(self) -> None:
        if self.mounted:
            pyfuse3.close(unmount=True)
            self.mounted = False
        if getattr(self, "cache", None) is not None:
            self.cache.close()
        if self.kv is not None:
            self.kv.close()
            self.kv = None
