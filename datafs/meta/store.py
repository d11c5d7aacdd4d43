"""The filesystem schema on top of the key-value interface.

Every public method is one transaction. Methods that write are blocking (an
LMDB commit) and are called from a worker thread by `fs.py`; they never await.

Key layout (integers big-endian so scans come out in order):
    i <ino>                 -> Inode record
    d <parent> <name>       -> child ino, entry seq      (lookup by name)
    e <parent> <seq>        -> name                      (readdir, stable offsets)
    c <ino> <index>         -> chunk id (32 bytes), length (file content)
    r <chunk id>            -> refcount, length          (dedup and GC)
    u <chunk id>            -> enqueue time ns           (pending upload)
    g <chunk id>            -> ''                        (refcount fell to zero)
    x <ino> <name>          -> xattr value
    l <ino>                 -> symlink target
    o <ino>                 -> ''                        (nlink 0, kept while open)
    #ino, #inodes           -> counters

Readdir offsets are per-directory sequence numbers handed out at link time and
never reused, so entries removed during a listing cannot make another entry be
skipped or repeated.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import time
from typing import Iterable, Iterator

from .. import errors
from ..config import CHUNK_SIZE_BYTES
from .kv import KV, Txn

ROOT_INODE = 1
NAME_MAX = 255
XATTR_CREATE = 1
XATTR_REPLACE = 2

_INODE = struct.Struct(">IIIQqqqIQQQ")
_U64 = struct.Struct(">Q")
_ENTRY = struct.Struct(">QQ")
_CHUNK = struct.Struct(">32sI")
_REF = struct.Struct(">qI")


def _u64(value: int) -> bytes:
    return _U64.pack(value)


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


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise errors.NameTooLong(f"name of {len(name)} bytes")
    if not name or b"/" in name or name in (b".", b".."):
        raise errors.Invalid(f"invalid name {name!r}")


class _Tx:
    """A write transaction with an inode cache, so a method can load the same
    directory twice (rename within one directory) and save it once."""

    def __init__(self, txn: Txn):
        self.t = txn
        self._inodes: dict[int, Inode] = {}
        self.now = time.time_ns()

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

    def set_entry(self, parent: int, name: bytes, ino: int) -> None:
        """Point an existing entry at another inode, keeping its readdir position."""
        _, seq = self.entry(parent, name)  # type: ignore[misc]
        self.t.put(_k_dirent(parent, name), _ENTRY.pack(ino, seq))

    def remove_entry(self, parent: int, name: bytes) -> int:
        found = self.entry(parent, name)
        if found is None:
            raise errors.NotFound(name.decode(errors="replace"))
        ino, seq = found
        self.t.delete(_k_dirent(parent, name))
        self.t.delete(_k_seq(parent, seq))
        return ino

    def touch(self, inode: Inode, *, mtime: bool = True) -> None:
        inode.ctime_ns = self.now
        if mtime:
            inode.mtime_ns = self.now

    def drop_link(self, inode: Inode) -> None:
        inode.nlink = 0 if inode.is_dir else inode.nlink - 1
        inode.ctime_ns = self.now
        if inode.nlink == 0:
            self.t.put(b"o" + _u64(inode.ino), b"")

    # Chunk reference counting. A chunk first seen here is queued for upload.
    def incref(self, chunk_id: bytes, length: int) -> bool:
        raw = self.t.get(b"r" + chunk_id)
        if raw is None:
            self.t.put(b"r" + chunk_id, _REF.pack(1, length))
            self.t.put(b"u" + chunk_id, _u64(self.now))
            return True
        refs, _ = _REF.unpack(raw)
        if refs == 0:
            self.t.delete(b"g" + chunk_id)
        self.t.put(b"r" + chunk_id, _REF.pack(refs + 1, length))
        return False

    def decref(self, chunk_id: bytes) -> None:
        raw = self.t.get(b"r" + chunk_id)
        if raw is None:
            return
        refs, length = _REF.unpack(raw)
        refs = max(refs - 1, 0)
        self.t.put(b"r" + chunk_id, _REF.pack(refs, length))
        if refs == 0:
            self.t.put(b"g" + chunk_id, b"")


class MetaStore:
    def __init__(self, kv: KV):
        self.kv = kv

    # ---- lifecycle -------------------------------------------------------
    def init_root(self, uid: int | None = None, gid: int | None = None) -> None:
        with self.kv.write() as t:
            if t.get(_k_inode(ROOT_INODE)) is not None:
                return
            now = time.time_ns()
            root = Inode(
                ROOT_INODE, stat.S_IFDIR | 0o755,
                os.getuid() if uid is None else uid, os.getgid() if gid is None else gid,
                atime_ns=now, mtime_ns=now, ctime_ns=now, nlink=2, parent=ROOT_INODE,
            )
            t.put(_k_inode(ROOT_INODE), root.pack())
            t.put(b"#ino", _U64.pack(ROOT_INODE))
            t.incr(b"#inodes")

    def sync(self) -> None:
        self.kv.sync()

    # ---- reads ------------------------------------------------------------
    def get_inode(self, ino: int) -> Inode:
        with self.kv.read() as t:
            raw = t.get(_k_inode(ino))
        if raw is None:
            raise errors.NotFound(f"inode {ino}")
        return Inode.unpack(ino, raw)

    def lookup(self, parent: int, name: bytes) -> Inode:
        with self.kv.read() as t:
            raw_parent = t.get(_k_inode(parent))
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
                if len(name) > NAME_MAX:
                    raise errors.NameTooLong(f"name of {len(name)} bytes")
                raw = t.get(_k_dirent(parent, name))
                if raw is None:
                    raise errors.NotFound(name.decode(errors="replace"))
                ino = _ENTRY.unpack(raw)[0]
            return Inode.unpack(ino, t.get(_k_inode(ino)))

    def readdir(self, parent: int, start_seq: int) -> Iterator[tuple[int, bytes, Inode]]:
        """Entries with seq >= start_seq as (seq, name, inode), from one snapshot.
        A generator, so a listing reads only the entries the kernel takes; it
        holds a read transaction, so the caller must not await while iterating."""
        prefix = b"e" + _u64(parent)
        with self.kv.read() as t:
            for key, name in t.scan(prefix, prefix + _u64(start_seq)):
                ino = _ENTRY.unpack(t.get(_k_dirent(parent, name)))[0]
                yield _U64.unpack(key[9:])[0], name, Inode.unpack(ino, t.get(_k_inode(ino)))

    def readlink(self, ino: int) -> bytes:
        with self.kv.read() as t:
            target = t.get(b"l" + _u64(ino))
        if target is None:
            raise errors.Invalid(f"inode {ino} is not a symlink")
        return target

    def chunks(self, ino: int, first: int, last: int) -> dict[int, ChunkRef]:
        """Chunk refs of indexes first..last inclusive; holes are absent."""
        out = {}
        prefix = b"c" + _u64(ino)
        with self.kv.read() as t:
            for key, value in t.scan(prefix, prefix + _u64(first)):
                index = _U64.unpack(key[9:])[0]
                if index > last:
                    break
                raw_id, length = _CHUNK.unpack(value)
                out[index] = ChunkRef(raw_id.hex(), length)
        return out

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with self.kv.read() as t:
            if t.get(_k_inode(ino)) is None:
                raise errors.NotFound(f"inode {ino}")
            value = t.get(_k_xattr(ino, name))
        if value is None:
            raise errors.NoAttr(name.decode(errors="replace"))
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        prefix = b"x" + _u64(ino)
        with self.kv.read() as t:
            return [key[9:] for key, _ in t.scan(prefix)]

    def orphans(self) -> list[int]:
        with self.kv.read() as t:
            return [_U64.unpack(key[1:])[0] for key, _ in t.scan(b"o")]

    def pending_uploads(self, limit: int = 1 << 30) -> list[tuple[str, int, int]]:
        """(chunk id, length, enqueued ns) of chunks not yet in the object store."""
        out = []
        with self.kv.read() as t:
            for key, value in t.scan(b"u"):
                raw = t.get(b"r" + key[1:])
                length = _REF.unpack(raw)[1] if raw else 0
                out.append((key[1:].hex(), length, _U64.unpack(value)[0]))
                if len(out) >= limit:
                    break
        return out

    def is_pending(self, chunk_id: str) -> bool:
        with self.kv.read() as t:
            return t.get(b"u" + bytes.fromhex(chunk_id)) is not None

    def chunk_record(self, chunk_id: str) -> tuple[int, int] | None:
        """(reference count, length) of a chunk this store knows, else None."""
        with self.kv.read() as t:
            raw = t.get(b"r" + bytes.fromhex(chunk_id))
        return None if raw is None else _REF.unpack(raw)

    def garbage(self, limit: int = 1024) -> list[str]:
        out = []
        with self.kv.read() as t:
            for key, _ in t.scan(b"g"):
                out.append(key[1:].hex())
                if len(out) >= limit:
                    break
        return out

    def counts(self) -> dict[str, int]:
        with self.kv.read() as t:
            return {"inodes": t.counter(b"#inodes"), "next_ino": t.counter(b"#ino") + 1}

    # ---- namespace writes -------------------------------------------------
    def mknode(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int,
        rdev: int = 0, target: bytes | None = None,
    ) -> Inode:
        _check_name(name)
        with self.kv.write() as t:
            tx = _Tx(t)
            directory = tx.directory(parent)
            if directory.nlink == 0:
                raise errors.NotFound("directory was removed")
            if tx.entry(parent, name) is not None:
                raise errors.Exists(name.decode(errors="replace"))
            ino = t.incr(b"#ino")
            t.incr(b"#inodes")
            is_dir = stat.S_ISDIR(mode)
            inode = Inode(
                ino, mode, uid, gid, atime_ns=tx.now, mtime_ns=tx.now, ctime_ns=tx.now,
                nlink=2 if is_dir else 1, rdev=rdev, parent=parent if is_dir else 0,
            )
            if target is not None:
                t.put(b"l" + _u64(ino), target)
                inode.size = len(target)
            tx.add_entry(directory, name, ino)
            if is_dir:
                directory.nlink += 1
            tx.touch(directory)
            tx.save(inode, directory)
            return inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        _check_name(name)
        with self.kv.write() as t:
            tx = _Tx(t)
            inode = tx.inode(ino)
            if inode.is_dir:
                raise errors.NotPermitted("hard link to a directory")
            if inode.nlink == 0:
                raise errors.NotFound("file was removed")
            if inode.nlink >= 0xFFFFFFFF:
                raise errors.TooManyLinks(f"inode {ino}")
            directory = tx.directory(parent)
            if tx.entry(parent, name) is not None:
                raise errors.Exists(name.decode(errors="replace"))
            tx.add_entry(directory, name, ino)
            inode.nlink += 1
            tx.touch(inode, mtime=False)
            tx.touch(directory)
            tx.save(inode, directory)
            return inode

    def unlink(self, parent: int, name: bytes, *, directory: bool = False) -> Inode:
        """Remove one name. Returns the inode; nlink 0 means it is an orphan now."""
        with self.kv.write() as t:
            tx = _Tx(t)
            parent_inode = tx.directory(parent)
            found = tx.entry(parent, name)
            if found is None:
                raise errors.NotFound(name.decode(errors="replace"))
            inode = tx.inode(found[0])
            if directory:
                if not inode.is_dir:
                    raise errors.NotDirectory(name.decode(errors="replace"))
                if next(t.scan(b"e" + _u64(inode.ino)), None) is not None:
                    raise errors.NotEmpty(name.decode(errors="replace"))
                parent_inode.nlink -= 1
            elif inode.is_dir:
                raise errors.IsDirectory(name.decode(errors="replace"))
            tx.remove_entry(parent, name)
            tx.drop_link(inode)
            tx.touch(parent_inode)
            tx.save(inode, parent_inode)
            return inode

    def _is_ancestor(self, tx: _Tx, ancestor: int, ino: int) -> bool:
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
        with self.kv.write() as t:
            tx = _Tx(t)
            src_dir, dst_dir = tx.directory(old_parent), tx.directory(new_parent)
            found = tx.entry(old_parent, old_name)
            if found is None:
                raise errors.NotFound(old_name.decode(errors="replace"))
            moved = tx.inode(found[0])
            target_entry = tx.entry(new_parent, new_name)
            target = tx.inode(target_entry[0]) if target_entry else None
            if moved.is_dir and self._is_ancestor(tx, moved.ino, new_parent):
                raise errors.Invalid("cannot move a directory into itself")
            if exchange:
                if target is None:
                    raise errors.NotFound(new_name.decode(errors="replace"))
                if target.is_dir and self._is_ancestor(tx, target.ino, old_parent):
                    raise errors.Invalid("cannot move a directory into itself")
                tx.set_entry(old_parent, old_name, target.ino)
                tx.set_entry(new_parent, new_name, moved.ino)
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
                    if next(t.scan(b"e" + _u64(target.ino)), None) is not None:
                        raise errors.NotEmpty(new_name.decode(errors="replace"))
                    dst_dir.nlink -= 1
                tx.set_entry(new_parent, new_name, moved.ino)
                tx.drop_link(target)
            else:
                tx.add_entry(dst_dir, new_name, moved.ino)
            tx.remove_entry(old_parent, old_name)
            if moved.is_dir and old_parent != new_parent:
                src_dir.nlink -= 1
                dst_dir.nlink += 1
                moved.parent = new_parent
            tx.touch(moved, mtime=False)
            tx.touch(src_dir)
            tx.touch(dst_dir)
            tx.save(moved, src_dir, dst_dir, *([target] if target else []))
            return target

    def setattr(
        self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
        atime_ns: int | None = None, mtime_ns: int | None = None, ctime_ns: int | None = None,
    ) -> Inode:
        with self.kv.write() as t:
            tx = _Tx(t)
            inode = tx.inode(ino)
            if mode is not None:
                inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
            if uid is not None or gid is not None:
                if uid is not None:
                    inode.uid = uid
                if gid is not None:
                    inode.gid = gid
                if not inode.is_dir:  # chown clears set-id bits, as on local filesystems
                    inode.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            if atime_ns is not None:
                inode.atime_ns = atime_ns
            if mtime_ns is not None:
                inode.mtime_ns = mtime_ns
            inode.ctime_ns = ctime_ns if ctime_ns is not None else tx.now
            tx.save(inode)
            return inode

    # ---- xattrs -------------------------------------------------------------
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if not name or len(name) > NAME_MAX:
            raise errors.RangeError("xattr name length")
        if len(value) > 65536:
            raise errors.FileTooBig("xattr value larger than 64 KiB")
        with self.kv.write() as t:
            tx = _Tx(t)
            inode = tx.inode(ino)
            exists = t.get(_k_xattr(ino, name)) is not None
            if flags & XATTR_CREATE and exists:
                raise errors.Exists(name.decode(errors="replace"))
            if flags & XATTR_REPLACE and not exists:
                raise errors.NoAttr(name.decode(errors="replace"))
            t.put(_k_xattr(ino, name), value)
            tx.touch(inode, mtime=False)
            tx.save(inode)

    def removexattr(self, ino: int, name: bytes) -> None:
        with self.kv.write() as t:
            tx = _Tx(t)
            inode = tx.inode(ino)
            if not t.delete(_k_xattr(ino, name)):
                raise errors.NoAttr(name.decode(errors="replace"))
            tx.touch(inode, mtime=False)
            tx.save(inode)

    # ---- content ------------------------------------------------------------
    def commit_content(
        self, ino: int, size: int, changes: dict[int, ChunkRef | None],
        mtime_ns: int | None = None, drop_from: int | None = None,
    ) -> list[str]:
        """Point chunk indexes at new chunks (None = hole), drop chunks from
        index `drop_from` (a truncation) and past `size`, set size and times.
        Returns chunk ids that are new to this store and were queued for
        upload in the same transaction."""
        new_chunks = []
        with self.kv.write() as t:
            tx = _Tx(t)
            inode = tx.inode(ino)
            end_index = (size + CHUNK_SIZE_BYTES - 1) // CHUNK_SIZE_BYTES
            first_dropped = end_index if drop_from is None else min(end_index, drop_from)
            prefix = b"c" + _u64(ino)
            for key, value in list(t.scan(prefix, prefix + _u64(first_dropped))):
                t.delete(key)
                tx.decref(value[:32])
            for index in sorted(changes):
                ref = changes[index]
                if index >= end_index and ref is not None:
                    continue
                key = _k_chunk(ino, index)
                old = t.get(key)
                new_raw = bytes.fromhex(ref.chunk_id) if ref else None
                if old is not None and old[:32] == new_raw:
                    continue
                if old is not None:
                    tx.decref(old[:32])
                if ref is None:
                    t.delete(key)
                    continue
                t.put(key, _CHUNK.pack(new_raw, ref.length))
                if tx.incref(new_raw, ref.length):
                    new_chunks.append(ref.chunk_id)
            inode.size = size
            inode.mtime_ns = mtime_ns if mtime_ns is not None else tx.now
            inode.ctime_ns = tx.now
            tx.save(inode)
        return new_chunks

    def delete_inode(self, ino: int) -> bool:
        """Free an inode whose last name is gone and that nothing holds open."""
        with self.kv.write() as t:
            raw = t.get(_k_inode(ino))
            if raw is None:
                t.delete(b"o" + _u64(ino))
                return False
            inode = Inode.unpack(ino, raw)
            if inode.nlink > 0:
                t.delete(b"o" + _u64(ino))
                return False
            tx = _Tx(t)
            prefix = b"c" + _u64(ino)
            for key, value in list(t.scan(prefix)):
                t.delete(key)
                tx.decref(value[:32])
            for key, _ in list(t.scan(b"x" + _u64(ino))):
                t.delete(key)
            t.delete(b"l" + _u64(ino))
            t.delete(b"o" + _u64(ino))
            t.delete(_k_inode(ino))
            t.incr(b"#inodes", -1)
            return True

    # ---- upload and garbage bookkeeping ------------------------------------------
    def mark_uploaded(self, chunk_ids: Iterable[str]) -> None:
        with self.kv.write() as t:
            for chunk_id in chunk_ids:
                t.delete(b"u" + bytes.fromhex(chunk_id))

    def drop_chunk_if_unreferenced(self, chunk_id: str) -> bool:
        """Forget a chunk whose refcount is zero. True means the caller may
        delete its bytes; False means a file references it again."""
        raw_id = bytes.fromhex(chunk_id)
        with self.kv.write() as t:
            t.delete(b"g" + raw_id)
            raw = t.get(b"r" + raw_id)
            if raw is not None and _REF.unpack(raw)[0] > 0:
                return False
            t.delete(b"r" + raw_id)
            t.delete(b"u" + raw_id)
            return True
