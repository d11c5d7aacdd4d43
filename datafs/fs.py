"""The pyfuse3 Operations: thin, typed, and the only place that speaks errno.

Every handler goes through `_fuse_op`, which turns `FsError`/`OSError` into the
matching `FUSEError` and anything unexpected into EIO with a log line, so a bug
never takes the daemon (and with it the kernel mount) down.

Lifetime rules (pyfuse3's lookup-count contract): every reply that returns an
entry (lookup, create, mkdir, mknod, symlink, link, each readdirplus entry)
adds one to the inode's lookup count; `forget` takes them away. An inode whose
last name is gone is only deleted once no lookup and no open handle remains, so
a file unlinked while open stays readable and writable through its descriptors.

Metadata calls go through `MetaCalls`: on LMDB they run inline (memory-mapped
reads and small write transactions take microseconds, while a hop to a worker
thread costs ~90 us and halved file-creation throughput when measured); on a
remote engine every call runs in a worker thread behind the engine's own
limiter, so no FUSE request waits on the network on the event loop. Work that
can be large or waits on the disk (large content commits, freeing a big file,
fsync) always runs in a thread.

`close()` makes a file visible and safe from a crash of the daemon; `fsync()`
makes it safe from a power loss (durability.py: its chunks, then the
metadata); the rest becomes durable within the flush interval.

Across nodes (a shared engine), the consistency model is close-to-open: an
`open()` compares the inode's size and mtime with what this node last saw and
drops the kernel's cached pages when another node changed the file. Names and
attributes are cached by the kernel for the entry/attribute timeout (1 s). An
inode that loses its last name is freed only once no node holds it open: each
node records its open inodes in the engine (`SessionKeeper`), and a shared
volume waits `orphan_grace_seconds` before freeing, which covers an open on
another node that is not recorded yet.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pyfuse3
import trio

from . import errors, metrics
from .chunks.content import ContentService, FileContent
from .config import CHUNK_SIZE_BYTES
from .durability import Durability
from .meta.calls import _ABANDON_KW, MetaCalls
from .meta.store import Inode, MetaStore

log = logging.getLogger(__name__)

BLOCK_SIZE_BYTES = 1 << 20  # st_blksize: the I/O size tools like cp pick
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10  # <linux/falloc.h>


def _fuse_op(func: Callable[..., Any]) -> Callable[..., Any]:
    name = func.__name__
    # Bound once: every request passes here, and the two label lookups per
    # request were 3% of the event loop's busy time in a parallel read of
    # small files (py-spy).
    seconds, succeeded = metrics.FUSE_OP_SECONDS.labels(name), metrics.FUSE_OPS.labels(name, "ok")

    @functools.wraps(func)
    async def wrapper(self: "Operations", *args: Any) -> Any:
        started = self.last_request = time.monotonic()
        result = "ok"
        try:
            return await func(self, *args)
        except pyfuse3.FUSEError as exc:
            result = errno.errorcode.get(exc.errno, "error")
            raise
        except errors.FsError as exc:
            result = errno.errorcode.get(exc.errno, "error")
            if exc.errno == errno.EIO:
                log.error("request failed", extra={"op": name, "request": _brief(args), "error": str(exc)})
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            code = exc.errno or errno.EIO
            result = errno.errorcode.get(code, "error")
            if code not in (errno.ENOSPC, errno.EDQUOT):
                log.error("request failed with an OS error", extra={"op": name, "request": _brief(args), "error": str(exc)})
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            result = "EIO"
            log.exception("unexpected error in request", extra={"op": name, "request": _brief(args)})
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            (succeeded if result == "ok" else metrics.FUSE_OPS.labels(name, result)).inc()
            seconds.observe(time.monotonic() - started)

    return wrapper


def _brief(args: tuple) -> str:
    return ", ".join(
        f"<{len(a)} bytes>" if isinstance(a, (bytes, memoryview)) and len(a) > 64 else repr(a)
        for a in args if not isinstance(a, pyfuse3.RequestContext)
    )


PREFETCH_MAX_WINDOW_CHUNKS = 16
#: A read that is not part of a sequential run (a random reader, page faults
#: of a memory-mapped file) gets the kernel only the pages it asked for, and
#: every other page of the chunk costs one more request later: each a round
#: trip through this daemon (4 fio jobs of random 4 KiB reads of a cached
#: 1 GiB file: 22-25k requests/s, so ten seconds before the page cache holds
#: the file). Such a read's whole chunk is put in the kernel's page cache
#: right after (FUSE notify_store). A later read of a pushed chunk means the
#: kernel dropped its pages since (fadvise DONTNEED, drop_caches, memory
#: pressure): it is pushed again, once in this long at most.
PUSH_CHUNK_AGAIN_SECONDS = 1.0
#: Only reads smaller than this push: a sequential reader's requests are
#: 1 MiB (the kernel's readahead, several in flight and not always in
#: order), and pushing the chunks under them cost a sequential read of the
#: local cache, page cache dropped, a third of its speed.
PUSH_MAX_READ_BYTES = 256 << 10
#: Pushes wait while the node's available memory is under this share of it:
#: a working set larger than memory would have every small read bring a
#: whole chunk back in, to push out another.
PUSH_MIN_AVAILABLE_MEMORY = 0.25
#: A request that changes what the kernel caches of a file (an open for
#: writing, a truncate, another node's version opened) waits this long for
#: pushes of that file in flight. A push waits for reads of its pages that
#: the kernel sent, so waiting longer could hold every request task while
#: the read that would end the wait finds none: past this, the request goes
#: on and the file's cached pages are dropped once the push is over.
PUSH_WAIT_SECONDS = 1.0
#: (inode, chunk) pairs remembered as pushed.
PUSHED_CHUNKS_REMEMBERED = 16384
#: Entries fetched per metadata call while listing a directory.
READDIR_BATCH = 1000
#: Inodes whose last-seen (size, mtime) this node remembers for close-to-open.
SEEN_INODES_MAX = 100_000


class _Handle:
    """An open file. Tracks the read pattern: while reads stay sequential the
    prefetch window doubles (1, 2, 4, ... chunks); a seek resets it."""

    __slots__ = ("ino", "content", "next_offset", "window", "writes")

    def __init__(self, ino: int, content: FileContent, writes: bool):
        self.ino = ino
        self.content = content
        self.next_offset = 0
        self.window = 0
        self.writes = writes  # opened for writing

    def note_read(self, offset: int, size: int) -> None:
        # Kernel readahead issues several requests at once, so "sequential"
        # allows requests slightly out of order around the expected offset.
        if self.next_offset - CHUNK_SIZE_BYTES <= offset <= self.next_offset + CHUNK_SIZE_BYTES:
            self.window = min(max(1, self.window * 2), PREFETCH_MAX_WINDOW_CHUNKS)
        else:
            self.window = 0
        self.next_offset = max(self.next_offset, offset + size) if self.window else offset + size
        if self.window:
            self.content.prefetch((offset + size) // CHUNK_SIZE_BYTES + 1, self.window)


class _DirHandle:
    """An open directory: the last batch of entries read from the metadata
    engine, so the kernel's small readdir requests cost one call per batch."""

    __slots__ = ("ino", "start", "entries")

    def __init__(self, ino: int):
        self.ino = ino
        self.start = -1
        self.entries: list[tuple[int, bytes, Inode]] = []

    def keep(self, start: int, entries: list[tuple[int, bytes, Inode]]) -> None:
        self.start, self.entries = start, entries

    def batch_from(self, start: int) -> list[tuple[int, bytes, Inode]] | None:
        """Cached entries from offset `start` on; None: read a new batch.
        Offset 0 (a new listing, or rewinddir) always reads afresh."""
        if start == 0 or self.start < 0 or start < self.start:
            return None
        rest = [entry for entry in self.entries if entry[0] >= start]
        if rest:
            return rest
        return [] if len(self.entries) < READDIR_BATCH else None


class _AvailableMemory:
    """Whether the node's available memory is at least a share of its total
    (/proc/meminfo, read at most once a second)."""

    def __init__(self, share: float, path: str = "/proc/meminfo"):
        self.share = share
        self.path = path
        self._checked = -1.0
        self._plentiful = True

    def plentiful(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                with open(self.path) as f:
                    fields = dict(line.split(":", 1) for line in f)
                total, available = (int(fields[k].split()[0]) for k in ("MemTotal", "MemAvailable"))
                self._plentiful = available >= self.share * total
            except (OSError, KeyError, ValueError):
                self._plentiful = False
        return self._plentiful


class _Pushes:
    """Chunks of one inode being put in the kernel's page cache now."""

    __slots__ = ("count", "done")

    def __init__(self) -> None:
        self.count = 0
        self.done = trio.Event()


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, meta: MetaStore, content: ContentService, calls: MetaCalls, *,
        statfs_path: Path, attr_timeout_seconds: float, entry_timeout_seconds: float,
        on_inode_deleted: Callable[[], None] = lambda: None,
        fsync_waits_for: Callable[[set[str]], Awaitable[None]] | None = None,
        orphan_grace_seconds: float = 0.0, durability: Durability | None = None,
    ):
        super().__init__()
        self.meta = meta
        self.durability = durability
        self.svc = content
        self.calls = calls
        self.orphan_grace_ns = int(orphan_grace_seconds * 1e9)
        self.statfs_path = statfs_path
        self.attr_timeout = attr_timeout_seconds
        self.entry_timeout = entry_timeout_seconds
        self.on_inode_deleted = on_inode_deleted
        self.fsync_waits_for = fsync_waits_for
        self.last_request = 0.0  # time.monotonic() of the last request (background work yields to them)
        self.lookups: collections.Counter[int] = collections.Counter()
        self.open_count: collections.Counter[int] = collections.Counter()
        self.writers: collections.Counter[int] = collections.Counter()  # handles open for writing, per inode
        self.pushes: dict[int, _Pushes] = {}  # chunks being pushed into the kernel's page cache, per inode
        self._pushes_held: collections.Counter[int] = collections.Counter()  # requests no push may start under
        # Bumped whenever this kernel's pages of an inode may no longer hold
        # (another node's version opened, a truncate): a push read before is dropped.
        self._page_generation: collections.Counter[int] = collections.Counter()
        self._pushed_late: set[int] = set()  # inodes whose pages to drop when their pushes end
        self._memory = _AvailableMemory(PUSH_MIN_AVAILABLE_MEMORY)
        # When each (inode, chunk) was last pushed.
        self._pushed: collections.OrderedDict[tuple[int, int], float] = collections.OrderedDict()
        self.contents: dict[int, FileContent] = {}
        self.handles: dict[int, _Handle] = {}
        self.dir_handles: dict[int, _DirHandle] = {}
        # Inodes whose last name this node removed, not freed yet: a release
        # or forget frees them without asking the engine for nlink.
        self.unlinked: set[int] = set()
        # Inodes this node created and holds open: they have no xattrs unless
        # set here, so the kernel's security.capability check on every first
        # write needs no round trip to the engine.
        self.fresh: set[int] = set()
        # Remote engines only: inode records this node read or wrote, kept
        # for the attribute timeout (what the kernel would cache anyway), so
        # the getattr the kernel sends for a directory after every create in
        # it costs no round trip. Never used where freshness matters (open).
        self.attr_cache: collections.OrderedDict[int, tuple[float, Inode]] = collections.OrderedDict()
        # The last inode record read for each inode open on this node.
        self.open_inodes: dict[int, Inode] = {}
        self._fh = itertools.count(1)
        self._kernel_limiter = trio.CapacityLimiter(2)  # threads that call into the kernel (invalidations)
        # (size, mtime) of each inode as this node last opened or wrote it.
        self.seen: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()

    def idle_seconds(self) -> float:
        """Seconds since the last request began."""
        return time.monotonic() - self.last_request

    # ---- helpers -----------------------------------------------------------------
    async def _m(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self.calls(fn, *args, **kwargs)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self.calls.in_thread(fn, *args, **kwargs)

    def _cache(self, *inodes: Inode) -> None:
        if not self.calls.remote or self.attr_timeout <= 0:
            return
        expires = time.monotonic() + self.attr_timeout
        for inode in inodes:
            self.attr_cache[inode.ino] = (expires, inode)
            self.attr_cache.move_to_end(inode.ino)
        while len(self.attr_cache) > SEEN_INODES_MAX:
            self.attr_cache.popitem(last=False)

    def _uncache(self, *inos: int) -> None:
        for ino in inos:
            self.attr_cache.pop(ino, None)

    async def _inode(self, ino: int) -> Inode:
        """An inode's attributes, at most the attribute timeout old."""
        entry = self.attr_cache.get(ino)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        node = await self._m(self.meta.get_inode, ino)
        self._cache(node)
        return node

    def _remember(self, ino: int, size: int, mtime_ns: int) -> None:
        self.seen[ino] = (size, mtime_ns)
        self.seen.move_to_end(ino)
        if len(self.seen) > SEEN_INODES_MAX:
            self.seen.popitem(last=False)

    def _cache_is_current(self, inode: Inode) -> bool:
        """Close-to-open: whether pages this kernel cached for the file still
        hold (no other node changed it since this node last saw it)."""
        if not self.meta.shared:
            return True  # every change passes through this node's kernel
        current = self.seen.get(inode.ino) == (inode.size, inode.mtime_ns)
        self._remember(inode.ino, inode.size, inode.mtime_ns)
        return current

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        content = self.contents.get(inode.ino)
        size, mtime, ctime = inode.size, inode.mtime_ns, inode.ctime_ns
        if content is not None and content.dirty:
            # The commit sets ctime; until then it moves with the data, as on a local disk.
            size, mtime = content.size, content.mtime_ns or mtime
            ctime = max(ctime, content.mtime_ns or 0)
        attrs.st_ino = inode.ino
        attrs.generation = 0
        attrs.entry_timeout = self.entry_timeout
        attrs.attr_timeout = self.attr_timeout
        attrs.st_mode = inode.mode
        attrs.st_nlink = inode.nlink
        attrs.st_uid = inode.uid
        attrs.st_gid = inode.gid
        attrs.st_rdev = inode.rdev
        attrs.st_size = size
        attrs.st_blksize = BLOCK_SIZE_BYTES
        attrs.st_blocks = (size + 511) // 512
        attrs.st_atime_ns = inode.atime_ns
        attrs.st_mtime_ns = mtime
        attrs.st_ctime_ns = ctime
        return attrs

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        self.lookups[inode.ino] += 1
        return self._attrs(inode)

    def _forget_dropped_writes(self, content: FileContent) -> None:
        """A file's uncommitted writes were just dropped: the kernel may still
        cache their pages and the size they reached. Drop those too, from a
        worker thread (the kernel waits there for the failed request to end)."""
        if content.failure is None or pyfuse3.trio_token is None or self.svc.nursery is None:
            return  # nothing dropped, or not mounted (the Operations called directly)
        self.svc.nursery.start_soon(self._invalidate, content.ino)

    def _push_chunk_soon(self, handle: _Handle, index: int) -> None:
        """After a read out of sequence: put the read's whole chunk in the
        kernel's page cache (see PUSH_CHUNK_AGAIN_SECONDS), unless the file
        is open for writing on this node or has writes not committed: the
        pages pushed must be what a read would return until the file changes,
        and every change on this node comes from a handle open for writing
        or a truncate, which wait for pushes in flight (`_settled_pushes`)."""
        if pyfuse3.trio_token is None or self.svc.nursery is None:
            return  # not mounted (the Operations called directly)
        if not self._may_push(handle.ino, handle.content) or not self._memory.plentiful():
            return
        key = (handle.ino, index)
        now = time.monotonic()
        if now - self._pushed.get(key, -PUSH_CHUNK_AGAIN_SECONDS) < PUSH_CHUNK_AGAIN_SECONDS:
            return
        self._pushed[key] = now
        self._pushed.move_to_end(key)
        while len(self._pushed) > PUSHED_CHUNKS_REMEMBERED:
            self._pushed.popitem(last=False)
        self.svc.nursery.start_soon(self._push_chunk, handle.ino, handle.content, index, self._page_generation[handle.ino])

    def _may_push(self, ino: int, content: FileContent) -> bool:
        """No handle open for writing, no request changing the file's cached
        pages under way, nothing written and not committed."""
        return not self.writers.get(ino) and not self._pushes_held.get(ino) and content.clean

    async def _push_chunk(self, ino: int, content: FileContent, index: int, generation: int) -> None:
        try:
            data = await content.committed_piece(index)
        except errors.FsError:  # the reader that asked next reports it
            return
        # Looked at again after the await, and counted before the next one:
        # an open for writing or a truncate from now on waits for this push.
        if data is None or not self._may_push(ino, content) or self._page_generation[ino] != generation:
            return
        pushes = self.pushes.get(ino)
        if pushes is None:
            pushes = self.pushes[ino] = _Pushes()
        pushes.count += 1
        try:
            # From a worker thread: the kernel locks the pages it stores
            # into, and waits for reads of them in flight, which the event
            # loop must be free to answer.
            await trio.to_thread.run_sync(pyfuse3.notify_store, ino, index * CHUNK_SIZE_BYTES, data,
                                          limiter=self._kernel_limiter, **{_ABANDON_KW: True})
            metrics.KERNEL_PUSHED_BYTES.inc(len(data))
        except OSError as exc:
            log.debug("could not push a chunk into the kernel's page cache",
                      extra={"ino": ino, "index": index, "error": str(exc)})
        finally:
            pushes.count -= 1
            if pushes.count == 0:
                del self.pushes[ino]
                pushes.done.set()
                if ino in self._pushed_late and self.svc.nursery is not None:
                    self._pushed_late.discard(ino)
                    self.svc.nursery.start_soon(self._invalidate, ino)

    @contextlib.asynccontextmanager
    async def _settled_pushes(self, ino: int) -> AsyncIterator[None]:
        """For a request that changes what the kernel caches of `ino`: no
        push starts from now on, nor goes on with bytes read before; the
        block runs once the pushes in flight are over, or after
        PUSH_WAIT_SECONDS with those dropped from the kernel when they end."""
        self._pushes_held[ino] += 1
        self._page_generation[ino] += 1
        try:
            pushes = self.pushes.get(ino)
            if pushes is not None:
                with trio.move_on_after(PUSH_WAIT_SECONDS):
                    await pushes.done.wait()
                if not pushes.done.is_set():
                    self._pushed_late.add(ino)
            yield
        finally:
            self._pushes_held[ino] -= 1
            if self._pushes_held[ino] <= 0:
                del self._pushes_held[ino]

    async def _invalidate(self, ino: int) -> None:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False, limiter=self._kernel_limiter)
        except OSError as exc:
            log.debug("could not invalidate the kernel's cache of an inode", extra={"ino": ino, "error": str(exc)})

    def _content(self, inode: Inode) -> FileContent:
        content = self.contents.get(inode.ino)
        if content is None:
            content = self.contents[inode.ino] = FileContent(self.svc, inode.ino, inode.size)
        return content

    async def _mknode(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext, **kwargs: Any) -> Inode:
        # The kernel has already applied the umask (no FUSE_DONT_MASK without
        # ACLs); the store applies a set-group-ID directory's group.
        node, directory = await self._m(self.meta.mknode, parent, name, mode, ctx.uid, ctx.gid, with_parent=True, **kwargs)
        self._cache(node, directory)
        return node

    async def _truncate(self, node: Inode, size_bytes: int) -> FileContent:
        content = self._content(node)
        try:
            await content.truncate(size_bytes)
        except errors.FsError:
            self._forget_dropped_writes(content)
            raise
        await self._commit(content)
        return content

    async def _maybe_delete(self, ino: int) -> None:
        """Free an inode once it has no name, no lookup and no open handle.
        On a shared volume only the collector frees, after the grace period."""
        if self.lookups.get(ino, 0) > 0 or self.open_count.get(ino, 0) > 0:
            return
        self.unlinked.discard(ino)
        self._uncache(ino)
        content = self.contents.pop(ino, None)
        try:
            if content is not None:
                await content.discard()
            if self.orphan_grace_ns:
                return
            if await self._in_thread(self.meta.delete_inode, ino, self.orphan_grace_ns):
                self.seen.pop(ino, None)
                self.on_inode_deleted()
            # Not freed: open on another node, or younger than the grace
            # period of a shared volume; the collector's orphan pass retries.
        except Exception:
            log.exception("freeing an inode failed; it is retried at the next start", extra={"ino": ino})

    # ---- lookups and attributes ----------------------------------------------------
    @_fuse_op
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self._m(self.meta.lookup, parent_inode, name)
        self._cache(node)
        return self._entry(node)

    @_fuse_op
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        content = self.contents.get(inode)
        if inode in self.open_inodes and (inode in self.fresh or (content is not None and content.dirty)):
            # Created or being written here, and open: this node's view is the
            # newest (close-to-open), and the kernel asks before every write.
            return self._attrs(self.open_inodes[inode])
        try:
            node = await self._inode(inode)
        except errors.MetaUnavailable:
            # The kernel revalidates attributes while reading an open file:
            # answer from what this node knows, so cached reads go on while
            # the engine is away.
            node = self.open_inodes.get(inode)
            if node is None:
                raise
            return self._attrs(node)
        if inode in self.open_inodes:
            self.open_inodes[inode] = node
        return self._attrs(node)

    @_fuse_op
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self._m(self.meta.get_inode, inode)
        if fields.update_size:
            if node.is_dir:
                raise errors.IsDirectory(f"inode {inode}")
            if not node.is_reg:
                raise errors.Invalid(f"inode {inode} is not a regular file")
            async with self._settled_pushes(inode):
                content = await self._truncate(node, attr.st_size)
            if self.open_count.get(inode, 0) == 0 and not content.dirty:
                self.contents.pop(inode, None)
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
            content = self.contents.get(inode)
            if content is not None and content.dirty:
                content.mtime_ns = attr.st_mtime_ns  # cp -p sets times before close
        if fields.update_ctime:
            changes["ctime_ns"] = attr.st_ctime_ns
        if changes:
            node = await self._m(self.meta.setattr, inode, **changes)
            self._cache(node)
        elif fields.update_size:
            node = await self._m(self.meta.get_inode, inode)
        return self._attrs(node)

    @_fuse_op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._m(self.meta.readlink, inode)

    # ---- namespace -----------------------------------------------------------------
    @_fuse_op
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._mknode(parent_inode, name, mode, ctx, rdev=rdev))

    @_fuse_op
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._mknode(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    @_fuse_op
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if len(target) > 4095:
            raise errors.NameTooLong("symlink target longer than PATH_MAX")
        return self._entry(await self._mknode(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target))

    @_fuse_op
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._uncache(inode, new_parent_inode)
        return self._entry(await self._m(self.meta.link, inode, new_parent_inode, new_name))

    @_fuse_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self._m(self.meta.unlink, parent_inode, name)
        self._uncache(parent_inode, node.ino)
        if node.nlink == 0:
            self.unlinked.add(node.ino)
            await self._maybe_delete(node.ino)

    @_fuse_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self._m(self.meta.unlink, parent_inode, name, directory=True)
        self._uncache(parent_inode, node.ino)
        self.unlinked.add(node.ino)
        await self._maybe_delete(node.ino)

    @_fuse_op
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._uncache(parent_inode_old, parent_inode_new)
        replaced = await self._m(self.meta.rename, parent_inode_old, name_old, parent_inode_new, name_new, flags)
        self.attr_cache.clear()  # the moved inode's ctime and parent changed too; renames are rare
        if replaced is not None and replaced.nlink == 0:
            self.unlinked.add(replaced.ino)
            await self._maybe_delete(replaced.ino)

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # Synchronous in pyfuse3 and must not raise: deletions go to the nursery.
        for ino, count in inode_list:
            left = self.lookups[ino] - count
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            self._page_generation.pop(ino, None)  # the kernel dropped the inode and its pages
            if self.open_count.get(ino, 0) == 0 and ino in self.unlinked and self.svc.nursery is not None:
                self.svc.nursery.start_soon(self._forgotten, ino)

    async def _forgotten(self, ino: int) -> None:
        """The kernel dropped its last reference: free the inode if it has no name."""
        try:
            if ino in self.unlinked:
                await self._maybe_delete(ino)
        except Exception:
            log.exception("forget failed", extra={"ino": ino})

    # ---- directories -----------------------------------------------------------------
    @_fuse_op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not (await self._inode(inode)).is_dir:
            raise errors.NotDirectory(f"inode {inode}")
        fh = next(self._fh)
        self.dir_handles[fh] = _DirHandle(inode)
        return fh

    @_fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dir_handles.get(fh)
        if handle is None:
            raise errors.BadHandle(f"directory handle {fh}")
        while True:
            entries = handle.batch_from(start_id)
            if entries is None:
                # Offsets are stable entry sequence numbers, so a batch read
                # now continues exactly where the kernel stopped taking.
                entries = await self._m(self.meta.readdir, handle.ino, start_id, READDIR_BATCH)
                handle.keep(start_id, entries)
                self._cache(*(inode for _, _, inode in entries))  # a walk opens these next
            if not entries:
                return
            for seq, name, inode in entries:
                if not pyfuse3.readdir_reply(token, name, self._attrs(inode), seq + 1):
                    return
                self.lookups[inode.ino] += 1
                start_id = seq + 1
            if len(entries) < READDIR_BATCH:
                return

    @_fuse_op
    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    @_fuse_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # The entries are metadata; the files they name are the journal's
        # (a power loss may cut those back, never leave a name without its inode).
        await self._in_thread(self.meta.sync)

    # ---- files -------------------------------------------------------------------------
    def _open_handle(self, inode: Inode, writes: bool, keep_cache: bool = True) -> pyfuse3.FileInfo:
        fh = next(self._fh)
        content = self._content(inode)
        content.opened()
        self.handles[fh] = _Handle(inode.ino, content, writes)
        self.open_count[inode.ino] += 1
        if writes:
            self.writers[inode.ino] += 1
        self.open_inodes[inode.ino] = inode
        # Every change made on this node passes through this kernel, so its
        # page cache is stale only if another node changed the file.
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @_fuse_op
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writes = flags & os.O_ACCMODE != os.O_RDONLY
        if writes or flags & os.O_TRUNC:  # a writer: no push may be under way or start
            async with self._settled_pushes(inode):
                return await self._open(inode, flags, writes)
        return await self._open(inode, flags, writes)

    async def _open(self, inode: int, flags: int, writes: bool) -> pyfuse3.FileInfo:
        node = await self._m(self.meta.get_inode, inode)
        if node.is_dir:
            raise errors.IsDirectory(f"inode {inode}")
        if flags & os.O_TRUNC and node.is_reg:
            # libfuse asks for FUSE_CAP_ATOMIC_O_TRUNC, so the kernel passes
            # O_TRUNC here instead of sending a setattr first.
            await self._truncate(node, 0)
            return self._open_handle(node, writes)
        keep = self._cache_is_current(node)
        if not keep:
            async with self._settled_pushes(node.ino):  # the kernel drops its pages at this reply
                if node.ino not in self.open_count:
                    self.contents.pop(node.ino, None)  # its chunk list is another node's old one
        return self._open_handle(node, writes, keep_cache=keep)

    @_fuse_op
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = await self._mknode(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        self._remember(node.ino, node.size, node.mtime_ns)
        self.fresh.add(node.ino)
        return self._open_handle(node, writes=True), self._entry(node)

    def _handle(self, fh: int) -> _Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise errors.BadHandle(f"file handle {fh}")
        return handle

    @_fuse_op
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        handle = self._handle(fh)
        handle.note_read(off, size)
        try:
            data = await handle.content.read(off, size)
        except errors.FsError as exc:  # the chunk's error, plus which file it broke
            raise errors.FsError(f"reading inode {handle.ino} at offset {off}: {exc}", exc.errno) from exc
        if not handle.window and 0 < len(data) < PUSH_MAX_READ_BYTES:
            self._push_chunk_soon(handle, off // CHUNK_SIZE_BYTES)
        return data

    @_fuse_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        content = self._handle(fh).content
        try:
            return await content.write(off, buf)
        except errors.FsError:
            self._forget_dropped_writes(content)
            raise

    @_fuse_op
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2), carried here by `fuse_fallocate` (pyfuse3 has no
        handler for it). Nothing is reserved: a range of zeros costs nothing
        until written (chunks are made on demand, holes are stored as no
        chunk), so the allocating modes only refuse, as a local disk would, a
        range past the end larger than the cache disk's free space (what
        statfs shows)."""
        if offset < 0 or length <= 0:
            raise errors.Invalid(f"fallocate of {length} bytes at offset {offset}")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise errors.NotSupported(f"fallocate mode {mode:#x}")
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        punch, zero = bool(mode & FALLOC_FL_PUNCH_HOLE), bool(mode & FALLOC_FL_ZERO_RANGE)
        if punch and (zero or not keep_size):  # the kernel's own rules (vfs_fallocate)
            raise errors.NotSupported(f"fallocate mode {mode:#x}")
        content = self._handle(fh).content
        end = offset + length
        if not punch:
            past_end = end - max(offset, content.size)
            disk = os.statvfs(self.statfs_path)
            if past_end > disk.f_bavail * disk.f_frsize:
                raise errors.NoSpace(f"fallocate of {past_end} bytes past the end")
        try:
            if punch or zero:
                await content.zero_range(offset, length, keep_size)
            else:
                await content.allocate(end, keep_size)
        except errors.FsError:
            self._forget_dropped_writes(content)
            raise

    @_fuse_op
    async def flush(self, fh: int) -> None:
        await self._commit(self._handle(fh).content)

    async def _commit(self, content: FileContent) -> None:
        try:
            committed = await content.commit()
        except errors.FsError:
            self._forget_dropped_writes(content)
            raise
        if committed:
            self._remember(content.ino, content.size, content.committed_mtime_ns)
            if content.committed is not None:
                self._cache(content.committed)
                if content.ino in self.open_inodes:
                    self.open_inodes[content.ino] = content.committed

    @_fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        await self._commit(handle.content)
        if self.durability is not None:  # the file's chunks, then the metadata
            await self.durability.sync_file(handle.ino)
        else:
            await self._in_thread(self.meta.sync)
        if self.fsync_waits_for is not None:  # --fsync-waits-upload: durable in the object store too
            chunks = await self._m(self.meta.chunks, handle.ino, 0, 1 << 62)
            await self.fsync_waits_for({ref.chunk_id for ref in chunks.values()})

    @_fuse_op
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        try:
            await self._commit(handle.content)
        finally:
            if handle.writes:
                self.writers[handle.ino] -= 1
                if self.writers[handle.ino] <= 0:
                    del self.writers[handle.ino]
            self.open_count[handle.ino] -= 1
            if self.open_count[handle.ino] <= 0:
                del self.open_count[handle.ino]
                self.open_inodes.pop(handle.ino, None)
                self.fresh.discard(handle.ino)
                if not handle.content.dirty:
                    self.contents.pop(handle.ino, None)
                if handle.ino in self.unlinked:
                    await self._maybe_delete(handle.ino)

    # ---- filesystem -----------------------------------------------------------------------
    @_fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        disk = os.statvfs(self.statfs_path)
        out = pyfuse3.StatvfsData()
        out.f_bsize = disk.f_bsize
        out.f_frsize = disk.f_frsize
        out.f_blocks = disk.f_blocks
        out.f_bfree = disk.f_bfree
        out.f_bavail = disk.f_bavail
        used = (await self._m(self.meta.counts))["inodes"]
        out.f_files = max(disk.f_files, used + disk.f_ffree)
        out.f_ffree = out.f_files - used
        out.f_favail = out.f_ffree
        out.f_namemax = 255
        return out

    @_fuse_op
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Permission checks are the kernel's (default_permissions); this only
        # has to confirm the inode exists.
        await self._m(self.meta.get_inode, inode)
        return True

    # ---- xattrs ---------------------------------------------------------------------------
    @_fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode in self.fresh:
            raise errors.NoAttr(name.decode(errors="replace"))
        return await self._m(self.meta.getxattr, inode, name)

    @_fuse_op
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fresh.discard(inode)
        self._uncache(inode)
        await self._m(self.meta.setxattr, inode, name, value)

    @_fuse_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        await self._m(self.meta.get_inode, inode)
        return await self._m(self.meta.listxattr, inode)

    @_fuse_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._uncache(inode)
        await self._m(self.meta.removexattr, inode, name)

    # ---- shutdown -------------------------------------------------------------------------
    async def commit_all(self) -> list[dict]:
        """Commit every file with uncommitted writes (clean unmount, SIGTERM).
        Returns what could not be committed, for the exit report: the files
        whose writes are lost (inode, size they reached, why)."""
        lost = []
        for content in list(self.contents.values()):
            size = content.size
            try:
                await content.commit()
            except Exception as exc:
                if not isinstance(exc, errors.FsError):
                    log.exception("commit at shutdown failed", extra={"ino": content.ino})
                lost.append({"ino": content.ino, "size_bytes": size, "error": str(exc) or type(exc).__name__})
        for item in lost:
            log.error("uncommitted writes lost at shutdown", extra=item)
        return lost
