"""The filesystem schema on every engine (memory, LMDB, PostgreSQL): namespace
rules, reference counts, pending uploads, garbage, readdir offsets, and the
cross-node rules of a shared volume (per-node pending uploads, open markers,
the deletion protocol that a concurrent commit rescues)."""

from __future__ import annotations

import stat

import pytest

from datafs import errors
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.meta.kv import open_kv
from datafs.meta.store import ROOT_INODE, ChunkRef, MetaStore

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture(params=["memory", "lmdb", "postgres"])
def meta(request, tmp_path) -> MetaStore:
    if request.param == "memory":
        kv = open_kv("memory://")
    elif request.param == "lmdb":
        kv = open_kv(f"lmdb://{tmp_path / 'meta'}")
    else:
        database = request.getfixturevalue("pg_url")
        kv = open_kv(database.url, password=database.env["PGPASSWORD"])
    store = MetaStore(kv)
    store.init_root(0, 0)
    yield store
    kv.close()


def other_node(meta: MetaStore, node_id: int = 2) -> MetaStore:
    """A second node on the same engine."""
    return MetaStore(meta.kv, node_id=node_id)


def pending_ids(meta: MetaStore) -> set[str]:
    return {p[0] for p in meta.pending_uploads()}


def upload(meta: MetaStore, chunk_id: str) -> str:
    return meta.mark_uploaded(chunk_id, meta.pending_token(chunk_id))


def collect(meta: MetaStore, chunk_id: str) -> bool:
    """One collector pass over one chunk; True if it was deleted and forgotten."""
    return meta.begin_delete(chunk_id) and meta.finish_delete(chunk_id)


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
    assert gone.nlink == 0 and [ino for ino, _ in meta.orphans()] == [gone.ino]
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
    first = meta.readdir(ROOT_INODE, 0, 10)
    seen = [name for _, name, _ in first]
    for name in names[5:30:2]:
        meta.unlink(ROOT_INODE, name)
    rest, start = [], first[-1][0] + 1
    while batch := meta.readdir(ROOT_INODE, start, 7):
        rest += [name for _, name, _ in batch]
        start = batch[-1][0] + 1
    listed = seen + rest
    assert len(listed) == len(set(listed))
    survivors = set(names) - set(names[5:30:2])
    assert survivors <= set(listed)


def test_refcounts_dedup_pending_and_garbage(meta):
    a = meta.mknode(ROOT_INODE, b"a", FILE, 0, 0)
    b = meta.mknode(ROOT_INODE, b"b", FILE, 0, 0)
    assert meta.commit_content(a.ino, C + 20, {0: ref(1), 1: ref(2)})[0] == [ref(1).chunk_id, ref(2).chunk_id]
    assert meta.commit_content(b.ino, 10, {0: ref(1)})[0] == []  # dedup: not new, already pending here
    assert meta.chunk_record(ref(1).chunk_id) == (2, 10)
    assert pending_ids(meta) == {ref(1).chunk_id, ref(2).chunk_id}
    assert upload(meta, ref(1).chunk_id) == "done"
    assert pending_ids(meta) == {ref(2).chunk_id}
    # Truncating a to one chunk releases chunk 2.
    meta.commit_content(a.ino, 5, {})
    assert meta.garbage() == [ref(2).chunk_id]
    assert meta.chunks(a.ino, 0, 10) == {0: ref(1)}
    # Re-referencing a garbage chunk takes it off the garbage list.
    meta.commit_content(b.ino, C + 20, {1: ref(2)})
    assert meta.garbage() == []
    assert meta.begin_delete(ref(2).chunk_id) is False
    meta.unlink(ROOT_INODE, b"b")
    meta.delete_inode(b.ino)
    assert set(meta.garbage()) == {ref(2).chunk_id}
    assert collect(meta, ref(2).chunk_id) is True
    assert meta.chunk_record(ref(2).chunk_id) is None
    assert ref(2).chunk_id not in pending_ids(meta)
    assert meta.chunk_record(ref(1).chunk_id) == (1, 10)


def test_garbage_waits_for_the_grace_period(meta):
    f = meta.mknode(ROOT_INODE, b"f", FILE, 0, 0)
    meta.commit_content(f.ino, 10, {0: ref(7)})
    meta.commit_content(f.ino, 0, {})
    hour = 3600 * 10**9
    assert meta.garbage(grace_ns=hour) == []
    assert meta.begin_delete(ref(7).chunk_id, grace_ns=hour) is False
    assert meta.garbage(grace_ns=0) == [ref(7).chunk_id]


def test_commit_during_deletion_rescues_the_chunk(meta):
    """A node commits a chunk whose object another node is deleting: the
    chunk survives, pending upload from the committing node, and that upload
    cannot be marked done until the deletion is over."""
    deleter, writer = meta, other_node(meta)
    f = meta.mknode(ROOT_INODE, b"f", FILE, 0, 0)
    meta.commit_content(f.ino, 10, {0: ref(9)})
    upload(meta, ref(9).chunk_id)
    meta.commit_content(f.ino, 0, {})
    assert deleter.begin_delete(ref(9).chunk_id) is True  # the object is being deleted now
    g = writer.mknode(ROOT_INODE, b"g", FILE, 0, 0)
    assert writer.commit_content(g.ino, 10, {0: ref(9)})[0] == [ref(9).chunk_id]
    token = writer.pending_token(ref(9).chunk_id)
    assert writer.mark_uploaded(ref(9).chunk_id, token) == "retry"  # the deletion may still remove it
    assert deleter.finish_delete(ref(9).chunk_id) is False  # rescued: not forgotten
    assert meta.chunk_record(ref(9).chunk_id) == (1, 10)
    assert writer.mark_uploaded(ref(9).chunk_id, token) == "retry"  # saw the object before it went
    assert upload(writer, ref(9).chunk_id) == "done"  # uploaded again after the deletion
    assert writer.pending_uploads() == []


def test_pending_uploads_are_per_node_and_cleared_by_the_first_upload(meta):
    a, b = meta, other_node(meta)
    fa = a.mknode(ROOT_INODE, b"fa", FILE, 0, 0)
    fb = b.mknode(ROOT_INODE, b"fb", FILE, 0, 0)
    assert a.commit_content(fa.ino, 10, {0: ref(3)})[0] == [ref(3).chunk_id]
    # B commits the same bytes before A uploads: B keeps a copy pending too.
    assert b.commit_content(fb.ino, 10, {0: ref(3)})[0] == [ref(3).chunk_id]
    assert sorted(a.chunk_holders(ref(3).chunk_id)) == [1, 2]
    assert upload(b, ref(3).chunk_id) == "done"
    assert a.pending_uploads() == [] and b.pending_uploads() == []
    assert upload(a, ref(3).chunk_id) == "done"  # nothing left to do: fine


def test_early_uploads_no_commit_took_become_garbage(meta):
    """A node uploads chunks before their file's commit; it dies before the
    commit of one. Releasing its early uploads makes that chunk a garbage
    candidate, and leaves the committed one (and another node's) alone."""
    b = other_node(meta)
    f = meta.mknode(ROOT_INODE, b"f", FILE, 0, 0)
    for n in (1, 2):
        meta.note_early_upload(ref(n).chunk_id, 10)
    b.note_early_upload(ref(3).chunk_id, 10)
    meta.commit_content(f.ino, 10, {0: ref(1)})  # chunk 2's file never committed
    assert upload(meta, ref(1).chunk_id) == "done"
    assert meta.release_early_uploads(meta.node_id) == 1
    assert meta.chunk_record(ref(2).chunk_id) == (0, 10)
    assert meta.garbage() == [ref(2).chunk_id]
    assert meta.chunk_record(ref(1).chunk_id) == (1, 10) and meta.chunk_record(ref(3).chunk_id) is None
    assert meta.release_early_uploads(meta.node_id) == 0  # each early upload is released once
    assert collect(meta, ref(2).chunk_id) is True
    assert b.release_early_uploads(b.node_id) == 1


def test_upload_state_says_whether_the_store_may_have_a_chunk(meta):
    """Only a chunk some node uploaded through a commit is worth asking the
    store about; the token is the one marking the upload checks."""
    b = other_node(meta)
    chunk = ref(4).chunk_id
    assert meta.upload_state(chunk) == (None, False)  # unknown
    f = meta.mknode(ROOT_INODE, b"f", FILE, 0, 0)
    meta.commit_content(f.ino, 10, {0: ref(4)})
    token, uploaded_once = meta.upload_state(chunk)
    assert token is not None and token == meta.pending_token(chunk) and uploaded_once is False
    assert b.upload_state(chunk) == (None, False)  # b owes nothing, and nobody uploaded it
    assert meta.mark_uploaded(chunk, token) == "done"
    assert meta.upload_state(chunk) == (None, True) and b.upload_state(chunk) == (None, True)


def test_open_elsewhere_keeps_an_unlinked_inode(meta):
    a, b = meta, other_node(meta)
    f = a.mknode(ROOT_INODE, b"f", FILE, 0, 0)
    a.commit_content(f.ino, 10, {0: ref(5)})
    b.update_open_markers([f.ino], [])
    a.unlink(ROOT_INODE, b"f")
    assert a.delete_inode(f.ino) is False  # B still reads it
    assert a.chunks(f.ino) == {0: ref(5)}
    b.update_open_markers([], [f.ino])
    assert a.delete_inode(f.ino, min_orphan_age_ns=3600 * 10**9) is False  # too young for a shared volume
    assert a.delete_inode(f.ino) is True
    assert a.garbage() == [ref(5).chunk_id]


def test_dead_session_is_reclaimed(meta):
    a, b = meta, other_node(meta)
    b.heartbeat({"host": "b"})
    f = a.mknode(ROOT_INODE, b"f", FILE, 0, 0)
    b.update_open_markers([f.ino], [])
    a.unlink(ROOT_INODE, b"f")
    assert a.delete_inode(f.ino) is False
    assert 2 in a.sessions()
    assert a.reclaim_session(2) == 1
    assert 2 not in a.sessions()
    assert a.delete_inode(f.ino) is True


def test_inode_numbers_come_in_batches_per_node(meta):
    a, b = meta, other_node(meta)
    first_a = a.mknode(ROOT_INODE, b"a1", FILE, 0, 0).ino
    first_b = b.mknode(ROOT_INODE, b"b1", FILE, 0, 0).ino
    second_a = a.mknode(ROOT_INODE, b"a2", FILE, 0, 0).ino
    assert second_a == first_a + 1  # from A's own batch
    assert abs(first_b - first_a) >= 1000  # B took another batch
    assert meta.counts()["inodes"] - meta._inode_delta == 1  # only the root is flushed yet
    a.flush_counts()
    b.flush_counts()
    assert a.counts()["inodes"] == 4


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


def test_chown_clears_setgid_only_with_group_execute(meta):
    """As on Linux: without group-execute, S_ISGID marks mandatory locking and stays."""
    locked = meta.mknode(ROOT_INODE, b"locked", FILE | stat.S_ISGID | stat.S_ISUID, 0, 0)
    assert meta.setattr(locked.ino, uid=7).mode & stat.S_ISGID
    runnable = meta.mknode(ROOT_INODE, b"run", stat.S_IFREG | 0o755 | stat.S_ISGID, 0, 0)
    assert not meta.setattr(runnable.ino, gid=7).mode & stat.S_ISGID
