"""`datafs fsck`: each kind of damage is found and repaired, a clean volume
(and one in use) is clean, and mistakes are one line.

Two layers. The check itself, called directly over the in-memory engine, a
file store and a cache, with each kind of damage written straight into the
keys (fast, one case per kind). Then through the real mount and the real CLI
on LMDB and on PostgreSQL: damage is written into the engine (LMDB: on the
unmounted state dir; PostgreSQL: beside the live mount), found, repaired, and
a second fsck is clean. Mounts that are damaged on purpose opt out of the
fsck that conftest runs after every test.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Callable

import pytest

from datafs.chunks import chunk_id
from datafs.chunks.cache import ChunkCache
from datafs.control import request
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.state_files import control_path
from datafs.fsck import Fsck, render
from datafs.meta.calls import MetaCalls
from datafs.meta.kv import KV, Txn, open_kv
from datafs.meta.lmdb_kv import LmdbKV
from datafs.meta.memory_kv import MemoryKV
from datafs.meta.store import (
    _CHUNK, _ENTRY, PENDING, ROOT_INODE, ChunkRecord, ChunkRef, Inode, MetaStore, _k_dirent, _k_holder,
    _k_inode, _k_pending, _k_seq, _u64,
)
from datafs.tiers.file_store import FileStore
from datafs.tiers.store import object_key

from .conftest import Mount, run_cli

MiB = 1 << 20


def kinds(output: str) -> set[str]:
    """The kinds of the findings `datafs fsck` printed (one line each)."""
    return {line.split(":", 1)[0] for line in output.splitlines() if line and not line.startswith("fsck:")}


# ---- keys, for writing damage -----------------------------------------------------------------
def entry(t: Txn, parent: int, name: bytes) -> tuple[int, int]:
    return _ENTRY.unpack(t.get(_k_dirent(parent, name)))


def chunks_of(t: Txn, ino: int) -> list[bytes]:
    return [_CHUNK.unpack(v)[0] for _, v in t.scan(b"c" + _u64(ino))]


def unname(t: Txn, parent: int, name: bytes) -> None:
    """Remove a name (entry and listing slot) and nothing else."""
    t.delete(_k_seq(parent, entry(t, parent, name)[1]))
    t.delete(_k_dirent(parent, name))


def edit_record(t: Txn, raw: bytes, **changes: int) -> None:
    record = ChunkRecord.unpack(t.get(b"r" + raw))
    for name, value in changes.items():
        setattr(record, name, value)
    t.put(b"r" + raw, record.pack())


def edit_inode(t: Txn, ino: int, **changes: int) -> None:
    inode = Inode.unpack(ino, t.get(_k_inode(ino)))
    for name, value in changes.items():
        setattr(inode, name, value)
    t.put(_k_inode(ino), inode.pack())


# ---- the check, called directly ----------------------------------------------------------------
class Volume:
    """A small volume on the in-memory engine: /dir/big (two chunks), /small
    with a second name /dir/link, and a file store and cache holding every
    chunk (uploaded, as after a sync)."""

    def __init__(self, root: Path):
        self.kv = MemoryKV()
        self.meta = MetaStore(self.kv)
        self.meta.init_root()
        self.store = FileStore(root / "store")
        self.store.check()
        self.cache = ChunkCache(root / "cache", 1 << 30, 0)
        self.cache.open()
        self.root = root
        self.dir = self.meta.mknode(ROOT_INODE, b"dir", stat.S_IFDIR | 0o755, 0, 0).ino
        self.big = self.write(self.dir, b"big", os.urandom(C + 1000))
        self.small = self.write(ROOT_INODE, b"small", b"small file")
        self.meta.link(self.small, self.dir, b"link")

    def write(self, parent: int, name: bytes, data: bytes, upload: bool = True) -> int:
        ino = self.meta.mknode(parent, name, stat.S_IFREG | 0o644, 0, 0).ino
        changes = {}
        for index in range(0, len(data), C):
            part = data[index:index + C]
            self.cache.put(chunk_id(part), part)
            changes[index // C] = ChunkRef(chunk_id(part), len(part))
        owed, _ = self.meta.commit_content(ino, len(data), changes)
        for chunk in owed if upload else ():
            self.store.put_file(chunk, self.cache.path(chunk))
            self.meta.mark_uploaded(chunk, None)
        return ino

    def raw_chunk(self, ino: int, index: int = 0) -> bytes:
        return bytes.fromhex(self.meta.chunks(ino)[index].chunk_id)

    def damage(self, fn: Callable[[Txn], None]) -> None:
        self.kv.transact(fn)

    async def fsck(self, **options) -> tuple[dict, list[str], bool]:
        options.setdefault("grace_seconds", 3600)
        report = await Fsck(self.meta, self.store, self.cache, MetaCalls(), **options).run()
        lines, _, clean = render(report)
        return report, lines, clean


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    return Volume(tmp_path)


def _stray_object(v: Volume) -> None:
    path = v.root / "stray"
    path.write_bytes(b"uploaded, never committed")
    v.store.put_file(chunk_id(path.read_bytes()), path)


def _store_lost_a_chunk(v: Volume) -> None:
    os.unlink(v.store.root / object_key(v.raw_chunk(v.big, 1).hex()))


#: Damage written straight into the keys (or the store), and the kind it is.
DAMAGE: dict[str, Callable[[Volume], None]] = {
    "entry-dangling": lambda v: v.damage(lambda t: (
        t.put(_k_dirent(ROOT_INODE, b"ghost"), _ENTRY.pack(99999, 500)), t.put(_k_seq(ROOT_INODE, 500), b"ghost"))),
    "entry-unlisted": lambda v: v.damage(lambda t: t.delete(_k_seq(v.dir, entry(t, v.dir, b"big")[1]))),
    "listing-stale": lambda v: v.damage(lambda t: t.put(_k_seq(v.dir, 400), b"gone")),
    "dir-parent": lambda v: v.damage(lambda t: edit_inode(t, v.dir, parent=v.big)),
    "content-orphan": lambda v: v.damage(lambda t: (
        t.put(b"c" + _u64(5000) + _u64(0), _CHUNK.pack(v.raw_chunk(v.small), 10)),
        edit_record(t, v.raw_chunk(v.small), refs=2))),
    "content-past-end": lambda v: v.damage(lambda t: edit_inode(t, v.big, size=10)),
    "key-orphan": lambda v: v.damage(lambda t: t.put(b"x" + _u64(5001) + b"user.k", b"v")),
    "nlink": lambda v: v.damage(lambda t: edit_inode(t, v.small, nlink=5)),
    "unreachable": lambda v: v.damage(lambda t: (unname(t, ROOT_INODE, b"small"), unname(t, v.dir, b"link"))),
    "orphan-unmarked": lambda v: v.damage(lambda t: t.put(
        _k_inode(5002), Inode(5002, stat.S_IFREG | 0o644, 0, 0, nlink=0).pack())),
    "orphan-stale": lambda v: v.damage(lambda t: t.put(b"o" + _u64(v.small), _u64(1))),
    "refcount": lambda v: v.damage(lambda t: edit_record(t, v.raw_chunk(v.big), refs=3)),
    "garbage-missing": lambda v: v.damage(lambda t: t.put(b"r" + bytes(range(32)), ChunkRecord(0, 5).pack())),
    "garbage-stale": lambda v: v.damage(lambda t: t.put(b"g" + v.raw_chunk(v.small), _u64(1))),
    "pending-orphan": lambda v: v.damage(lambda t: t.put(_k_pending(7, bytes(32)), _u64(1))),
    "pending-unpaired": lambda v: v.damage(lambda t: t.put(_k_holder(v.raw_chunk(v.small), 7), b"")),
    "pending-stale": lambda v: v.damage(lambda t: (
        t.put(_k_pending(1, v.raw_chunk(v.small)), _u64(1)), t.put(_k_holder(v.raw_chunk(v.small), 1), b""),
        edit_record(t, v.raw_chunk(v.small), flags=PENDING))),
    "pending-flag": lambda v: v.damage(lambda t: edit_record(t, v.raw_chunk(v.small), flags=PENDING)),
    "pending-flag-unset": lambda v: (_store_lost_a_chunk(v), v.damage(lambda t: (
        t.put(_k_pending(7, v.raw_chunk(v.big, 1)), _u64(1)), t.put(_k_holder(v.raw_chunk(v.big, 1), 7), b"")))),
    "chunk-missing": _store_lost_a_chunk,
    "object-unreferenced": _stray_object,
}
UNREPAIRABLE = {"unreachable"}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
async def test_each_kind_of_damage_is_found_and_repaired(volume: Volume, kind: str):
    DAMAGE[kind](volume)
    kind = kind.removesuffix("-unset")
    report, lines, clean = await volume.fsck(grace_seconds=0)
    assert not clean and kind in report["found"], lines
    assert set(report["found"]) <= {kind, "refcount", "garbage-missing", "nlink"}, lines  # knock-on effects only
    report, lines, clean = await volume.fsck(grace_seconds=0, repair=True)
    if kind in UNREPAIRABLE:
        assert not clean and not report["repaired"].get(kind), lines
        return
    assert clean and report["repaired"] == report["found"], lines
    report, lines, clean = await volume.fsck(grace_seconds=0, verify=True)
    assert clean, lines


async def test_a_clean_volume_is_clean_and_verifies(volume: Volume):
    report, lines, clean = await volume.fsck(verify=True)
    assert clean and not lines
    assert report["counts"]["inodes"] == 4 and report["counts"]["chunks"] == 3
    assert report["counts"]["verified_bytes"] == 2 * (C + 1000 + len(b"small file"))


async def test_states_of_a_volume_in_use_are_not_findings(volume: Volume):
    # Committed here, not uploaded yet (pinned in this node's cache).
    volume.write(ROOT_INODE, b"fresh", b"not uploaded yet", upload=False)
    # Committed on node 2, which has not uploaded it: that node's business.
    other = MetaStore(volume.kv, node_id=2)
    ino = other.mknode(ROOT_INODE, b"elsewhere", stat.S_IFREG | 0o644, 0, 0).ino
    other.commit_content(ino, 5, {0: ChunkRef(chunk_id(b"other"), 5)})
    # Unlinked while open: an orphan, freed at its last close.
    orphan = volume.write(ROOT_INODE, b"open", b"still open")
    volume.meta.unlink(ROOT_INODE, b"open")
    # A chunk being deleted by the collector.
    garbage = volume.write(ROOT_INODE, b"garbage", b"garbage")
    raw = volume.raw_chunk(garbage)
    volume.meta.unlink(ROOT_INODE, b"garbage")
    volume.meta.delete_inode(garbage)
    assert volume.meta.begin_delete(raw.hex())
    # Uploaded moments ago by a write not committed yet.
    _stray_object(volume)
    report, lines, clean = await volume.fsck()
    assert clean, lines
    assert report["notes"]["chunks pending upload from this node"] == 1
    assert report["notes"]["chunks pending upload from other nodes"] == 1
    assert report["notes"]["unreferenced objects younger than the GC grace, left alone"] == 1
    assert volume.meta.get_inode(orphan).nlink == 0


async def test_a_chunk_with_no_copy_left_is_reported_not_repaired(volume: Volume):
    raw = volume.raw_chunk(volume.big, 1).hex()
    os.unlink(volume.store.root / object_key(raw))
    volume.cache.remove(raw)
    report, lines, clean = await volume.fsck(repair=True)
    assert not clean and report["found"] == {"chunk-lost": 1} and not report["repaired"], lines
    assert "cannot be repaired" in lines[0] and raw in lines[0]


async def test_verify_finds_a_corrupt_object_and_restores_it_from_the_cache(volume: Volume):
    raw = volume.raw_chunk(volume.big, 0).hex()
    path = volume.store.root / object_key(raw)
    os.unlink(path)  # the cached copy is a hard link to the same file: keep it intact
    path.write_bytes(b"\0" * C)
    report, lines, clean = await volume.fsck()
    assert clean, lines
    report, lines, clean = await volume.fsck(verify=True)
    assert report["found"] == {"chunk-corrupt": 1}, lines
    report, lines, clean = await volume.fsck(verify=True, repair=True)
    assert clean and report["repaired"] == {"chunk-corrupt": 1}, lines
    assert chunk_id(volume.store.get(raw)) == raw


async def test_a_count_is_repaired_once_though_two_repairs_race(volume: Volume):
    """Two nodes' fsck --repair measure the same wrong count; only the first
    fix lands, and a count that changed since it was measured is left alone."""
    from datafs.fsck import _fix_nlink, _fix_refcount

    raw = volume.raw_chunk(volume.small)
    volume.damage(lambda t: edit_record(t, raw, refs=5))  # one file entry names it
    assert volume.meta._write(lambda tx: _fix_refcount(tx, raw, 5, 1, 10, None))[0]
    assert not volume.meta._write(lambda tx: _fix_refcount(tx, raw, 5, 1, 10, None))[0]
    volume.write(ROOT_INODE, b"copy", b"small file")  # now 2 and 2
    assert not volume.meta._write(lambda tx: _fix_refcount(tx, raw, 1, 1, 10, None))[0]
    assert volume.meta.chunk_record(raw.hex())[0] == 2

    volume.damage(lambda t: edit_inode(t, volume.small, nlink=5))
    ctime = volume.meta.get_inode(volume.small).ctime_ns
    assert volume.meta._write(lambda tx: _fix_nlink(tx, volume.small, ctime, 2))
    assert not volume.meta._write(lambda tx: _fix_nlink(tx, volume.small, ctime, 2))
    assert volume.meta.get_inode(volume.small).nlink == 2
    report, lines, clean = await volume.fsck()
    assert clean, lines


def test_file_store_lists_its_chunks_with_size_and_age(tmp_path: Path):
    store = FileStore(tmp_path / "store")
    store.check()
    ids = []
    for data in (b"one", b"two", b"three"):
        (tmp_path / data.decode()).write_bytes(data)
        store.put_file(chunk_id(data), tmp_path / data.decode())
        ids.append(chunk_id(data))
    (tmp_path / "store" / "chunks" / "not-a-chunk").write_bytes(b"")
    listed = list(store.list_chunks())
    assert [c.chunk_id for c in listed] == sorted(ids)
    assert {c.size_bytes for c in listed} == {3, 5}
    assert all(abs(time.time() - c.modified) < 60 for c in listed)


# ---- through the real mount ------------------------------------------------------------------------

def make_tree(root: Path) -> dict[str, bytes]:
    """Files of every shape, written, renamed, linked, shrunk and unlinked."""
    files = {
        "big.bin": os.urandom(2 * C + 123),
        "dir/sub/small.txt": b"small",
        "dir/copy.bin": b"",
        "empty": b"",
    }
    files["dir/copy.bin"] = files["big.bin"][:C]  # a chunk shared with big.bin
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    os.link(root / "dir/sub/small.txt", root / "hardlink")
    os.symlink("big.bin", root / "symlink")
    os.setxattr(root / "big.bin", "user.origin", b"test")
    (root / "tmp.bin").write_bytes(os.urandom(MiB))
    os.rename(root / "tmp.bin", root / "dir/renamed.bin")
    (root / "gone.bin").write_bytes(os.urandom(C + 1))
    os.unlink(root / "gone.bin")
    with open(root / "big.bin", "r+b") as f:
        f.truncate(C + 10)
    os.mkdir(root / "dir/empty-dir")
    os.rmdir(root / "dir/empty-dir")
    return files


@pytest.fixture(params=["lmdb", "postgres"])
def engine(request) -> str:
    return request.param


@pytest.fixture
def node(engine: str, request, tmp_path: Path) -> Callable[..., Mount]:
    """`node(**env)` mounts one node: embedded LMDB, or PostgreSQL with its
    store a file:// dir in the state dir. The database comes first, so it
    is dropped only after the mount is gone."""
    database = request.getfixturevalue("pg_url") if engine == "postgres" else None
    mount_factory = request.getfixturevalue("mount_factory")
    state_dir = tmp_path / "node-state"

    def make(**env: str) -> Mount:
        if database is None:
            return mount_factory(env=env, state_dir=state_dir)
        return mount_factory(extra_args=["--meta", database.url, "--store", f"file://{state_dir / 'store'}"],
                             env={**database.env, **env}, state_dir=state_dir)

    make.database = database  # type: ignore[attr-defined]
    return make


def edit_engine(mount: Mount, database, fn: Callable[[KV], object]):
    """Open the mount's engine from the test: PostgreSQL beside the live mount,
    LMDB on the unmounted state dir (one writer per environment)."""
    if database is None:
        kv: KV = LmdbKV(str(mount.state_dir / "meta"))
    else:
        kv = open_kv(database.url, password=database.env["PGPASSWORD"], volume="default")
    try:
        return fn(kv)
    finally:
        kv.close()


@pytest.mark.mount
def test_a_clean_volume_in_use_reports_clean(node, engine: str):
    m = node()
    make_tree(m.path)
    with open(m.path / "open-unlinked", "wb") as held:
        held.write(os.urandom(C + 5))
        held.flush()
        os.unlink(m.path / "open-unlinked")
        result = m.fsck()
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().splitlines()[-1].endswith("clean") or "clean (" in result.stdout
    run_cli("sync", str(m.path))
    result = m.fsck("--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("fsck: ") and "verified" in result.stdout and ": clean" in result.stdout


@pytest.mark.mount
def test_damage_is_found_and_repaired_through_the_mount(node, engine: str):
    m = node(DATAFS_GC_GRACE="1")
    m.fsck_after = False  # until it is repaired
    make_tree(m.path)
    (m.path / "victim.bin").write_bytes(os.urandom(C + 7))
    run_cli("sync", str(m.path))
    if engine == "lmdb":
        m.umount()
    stray = b"an upload whose commit never came"
    (m.state_dir / "stray").write_bytes(stray)
    FileStore(m.state_dir / "store").put_file(chunk_id(stray), m.state_dir / "stray")

    def damage(kv: KV) -> str:
        def body(t: Txn) -> str:
            big, _ = entry(t, ROOT_INODE, b"big.bin")
            dir_ino, _ = entry(t, ROOT_INODE, b"dir")
            small, _ = entry(t, ROOT_INODE, b"hardlink")
            victim, _ = entry(t, ROOT_INODE, b"victim.bin")
            shared = chunks_of(t, big)[0]
            edit_record(t, shared, refs=7)  # refcount
            t.put(b"r" + bytes(range(32)), ChunkRecord(0, 5).pack())  # garbage-missing
            # pending-stale: node 5 died between its upload and marking it done
            # (this node's own would resume at the mount and clear itself).
            t.put(_k_pending(5, chunks_of(t, small)[0]), _u64(1))
            t.put(_k_holder(chunks_of(t, small)[0], 5), b"")
            t.put(_k_pending(9, bytes(32)), _u64(1))  # pending-orphan
            t.put(_k_dirent(ROOT_INODE, b"ghost"), _ENTRY.pack(10**9, 10**6))  # entry-dangling
            t.put(_k_seq(ROOT_INODE, 10**6), b"ghost")
            t.delete(_k_seq(dir_ino, entry(t, dir_ino, b"copy.bin")[1]))  # entry-unlisted
            edit_inode(t, small, nlink=9)  # nlink
            return chunks_of(t, victim)[1].hex()

        return kv.transact(body)

    lost_from_store = edit_engine(m, node.database, damage)
    os.unlink(m.state_dir / "store" / object_key(lost_from_store))  # chunk-missing (the cache has it)
    time.sleep(1.1)  # the stray object outgrows the GC grace
    expected = {"refcount", "garbage-missing", "pending-stale", "pending-orphan", "entry-dangling", "entry-unlisted",
                "nlink", "object-unreferenced", "chunk-missing"}
    if engine == "lmdb":
        result = run_cli("fsck", "--state-dir", str(m.state_dir), check=False, env={"DATAFS_GC_GRACE": "1"})
        assert result.returncode == 1 and kinds(result.stdout) == expected, result.stdout + result.stderr
        m.mount()
    result = m.fsck()
    assert result.returncode == 1 and kinds(result.stdout) == expected, result.stdout + result.stderr
    assert "problems (run with --repair" in result.stdout.splitlines()[-1]
    result = m.fsck("--repair")
    assert result.returncode == 0 and kinds(result.stdout) == expected, result.stdout + result.stderr
    assert all("(repaired: " in line for line in result.stdout.splitlines()[:-1])
    run_cli("sync", str(m.path))  # the chunk the store lost goes back up from the cache
    assert (m.state_dir / "store" / object_key(lost_from_store)).exists()
    result = m.fsck("--verify")
    assert result.returncode == 0 and ": clean" in result.stdout, result.stdout + result.stderr
    assert sorted(os.listdir(m.path)) == ["big.bin", "dir", "empty", "hardlink", "symlink", "victim.bin"]
    assert "copy.bin" in os.listdir(m.path / "dir")
    m.fsck_after = True


@pytest.mark.mount
def test_verify_catches_a_corrupt_store_object(node, engine: str):
    m = node()
    data = os.urandom(C + 99)
    (m.path / "model.bin").write_bytes(data)
    run_cli("sync", str(m.path))
    path = m.state_dir / "store" / object_key(chunk_id(data[:C]))
    os.unlink(path)  # the cache's hard link keeps the good bytes
    path.write_bytes(os.urandom(C))
    assert m.fsck().returncode == 0  # without --verify nothing reads the bytes
    result = m.fsck("--verify")
    assert result.returncode == 1 and kinds(result.stdout) == {"chunk-corrupt"}, result.stdout + result.stderr
    result = m.fsck("--verify", "--repair")
    assert result.returncode == 0 and "(repaired: upload this node's good cached copy" in result.stdout
    assert chunk_id(path.read_bytes()) == chunk_id(data[:C])


@pytest.mark.mount
def test_a_chunk_with_no_copy_left_fails_even_after_repair(mount_factory):
    m = mount_factory()
    m.fsck_after = False
    data = os.urandom(C + 1)
    (m.path / "doomed.bin").write_bytes(data)
    run_cli("sync", str(m.path))
    m.umount()
    chunk = chunk_id(data[:C])
    os.unlink(m.state_dir / "store" / object_key(chunk))
    os.unlink(m.state_dir / "cache" / "chunks" / chunk[:2] / chunk)
    result = run_cli("fsck", "--state-dir", str(m.state_dir), "--repair", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert kinds(result.stdout) == {"chunk-lost"} and "cannot be repaired" in result.stdout
    assert result.stdout.splitlines()[-1].endswith("1 problem, 0 repaired")


@pytest.mark.mount
def test_young_unreferenced_objects_are_left_alone(mount_factory):
    m = mount_factory()
    stray = b"uploaded a moment ago, its commit still to come"
    (m.state_dir / "stray").write_bytes(stray)
    FileStore(m.state_dir / "store").put_file(chunk_id(stray), m.state_dir / "stray")
    result = m.fsck("--repair")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unreferenced objects younger than the GC grace, left alone: 1" in result.stdout
    assert (m.state_dir / "store" / object_key(chunk_id(stray))).exists()


@pytest.mark.mount
def test_mistakes_are_one_line_and_exit_2(mount_factory, tmp_path: Path):
    m = mount_factory()
    cases = [
        ((), "give either a mountpoint"),
        ((str(m.path), "--state-dir", str(m.state_dir)), "give either a mountpoint"),
        ((str(tmp_path),), "is not mounted"),
        (("--state-dir", str(m.state_dir)), "is in use by a running datafs daemon"),
        (("--state-dir", str(tmp_path / "nowhere")), "does not exist"),
        (("--state-dir", str(tmp_path)), "holds no datafs metadata"),
        ((str(m.path), "--cache-dir", str(tmp_path)), "--cache-dir goes with --state-dir"),
    ]
    for args, message in cases:
        result = run_cli("fsck", *args, check=False)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("datafs: ") and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout, (args, result.stderr)
    assert request(control_path(m.state_dir), "GET", "/fsck") == {"running": False}  # progress, when idle
    m.umount()
    result = run_cli("fsck", "--state-dir", str(m.state_dir), check=False)
    assert result.returncode == 0 and ": clean" in result.stdout, result.stdout + result.stderr


@pytest.mark.mount
def test_a_shared_volume_is_checked_through_a_mount(pg_url, mount_factory, tmp_path: Path):
    state_dir = tmp_path / "shared-state"
    m = mount_factory(extra_args=["--meta", pg_url.url, "--store", f"file://{state_dir / 'store'}"],
                      env=pg_url.env, state_dir=state_dir)
    m.umount()
    result = run_cli("fsck", "--state-dir", str(state_dir), check=False)
    assert result.returncode == 2 and "is a node of the shared volume" in result.stderr, result.stderr


async def test_a_flaky_store_is_asked_again(volume: Volume, monkeypatch: pytest.MonkeyPatch):
    """Temporary store errors (500, SlowDown) are retried, as the daemon's own
    callers retry them; fsck fails only if the store stays down."""
    from datafs.errors import StoreError

    monkeypatch.setattr("datafs.fsck.STORE_RETRY_SECONDS", 0.001)
    real_list, real_get = volume.store.list_chunks, volume.store.get
    failures = {"list": 1, "get": 1}

    def flaky(name, real):
        def call(*args):
            if failures[name]:
                failures[name] -= 1
                raise StoreError("503 SlowDown", temporary=True)
            return real(*args)
        return call

    def listing():
        yield from flaky("list", real_list)()

    monkeypatch.setattr(volume.store, "list_chunks", listing)
    monkeypatch.setattr(volume.store, "get", flaky("get", real_get))
    report, lines, clean = await volume.fsck(verify=True)
    assert clean and report["counts"]["objects"] == 3, lines
    assert failures == {"list": 0, "get": 0}
