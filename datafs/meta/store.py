"""The filesystem schema on top of the key-value interface.

Every public method is one transaction: a function handed to `kv.transact` or
`kv.view`, which an optimistic engine may run more than once, so bodies only
read and write keys and return values. Methods block; `fs.py` runs them inline
for a local engine (LMDB, microseconds) and in worker threads for a remote one.

A `MetaStore` speaks for one node (`node_id`): what is shared between nodes
and what is the node's own lives in the same engine, under different keys.

Key layout (integers big-endian so scans come out in order):
    V                       -> volume record (JSON: name, uuid, store, chunk size)
    i <ino>                 -> Inode record
    d <parent> <name>       -> child ino, entry seq      (lookup by name)
    e <parent> <seq>        -> name                      (readdir, stable offsets)
    c <ino> <index>         -> chunk id (32 bytes), length (file content)
    r <chunk id>            -> refcount, length, flags   (dedup, GC, upload state)
    g <chunk id>            -> time ns                   (refcount fell to zero, or deletion began)
    u <node> <chunk id>     -> token                     (pending upload from that node)
    w <chunk id> <node>     -> ''                        (who holds an unuploaded copy)
    x <ino> <name>          -> xattr value
    l <ino>                 -> symlink target
    o <ino>                 -> time ns                   (nlink 0, kept while open somewhere)
    O <ino> <node>          -> ''                        (that node holds the inode open)
    s <node>                -> session record (JSON, with heartbeat time)
    t <node> <chunk id>     -> time ns, length           (uploaded before its file's commit)
    j <node> <seq>          -> ino, chunk ids            (a commit whose chunks were not durable yet)
    J <node>                -> seq                       (durable point: commits up to it have durable chunks)
    #ino                    -> inode numbers handed out (in batches, per node)
    #node                   -> node ids handed out
    #inodes <node>          -> inodes created minus freed by that node

The durability journal (`j`, `J`; durability.py): on the embedded engine a
content commit may reference chunks not yet fsynced, and records them under
`j` in the same transaction, so whatever state of the metadata a power loss
leaves on disk names every chunk it may have lost. A flush makes chunks
durable, then moves `J` and deletes the entries up to it; a start checks
those left.

No hot keys: inode numbers come in batches, inode counts are per node and
flushed in the background, and the only key many nodes write at once is the
directory they all create files in (its entry sequence), where a conflict
just runs the transaction again.

Readdir offsets are per-directory sequence numbers handed out at link time and
never reused, so entries removed (on any node) during a listing cannot make
another entry be skipped or repeated.

A chunk's life (`r` flags): committed for the first time by a node, it is
PENDING and that node records it under `u`/`w`; the first upload clears
PENDING and every node's `u`/`w` for it. At refcount zero it goes on the `g`
list; after the grace period a collector marks it DELETING, deletes the
object, then forgets it. A commit that re-references a chunk rescues it: off
the `g` list, or, if DELETING, pending again on the committing node (whose
upload waits until the deletion is over, then puts it back).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
import threading
import time
from typing import Iterable

from .. import errors
from ..config import CHUNK_SIZE_BYTES
from .kv import KV, Txn

ROOT_INODE = 1
NAME_MAX = 255
XATTR_CREATE = 1
XATTR_REPLACE = 2
#: Inode numbers a node takes from the shared counter at a time.
INODE_BATCH = 1024
#: A deletion whose collector died is taken over after this long.
STALE_DELETION_NS = 300 * 10**9

PENDING = 1
DELETING = 2

_INODE = struct.Struct(">IIIQqqqIQQQ")
_U64 = struct.Struct(">Q")
_ENTRY = struct.Struct(">QQ")
_CHUNK = struct.Struct(">32sI")
_REF_OLD = struct.Struct(">qI")
_REF = struct.Struct(">qIB")

UPLOAD_DONE = "done"
UPLOAD_RETRY = "retry"


def _u64(value: int) -> bytes:
    return _U64.pack(value)


def _time(raw: bytes | None) -> int:
    return _U64.unpack(raw)[0] if raw and len(raw) == 8 else 0


@dataclasses.dataclass
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    rdev: int = 0
    next_seq: int = 1  # directories: next readdir sequence number
    parent: int = 0  # directories: the one parent (for '..' and cycle checks)

    def pack(self) -> bytes:
        return _INODE.pack(
            self.mode, self.uid, self.gid, self.size, self.atime_ns, self.mtime_ns,
            self.ctime_ns, self.nlink, self.rdev, self.next_seq, self.parent,
        )

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> "Inode":
        return cls(ino, *_INODE.unpack(raw))

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclasses.dataclass(frozen=True)
class ChunkRef:
    chunk_id: str
    length: int


@dataclasses.dataclass
class ChunkRecord:
    refs: int
    length: int
    flags: int = 0

    def pack(self) -> bytes:
        return _REF.pack(self.refs, self.length, self.flags)

    @classmethod
    def unpack(cls, raw: bytes) -> "ChunkRecord":
        if len(raw) == _REF_OLD.size:
            return cls(*_REF_OLD.unpack(raw))
        return cls(*_REF.unpack(raw))


def _k_inode(ino: int) -> bytes:
    return b"i" + _u64(ino)


def _k_dirent(parent: int, name: bytes) -> bytes:
    return b"d" + _u64(parent) + name


def _k_seq(parent: int, seq: int) -> bytes:
    return b"e" + _u64(parent) + _u64(seq)


def _k_chunk(ino: int, index: int) -> bytes:
    return b"c" + _u64(ino) + _u64(index)


def _k_xattr(ino: int, name: bytes) -> bytes:
    return b"x" + _u64(ino) + name


def _k_pending(node: int, chunk: bytes) -> bytes:
    return b"u" + _u64(node) + chunk


def _k_holder(chunk: bytes, node: int) -> bytes:
    return b"w" + chunk + _u64(node)


def _k_journal(node: int, seq: int | None = None) -> bytes:
    """A journal entry's key; without `seq`, the prefix of the node's entries."""
    return b"j" + _u64(node) + (b"" if seq is None else _u64(seq))


def _k_durable_point(node: int) -> bytes:
    return b"J" + _u64(node)


def _k_open(ino: int, node: int) -> bytes:
    return b"O" + _u64(ino) + _u64(node)


def _k_count(node: int) -> bytes:
    return b"#inodes" + _u64(node)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise errors.NameTooLong(f"name of {len(name)} bytes")
    if not name or b"/" in name or name in (b".", b".."):
        raise errors.Invalid(f"invalid name {name!r}")


class _Tx:
    """One run of a transaction body: an inode cache (so a method can load the
    same directory twice and save it once) and a chunk-record cache (so the
    reference counts of a whole commit are read in one batch)."""

    def __init__(self, txn: Txn, node: int):
        self.t = txn
        self.node = node
        self._inodes: dict[int, Inode] = {}
        self._refs: dict[bytes, ChunkRecord | None] = {}
        self.now = time.time_ns()
        self.to_upload: list[str] = []

    # ---- inodes and entries ------------------------------------------------
    def load(self, *keys: bytes) -> dict[bytes, bytes]:
        """Fetch several keys in one round trip; inode and chunk records
        (`r` keys, found or not) are cached for the rest of the body."""
        found = self.t.get_many(k for k in keys if not (k[:1] == b"i" and _U64.unpack(k[1:9])[0] in self._inodes))
        for key in keys:
            raw = found.get(key)
            if key[:1] == b"i" and len(key) == 9 and raw is not None:
                ino = _U64.unpack(key[1:])[0]
                self._inodes[ino] = Inode.unpack(ino, raw)
            elif key[:1] == b"r" and len(key) == 33 and key[1:] not in self._refs:
                self._refs[key[1:]] = ChunkRecord.unpack(raw) if raw else None
        return found

    def inode(self, ino: int) -> Inode:
        if ino not in self._inodes:
            raw = self.t.get(_k_inode(ino))
            if raw is None:
                raise errors.NotFound(f"inode {ino}")
            self._inodes[ino] = Inode.unpack(ino, raw)
        return self._inodes[ino]

    def directory(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if not inode.is_dir:
            raise errors.NotDirectory(f"inode {ino}")
        return inode

    def save(self, *inodes: Inode) -> None:
        for inode in inodes:
            self._inodes[inode.ino] = inode
            self.t.put(_k_inode(inode.ino), inode.pack())

    def entry(self, parent: int, name: bytes) -> tuple[int, int] | None:
        raw = self.t.get(_k_dirent(parent, name))
        return _ENTRY.unpack(raw) if raw else None

    def add_entry(self, parent: Inode, name: bytes, ino: int) -> None:
        seq = parent.next_seq
        parent.next_seq += 1
        self.t.put(_k_dirent(parent.ino, name), _ENTRY.pack(ino, seq))
        self.t.put(_k_seq(parent.ino, seq), name)

    def set_entry(self, parent: int, name: bytes, ino: int, seq: int) -> None:
        """Point an existing entry at another inode, keeping its readdir position."""
        self.t.put(_k_dirent(parent, name), _ENTRY.pack(ino, seq))

    def remove_entry(self, parent: int, name: bytes, seq: int) -> None:
        self.t.delete(_k_dirent(parent, name))
        self.t.delete(_k_seq(parent, seq))

    def touch(self, inode: Inode, *, mtime: bool = True) -> None:
        inode.ctime_ns = self.now
        if mtime:
            inode.mtime_ns = self.now

    def drop_link(self, inode: Inode) -> None:
        inode.nlink = 0 if inode.is_dir else inode.nlink - 1
        inode.ctime_ns = self.now
        if inode.nlink == 0:
            self.t.put(b"o" + _u64(inode.ino), _u64(self.now))

    def is_empty_dir(self, ino: int) -> bool:
        return next(self.t.scan(b"e" + _u64(ino), limit=1), None) is None

    # ---- chunk reference counting ----------------------------------------------
    def load_refs(self, chunk_ids: Iterable[bytes]) -> None:
        wanted = [c for c in set(chunk_ids) if c not in self._refs]
        found = self.t.get_many(b"r" + c for c in wanted)
        for chunk in wanted:
            raw = found.get(b"r" + chunk)
            self._refs[chunk] = ChunkRecord.unpack(raw) if raw else None

    def record(self, chunk: bytes) -> ChunkRecord | None:
        """The chunk's record (read once per transaction), or None if the volume has none."""
        if chunk not in self._refs:
            self.load_refs([chunk])
        return self._refs[chunk]

    def incref(self, chunk: bytes, length: int) -> None:
        """One more reference. A chunk new to the volume, being deleted from
        the store, or not yet uploaded by another node is recorded as pending
        upload from this node too (this node sealed it, so it has the bytes)."""
        record = self.record(chunk)
        new = record is None
        if record is None:
            record = ChunkRecord(0, length)
        elif record.refs == 0 and not record.flags & DELETING:
            self.t.delete(b"g" + chunk)
        record.refs += 1
        if new or (record.flags & (PENDING | DELETING) and self.t.get(_k_pending(self.node, chunk)) is None):
            self.add_pending(chunk)
            record.flags |= PENDING
        self._refs[chunk] = record
        self.t.put(b"r" + chunk, record.pack())

    def add_pending(self, chunk: bytes) -> None:
        self.t.put(_k_pending(self.node, chunk), _u64(self.now))
        self.t.put(_k_holder(chunk, self.node), b"")
        self.to_upload.append(chunk.hex())

    def decref(self, chunk: bytes) -> None:
        record = self.record(chunk)
        if record is None:
            return
        record.refs = max(record.refs - 1, 0)
        self.t.put(b"r" + chunk, record.pack())
        if record.refs == 0 and not record.flags & DELETING:
            self.t.put(b"g" + chunk, _u64(self.now))

    def holders(self, chunk: bytes) -> list[int]:
        return [_U64.unpack(k[33:])[0] for k, _ in self.t.scan(b"w" + chunk)]

    def drop_pending(self, chunk: bytes) -> bool:
        """This node no longer owes the chunk's upload; the chunk stops being
        pending once no node does. Returns whether this node owed it."""
        owed = self.t.get(_k_pending(self.node, chunk)) is not None
        self.t.delete(_k_pending(self.node, chunk))
        self.t.delete(_k_holder(chunk, self.node))
        record = self.record(chunk)
        if record is not None and record.flags & PENDING and not self.holders(chunk):
            record.flags &= ~PENDING
            self.t.put(b"r" + chunk, record.pack())
        return owed

    def clear_pending(self, chunk: bytes) -> None:
        for node in self.holders(chunk):
            self.t.delete(_k_pending(node, chunk))
            self.t.delete(_k_holder(chunk, node))

    def stored(self, chunk: bytes) -> None:
        """The store has the chunk: no node owes its upload, and its record
        (if the volume has one) is no longer pending."""
        self.clear_pending(chunk)
        record = self.record(chunk)
        if record is not None:
            record.flags &= ~PENDING
            self.t.put(b"r" + chunk, record.pack())

    def record_unreferenced(self, chunk: bytes, length: int) -> None:
        """Record a chunk the volume did not know with no reference: a
        garbage candidate from now on, which a commit may still rescue."""
        record = self._refs[chunk] = ChunkRecord(0, length)
        self.t.put(b"r" + chunk, record.pack())
        self.t.put(b"g" + chunk, _u64(self.now))


class InodeAllocator:
    """Hands out inode numbers from batches taken off the shared counter, so
    nodes creating files at once never contend for one key."""

    def __init__(self, kv: KV):
        self.kv = kv
        self._next = 0
        self._end = 0
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if self._next >= self._end:
                end = self.kv.transact(lambda t: t.incr(b"#ino", INODE_BATCH))
                self._next, self._end = end - INODE_BATCH + 1, end + 1
            ino = self._next
            self._next += 1
            return ino


class MetaStore:
    def __init__(self, kv: KV, node_id: int = 1):
        self.kv = kv
        self.node_id = node_id
        self.allocator = InodeAllocator(kv)
        # Inodes created minus freed here since the last flush (a per-node
        # counter flushed in the background keeps creates free of a hot key).
        self._inode_delta = 0
        self._delta_lock = threading.Lock()

    @property
    def remote(self) -> bool:
        return self.kv.remote

    @property
    def shared(self) -> bool:
        return self.kv.shared

    def _write(self, body):
        return self.kv.transact(lambda t: body(_Tx(t, self.node_id)))

    # ---- volume, nodes and sessions ---------------------------------------------------
    def volume(self) -> dict | None:
        raw = self.kv.view(lambda t: t.get(b"V"))
        return json.loads(raw) if raw else None

    def init_volume(self, record: dict, uid: int | None = None, gid: int | None = None) -> dict:
        """Create the volume (its record and root directory) unless it exists;
        return the stored record either way."""
        uid = os.getuid() if uid is None else uid
        gid = os.getgid() if gid is None else gid

        def body(t: Txn) -> dict:
            raw = t.get(b"V")
            if raw is not None:
                return json.loads(raw)
            if t.get(_k_inode(ROOT_INODE)) is None:
                now = time.time_ns()
                root = Inode(
                    ROOT_INODE, stat.S_IFDIR | 0o755, uid, gid,
                    atime_ns=now, mtime_ns=now, ctime_ns=now, nlink=2, parent=ROOT_INODE,
                )
                t.put(_k_inode(ROOT_INODE), root.pack())
                if t.get(b"#ino") is None:
                    t.incr(b"#ino", ROOT_INODE)
                t.incr(_k_count(0))
            else:
                _migrate_single_node(t)
            t.put(b"V", json.dumps(record, sort_keys=True).encode())
            return record

        return self.kv.transact(body)

    def init_root(self, uid: int | None = None, gid: int | None = None) -> None:
        """A volume with default settings (unit tests, tools)."""
        self.init_volume({"name": "test", "uuid": "0", "chunk_size": CHUNK_SIZE_BYTES}, uid, gid)

    def register_node(self) -> int:
        return self.kv.transact(lambda t: t.incr(b"#node"))

    def heartbeat(self, info: dict) -> None:
        record = json.dumps({**info, "node": self.node_id, "heartbeat": time.time()}, sort_keys=True).encode()
        self.kv.transact(lambda t: t.put(b"s" + _u64(self.node_id), record))

    def end_session(self) -> None:
        self.kv.transact(lambda t: t.delete(b"s" + _u64(self.node_id)))

    def sessions(self) -> dict[int, dict]:
        return self.kv.view(lambda t: {_U64.unpack(k[1:])[0]: json.loads(v) for k, v in t.scan(b"s")})

    def reclaim_session(self, node: int) -> int:
        """Forget a dead node's open markers and session (its pending uploads
        stay: they resume when the node comes back). Returns markers dropped."""

        def body(t: Txn) -> int:
            dropped = 0
            for key, _ in list(t.scan(b"O")):
                if _U64.unpack(key[9:])[0] == node:
                    t.delete(key)
                    dropped += 1
            t.delete(b"s" + _u64(node))
            return dropped

        dropped = self.kv.transact(body)
        self.release_early_uploads(node)
        return dropped

    def update_open_markers(self, opened: Iterable[int], closed: Iterable[int]) -> None:
        """Tell other nodes which inodes this node holds open, so an inode
        unlinked elsewhere is not freed under this node's descriptors."""
        opened, closed = list(opened), list(closed)

        def body(t: Txn) -> None:
            for ino in opened:
                t.put(_k_open(ino, self.node_id), b"")
            for ino in closed:
                t.delete(_k_open(ino, self.node_id))

        if opened or closed:
            self.kv.transact(body)

    def add_inode_delta(self, delta: int) -> None:
        with self._delta_lock:
            self._inode_delta += delta

    def flush_counts(self) -> None:
        with self._delta_lock:
            delta, self._inode_delta = self._inode_delta, 0
        if not delta:
            return
        try:
            self.kv.transact(lambda t: t.incr(_k_count(self.node_id), delta))
        except BaseException:
            self.add_inode_delta(delta)
            raise

    def sync(self) -> None:
        self.kv.sync()

    # ---- chunks uploaded before their file's commit ------------------------------------
    def note_early_upload(self, chunk_id: str, length: int) -> None:
        """Record, before its PUT, that this node uploads a chunk no commit
        references yet. The commit clears it; if the node dies first, the
        object would be in the store with nothing naming it: the next start
        of this node, or the reclaim of its session, hands it to the garbage
        collector (`release_early_uploads`)."""
        value = _u64(time.time_ns()) + _u64(length)
        self.kv.transact(lambda t: t.put(b"t" + _u64(self.node_id) + bytes.fromhex(chunk_id), value))

    def release_early_uploads(self, node: int) -> int:
        """Early uploads of `node` (a previous run, or a dead node) that no
        commit took: each becomes a garbage candidate (a zero-reference
        record), so the collector deletes its object after the grace period
        unless a commit rescues it first. Returns how many were released."""
        prefix = b"t" + _u64(node)

        def body(tx: _Tx) -> int:
            t = tx.t
            rows = list(t.scan(prefix, limit=1000))
            tx.load_refs(key[9:] for key, _ in rows)
            released = 0
            for key, value in rows:
                chunk = key[9:]
                t.delete(key)
                if tx.record(chunk) is None:
                    tx.record_unreferenced(chunk, _U64.unpack(value[8:16])[0] if len(value) >= 16 else 0)
                    released += 1
            return released

        total = 0
        while True:
            released = self._write(body)
            total += released
            if not self.kv.view(lambda t: next(t.scan(prefix, limit=1), None)):
                return total

    # ---- reads ------------------------------------------------------------
    def get_inode(self, ino: int) -> Inode:
        raw = self.kv.view(lambda t: t.get(_k_inode(ino)), consistent=False)
        if raw is None:
            raise errors.NotFound(f"inode {ino}")
        return Inode.unpack(ino, raw)

    def lookup(self, parent: int, name: bytes) -> Inode:
        if len(name) > NAME_MAX:
            raise errors.NameTooLong(f"name of {len(name)} bytes")

        def body(t: Txn) -> Inode:
            # One round trip: the parent, the entry and the inode it names.
            found = t.get_many_via([_k_inode(parent), _k_dirent(parent, name)], _k_dirent(parent, name), b"i")
            raw_parent = found.get(_k_inode(parent))
            if raw_parent is None:
                raise errors.NotFound(f"inode {parent}")
            parent_inode = Inode.unpack(parent, raw_parent)
            if not parent_inode.is_dir:
                raise errors.NotDirectory(f"inode {parent}")
            if name == b".":
                return parent_inode
            if name == b"..":
                ino = parent_inode.parent
            else:
                raw = found.get(_k_dirent(parent, name))
                if raw is None:
                    raise errors.NotFound(name.decode(errors="replace"))
                ino = _ENTRY.unpack(raw)[0]
            raw_child = found.get(_k_inode(ino)) or t.get(_k_inode(ino))
            if raw_child is None:
                raise errors.NotFound(f"inode {ino}")
            return Inode.unpack(ino, raw_child)

        return self.kv.view(body, consistent=False)

    def readdir(self, parent: int, start_seq: int, limit: int = 256) -> list[tuple[int, bytes, Inode]]:
        """Up to `limit` entries with seq >= start_seq as (seq, name, inode),
        from one snapshot, in three batched reads."""
        prefix = b"e" + _u64(parent)

        def body(t: Txn) -> list[tuple[int, bytes, Inode]]:
            rows = list(t.scan(prefix, prefix + _u64(start_seq), limit=limit))
            dirents = t.get_many(_k_dirent(parent, name) for _, name in rows)
            inos = {}
            for key, name in rows:
                raw = dirents.get(_k_dirent(parent, name))
                if raw is not None:
                    inos[key] = _ENTRY.unpack(raw)[0]
            inodes = t.get_many(_k_inode(ino) for ino in inos.values())
            out = []
            for key, name in rows:
                ino = inos.get(key)
                raw = inodes.get(_k_inode(ino)) if ino is not None else None
                if raw is not None:
                    out.append((_U64.unpack(key[9:])[0], name, Inode.unpack(ino, raw)))
            return out

        # Entries removed between the reads are skipped, as a listing racing
        # an unlink would skip them anyway.
        return self.kv.view(body, consistent=False)

    def readlink(self, ino: int) -> bytes:
        target = self.kv.view(lambda t: t.get(b"l" + _u64(ino)), consistent=False)
        if target is None:
            raise errors.Invalid(f"inode {ino} is not a symlink")
        return target

    def chunks(self, ino: int, first: int = 0, last: int = 1 << 62) -> dict[int, ChunkRef]:
        """Chunk refs of indexes first..last inclusive; holes are absent."""
        prefix = b"c" + _u64(ino)

        def body(t: Txn) -> dict[int, ChunkRef]:
            out = {}
            for key, value in t.scan(prefix, prefix + _u64(first)):
                index = _U64.unpack(key[9:])[0]
                if index > last:
                    break
                raw_id, length = _CHUNK.unpack(value)
                out[index] = ChunkRef(raw_id.hex(), length)
            return out

        # One statement for any file under 512 chunks; a longer list spans
        # pages and needs the snapshot.
        return self.kv.view(body, consistent=last - first < 512)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        found = self.kv.view(lambda t: t.get_many([_k_inode(ino), _k_xattr(ino, name)]), consistent=False)
        if _k_inode(ino) not in found:
            raise errors.NotFound(f"inode {ino}")
        value = found.get(_k_xattr(ino, name))
        if value is None:
            raise errors.NoAttr(name.decode(errors="replace"))
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        prefix = b"x" + _u64(ino)
        return self.kv.view(lambda t: [key[9:] for key, _ in t.scan(prefix)])

    def orphans(self) -> list[tuple[int, int]]:
        """(ino, ns since it lost its last name) of every orphan."""
        now = time.time_ns()
        return self.kv.view(lambda t: [(_U64.unpack(k[1:])[0], now - (_time(v) or now)) for k, v in t.scan(b"o")])

    def open_elsewhere(self, ino: int) -> list[int]:
        return self.kv.view(lambda t: [
            n for n in (_U64.unpack(k[9:])[0] for k, _ in t.scan(b"O" + _u64(ino))) if n != self.node_id
        ])

    def pending_uploads(self, node: int | None = None, limit: int = 1 << 30) -> list[tuple[str, int, int]]:
        """(chunk id, length, enqueued ns) of chunks this node (or `node`) must upload."""
        prefix = b"u" + _u64(self.node_id if node is None else node)

        def body(t: Txn) -> list[tuple[str, int, int]]:
            rows = list(t.scan(prefix, limit=limit))
            records = t.get_many(b"r" + key[9:] for key, _ in rows)
            out = []
            for key, value in rows:
                raw = records.get(b"r" + key[9:])
                out.append((key[9:].hex(), ChunkRecord.unpack(raw).length if raw else 0, _time(value)))
            return out

        return self.kv.view(body)

    def all_pending(self) -> list[tuple[int, str, int]]:
        """(node, chunk id, enqueued ns) of every pending upload in the volume."""
        return self.kv.view(lambda t: [
            (_U64.unpack(k[1:9])[0], k[9:].hex(), _time(v)) for k, v in t.scan(b"u")
        ])

    def pending_token(self, chunk_id: str) -> bytes | None:
        """This node's pending-upload token for a chunk, or None if it owes no upload."""
        return self.kv.view(lambda t: t.get(_k_pending(self.node_id, bytes.fromhex(chunk_id))), consistent=False)

    def upload_state(self, chunk_id: str) -> tuple[bytes | None, bool]:
        """This node's pending-upload token for a chunk (None if it owes no
        upload), and whether the volume records the chunk as uploaded once:
        else the store can have it only from an early upload, and asking it
        before a PUT is not worth the round trip."""
        raw_id = bytes.fromhex(chunk_id)
        pending = _k_pending(self.node_id, raw_id)

        def body(t: Txn) -> tuple[bytes | None, bool]:
            found = t.get_many([pending, b"r" + raw_id])
            raw = found.get(b"r" + raw_id)
            return found.get(pending), raw is not None and not ChunkRecord.unpack(raw).flags & PENDING

        return self.kv.view(body, consistent=False)

    def chunk_holders(self, chunk_id: str) -> list[int]:
        """Nodes that committed this chunk and hold it until it is uploaded."""
        raw = bytes.fromhex(chunk_id)
        return self.kv.view(lambda t: [_U64.unpack(k[33:])[0] for k, _ in t.scan(b"w" + raw)])

    def chunk_record(self, chunk_id: str) -> tuple[int, int] | None:
        """(reference count, length) of a chunk this volume knows, else None."""
        raw = self.kv.view(lambda t: t.get(b"r" + bytes.fromhex(chunk_id)))
        if raw is None:
            return None
        record = ChunkRecord.unpack(raw)
        return record.refs, record.length

    def chunk_records(self, chunk_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        ids = list(chunk_ids)

        def body(t: Txn) -> dict[str, tuple[int, int]]:
            out = {}
            for start in range(0, len(ids), 1000):
                found = t.get_many(b"r" + bytes.fromhex(c) for c in ids[start:start + 1000])
                for key, raw in found.items():
                    record = ChunkRecord.unpack(raw)
                    out[key[1:].hex()] = (record.refs, record.length)
            return out

        return self.kv.view(body)

    def garbage(self, limit: int = 1024, grace_ns: int = 0) -> list[str]:
        """Chunks at refcount zero for at least `grace_ns` (or whose deletion stalled)."""
        now = time.time_ns()

        def body(t: Txn) -> list[str]:
            out = []
            for key, value in t.scan(b"g"):
                if now - _time(value) >= grace_ns:
                    out.append(key[1:].hex())
                    if len(out) >= limit:
                        break
            return out

        return self.kv.view(body)

    def counts(self) -> dict[str, int]:
        def body(t: Txn) -> dict[str, int]:
            inodes = sum(struct.unpack(">q", v)[0] for _, v in t.scan(b"#inodes"))
            return {"inodes": inodes, "next_ino": t.counter(b"#ino") + 1}

        out = self.kv.view(body)
        out["inodes"] += self._inode_delta
        return out

    # ---- namespace writes -------------------------------------------------
    def mknode(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int,
        rdev: int = 0, target: bytes | None = None, with_parent: bool = False,
    ) -> Inode | tuple[Inode, Inode]:
        """A new inode named `name` in `parent`. In a set-group-ID directory it
        takes the directory's group (and a new directory the bit), as on ext4.
        `with_parent` also returns the directory as the transaction left it."""
        _check_name(name)
        ino = self.allocator.take()

        def body(tx: _Tx) -> Inode:
            found = tx.load(_k_inode(parent), _k_dirent(parent, name))
            directory = tx.directory(parent)
            if directory.nlink == 0:
                raise errors.NotFound("directory was removed")
            if _k_dirent(parent, name) in found:
                raise errors.Exists(name.decode(errors="replace"))
            is_dir = stat.S_ISDIR(mode)
            new_mode, new_gid = mode, gid
            if directory.mode & stat.S_ISGID:
                new_gid = directory.gid
                if is_dir:
                    new_mode |= stat.S_ISGID
            inode = Inode(
                ino, new_mode, uid, new_gid, atime_ns=tx.now, mtime_ns=tx.now, ctime_ns=tx.now,
                nlink=2 if is_dir else 1, rdev=rdev, parent=parent if is_dir else 0,
            )
            if target is not None:
                tx.t.put(b"l" + _u64(ino), target)
                inode.size = len(target)
            tx.add_entry(directory, name, ino)
            if is_dir:
                directory.nlink += 1
            tx.touch(directory)
            tx.save(inode, directory)
            return inode, dataclasses.replace(directory)

        inode, directory = self._write(body)
        self.add_inode_delta(1)
        return (inode, directory) if with_parent else inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        _check_name(name)

        def body(tx: _Tx) -> Inode:
            found = tx.load(_k_inode(ino), _k_inode(parent), _k_dirent(parent, name))
            inode = tx.inode(ino)
            if inode.is_dir:
                raise errors.NotPermitted("hard link to a directory")
            if inode.nlink == 0:
                raise errors.NotFound("file was removed")
            if inode.nlink >= 0xFFFFFFFF:
                raise errors.TooManyLinks(f"inode {ino}")
            directory = tx.directory(parent)
            if _k_dirent(parent, name) in found:
                raise errors.Exists(name.decode(errors="replace"))
            tx.add_entry(directory, name, ino)
            inode.nlink += 1
            tx.touch(inode, mtime=False)
            tx.touch(directory)
            tx.save(inode, directory)
            return inode

        return self._write(body)

    def unlink(self, parent: int, name: bytes, *, directory: bool = False) -> Inode:
        """Remove one name. Returns the inode; nlink 0 means it is an orphan now."""

        def body(tx: _Tx) -> Inode:
            found = tx.load(_k_inode(parent), _k_dirent(parent, name))
            parent_inode = tx.directory(parent)
            raw = found.get(_k_dirent(parent, name))
            if raw is None:
                raise errors.NotFound(name.decode(errors="replace"))
            ino, seq = _ENTRY.unpack(raw)
            inode = tx.inode(ino)
            if directory:
                if not inode.is_dir:
                    raise errors.NotDirectory(name.decode(errors="replace"))
                if not tx.is_empty_dir(inode.ino):
                    raise errors.NotEmpty(name.decode(errors="replace"))
                parent_inode.nlink -= 1
            elif inode.is_dir:
                raise errors.IsDirectory(name.decode(errors="replace"))
            tx.remove_entry(parent, name, seq)
            tx.drop_link(inode)
            tx.touch(parent_inode)
            tx.save(inode, parent_inode)
            return inode

        return self._write(body)

    @staticmethod
    def _is_ancestor(tx: _Tx, ancestor: int, ino: int) -> bool:
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INODE:
                return False
            ino = tx.inode(ino).parent

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int) -> Inode | None:
        """Atomic rename with RENAME_NOREPLACE (1) / RENAME_EXCHANGE (2).
        Returns the inode that lost its name (nlink may now be 0), if any."""
        _check_name(new_name)
        noreplace, exchange = bool(flags & 1), bool(flags & 2)
        if flags & ~3 or (noreplace and exchange):
            raise errors.Invalid("unsupported rename flags")

        def body(tx: _Tx) -> Inode | None:
            found = tx.load(
                _k_inode(old_parent), _k_inode(new_parent),
                _k_dirent(old_parent, old_name), _k_dirent(new_parent, new_name),
            )
            src_dir, dst_dir = tx.directory(old_parent), tx.directory(new_parent)
            raw_src = found.get(_k_dirent(old_parent, old_name))
            if raw_src is None:
                raise errors.NotFound(old_name.decode(errors="replace"))
            moved_ino, src_seq = _ENTRY.unpack(raw_src)
            raw_dst = found.get(_k_dirent(new_parent, new_name))
            dst_ino, dst_seq = _ENTRY.unpack(raw_dst) if raw_dst else (None, 0)
            tx.load(_k_inode(moved_ino), *([_k_inode(dst_ino)] if dst_ino else []))
            moved = tx.inode(moved_ino)
            target = tx.inode(dst_ino) if dst_ino else None
            if moved.is_dir and self._is_ancestor(tx, moved.ino, new_parent):
                raise errors.Invalid("cannot move a directory into itself")
            if exchange:
                if target is None:
                    raise errors.NotFound(new_name.decode(errors="replace"))
                if target.is_dir and self._is_ancestor(tx, target.ino, old_parent):
                    raise errors.Invalid("cannot move a directory into itself")
                tx.set_entry(old_parent, old_name, target.ino, src_seq)
                tx.set_entry(new_parent, new_name, moved.ino, dst_seq)
                if moved.is_dir != target.is_dir and old_parent != new_parent:
                    shift = 1 if moved.is_dir else -1
                    src_dir.nlink -= shift
                    dst_dir.nlink += shift
                for inode, parent in ((moved, new_parent), (target, old_parent)):
                    if inode.is_dir:
                        inode.parent = parent
                    tx.touch(inode, mtime=False)
                tx.touch(src_dir)
                tx.touch(dst_dir)
                tx.save(moved, target, src_dir, dst_dir)
                return None
            if target is not None:
                if noreplace:
                    raise errors.Exists(new_name.decode(errors="replace"))
                if target.ino == moved.ino:
                    return None  # two names of one file: POSIX says do nothing
                if moved.is_dir and not target.is_dir:
                    raise errors.NotDirectory(new_name.decode(errors="replace"))
                if target.is_dir:
                    if not moved.is_dir:
                        raise errors.IsDirectory(new_name.decode(errors="replace"))
                    if not tx.is_empty_dir(target.ino):
                        raise errors.NotEmpty(new_name.decode(errors="replace"))
                    dst_dir.nlink -= 1
                tx.set_entry(new_parent, new_name, moved.ino, dst_seq)
                tx.drop_link(target)
            else:
                tx.add_entry(dst_dir, new_name, moved.ino)
            tx.remove_entry(old_parent, old_name, src_seq)
            if moved.is_dir and old_parent != new_parent:
                src_dir.nlink -= 1
                dst_dir.nlink += 1
                moved.parent = new_parent
            tx.touch(moved, mtime=False)
            tx.touch(src_dir)
            tx.touch(dst_dir)
            tx.save(moved, src_dir, dst_dir, *([target] if target else []))
            return target

        return self._write(body)

    def setattr(
        self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
        atime_ns: int | None = None, mtime_ns: int | None = None, ctime_ns: int | None = None,
    ) -> Inode:
        def body(tx: _Tx) -> Inode:
            inode = tx.inode(ino)
            if mode is not None:
                inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
            if uid is not None or gid is not None:
                if uid is not None:
                    inode.uid = uid
                if gid is not None:
                    inode.gid = gid
                if not inode.is_dir:
                    # As Linux does: chown clears set-user-ID, and set-group-ID
                    # only with group-execute (without it, S_ISGID marks
                    # mandatory locking and stays).
                    inode.mode &= ~stat.S_ISUID
                    if inode.mode & stat.S_IXGRP:
                        inode.mode &= ~stat.S_ISGID
            if atime_ns is not None:
                inode.atime_ns = atime_ns
            if mtime_ns is not None:
                inode.mtime_ns = mtime_ns
            inode.ctime_ns = ctime_ns if ctime_ns is not None else tx.now
            tx.save(inode)
            return inode

        return self._write(body)

    # ---- xattrs -------------------------------------------------------------
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if not name or len(name) > NAME_MAX:
            raise errors.RangeError("xattr name length")
        if len(value) > 65536:
            raise errors.FileTooBig("xattr value larger than 64 KiB")

        def body(tx: _Tx) -> None:
            found = tx.load(_k_inode(ino), _k_xattr(ino, name))
            inode = tx.inode(ino)
            exists = _k_xattr(ino, name) in found
            if flags & XATTR_CREATE and exists:
                raise errors.Exists(name.decode(errors="replace"))
            if flags & XATTR_REPLACE and not exists:
                raise errors.NoAttr(name.decode(errors="replace"))
            tx.t.put(_k_xattr(ino, name), value)
            tx.touch(inode, mtime=False)
            tx.save(inode)

        self._write(body)

    def removexattr(self, ino: int, name: bytes) -> None:
        def body(tx: _Tx) -> None:
            found = tx.load(_k_inode(ino), _k_xattr(ino, name))
            inode = tx.inode(ino)
            if _k_xattr(ino, name) not in found:
                raise errors.NoAttr(name.decode(errors="replace"))
            tx.t.delete(_k_xattr(ino, name))
            tx.touch(inode, mtime=False)
            tx.save(inode)

        self._write(body)

    # ---- content ------------------------------------------------------------
    def commit_content(
        self, ino: int, size: int, changes: dict[int, ChunkRef | None],
        mtime_ns: int | None = None, drop_from: int | None = None,
        journal: tuple[int, list[str]] | None = None,
    ) -> tuple[list[str], Inode]:
        """Point chunk indexes at new chunks (None = hole), drop chunks from
        index `drop_from` (a truncation) and past `size`, set size and times.
        `journal` (sequence number, chunk ids) records the chunks of this
        commit that are not durable yet, in the same transaction.
        Returns the chunk ids this node now owes an upload for (recorded as
        pending in the same transaction) and the inode as committed."""
        journal_entry = None
        if journal is not None and journal[1]:
            journal_entry = (_k_journal(self.node_id, journal[0]),
                             _u64(ino) + b"".join(bytes.fromhex(chunk) for chunk in journal[1]))

        end_index = (size + CHUNK_SIZE_BYTES - 1) // CHUNK_SIZE_BYTES
        first_dropped = end_index if drop_from is None else min(end_index, drop_from)
        wanted = {i: r for i, r in changes.items() if i < end_index or r is None}
        chunk_keys = [_k_chunk(ino, i) for i in wanted if i < first_dropped]
        new_refs = {b"r" + bytes.fromhex(r.chunk_id) for r in wanted.values() if r is not None}

        def body(tx: _Tx) -> list[str]:
            t = tx.t
            # One read for the inode, the chunks being replaced and the
            # records of the new chunks; more only for what those reveal.
            found = tx.load(_k_inode(ino), *chunk_keys, *new_refs)
            inode = tx.inode(ino)
            prefix = b"c" + _u64(ino)
            # No chunk exists past the committed size: a scan is needed only
            # to drop a tail (truncation or shrink).
            old_end = (inode.size + CHUNK_SIZE_BYTES - 1) // CHUNK_SIZE_BYTES
            dropped = list(t.scan(prefix, prefix + _u64(first_dropped))) if old_end > first_dropped else []
            old = {key: found[key] for key in chunk_keys if key in found}
            for key, value in dropped:
                old.setdefault(key, value)
            tx.load_refs(v[:32] for v in old.values())
            for key, value in dropped:
                t.delete(key)
                tx.decref(value[:32])
            for index in sorted(wanted):
                ref = wanted[index]
                key = _k_chunk(ino, index)
                previous = old.get(key) if index < first_dropped else None
                new_raw = bytes.fromhex(ref.chunk_id) if ref else None
                if previous is not None and previous[:32] == new_raw:
                    continue
                if previous is not None:
                    tx.decref(previous[:32])
                if ref is None:
                    t.delete(key)
                    continue
                t.put(key, _CHUNK.pack(new_raw, ref.length))
                tx.incref(new_raw, ref.length)
                t.delete(b"t" + _u64(self.node_id) + new_raw)
            inode.size = size
            inode.mtime_ns = mtime_ns if mtime_ns is not None else tx.now
            inode.ctime_ns = tx.now
            tx.save(inode)
            if journal_entry is not None:
                t.put(*journal_entry)
            return list(dict.fromkeys(tx.to_upload)), dataclasses.replace(inode)

        return self._write(body)

    def delete_inode(self, ino: int, min_orphan_age_ns: int = 0) -> bool:
        """Free an inode whose last name is gone and that no node holds open
        (this node's own handles are the caller's to check), once it has been
        an orphan for `min_orphan_age_ns`. Returns whether it was freed."""

        def body(tx: _Tx) -> bool:
            t = tx.t
            found = t.get_many([_k_inode(ino), b"o" + _u64(ino)])
            raw = found.get(_k_inode(ino))
            if raw is None:
                t.delete(b"o" + _u64(ino))
                return False
            inode = Inode.unpack(ino, raw)
            if inode.nlink > 0:
                t.delete(b"o" + _u64(ino))
                return False
            orphaned = _time(found.get(b"o" + _u64(ino)))
            if min_orphan_age_ns and orphaned and tx.now - orphaned < min_orphan_age_ns:
                return False
            for key, _ in t.scan(b"O" + _u64(ino)):
                if _U64.unpack(key[9:])[0] != self.node_id:
                    return False  # open on another node: its last close or expiry frees it
            prefix = b"c" + _u64(ino)
            contents = list(t.scan(prefix))
            tx.load_refs(value[:32] for _, value in contents)
            for key, value in contents:
                t.delete(key)
                tx.decref(value[:32])
            for key, _ in list(t.scan(b"x" + _u64(ino))):
                t.delete(key)
            t.delete(_k_open(ino, self.node_id))
            t.delete(b"l" + _u64(ino))
            t.delete(b"o" + _u64(ino))
            t.delete(_k_inode(ino))
            return True

        freed = self._write(body)
        if freed:
            self.add_inode_delta(-1)
        return freed

    # ---- the durability journal (durability.py) ------------------------------------
    def journal_entries(self) -> list[tuple[int, int, list[str]]]:
        """(seq, ino, chunk ids) of this node's commits whose chunks were not
        known durable when they were last flushed, oldest first."""
        prefix = _k_journal(self.node_id)

        def body(t: Txn) -> list[tuple[int, int, list[str]]]:
            return [
                (_U64.unpack(key[9:17])[0], _U64.unpack(value[:8])[0],
                 [value[i:i + 32].hex() for i in range(8, len(value), 32)])
                for key, value in t.scan(prefix)
            ]

        return self.kv.view(body)

    def durable_point(self) -> int:
        """The last journal sequence number known durable (0: none yet)."""
        return _time(self.kv.view(lambda t: t.get(_k_durable_point(self.node_id))))

    def advance_durable_point(self, seq: int) -> int:
        """Every commit up to `seq` has durable chunks now: move the durable
        point there (never back) and forget the journal entries up to it.
        Returns the durable point."""
        prefix = _k_journal(self.node_id)

        def body(t: Txn) -> int:
            point = max(_time(t.get(_k_durable_point(self.node_id))), seq)
            t.put(_k_durable_point(self.node_id), _u64(point))
            for key, _ in list(t.scan(prefix)):
                if _U64.unpack(key[9:17])[0] > point:
                    break
                t.delete(key)
            return point

        return self.kv.transact(body)

    def cut_at_lost_chunk(self, ino: int, lost: set[str]) -> tuple[int, int] | None:
        """Cut a file short at the start of the first chunk it references that
        is lost, dropping that chunk and every one after it (their references
        go: a chunk no file names any more is garbage). What ext4 does to a
        file whose unsynced blocks a power loss took, as near as a chunked
        file allows: a shorter file, never one that names bytes that are not
        there. Returns (old size, new size), or None when the inode is gone
        or names none of `lost`."""
        raw_lost = {bytes.fromhex(chunk) for chunk in lost}
        prefix = b"c" + _u64(ino)

        def body(tx: _Tx) -> tuple[int, int] | None:
            t = tx.t
            raw_inode = t.get(_k_inode(ino))
            if raw_inode is None:
                return None
            inode = Inode.unpack(ino, raw_inode)
            contents = list(t.scan(prefix))
            first = next((_U64.unpack(key[9:])[0] for key, value in contents if value[:32] in raw_lost), None)
            if first is None:
                return None
            dropped = [(key, value) for key, value in contents if _U64.unpack(key[9:])[0] >= first]
            tx.load_refs(value[:32] for _, value in dropped)
            for key, value in dropped:
                t.delete(key)
                tx.decref(value[:32])
            old_size = inode.size
            inode.size = min(inode.size, first * CHUNK_SIZE_BYTES)
            inode.ctime_ns = tx.now
            tx.save(inode)
            return old_size, inode.size

        return self._write(body)

    def forget_lost_chunks(self, lost: Iterable[str]) -> int:
        """Chunks lost before they were uploaded: this node can never upload
        them, so its pending uploads of them go, and the pending flag with
        them when no other node owes one. Returns how many were pending."""
        raw_ids = [bytes.fromhex(chunk) for chunk in lost]

        def body(tx: _Tx) -> int:
            tx.load_refs(raw_ids)
            return sum(tx.drop_pending(raw) for raw in raw_ids)

        return self._write(body)

    # ---- upload and garbage bookkeeping ------------------------------------------
    def mark_uploaded(self, chunk_id: str, token: bytes | None) -> str:
        """Record that the store has this chunk, if what this node saw before
        uploading (`token`) still holds: UPLOAD_DONE, or UPLOAD_RETRY when the
        chunk is being deleted or was re-queued meanwhile (upload again)."""
        return self.mark_uploaded_many([(chunk_id, token)])[chunk_id]

    def mark_uploaded_many(self, items: list[tuple[str, bytes | None]]) -> dict[str, str]:
        """`mark_uploaded` for many chunks in one transaction: the uploader
        batches them, so a busy node commits one write instead of one per
        chunk (fewer transactions to conflict with the namespace's)."""
        raw_ids = [(bytes.fromhex(chunk), token) for chunk, token in items]

        def body(tx: _Tx) -> dict[str, str]:
            keys = [k for raw, _ in raw_ids for k in (b"r" + raw, _k_pending(self.node_id, raw))]
            found = tx.load(*keys)
            out = {}
            for raw_id, token in raw_ids:
                record = tx.record(raw_id)
                current = found.get(_k_pending(self.node_id, raw_id))
                if record is not None and record.flags & DELETING:
                    out[raw_id.hex()] = UPLOAD_RETRY
                elif current is None:
                    out[raw_id.hex()] = UPLOAD_DONE  # another node uploaded it, or it was collected
                elif token is not None and current != token:
                    out[raw_id.hex()] = UPLOAD_RETRY
                else:
                    tx.stored(raw_id)
                    found.pop(_k_pending(self.node_id, raw_id), None)
                    out[raw_id.hex()] = UPLOAD_DONE
            return out

        return self._write(body)

    def begin_delete(self, chunk_id: str, grace_ns: int = 0) -> bool:
        """Claim an unreferenced chunk for deletion from the store: True means
        delete the object now, then call `finish_delete`."""
        raw_id = bytes.fromhex(chunk_id)

        def body(tx: _Tx) -> bool:
            t = tx.t
            found = t.get_many([b"r" + raw_id, b"g" + raw_id])
            since = _time(found.get(b"g" + raw_id))
            raw = found.get(b"r" + raw_id)
            if raw is None:
                t.delete(b"g" + raw_id)
                return False
            record = ChunkRecord.unpack(raw)
            if record.flags & DELETING:
                # Another collector's claim; take it over only if it stalled.
                if tx.now - since < STALE_DELETION_NS:
                    return False
            elif record.refs > 0:
                t.delete(b"g" + raw_id)
                return False
            elif b"g" + raw_id not in found or tx.now - since < grace_ns:
                return False
            record.flags |= DELETING
            t.put(b"r" + raw_id, record.pack())
            t.put(b"g" + raw_id, _u64(tx.now))
            return True

        return self._write(body)

    def finish_delete(self, chunk_id: str) -> bool:
        """The object is gone from the store. Forget the chunk, unless a commit
        rescued it meanwhile: then its pending uploads start over. Returns
        whether the chunk is forgotten."""
        raw_id = bytes.fromhex(chunk_id)

        def body(tx: _Tx) -> bool:
            t = tx.t
            raw = t.get(b"r" + raw_id)
            t.delete(b"g" + raw_id)
            if raw is None:
                return True
            record = ChunkRecord.unpack(raw)
            if record.refs == 0:
                t.delete(b"r" + raw_id)
                tx.clear_pending(raw_id)
                return True
            record.flags = (record.flags & ~DELETING) | PENDING
            t.put(b"r" + raw_id, record.pack())
            for node in tx.holders(raw_id):  # new tokens: uploads that saw the old object redo it
                t.put(_k_pending(node, raw_id), _u64(tx.now))
            return False

        return self._write(body)


def _migrate_single_node(t: Txn) -> None:
    """A state dir from before volumes and nodes: pending uploads become node
    1's, the inode count becomes a per-node counter."""
    for key, value in list(t.scan(b"u")):
        if len(key) == 33:
            t.delete(key)
            t.put(_k_pending(1, key[1:]), value)
            t.put(_k_holder(key[1:], 1), b"")
    count = t.get(b"#inodes")
    if count is not None and len(count) == 8:
        t.delete(b"#inodes")
        t.put(_k_count(0), count)
    if t.get(b"#node") is None:
        t.incr(b"#node")
