"""`datafs fsck`: the metadata checked against itself, the object store and
this node's chunk cache; with repair, fixed where the fix can be proven.

The check runs beside a live mount (on a shared volume, beside a whole
fleet), so it never reads the volume in one long transaction and never holds
a table in memory: it copies the keys it needs, a page per transaction, into
a scratch SQLite database on local disk, with the store's listing and the
cache's index, and lets SQL find *candidates*. Pages read at different
moments disagree while files change, so a candidate is confirmed before it is
reported:
- a local fact (an entry and its inode, a chunk record and its pending
  entries) is read again in one consistent transaction;
- a count (references to a chunk, names of an inode) is taken again in one
  consistent transaction over the whole key range, for the candidates only;
- the store and the cache are asked again once the metadata that makes their
  answer wrong is confirmed.

What a volume in use normally holds is not a finding: chunks pending upload
(held in this node's cache, or owed by another node), chunks being deleted,
and store objects that no record names yet but that are younger than the GC
grace (uploaded before their file's commit). Those are counted as notes.

Every repair is a transaction that checks again what it fixes. A count is
set to what was counted only if it still holds the value seen then (an
inode: its ctime is unchanged), so two repairs racing from two nodes never
apply one fix twice; one that changed meanwhile is left for the next run.
An unreferenced object is deleted under the collector's own protocol
(DELETING, delete, `finish_delete`), so a commit of the same bytes meanwhile
re-uploads it. Nothing is re-pointed that cannot be proven: an inode no name
reaches, a chunk with no copy left and a corrupt cached copy are reported,
not repaired.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import sqlite3
import time
from typing import Any, AsyncIterator, Callable, Iterable

import trio

from .chunks import chunk_id as hash_chunk
from .config import CHUNK_SIZE_BYTES
from .errors import ChunkMissing, StoreError
from .meta.calls import MetaCalls
from .meta.kv import Txn
from .meta.store import (
    _CHUNK, _ENTRY, _U64, DELETING, PENDING, ROOT_INODE, ChunkRecord, Inode, MetaStore, _k_dirent, _k_holder,
    _k_inode, _k_pending, _k_seq, _Tx, _u64,
)
from .tiers.store import ObjectStore

log = logging.getLogger(__name__)

#: Keys per metadata transaction while copying, rows per SQL batch.
PAGE_KEYS = 1000
#: Candidates confirmed by one recount over the whole key range.
RECOUNT_BATCH = 100_000
#: Parallel store and cache reads (existence checks, --verify).
IO_CONCURRENCY = 8
#: A pending upload whose chunk the store has is stale only if it is still
#: there this much later (the uploader marks its uploads in batches).
PENDING_SETTLE_SECONDS = 1.0
#: Tries of a store request that fails with a temporary error, backing off
#: from STORE_RETRY_SECONDS (the daemon's own callers retry the same way).
STORE_ATTEMPTS = 5
STORE_RETRY_SECONDS = 0.2
#: Findings kept per kind for the report; beyond it they are only counted.
REPORT_LIMIT = 1000

_SCHEMA = """
CREATE TABLE inode (ino INTEGER PRIMARY KEY, dir INTEGER, reg INTEGER, nlink INTEGER, parent INTEGER, size INTEGER);
CREATE TABLE content (ino INTEGER PRIMARY KEY, chunks INTEGER, last INTEGER);
CREATE TABLE ref (chunk BLOB PRIMARY KEY, n INTEGER, length INTEGER) WITHOUT ROWID;
CREATE TABLE dent (parent INTEGER, name BLOB, ino INTEGER, seq INTEGER, PRIMARY KEY (parent, name)) WITHOUT ROWID;
CREATE TABLE listing (parent INTEGER, seq INTEGER, name BLOB, PRIMARY KEY (parent, seq)) WITHOUT ROWID;
CREATE TABLE rec (chunk BLOB PRIMARY KEY, refs INTEGER, length INTEGER, flags INTEGER) WITHOUT ROWID;
CREATE TABLE garbage (chunk BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE pend (chunk BLOB, node INTEGER, PRIMARY KEY (chunk, node)) WITHOUT ROWID;
CREATE TABLE hold (chunk BLOB, node INTEGER, PRIMARY KEY (chunk, node)) WITHOUT ROWID;
CREATE TABLE orphan (ino INTEGER PRIMARY KEY);
CREATE TABLE extra (ino INTEGER, key BLOB, PRIMARY KEY (ino, key)) WITHOUT ROWID;
CREATE TABLE obj (chunk BLOB PRIMARY KEY, size INTEGER, modified REAL) WITHOUT ROWID;
CREATE TABLE cached (chunk BLOB PRIMARY KEY) WITHOUT ROWID;
"""
_INDEXES = "CREATE INDEX dent_ino ON dent (ino);"


class FsckError(Exception):
    """The check could not run to its end (store or metadata unreachable)."""


@dataclasses.dataclass
class Finding:
    kind: str
    object: str  # what it is about: "chunk <id>", "inode 42 (/a/b)", "entry /a/b"
    detail: str  # what is wrong
    action: str  # what --repair does about it; with repairable False, why it does nothing
    repairable: bool = True
    repaired: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _chunk_name(raw: bytes) -> str:
    return f"chunk {raw.hex()}"


def _name(raw: bytes) -> str:
    return raw.decode(errors="backslashreplace")


class Fsck:
    """One run: `await Fsck(...).run()` returns the report as a JSON-able dict.

    `calls` runs metadata transactions (in worker threads, bounded as the
    daemon's are); store and cache I/O goes to worker threads behind a limiter
    of the check's own. `enqueue` hands chunks that a repair made this node
    owe to the uploader (the daemon's; offline they wait for the next mount).
    """

    def __init__(
        self, meta: MetaStore, store: ObjectStore, cache, calls: MetaCalls, *,
        grace_seconds: float, verify: bool = False, repair: bool = False,
        enqueue: Callable[[list[str]], None] | None = None,
    ):
        self.meta = meta
        self.store = store
        self.cache = cache
        self.calls = calls
        self.grace_seconds = grace_seconds
        self.verify = verify
        self.repair = repair
        self.enqueue = enqueue
        self.node = meta.node_id
        self.progress: dict[str, Any] = {"phase": "starting", "done": 0, "total": None}
        self.counts: collections.Counter[str] = collections.Counter()
        self.notes: collections.Counter[str] = collections.Counter()
        self.findings: list[Finding] = []
        self._found: collections.Counter[str] = collections.Counter()
        self._fixed: collections.Counter[str] = collections.Counter()
        self._listed = True
        self._disk = trio.CapacityLimiter(1)
        self._io_limiter = trio.CapacityLimiter(IO_CONCURRENCY)
        self._db: sqlite3.Connection | None = None

    # ---- the run ---------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self._db = await self._sql(self._open_db)
        try:
            await self._gather()
            for check in (
                self._check_entries, self._check_dir_parents, self._check_stray_keys, self._check_links,
                self._check_orphans, self._check_refcounts, self._check_garbage, self._check_pending,
                self._check_presence, self._check_unreferenced,
            ):
                await check()
            if self.verify:
                await self._verify()
        finally:
            db, self._db = self._db, None
            db.close()  # no thread uses it now; closing deletes its temporary file
        return self._report(time.monotonic() - started)

    def _report(self, seconds: float) -> dict[str, Any]:
        return {
            "findings": [f.to_json() for f in self.findings],
            "found": dict(self._found),
            "repaired": dict(self._fixed),
            "notes": dict(self.notes),
            "counts": dict(self.counts),
            "seconds": round(seconds, 2),
            "verify": self.verify,
            "repair": self.repair,
        }

    def _phase(self, name: str, total: int | None = None) -> None:
        self.progress = {"phase": name, "done": 0, "total": total}

    def _add(self, finding: Finding) -> None:
        self._found[finding.kind] += 1
        if finding.repaired:
            self._fixed[finding.kind] += 1
        if self._found[finding.kind] <= REPORT_LIMIT:
            self.findings.append(finding)
        log.warning("fsck: %s: %s: %s", finding.kind, finding.object, finding.detail)

    async def _settle(self, finding: Finding, repair: Callable[[], Any] | None) -> None:
        """Repair a confirmed finding if asked (and possible), then record it."""
        if self.repair and finding.repairable and repair is not None:
            finding.repaired = bool(await repair())
        self._add(finding)

    # ---- threads -----------------------------------------------------------------------
    async def _sql(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._disk)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._io_limiter)

    async def _view(self, fn: Callable[[Txn], Any]) -> Any:
        return await self.calls.in_thread(self.meta.kv.view, fn)

    async def _write(self, body: Callable[[_Tx], Any]) -> Any:
        return await self.calls.in_thread(self.meta.kv.transact, lambda t: body(_Tx(t, self.node)))

    # ---- the scratch database ------------------------------------------------------------
    @staticmethod
    def _open_db() -> sqlite3.Connection:
        # "": a private temporary database, in memory until it outgrows the
        # page cache, then in a file that SQLite deletes when it is closed.
        db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA cache_size = -32768")  # KiB
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.executescript(_SCHEMA)
        return db

    def _insert(self, statements: list[tuple[str, list[tuple]]]) -> None:
        assert self._db is not None
        self._db.execute("BEGIN")
        for sql, rows in statements:
            if rows:
                self._db.executemany(sql, rows)
        self._db.execute("COMMIT")

    def _fetch(self, sql: str, params: tuple = ()) -> list[tuple]:
        assert self._db is not None
        return self._db.execute(sql, params).fetchall()

    async def _candidates(self, sql: str, params: tuple = (), batch: int = PAGE_KEYS) -> AsyncIterator[list[tuple]]:
        """Rows of a candidate query in batches, so millions never sit in one list.
        The query runs to completion first (SQLite materializes nothing we
        change meanwhile: repairs write to the volume, not to these tables)."""
        assert self._db is not None
        cursor = await self._sql(self._db.execute, sql, params)
        while True:
            rows = await self._sql(cursor.fetchmany, batch)
            if not rows:
                return
            yield rows

    async def _path(self, ino: int) -> str | None:
        """A path to `ino` from the names copied, or None if none leads there."""
        parts: list[str] = []
        for _ in range(256):
            if ino == ROOT_INODE:
                return "/" + "/".join(reversed(parts))
            rows = await self._sql(self._fetch, "SELECT parent, name FROM dent WHERE ino = ? LIMIT 1", (ino,))
            if not rows:
                return None
            ino, name = rows[0]
            parts.append(_name(name))
        return None

    async def _inode_name(self, ino: int) -> str:
        path = await self._path(ino)
        return f"inode {ino}" + (f" ({path})" if path else "")

    async def _entry_name(self, parent: int, name: bytes) -> str:
        path = await self._path(parent)
        if path is None:
            return f"entry {_name(name)!r} in inode {parent}"
        return f"entry {path.rstrip('/')}/{_name(name)}"

    # ---- copying the volume --------------------------------------------------------------
    async def _gather(self) -> None:
        # Inodes first: a name or a chunk copied later that points at an
        # inode created meanwhile is only a candidate, dropped on confirming.
        await self._copy("inodes", b"i", _parse_inodes)
        await self._copy("file contents", b"c", _parse_contents)
        await self._copy("directory entries", b"d", _parse_entries)
        await self._copy("directory listings", b"e", _parse_listings)
        await self._copy("chunk records", b"r", _parse_records)
        await self._copy("garbage list", b"g", _parse_chunk_keys("garbage"))
        await self._copy("pending uploads", b"u", _parse_pending)
        await self._copy("chunk holders", b"w", _parse_holders)
        await self._copy("orphans", b"o", _parse_orphans)
        await self._copy("symlinks", b"l", _parse_extra)
        await self._copy("xattrs", b"x", _parse_extra)
        await self._copy_store()
        await self._copy_cache()
        self._phase("indexing")
        await self._sql(self._db.executescript, _INDEXES)
        for table, name in (("inode", "inodes"), ("dent", "entries"), ("rec", "chunks"), ("obj", "objects"),
                            ("cached", "cached")):
            self.counts[name] = (await self._sql(self._fetch, f"SELECT count(*) FROM {table}"))[0][0]

    async def _copy(self, phase: str, prefix: bytes, parse: Callable[[list[tuple[bytes, bytes]]], list]) -> None:
        self._phase(phase)
        after: bytes | None = None
        while True:
            start = None if after is None else after + b"\x00"
            page = await self._view(lambda t: list(t.scan(prefix, start, limit=PAGE_KEYS)))
            if not page:
                return
            await self._sql(self._insert, parse(page))
            self.progress["done"] += len(page)
            if len(page) < PAGE_KEYS:
                return
            after = page[-1][0]

    async def _copy_store(self) -> None:
        self._phase("store objects")
        try:
            listing = self.store.list_chunks()
        except NotImplementedError:
            self._listed = False
            self.notes["the object store cannot list its objects: unreferenced objects not looked for"] += 1
            await self._probe_store()
            return
        sql = "INSERT OR REPLACE INTO obj VALUES (?, ?, ?)"
        failures = 0
        while True:
            try:
                batch = await self._io(lambda: list(itertools.islice(listing, PAGE_KEYS)))
            except StoreError as exc:
                failures += 1
                if not exc.temporary or failures >= STORE_ATTEMPTS:
                    raise FsckError(f"cannot list the object store {self.store.describe()}: {exc}") from None
                await trio.sleep(STORE_RETRY_SECONDS * 2 ** failures)
                listing = self.store.list_chunks()  # from the start: rows already copied are replaced
                continue
            if not batch:
                return
            await self._sql(self._insert, [(sql, [(bytes.fromhex(o.chunk_id), o.size_bytes, o.modified) for o in batch])])
            self.progress["done"] += len(batch)

    async def _probe_store(self) -> None:
        """No listing: ask the store about each referenced chunk."""
        sql = "SELECT chunk FROM ref WHERE n > 0 UNION SELECT chunk FROM rec WHERE refs > 0"
        async for rows in self._candidates(sql):
            present = []

            async def probe(raw: bytes) -> None:
                if await self._exists(raw.hex()):
                    present.append((raw, 0, None))

            async with trio.open_nursery() as nursery:
                for (raw,) in rows:
                    nursery.start_soon(probe, raw)
            await self._sql(self._insert, [("INSERT OR REPLACE INTO obj VALUES (?, ?, ?)", present)])
            self.progress["done"] += len(rows)

    async def _copy_cache(self) -> None:
        self._phase("cache index")
        ids = await self._io(self.cache.ids)
        for start in range(0, len(ids), PAGE_KEYS):
            rows = [(bytes.fromhex(c),) for c in ids[start:start + PAGE_KEYS]]
            await self._sql(self._insert, [("INSERT OR IGNORE INTO cached VALUES (?)", rows)])
            self.progress["done"] += len(rows)

    # ---- store and cache, asked again ---------------------------------------------------
    async def _exists(self, chunk: str) -> bool:
        try:
            return await self._io(_retrying, self.store.exists, chunk)
        except StoreError as exc:
            raise FsckError(f"the object store {self.store.describe()} did not answer: {exc}") from None

    async def _in_cache(self, chunk: str) -> bool:
        return await self._io(self.cache.path(chunk).exists)

    # ---- directory entries ------------------------------------------------------------------
    async def _check_entries(self) -> None:
        self._phase("directory entries")
        # A name whose inode does not exist.
        sql = ("SELECT d.parent, d.name, d.ino, d.seq FROM dent d LEFT JOIN inode i ON i.ino = d.ino "
               "WHERE i.ino IS NULL")
        async for rows in self._candidates(sql):
            for parent, name, ino, seq in await self._view(lambda t: [
                row for row in rows if _entry_is(t, *row) and t.get(_k_inode(row[2])) is None
            ]):
                await self._settle(Finding(
                    "entry-dangling", await self._entry_name(parent, name), f"names inode {ino}, which does not exist",
                    "remove the entry",
                ), lambda: self._write(lambda tx: _remove_dangling(tx, parent, name, ino, seq)))
        # A name in something that is not a directory (or no longer exists).
        sql = ("SELECT d.parent, d.name, d.ino, d.seq FROM dent d LEFT JOIN inode p ON p.ino = d.parent "
               "WHERE p.ino IS NULL OR p.dir = 0")
        async for rows in self._candidates(sql):
            for parent, name, ino, seq in await self._view(lambda t: [
                row for row in rows if _entry_is(t, *row) and not _is_dir(t.get(_k_inode(row[0])), row[0])
            ]):
                await self._settle(Finding(
                    "entry-misplaced", f"entry {_name(name)!r} in inode {parent}",
                    f"names inode {ino} inside inode {parent}, which is not a directory",
                    "no name leads to that directory, so where the entry belongs cannot be proven",
                    repairable=False,
                ), None)
        # A name missing from its directory's listing: lookup finds it, readdir does not.
        sql = ("SELECT d.parent, d.name, d.ino, d.seq FROM dent d JOIN inode i ON i.ino = d.ino LEFT JOIN listing e "
               "ON e.parent = d.parent AND e.seq = d.seq WHERE e.name IS NULL OR e.name != d.name")
        async for rows in self._candidates(sql):
            for parent, name, ino, seq in await self._view(lambda t: [
                row for row in rows if _entry_is(t, *row) and t.get(_k_seq(row[0], row[3])) != row[1]
            ]):
                await self._settle(Finding(
                    "entry-unlisted", await self._entry_name(parent, name),
                    f"is missing from its directory's listing (slot {seq}): readdir does not show it",
                    "add it to the listing",
                ), lambda: self._write(lambda tx: _relist(tx, parent, name, ino, seq)))
        # A listing slot whose name is gone or has another slot: readdir skips it.
        sql = ("SELECT e.parent, e.seq, e.name FROM listing e LEFT JOIN dent d "
               "ON d.parent = e.parent AND d.name = e.name WHERE d.seq IS NULL OR d.seq != e.seq")
        async for rows in self._candidates(sql):
            for parent, seq, name in await self._view(lambda t: [
                row for row in rows if _slot_is_stale(t, *row)
            ]):
                await self._settle(Finding(
                    "listing-stale", await self._entry_name(parent, name),
                    f"listing slot {seq} names an entry that does not exist or has another slot",
                    "remove the slot",
                ), lambda: self._write(lambda tx: _drop_slot(tx, parent, seq, name)))

    async def _check_dir_parents(self) -> None:
        """A directory's '..' (its `parent`) is the directory its one name is in."""
        self._phase("directory parents")
        sql = ("SELECT i.ino, d.parent, d.name FROM inode i JOIN dent d ON d.ino = i.ino "
               "WHERE i.dir AND i.ino != ? AND i.parent != d.parent")
        async for rows in self._candidates(sql, (ROOT_INODE,)):
            def confirm(t: Txn) -> list[tuple[int, int, bytes, int]]:
                out = []
                for ino, parent, name in rows:
                    raw_entry, raw = t.get(_k_dirent(parent, name)), t.get(_k_inode(ino))
                    if raw_entry and raw and _ENTRY.unpack(raw_entry)[0] == ino:
                        inode = Inode.unpack(ino, raw)
                        if inode.is_dir and inode.parent != parent:
                            out.append((ino, parent, name, inode.parent))
                return out

            for ino, parent, name, wrong in await self._view(confirm):
                await self._settle(Finding(
                    "dir-parent", await self._inode_name(ino),
                    f"its '..' is inode {wrong}, but its name is in inode {parent}", f"set '..' to inode {parent}",
                ), lambda: self._write(lambda tx: _set_dir_parent(tx, ino, parent, name)))

    async def _check_stray_keys(self) -> None:
        """Content, symlink targets and xattrs of inodes that do not exist,
        and content past the end of a file: leaked, and the chunks they
        reference are never freed."""
        self._phase("stray keys")
        sql = "SELECT c.ino, c.chunks FROM content c LEFT JOIN inode i ON i.ino = c.ino WHERE i.ino IS NULL"
        async for rows in self._candidates(sql):
            for ino, count in await self._view(lambda t: [
                row for row in rows
                if t.get(_k_inode(row[0])) is None and next(t.scan(b"c" + _u64(row[0]), limit=1), None)
            ]):
                await self._settle(Finding(
                    "content-orphan", f"inode {ino}", f"{_plural(count, 'chunk entry', 'chunk entries')} of an inode that does not exist",
                    "drop them and their chunk references",
                ), lambda: self._write(lambda tx: _drop_content(tx, ino, 0, require_missing=True)))
        sql = ("SELECT c.ino, i.size, i.reg FROM content c JOIN inode i ON i.ino = c.ino "
               "WHERE i.reg = 0 OR c.last >= (i.size + ? - 1) / ?")
        async for rows in self._candidates(sql, (CHUNK_SIZE_BYTES, CHUNK_SIZE_BYTES)):
            def confirm(t: Txn) -> list[tuple[int, int]]:
                out = []
                for ino, _, _ in rows:
                    raw = t.get(_k_inode(ino))
                    if raw is None:
                        continue
                    inode = Inode.unpack(ino, raw)
                    end = (inode.size + CHUNK_SIZE_BYTES - 1) // CHUNK_SIZE_BYTES if inode.is_reg else 0
                    prefix = b"c" + _u64(ino)
                    if next(t.scan(prefix, prefix + _u64(end), limit=1), None):
                        out.append((ino, end))
                return out

            for ino, end in await self._view(confirm):
                await self._settle(Finding(
                    "content-past-end", await self._inode_name(ino), f"has chunk entries from index {end} on, past its size",
                    "drop them and their chunk references",
                ), lambda: self._write(lambda tx: _drop_content(tx, ino, end, require_missing=False)))
        sql = "SELECT x.ino, x.key FROM extra x LEFT JOIN inode i ON i.ino = x.ino WHERE i.ino IS NULL"
        async for rows in self._candidates(sql):
            for ino, key in await self._view(lambda t: [
                row for row in rows if t.get(_k_inode(row[0])) is None and t.get(row[1]) is not None
            ]):
                what = "symlink target" if key[:1] == b"l" else f"xattr {_name(key[9:])!r}"
                await self._settle(Finding(
                    "key-orphan", f"inode {ino}", f"a {what} of an inode that does not exist", "remove it",
                ), lambda: self._write(lambda tx: _drop_if_no_inode(tx, ino, key)))

    # ---- link counts ----------------------------------------------------------------------------
    async def _check_links(self) -> None:
        """nlink is the number of names (files), or 2 + subdirectories
        (directories; 0 once removed). Counted again over every entry, in one
        consistent transaction, for the inodes that look wrong."""
        self._phase("link counts")
        sql = """
            WITH names AS (SELECT ino, count(*) AS n FROM dent GROUP BY ino),
                 subdirs AS (SELECT d.parent AS ino, count(*) AS n FROM dent d JOIN inode c ON c.ino = d.ino
                             WHERE c.dir GROUP BY d.parent)
            SELECT i.ino FROM inode i LEFT JOIN names USING (ino) LEFT JOIN subdirs USING (ino)
            WHERE i.nlink != CASE
                WHEN NOT i.dir THEN coalesce(names.n, 0)
                WHEN i.ino = ? OR coalesce(names.n, 0) > 0 THEN 2 + coalesce(subdirs.n, 0)
                ELSE 0 END
        """
        async for rows in self._candidates(sql, (ROOT_INODE,), batch=RECOUNT_BATCH):
            for ino, is_dir, nlink, ctime, names, expected in await self._view(
                lambda t: _recount_links(t, [r[0] for r in rows]),
            ):
                who = await self._inode_name(ino)
                kind = "directory" if is_dir else "file"
                if names == 0 and ino != ROOT_INODE:
                    await self._settle(Finding(
                        "unreachable", who, f"a {kind} with nlink {nlink} that no name leads to",
                        "where it belongs cannot be proven (its data is kept)", repairable=False,
                    ), None)
                    continue
                if is_dir and names > 1:
                    await self._settle(Finding(
                        "dir-names", who, f"a directory with {names} names", "which name is right cannot be proven",
                        repairable=False,
                    ), None)
                    continue
                await self._settle(Finding(
                    "nlink", who, f"nlink is {nlink}, but the {kind} has " + (
                        _plural(expected - 2, "subdirectory", "subdirectories") if is_dir else _plural(names, "name")),
                    f"set nlink to {expected}",
                ), lambda: self._write(lambda tx: _fix_nlink(tx, ino, ctime, expected)))

    async def _check_orphans(self) -> None:
        self._phase("orphans")
        sql = "SELECT i.ino FROM inode i LEFT JOIN orphan o ON o.ino = i.ino WHERE i.nlink = 0 AND o.ino IS NULL"
        async for rows in self._candidates(sql):
            for (ino,) in await self._view(lambda t: [
                row for row in rows if _nlink(t, row[0]) == 0 and t.get(b"o" + _u64(row[0])) is None
            ]):
                await self._settle(Finding(
                    "orphan-unmarked", f"inode {ino}", "has no name left but is not marked an orphan: it is never freed",
                    "mark it an orphan (freed with its chunks once nothing holds it open)",
                ), lambda: self._write(lambda tx: _mark_orphan(tx, ino)))
        sql = "SELECT o.ino FROM orphan o LEFT JOIN inode i ON i.ino = o.ino WHERE i.ino IS NULL OR i.nlink > 0"
        async for rows in self._candidates(sql):
            for (ino,) in await self._view(lambda t: [
                row for row in rows if t.get(b"o" + _u64(row[0])) is not None and _nlink(t, row[0]) != 0
            ]):
                await self._settle(Finding(
                    "orphan-stale", f"inode {ino}", "is marked an orphan but has a name, or does not exist",
                    "remove the mark",
                ), lambda: self._write(lambda tx: _unmark_orphan(tx, ino)))

    # ---- the chunk ledger ---------------------------------------------------------------------
    async def _check_refcounts(self) -> None:
        """A chunk's count is the number of file-content entries naming it."""
        self._phase("reference counts")
        sql = """
            SELECT chunk FROM rec r LEFT JOIN ref f USING (chunk) WHERE r.refs != coalesce(f.n, 0)
            UNION ALL
            SELECT chunk FROM ref f LEFT JOIN rec r USING (chunk) WHERE r.chunk IS NULL
        """
        async for rows in self._candidates(sql, batch=RECOUNT_BATCH):
            for raw, record, counted, length in await self._view(lambda t: _recount_refs(t, [r[0] for r in rows])):
                recorded = record.refs if record else None
                chunk = raw.hex()
                where = None
                if record is None and self.repair:
                    where = await self._where(chunk)
                await self._settle(Finding(
                    "refcount", _chunk_name(raw),
                    (f"counts {_plural(record.refs, 'reference')}, but is named by {_plural(counted, 'file entry', 'file entries')}"
                     if record else f"is named by {_plural(counted, 'file entry', 'file entries')} but has no chunk record"),
                    f"set the count to {counted}" + ("" if record else " (a new record)"),
                ), lambda: self._repair_refcount(raw, recorded, counted, length, where))

    async def _where(self, chunk: str) -> str:
        if await self._exists(chunk):
            return "store"
        return "cache" if await self._in_cache(chunk) else "nowhere"

    async def _repair_refcount(self, raw: bytes, recorded: int | None, counted: int, length: int, where: str | None) -> bool:
        done, owed = await self._write(lambda tx: _fix_refcount(tx, raw, recorded, counted, length, where))
        self._owe(owed)
        return done

    def _owe(self, chunks: list[str]) -> None:
        if chunks and self.enqueue is not None:
            self.enqueue(chunks)

    async def _check_garbage(self) -> None:
        """The garbage list holds exactly the chunks at count zero (and those
        being deleted, whose entry is the deletion's start time)."""
        self._phase("garbage list")
        sql = ("SELECT r.chunk FROM rec r LEFT JOIN garbage g USING (chunk) "
               "WHERE (r.refs = 0 OR r.flags & ?) AND g.chunk IS NULL")
        async for rows in self._candidates(sql, (DELETING,)):
            for (raw,) in await self._view(lambda t: [row for row in rows if _garbage_state(t, row[0]) == "missing"]):
                await self._settle(Finding(
                    "garbage-missing", _chunk_name(raw),
                    "has no references (or is being deleted) but is not on the garbage list: never freed",
                    "put it on the garbage list",
                ), lambda: self._write(lambda tx: _fix_garbage(tx, raw)))
        sql = ("SELECT g.chunk FROM garbage g LEFT JOIN rec r USING (chunk) "
               "WHERE r.chunk IS NULL OR (r.refs > 0 AND r.flags & ? = 0)")
        async for rows in self._candidates(sql, (DELETING,)):
            for (raw,) in await self._view(lambda t: [row for row in rows if _garbage_state(t, row[0]) == "stale"]):
                await self._settle(Finding(
                    "garbage-stale", _chunk_name(raw), "is on the garbage list but has references or no record",
                    "take it off the garbage list",
                ), lambda: self._write(lambda tx: _fix_garbage(tx, raw)))

    async def _check_pending(self) -> None:
        """Pending uploads: `u <node> <chunk>` (the node owes the upload) and
        `w <chunk> <node>` (who holds a copy) come in pairs, only for chunks
        with a record, and only until the store has the chunk."""
        self._phase("pending uploads")
        sql = ("SELECT x.chunk, group_concat(x.node) FROM (SELECT chunk, node FROM pend UNION SELECT chunk, node FROM hold) x "
               "LEFT JOIN rec r USING (chunk) WHERE r.chunk IS NULL GROUP BY x.chunk")
        async for rows in self._candidates(sql):
            for raw, nodes in await self._view(lambda t: [
                (raw, nodes) for raw, nodes in ((r[0], _nodes(r[1])) for r in rows)
                if t.get(b"r" + raw) is None and any(_pending(t, raw, nodes))
            ]):
                await self._settle(Finding(
                    "pending-orphan", _chunk_name(raw), "has pending-upload entries but no chunk record",
                    "remove the entries",
                ), lambda: self._write(lambda tx: _drop_pending_orphan(tx, raw, nodes)))
        sql = ("SELECT p.chunk, p.node, 'u' FROM pend p LEFT JOIN hold h USING (chunk, node) WHERE h.node IS NULL "
               "UNION ALL SELECT h.chunk, h.node, 'w' FROM hold h LEFT JOIN pend p USING (chunk, node) WHERE p.node IS NULL")
        async for rows in self._candidates(sql):
            def confirm(t: Txn) -> list[tuple]:
                found = t.get_many(k for raw, node, _ in rows for k in (_k_pending(node, raw), _k_holder(raw, node), b"r" + raw))
                return [(raw, node, which) for raw, node, which in rows if b"r" + raw in found and
                        (_k_pending(node, raw) in found) != (_k_holder(raw, node) in found)]

            for raw, node, which in await self._view(confirm):
                if which == "u":
                    finding = Finding("pending-unpaired", _chunk_name(raw),
                                      f"node {node} owes its upload but is not listed as holding it: the entry is never cleared",
                                      "list the node as holder")
                else:
                    finding = Finding("pending-unpaired", _chunk_name(raw),
                                      f"node {node} is listed as holding it but owes no upload",
                                      "remove the holder entry")
                await self._settle(finding, lambda: self._write(lambda tx: _pair_pending(tx, raw, node)))
        # Stale: the store has the chunk, and no deletion is under way.
        sql = ("SELECT p.chunk, group_concat(p.node) FROM pend p JOIN rec r USING (chunk) JOIN obj o USING (chunk) "
               "WHERE r.flags & ? = 0 GROUP BY p.chunk")
        async for rows in self._candidates(sql, (DELETING,)):
            await self._check_stale_pending([(raw, _nodes(nodes)) for raw, nodes in rows])

    async def _check_stale_pending(self, rows: list[tuple[bytes, list[int]]]) -> None:
        def state(t: Txn) -> dict[bytes, tuple]:
            out = {}
            for raw, nodes in rows:
                tokens, _ = _pending(t, raw, nodes)
                raw_record = t.get(b"r" + raw)
                if tokens and raw_record and not ChunkRecord.unpack(raw_record).flags & DELETING:
                    out[raw] = tokens
            return out

        before = await self._view(state)
        stored = {raw for raw in before if await self._exists(raw.hex())}
        if not stored:
            return
        # An upload that has just finished is marked within moments.
        await trio.sleep(PENDING_SETTLE_SECONDS)
        after = await self._view(state)
        for raw in sorted(stored):
            tokens = before[raw]
            if after.get(raw) != tokens:
                continue
            nodes = ", ".join(str(n) for n in sorted(tokens))
            await self._settle(Finding(
                "pending-stale", _chunk_name(raw), f"is in the store but still pending upload on node {nodes}",
                "clear the pending entries",
            ), lambda: self._write(lambda tx: _clear_stale_pending(tx, raw, tokens)))

    async def _check_presence(self) -> None:
        """Every referenced chunk is in the store, or pending upload from a
        node that holds it (this node: in its cache)."""
        self._phase("chunk copies")
        sql = """
            WITH referenced AS (SELECT chunk FROM rec WHERE refs > 0 UNION SELECT chunk FROM ref WHERE n > 0)
            SELECT x.chunk, (SELECT group_concat(node) FROM pend p WHERE p.chunk = x.chunk)
            FROM referenced x LEFT JOIN rec r USING (chunk) LEFT JOIN obj o USING (chunk)
            WHERE o.chunk IS NULL AND coalesce(r.flags, 0) & ? = 0
            UNION ALL
            SELECT r.chunk, NULL FROM rec r JOIN obj o USING (chunk)
            WHERE r.flags & ? AND r.flags & ? = 0 AND r.chunk NOT IN (SELECT chunk FROM pend)
        """
        async for rows in self._candidates(sql, (DELETING, PENDING, DELETING)):
            for raw, nodes in rows:
                await self._check_copy(raw, _nodes(nodes))

    async def _check_copy(self, raw: bytes, nodes: list[int]) -> None:
        chunk = raw.hex()

        def state(t: Txn) -> tuple[ChunkRecord | None, dict[int, bytes]]:
            raw_record = t.get(b"r" + raw)
            return (ChunkRecord.unpack(raw_record) if raw_record else None), _pending(t, raw, nodes)[0]

        record, tokens = await self._view(state)
        if record is None or record.flags & DELETING:
            self.notes["chunks being deleted"] += bool(record)
            return
        stored = await self._exists(chunk)
        if stored:
            if record.flags & PENDING and not tokens:
                await self._settle(Finding(
                    "pending-flag", _chunk_name(raw), "is in the store but flagged pending upload, with nobody owing it",
                    "clear the flag",
                ), lambda: self._write(lambda tx: _clear_pending_flag(tx, raw)))
            return
        if record.refs == 0:
            return  # garbage: nothing needs it
        cached = await self._in_cache(chunk)
        if tokens and not record.flags & PENDING:
            owing = ", ".join(str(n) for n in sorted(tokens))
            await self._settle(Finding(
                "pending-flag", _chunk_name(raw), f"is owed an upload by node {owing} but not flagged pending upload",
                "set the flag",
            ), lambda: self._write(lambda tx: _set_pending_flag(tx, raw)))
            return
        if tokens:
            if self.node in tokens and cached:
                self.notes["chunks pending upload from this node"] += 1
                return
            others = sorted(n for n in tokens if n != self.node)
            if others:
                self.notes["chunks pending upload from other nodes"] += 1
                return
        if cached:
            await self._settle(Finding(
                "chunk-missing", _chunk_name(raw),
                ("is flagged pending upload but nobody owes it" if record.flags & PENDING else
                 "is not in the object store") + "; this node's cache has a copy",
                "upload it again from this node's cache",
            ), lambda: self._take_upload(raw))
            return
        holder = f"node {self.node} owed its upload but its cache has no copy" if tokens else "no node owes its upload"
        await self._settle(Finding(
            "chunk-lost", _chunk_name(raw), f"is referenced ({record.refs}) but not in the object store, and {holder}",
            "no copy is left to restore it from; the files naming it read EIO there", repairable=False,
        ), None)

    async def _take_upload(self, raw: bytes) -> bool:
        done = await self._write(lambda tx: _take_upload(tx, raw))
        if done:
            self._owe([raw.hex()])
        return done

    async def _check_unreferenced(self) -> None:
        """Objects no chunk record names: left by uploads whose commit never
        came. Young ones may still be committed; older ones are deleted."""
        if not self._listed:
            return
        self._phase("unreferenced objects")
        sql = "SELECT o.chunk, o.size, o.modified FROM obj o LEFT JOIN rec r USING (chunk) WHERE r.chunk IS NULL"
        grace = self.grace_seconds
        # Uploaded early by a node whose commit is still to come (`t` keys):
        # named by that note, not leaked.
        early = await self._view(lambda t: {key[9:] for key, _ in t.scan(b"t")})
        async for rows in self._candidates(sql):
            now = time.time()
            old = [(raw, size, modified) for raw, size, modified in rows if now - modified >= grace]
            self.notes["unreferenced objects younger than the GC grace, left alone"] += len(rows) - len(old)
            for raw, size, modified in old:
                if raw in early:
                    self.notes["objects uploaded before their file's commit"] += 1
                    continue
                if await self._view(lambda t: t.get(b"r" + raw)) is not None or not await self._exists(raw.hex()):
                    continue
                age = _duration(now - modified)
                await self._settle(Finding(
                    "object-unreferenced", _chunk_name(raw), f"is in the object store ({size} bytes, {age} old) but no chunk record names it",
                    "delete it (as the garbage collector does: a commit of the same bytes meanwhile re-uploads it)",
                ), lambda: self._delete_unreferenced(raw, size))

    async def _delete_unreferenced(self, raw: bytes, size: int) -> bool:
        if not await self._write(lambda tx: _claim_unreferenced(tx, raw, size)):
            return False
        try:
            await self._io(_retrying, self.store.delete, raw.hex())
        except StoreError as exc:
            log.warning("fsck: deleting an unreferenced object failed", extra={"chunk": raw.hex(), "error": str(exc)})
            return False
        finally:
            await self.calls.in_thread(self.meta.finish_delete, raw.hex())
        return True

    # ---- --verify ----------------------------------------------------------------------------------
    async def _verify(self) -> None:
        """Read every referenced chunk (its store object and this node's cached
        copy) and check it against its BLAKE3 id."""
        sql = ("SELECT r.chunk, r.length, o.chunk IS NOT NULL, c.chunk IS NOT NULL FROM rec r "
               "LEFT JOIN obj o USING (chunk) LEFT JOIN cached c USING (chunk) WHERE r.refs > 0 "
               "AND (o.chunk IS NOT NULL OR c.chunk IS NOT NULL)")
        total = (await self._sql(self._fetch, (
            "SELECT coalesce(sum(r.length * ((o.chunk IS NOT NULL) + (c.chunk IS NOT NULL))), 0) FROM rec r "
            "LEFT JOIN obj o USING (chunk) LEFT JOIN cached c USING (chunk) WHERE r.refs > 0")))[0][0]
        self._phase("verifying", total)
        async for rows in self._candidates(sql, batch=IO_CONCURRENCY * 4):
            bad: list[tuple[bytes, str]] = []

            async def check(raw: bytes, length: int, in_store: bool, in_cache: bool) -> None:
                for where, wanted, read in (("store", in_store, self._store_copy_is_bad),
                                            ("cache", in_cache, self._cache_copy_is_bad)):
                    if wanted:
                        is_bad, size = await self._io(read, raw.hex())
                        self.counts["verified_bytes"] += size
                        self.progress["done"] += length
                        if is_bad:
                            bad.append((raw, where))

            async with trio.open_nursery() as nursery:
                for row in rows:
                    nursery.start_soon(check, *row)
            for raw, where in sorted(bad):
                await self._report_corrupt(raw, where)

    def _store_copy_is_bad(self, chunk: str) -> tuple[bool, int]:
        """(corrupt, bytes read); a bad read is read again before it counts."""
        read = 0
        for _ in range(2):
            try:
                data = _retrying(self.store.get, chunk)
            except ChunkMissing:
                return False, read  # deleted meanwhile: not a copy any more
            except StoreError as exc:
                raise FsckError(f"the object store {self.store.describe()} did not answer: {exc}") from None
            read += len(data)
            if hash_chunk(data) == chunk:
                return False, read
        return True, read

    def _cache_copy_is_bad(self, chunk: str) -> tuple[bool, int]:
        data = self._read_cached(chunk)
        if data is None:
            return False, 0
        return hash_chunk(data) != chunk, len(data)

    def _read_cached(self, chunk: str) -> bytes | None:
        try:
            with open(self.cache.path(chunk), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None  # evicted meanwhile

    async def _report_corrupt(self, raw: bytes, where: str) -> None:
        chunk = raw.hex()
        if where == "cache":
            await self._settle(Finding(
                "cache-corrupt", _chunk_name(raw), "this node's cached copy does not match its BLAKE3 id",
                "the cache is the daemon's; unmount, delete the file and mount again", repairable=False,
            ), None)
            return
        good_copy = await self._in_cache(chunk) and not (await self._io(self._cache_copy_is_bad, chunk))[0]
        await self._settle(Finding(
            "chunk-corrupt", _chunk_name(raw), "the store's object does not match its BLAKE3 id (readers get EIO)",
            "upload this node's good cached copy over it" if good_copy else "no good copy on this node",
            repairable=good_copy,
        ), lambda: self._io(self._reupload, chunk))

    def _reupload(self, chunk: str) -> bool:
        data = self._read_cached(chunk)
        if data is None or hash_chunk(data) != chunk:
            return False
        try:
            _retrying(self.store.delete, chunk)  # a file store keeps an existing object
            _retrying(self.store.put_file, chunk, self.cache.path(chunk))
            return hash_chunk(_retrying(self.store.get, chunk)) == chunk
        except StoreError as exc:
            log.warning("fsck: re-uploading a corrupt object failed", extra={"chunk": chunk, "error": str(exc)})
            return False


def _retrying(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking store call, tried again after temporary errors (not after
    ChunkMissing, which answers the question)."""
    for attempt in range(STORE_ATTEMPTS):
        try:
            return fn(*args)
        except ChunkMissing:
            raise
        except StoreError as exc:
            if not exc.temporary or attempt == STORE_ATTEMPTS - 1:
                raise
            time.sleep(STORE_RETRY_SECONDS * 2 ** attempt)


# ---- parsing pages into scratch rows -------------------------------------------------------------
def _parse_inodes(page: list[tuple[bytes, bytes]]) -> list:
    rows = []
    for key, value in page:
        if len(key) == 9:
            inode = Inode.unpack(_U64.unpack(key[1:])[0], value)
            rows.append((inode.ino, inode.is_dir, inode.is_reg, inode.nlink, inode.parent, inode.size))
    return [("INSERT OR REPLACE INTO inode VALUES (?, ?, ?, ?, ?, ?)", rows)]


def _parse_contents(page: list[tuple[bytes, bytes]]) -> list:
    files: dict[int, list[int]] = {}
    chunks: dict[bytes, list[int]] = {}
    for key, value in page:
        if len(key) != 17:
            continue
        ino, index = _U64.unpack(key[1:9])[0], _U64.unpack(key[9:])[0]
        raw, length = _CHUNK.unpack(value)
        entry = files.setdefault(ino, [0, index])
        entry[0] += 1
        entry[1] = max(entry[1], index)
        chunks.setdefault(raw, [0, length])[0] += 1
    return [
        ("INSERT INTO content VALUES (?, ?, ?) ON CONFLICT (ino) DO UPDATE "
         "SET chunks = chunks + excluded.chunks, last = max(last, excluded.last)",
         [(ino, n, last) for ino, (n, last) in files.items()]),
        ("INSERT INTO ref VALUES (?, ?, ?) ON CONFLICT (chunk) DO UPDATE SET n = n + excluded.n",
         [(raw, n, length) for raw, (n, length) in chunks.items()]),
    ]


def _parse_entries(page: list[tuple[bytes, bytes]]) -> list:
    rows = [(_U64.unpack(k[1:9])[0], k[9:], *_ENTRY.unpack(v)) for k, v in page if len(k) > 9]
    return [("INSERT OR REPLACE INTO dent VALUES (?, ?, ?, ?)", rows)]


def _parse_listings(page: list[tuple[bytes, bytes]]) -> list:
    rows = [(_U64.unpack(k[1:9])[0], _U64.unpack(k[9:17])[0], v) for k, v in page if len(k) == 17]
    return [("INSERT OR REPLACE INTO listing VALUES (?, ?, ?)", rows)]


def _parse_records(page: list[tuple[bytes, bytes]]) -> list:
    rows = []
    for key, value in page:
        if len(key) == 33:
            record = ChunkRecord.unpack(value)
            rows.append((key[1:], record.refs, record.length, record.flags))
    return [("INSERT OR REPLACE INTO rec VALUES (?, ?, ?, ?)", rows)]


def _parse_chunk_keys(table: str) -> Callable[[list[tuple[bytes, bytes]]], list]:
    def parse(page: list[tuple[bytes, bytes]]) -> list:
        return [(f"INSERT OR REPLACE INTO {table} VALUES (?)", [(k[1:],) for k, _ in page if len(k) == 33])]

    return parse


def _parse_pending(page: list[tuple[bytes, bytes]]) -> list:
    rows = [(k[9:], _U64.unpack(k[1:9])[0]) for k, _ in page if len(k) == 41]
    return [("INSERT OR REPLACE INTO pend VALUES (?, ?)", rows)]


def _parse_holders(page: list[tuple[bytes, bytes]]) -> list:
    rows = [(k[1:33], _U64.unpack(k[33:])[0]) for k, _ in page if len(k) == 41]
    return [("INSERT OR REPLACE INTO hold VALUES (?, ?)", rows)]


def _parse_orphans(page: list[tuple[bytes, bytes]]) -> list:
    return [("INSERT OR REPLACE INTO orphan VALUES (?)", [(_U64.unpack(k[1:])[0],) for k, _ in page if len(k) == 9])]


def _parse_extra(page: list[tuple[bytes, bytes]]) -> list:
    return [("INSERT OR REPLACE INTO extra VALUES (?, ?)", [(_U64.unpack(k[1:9])[0], k) for k, _ in page if len(k) >= 9])]


def _nodes(text: str | None) -> list[int]:
    return [int(n) for n in str(text).split(",")] if text else []


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- confirming: reads in one transaction -----------------------------------------------------------
def _entry_is(t: Txn, parent: int, name: bytes, ino: int, seq: int) -> bool:
    raw = t.get(_k_dirent(parent, name))
    return raw is not None and _ENTRY.unpack(raw) == (ino, seq)


def _is_dir(raw: bytes | None, ino: int) -> bool:
    return raw is not None and Inode.unpack(ino, raw).is_dir


def _nlink(t: Txn, ino: int) -> int | None:
    raw = t.get(_k_inode(ino))
    return None if raw is None else Inode.unpack(ino, raw).nlink


def _slot_is_stale(t: Txn, parent: int, seq: int, name: bytes) -> bool:
    if t.get(_k_seq(parent, seq)) != name:
        return False
    raw = t.get(_k_dirent(parent, name))
    return raw is None or _ENTRY.unpack(raw)[1] != seq


def _garbage_state(t: Txn, raw: bytes) -> str:
    found = t.get_many([b"r" + raw, b"g" + raw])
    record = ChunkRecord.unpack(found[b"r" + raw]) if b"r" + raw in found else None
    listed = b"g" + raw in found
    wanted = record is not None and (record.refs == 0 or bool(record.flags & DELETING))
    if wanted and not listed:
        return "missing"
    if listed and not wanted:
        return "stale"
    return "ok"


def _pending(t: Txn, raw: bytes, nodes: Iterable[int]) -> tuple[dict[int, bytes], set[int]]:
    """The chunk's pending tokens by node, and its holders (`w`)."""
    holders = {_U64.unpack(k[33:])[0] for k, _ in t.scan(b"w" + raw)}
    wanted = set(nodes) | holders
    found = t.get_many(_k_pending(n, raw) for n in wanted)
    return {n: found[_k_pending(n, raw)] for n in wanted if _k_pending(n, raw) in found}, holders


def _recount_links(t: Txn, inos: list[int]) -> list[tuple[int, bool, int, int, int, int]]:
    """(ino, is_dir, nlink, ctime, names, expected nlink) of those of `inos`
    whose nlink is wrong, counted over every directory entry in this one snapshot."""
    wanted = set(inos)
    inodes = {}
    for start in range(0, len(inos), PAGE_KEYS):
        found = t.get_many(_k_inode(i) for i in inos[start:start + PAGE_KEYS])
        for key, raw in found.items():
            ino = _U64.unpack(key[1:])[0]
            inodes[ino] = Inode.unpack(ino, raw)
    names: collections.Counter[int] = collections.Counter()
    for key, value in t.scan(b"d"):
        ino = _ENTRY.unpack(value)[0]
        if ino in wanted:
            names[ino] += 1
    out = []
    for ino, inode in sorted(inodes.items()):
        if inode.is_dir:
            subdirs = _count_subdirs(t, ino)
            expected = 2 + subdirs if ino == ROOT_INODE or names[ino] else 0
        else:
            expected = names[ino]
        if inode.nlink != expected:
            out.append((ino, inode.is_dir, inode.nlink, inode.ctime_ns, names[ino], expected))
    return out


def _count_subdirs(t: Txn, ino: int) -> int:
    count = 0
    children = (_ENTRY.unpack(v)[0] for _, v in t.scan(b"d" + _u64(ino)))
    while batch := list(itertools.islice(children, PAGE_KEYS)):
        for key, raw in t.get_many(_k_inode(c) for c in batch).items():
            count += Inode.unpack(_U64.unpack(key[1:])[0], raw).is_dir
    return count


def _recount_refs(t: Txn, chunks: list[bytes]) -> list[tuple[bytes, ChunkRecord | None, int, int]]:
    """(chunk, record, entries naming it, length) of those of `chunks` whose
    count is wrong, counted over every file-content entry in this one snapshot."""
    counted: collections.Counter[bytes] = collections.Counter()
    lengths: dict[bytes, int] = {}
    wanted = set(chunks)
    for _, value in t.scan(b"c"):
        raw, length = _CHUNK.unpack(value)
        if raw in wanted:
            counted[raw] += 1
            lengths[raw] = length
    out = []
    for start in range(0, len(chunks), PAGE_KEYS):
        batch = chunks[start:start + PAGE_KEYS]
        found = t.get_many(b"r" + c for c in batch)
        for raw in batch:
            record = ChunkRecord.unpack(found[b"r" + raw]) if b"r" + raw in found else None
            if (record.refs if record else 0) != counted[raw]:
                out.append((raw, record, counted[raw], lengths.get(raw, record.length if record else 0)))
    return out


# ---- repairs: transactions that check again what they fix ----------------------------------------------
def _remove_dangling(tx: _Tx, parent: int, name: bytes, ino: int, seq: int) -> bool:
    t = tx.t
    if not _entry_is(t, parent, name, ino, seq) or t.get(_k_inode(ino)) is not None:
        return False
    t.delete(_k_dirent(parent, name))
    if t.get(_k_seq(parent, seq)) == name:
        t.delete(_k_seq(parent, seq))
    return True


def _relist(tx: _Tx, parent: int, name: bytes, ino: int, seq: int) -> bool:
    t = tx.t
    if not _entry_is(t, parent, name, ino, seq) or t.get(_k_seq(parent, seq)) == name:
        return False
    directory = tx.directory(parent)
    if t.get(_k_seq(parent, seq)) is not None or seq >= directory.next_seq:
        # The slot is another name's (or not handed out yet): take a new one.
        seq = directory.next_seq
        directory.next_seq += 1
        tx.save(directory)
        tx.set_entry(parent, name, ino, seq)
    t.put(_k_seq(parent, seq), name)
    return True


def _drop_slot(tx: _Tx, parent: int, seq: int, name: bytes) -> bool:
    if not _slot_is_stale(tx.t, parent, seq, name):
        return False
    tx.t.delete(_k_seq(parent, seq))
    return True


def _set_dir_parent(tx: _Tx, ino: int, parent: int, name: bytes) -> bool:
    raw = tx.t.get(_k_dirent(parent, name))
    inode = tx.inode(ino)
    if raw is None or _ENTRY.unpack(raw)[0] != ino or not inode.is_dir:
        return False
    inode.parent = parent
    tx.save(inode)
    return True


def _drop_content(tx: _Tx, ino: int, first_index: int, *, require_missing: bool) -> bool:
    t = tx.t
    raw_inode = t.get(_k_inode(ino))
    if require_missing and raw_inode is not None:
        return False
    if not require_missing:
        if raw_inode is None:
            return False
        inode = Inode.unpack(ino, raw_inode)
        end = (inode.size + CHUNK_SIZE_BYTES - 1) // CHUNK_SIZE_BYTES if inode.is_reg else 0
        if end != first_index:
            return False
    prefix = b"c" + _u64(ino)
    dropped = list(t.scan(prefix, prefix + _u64(first_index)))
    tx.load_refs(value[:32] for _, value in dropped)
    for key, value in dropped:
        t.delete(key)
        tx.decref(value[:32])
    return bool(dropped)


def _drop_if_no_inode(tx: _Tx, ino: int, key: bytes) -> bool:
    if tx.t.get(_k_inode(ino)) is not None or tx.t.get(key) is None:
        return False
    tx.t.delete(key)
    return True


def _fix_nlink(tx: _Tx, ino: int, ctime: int, expected: int) -> bool:
    """Set nlink to what was counted, if the inode is as it was then: every
    change to its names (or, for a directory, to its subdirectories) sets
    its ctime, and so does this fix, so a second repair racing this one
    (another node's fsck) finds it changed and leaves it."""
    inode = tx.inode(ino)
    if inode.ctime_ns != ctime:
        return False
    inode.nlink = expected
    inode.ctime_ns = tx.now
    tx.save(inode)
    tx.t.delete(b"o" + _u64(ino))
    return True


def _mark_orphan(tx: _Tx, ino: int) -> bool:
    raw = tx.t.get(_k_inode(ino))
    if raw is None or Inode.unpack(ino, raw).nlink != 0:
        return False
    tx.t.put(b"o" + _u64(ino), _u64(tx.now))
    return True


def _unmark_orphan(tx: _Tx, ino: int) -> bool:
    if _nlink(tx.t, ino) == 0:
        return False
    tx.t.delete(b"o" + _u64(ino))
    return True


def _fix_refcount(
    tx: _Tx, raw: bytes, recorded: int | None, counted: int, length: int, where: str | None,
) -> tuple[bool, list[str]]:
    """Set the count to what was counted, with the garbage list in step, if
    it still says what it said then (None: no record). Every transaction
    moves a count and what it counts together, so an unchanged count means
    an unchanged number of entries; a second repair racing this one (another
    node's fsck) finds the count changed and leaves it. A chunk with no
    record gets one: uploaded if the store has it, pending from this node if
    only its cache does (lost otherwise: the presence check says so)."""
    t = tx.t
    record = tx.record(raw)
    if (record.refs if record else None) != recorded or (record is None and counted == 0):
        return False, []
    new = counted
    if record is None:
        record = ChunkRecord(0, length)
        if where == "cache":
            record.flags |= PENDING
            tx.add_pending(raw)
    if not record.flags & DELETING:
        if new == 0:
            t.put(b"g" + raw, _u64(tx.now))
        else:
            t.delete(b"g" + raw)
    record.refs = new
    t.put(b"r" + raw, record.pack())
    return True, list(tx.to_upload)


def _fix_garbage(tx: _Tx, raw: bytes) -> bool:
    state = _garbage_state(tx.t, raw)
    if state == "missing":
        tx.t.put(b"g" + raw, _u64(tx.now))
    elif state == "stale":
        tx.t.delete(b"g" + raw)
    return state != "ok"


def _drop_pending_orphan(tx: _Tx, raw: bytes, nodes: list[int]) -> bool:
    if tx.t.get(b"r" + raw) is not None:
        return False
    tokens, holders = _pending(tx.t, raw, nodes)
    for node in set(tokens) | holders:
        tx.t.delete(_k_pending(node, raw))
        tx.t.delete(_k_holder(raw, node))
    return bool(tokens or holders)


def _pair_pending(tx: _Tx, raw: bytes, node: int) -> bool:
    t = tx.t
    found = t.get_many([_k_pending(node, raw), _k_holder(raw, node), b"r" + raw])
    if b"r" + raw not in found:
        return False
    if _k_pending(node, raw) in found and _k_holder(raw, node) not in found:
        t.put(_k_holder(raw, node), b"")
        return True
    if _k_holder(raw, node) in found and _k_pending(node, raw) not in found:
        t.delete(_k_holder(raw, node))
        return True
    return False


def _clear_stale_pending(tx: _Tx, raw: bytes, tokens: dict[int, bytes]) -> bool:
    """What marking the upload done would do, if nothing changed since the
    store was seen to have the chunk (a deletion changes the tokens)."""
    record = tx.record(raw)
    if record is None or record.flags & DELETING or _pending(tx.t, raw, tokens)[0] != tokens:
        return False
    for node in tokens:
        tx.t.delete(_k_pending(node, raw))
    tx.clear_pending(raw)
    record.flags &= ~PENDING
    tx.t.put(b"r" + raw, record.pack())
    return True


def _clear_pending_flag(tx: _Tx, raw: bytes) -> bool:
    record = tx.record(raw)
    if record is None or record.flags & DELETING or not record.flags & PENDING or next(tx.t.scan(b"w" + raw, limit=1), None):
        return False
    record.flags &= ~PENDING
    tx.t.put(b"r" + raw, record.pack())
    return True


def _set_pending_flag(tx: _Tx, raw: bytes) -> bool:
    record = tx.record(raw)
    if record is None or record.flags & (PENDING | DELETING) or not next(tx.t.scan(b"w" + raw, limit=1), None):
        return False
    record.flags |= PENDING
    tx.t.put(b"r" + raw, record.pack())
    return True


def _take_upload(tx: _Tx, raw: bytes) -> bool:
    """This node owes the upload of a chunk its cache holds."""
    record = tx.record(raw)
    if record is None or record.flags & DELETING or record.refs == 0:
        return False
    record.flags |= PENDING
    tx.t.put(b"r" + raw, record.pack())
    tx.add_pending(raw)
    return True


def _claim_unreferenced(tx: _Tx, raw: bytes, size: int) -> bool:
    """The collector's claim, for an object no record names: a record at count
    zero, DELETING, so a commit of the same bytes meanwhile re-uploads it."""
    if tx.t.get(b"r" + raw) is not None:
        return False
    tx.t.put(b"r" + raw, ChunkRecord(0, size, DELETING).pack())
    tx.t.put(b"g" + raw, _u64(tx.now))
    return True


# ---- for people -----------------------------------------------------------------------------------------------
def render(report: dict[str, Any]) -> tuple[list[str], str, bool]:
    """(one line per finding, the summary line, clean) for a report from `Fsck.run`."""
    lines = []
    for f in report["findings"]:
        if not f["repairable"]:
            outcome = f"cannot be repaired: {f['action']}"
        elif not report["repair"]:
            outcome = f"repair: {f['action']}"
        elif f["repaired"]:
            outcome = f"repaired: {f['action']}"
        else:
            outcome = f"not repaired, it changed meanwhile (run fsck again): {f['action']}"
        lines.append(f"{f['kind']}: {f['object']}: {f['detail']} ({outcome})")
    found, repaired = report["found"], report["repaired"]
    for kind, n in sorted(found.items()):
        shown = sum(1 for f in report["findings"] if f["kind"] == kind)
        if n > shown:
            lines.append(f"{kind}: {n - shown} more not shown")
    total, fixed = sum(found.values()), sum(repaired.values())
    problems = _plural(total, "problem")
    counts = report["counts"]
    checked = (f"{counts.get('inodes', 0)} inodes, {counts.get('entries', 0)} entries, "
               f"{counts.get('chunks', 0)} chunks, {counts.get('objects', 0)} store objects")
    if report["verify"]:
        checked += f", {counts.get('verified_bytes', 0) / (1 << 20):.1f} MiB verified"
    if not total:
        verdict = "clean"
    elif report["repair"]:
        verdict = f"{problems}, {fixed} repaired"
    else:
        verdict = f"{problems} (run with --repair to fix what can be)"
    notes = "; ".join(f"{text}: {n}" for text, n in sorted(report["notes"].items()) if n)
    summary = f"fsck: {checked} in {report['seconds']:.1f} s: {verdict}" + (f" ({notes})" if notes else "")
    clean = total == fixed if report["repair"] else total == 0
    return lines, summary, clean
