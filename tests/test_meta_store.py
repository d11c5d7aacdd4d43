"""The filesystem schema on the in-memory engine: namespace rules, reference
counts, pending uploads, garbage, readdir offsets."""

from __future__ import annotations

import itertools
import stat

import pytest

from datafs import errors
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.meta.kv import open_kv
from datafs.meta.store import ROOT_INODE, ChunkRef, MetaStore

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture
def meta() -> MetaStore:
    store = MetaStore(open_kv("memory://"))
    store.init_root(0, 0)
    return store


def ref(n: int, length: int = 10) -> ChunkRef:
    return ChunkRef(f"{n:064x}", length)


def test_mknode_lookup_and_parent_counts(meta):
    d = meta.mknode(ROOT_INODE, b"d", DIR, 0, 0)
    f = meta.mknode(d.ino, b"f", FILE, 1, 2)
    assert meta.lookup(d.ino, b"f").ino == f.ino
    assert meta.lookup(d.ino, b"..").ino == ROOT_INODE
    assert meta.lookup(d.ino, b".").ino == d.ino
    assert meta.get_inode(ROOT_INODE).nlink == 3
    assert (f.uid, f.gid, f.nlink) == (1, 2, 1)
    with pytest.raises(errors.Exists):
        meta.mknode(d.ino, b"f", FILE, 0, 0)
    with pytest.raises(errors.NotDirectory):
        meta.mknode(f.ino, b"x", FILE, 0, 0)
    with pytest.raises(errors.NameTooLong):
        meta.mknode(d.ino, b"x" * 256, FILE, 0, 0)
    with pytest.raises(errors.NotFound):
        meta.lookup(d.ino, b"nope")


def test_unlink_rmdir_rules(meta):
    d = meta.mknode(ROOT_INODE, b"d", DIR, 0, 0)
    meta.mknode(d.ino, b"f", FILE, 0, 0)
    with pytest.raises(errors.NotEmpty):
        meta.unlink(ROOT_INODE, b"d", directory=True)
    with pytest.raises(errors.IsDirectory):
        meta.unlink(ROOT_INODE, b"d")
    with pytest.raises(errors.NotDirectory):
        meta.unlink(d.ino, b"f", directory=True)
    gone = meta.unlink(d.ino, b"f")
    assert gone.nlink == 0 and meta.orphans() == [gone.ino]
    assert meta.delete_inode(gone.ino)
    assert meta.orphans() == []
    meta.unlink(ROOT_INODE, b"d", directory=True)
    assert meta.get_inode(ROOT_INODE).nlink == 2


def test_rename_over_existing_file_returns_replaced(meta):
    a = meta.mknode(ROOT_INODE, b"a", FILE, 0, 0)
    b = meta.mknode(ROOT_INODE, b"b", FILE, 0, 0)
    replaced = meta.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 0)
    assert replaced.ino == b.ino and replaced.nlink == 0
    assert meta.lookup(ROOT_INODE, b"b").ino == a.ino
    with pytest.raises(errors.NotFound):
        meta.lookup(ROOT_INODE, b"a")


def test_rename_flags(meta):
    a = meta.mknode(ROOT_INODE, b"a", FILE, 0, 0)
    d = meta.mknode(ROOT_INODE, b"d", DIR, 0, 0)
    with pytest.raises(errors.Exists):
        meta.rename(ROOT_INODE, b"a", ROOT_INODE, b"d", 1)  # RENAME_NOREPLACE
    meta.rename(ROOT_INODE, b"a", ROOT_INODE, b"d", 2)  # RENAME_EXCHANGE file <-> dir
    assert meta.lookup(ROOT_INODE, b"a").ino == d.ino
    assert meta.lookup(ROOT_INODE, b"d").ino == a.ino
    with pytest.raises(errors.NotFound):
        meta.rename(ROOT_INODE, b"a", ROOT_INODE, b"missing", 2)
    with pytest.raises(errors.Invalid):
        meta.rename(ROOT_INODE, b"a", ROOT_INODE, b"x", 3)


def test_rename_directories(meta):
    src = meta.mknode(ROOT_INODE, b"src", DIR, 0, 0)
    sub = meta.mknode(src.ino, b"sub", DIR, 0, 0)
    other = meta.mknode(ROOT_INODE, b"other", DIR, 0, 0)
    with pytest.raises(errors.Invalid):
        meta.rename(ROOT_INODE, b"src", sub.ino, b"loop", 0)
    full = meta.mknode(ROOT_INODE, b"full", DIR, 0, 0)
    meta.mknode(full.ino, b"f", FILE, 0, 0)
    with pytest.raises(errors.NotEmpty):
        meta.rename(ROOT_INODE, b"src", ROOT_INODE, b"full", 0)
    meta.rename(src.ino, b"sub", other.ino, b"moved", 0)
    assert meta.lookup(other.ino, b"moved").parent == other.ino
    assert meta.get_inode(src.ino).nlink == 2
    assert meta.get_inode(other.ino).nlink == 3
    f = meta.mknode(ROOT_INODE, b"file", FILE, 0, 0)
    with pytest.raises(errors.NotDirectory):
        meta.rename(ROOT_INODE, b"src", ROOT_INODE, b"file", 0)
    with pytest.raises(errors.IsDirectory):
        meta.rename(ROOT_INODE, b"file", ROOT_INODE, b"src", 0)
    assert meta.lookup(ROOT_INODE, b"file").ino == f.ino


def test_hard_links(meta):
    f = meta.mknode(ROOT_INODE, b"f", FILE, 0, 0)
    d = meta.mknode(ROOT_INODE, b"d", DIR, 0, 0)
    assert meta.link(f.ino, d.ino, b"g").nlink == 2
    with pytest.raises(errors.NotPermitted):
        meta.link(d.ino, ROOT_INODE, b"dlink")
    assert meta.rename(ROOT_INODE, b"f", d.ino, b"g", 0) is None  # same inode: no-op
    assert meta.unlink(ROOT_INODE, b"f").nlink == 1


def test_readdir_offsets_stable_under_deletion(meta):
    names = [f"n{i:03d}".encode() for i in range(50)]
    for name in names:
        meta.mknode(ROOT_INODE, name, FILE, 0, 0)
    first = list(itertools.islice(meta.readdir(ROOT_INODE, 0), 10))
    seen = [name for _, name, _ in first]
    for name in names[5:30:2]:
        meta.unlink(ROOT_INODE, name)
    rest, start = [], first[-1][0] + 1
    while batch := list(itertools.islice(meta.readdir(ROOT_INODE, start), 7)):
        rest += [name for _, name, _ in batch]
        start = batch[-1][0] + 1
    listed = seen + rest
    assert len(listed) == len(set(listed))
    survivors = set(names) - set(names[5:30:2])
    assert survivors <= set(listed)


def test_refcounts_dedup_pending_and_garbage(meta):
    a = meta.mknode(ROOT_INODE, b"a", FILE, 0, 0)
    b = meta.mknode(ROOT_INODE, b"b", FILE, 0, 0)
    assert meta.commit_content(a.ino, C + 20, {0: ref(1), 1: ref(2)}) == [ref(1).chunk_id, ref(2).chunk_id]
    assert meta.commit_content(b.ino, 10, {0: ref(1)}) == []  # dedup: not new
    assert meta.chunk_record(ref(1).chunk_id) == (2, 10)
    assert {p[0] for p in meta.pending_uploads()} == {ref(1).chunk_id, ref(2).chunk_id}
    meta.mark_uploaded([ref(1).chunk_id])
    assert [p[0] for p in meta.pending_uploads()] == [ref(2).chunk_id]
    # Truncating a to one chunk releases chunk 2.
    meta.commit_content(a.ino, 5, {})
    assert meta.garbage() == [ref(2).chunk_id]
    assert meta.chunks(a.ino, 0, 10) == {0: ref(1)}
    # Re-referencing a garbage chunk takes it off the garbage list.
    meta.commit_content(b.ino, C + 20, {1: ref(2)})
    assert meta.garbage() == []
    assert meta.drop_chunk_if_unreferenced(ref(2).chunk_id) is False
    meta.unlink(ROOT_INODE, b"b")
    meta.delete_inode(b.ino)
    assert set(meta.garbage()) == {ref(2).chunk_id}
    assert meta.drop_chunk_if_unreferenced(ref(2).chunk_id) is True
    assert meta.chunk_record(ref(2).chunk_id) is None
    assert meta.chunk_record(ref(1).chunk_id) == (1, 10)


def test_commit_drop_from_removes_truncated_tail(meta):
    f = meta.mknode(ROOT_INODE, b"f", FILE, 0, 0)
    meta.commit_content(f.ino, 2 * C + 30, {0: ref(1), 1: ref(2), 2: ref(3)})
    # Truncated to 0 then regrown to 30 with only chunk 2 rewritten.
    meta.commit_content(f.ino, 2 * C + 30, {2: ref(4)}, drop_from=0)
    assert meta.chunks(f.ino, 0, 10) == {2: ref(4)}


def test_xattrs(meta):
    f = meta.mknode(ROOT_INODE, b"f", FILE, 0, 0)
    meta.setxattr(f.ino, b"user.a", b"1")
    with pytest.raises(errors.Exists):
        meta.setxattr(f.ino, b"user.a", b"2", flags=1)
    with pytest.raises(errors.NoAttr):
        meta.setxattr(f.ino, b"user.b", b"2", flags=2)
    assert meta.getxattr(f.ino, b"user.a") == b"1"
    assert meta.listxattr(f.ino) == [b"user.a"]
    meta.removexattr(f.ino, b"user.a")
    with pytest.raises(errors.NoAttr):
        meta.getxattr(f.ino, b"user.a")


def test_symlink_and_setattr(meta):
    s = meta.mknode(ROOT_INODE, b"s", stat.S_IFLNK | 0o777, 0, 0, target=b"../t")
    assert meta.readlink(s.ino) == b"../t" and s.size == 4
    f = meta.mknode(ROOT_INODE, b"f", FILE | stat.S_ISUID, 0, 0)
    changed = meta.setattr(f.ino, uid=5, mtime_ns=123)
    assert changed.uid == 5 and changed.mtime_ns == 123
    assert not changed.mode & stat.S_ISUID  # chown clears set-uid
    assert stat.S_ISREG(meta.setattr(f.ino, mode=0o600).mode)
