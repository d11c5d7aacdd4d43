"""What is durable when (durability.py): close() is safe from a crash of the
daemon, fsync() from a power loss, the rest within the flush interval, and a
power loss never leaves a file naming a chunk that is not on disk.

Three layers. The cache's owed syncs and the journal's keys, unit by unit.
The Operations called directly, with a power loss simulated as what it can
do: the metadata (as it reached the disk) is kept, chunk files written since
the last flush are deleted or cut short, and a new start recovers. Then the
real mount: fsync and the interval move the durable point, and a SIGKILL
followed by the same damage to the cache leaves cut-back files, reported,
that `datafs fsck` finds clean.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import trio

from datafs.chunks import chunk_id
from datafs.chunks.cache import ChunkCache
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.control import request
from datafs.state_files import control_path
from datafs.fsck import Fsck, render
from datafs.meta.calls import MetaCalls
from datafs.meta.kv import open_kv
from datafs.meta.store import ROOT_INODE, ChunkRef, MetaStore
from datafs.tiers.faults import write_spec

from .conftest import Mount, run_cli
from .test_operations import Ctx, Stack


def pieces(data: bytes) -> list[bytes]:
    return [data[i:i + C] for i in range(0, len(data), C)]


# ---- the cache's owed syncs --------------------------------------------------------------------
def test_a_chunk_is_owed_a_sync_until_synced_stored_or_gone(tmp_path: Path):
    cache = ChunkCache(tmp_path, 1 << 30, 0)
    cache.open()
    a, b, c, d = (os.urandom(1000 + i) for i in range(4))
    cache.put(chunk_id(a), a)  # fsynced at once: owes nothing
    for data in (b, c, d):
        cache.put(chunk_id(data), data, defer_sync=True)
    assert cache.unsynced() == {chunk_id(b): len(b), chunk_id(c): len(c), chunk_id(d): len(d)}
    assert cache.sync([chunk_id(a), chunk_id(b)]) == (1, len(b))  # `a` is synced again, but was not owed
    cache.sync_not_needed(chunk_id(c))  # the object store has it now
    cache.remove(chunk_id(d))  # nothing left to sync
    assert cache.unsynced() == {}
    # A batch large enough for one syncfs(2) pays every chunk in it.
    many = [os.urandom(100) + bytes([i]) for i in range(40)]
    for data in many:
        cache.put(chunk_id(data), data, defer_sync=True)
    assert cache.sync(list(cache.unsynced())) == (40, 40 * 101) and cache.unsynced() == {}


def test_a_chunk_written_again_during_a_sync_stays_owed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The sync took its list, then the chunk was evicted and written again:
    the new file was never synced, so it is still owed."""
    cache = ChunkCache(tmp_path, 1 << 30, 0)
    cache.open()
    data = os.urandom(1000)
    cache.put(chunk_id(data), data, defer_sync=True)
    real_fsync = os.fsync

    def fsync_then_rewrite(fd: int) -> None:
        real_fsync(fd)
        if chunk_id(data) in cache.ids() and os.path.exists(cache.path(chunk_id(data))):
            monkeypatch.setattr(os, "fsync", real_fsync)
            cache.remove(chunk_id(data))
            cache.put(chunk_id(data), data, defer_sync=True)

    monkeypatch.setattr(os, "fsync", fsync_then_rewrite)
    assert cache.sync([chunk_id(data)]) == (0, 0)
    assert cache.is_unsynced(chunk_id(data))


# ---- the journal's keys ------------------------------------------------------------------------
def test_journal_entries_go_with_their_commit_and_leave_behind_the_durable_point(tmp_path: Path):
    meta = MetaStore(open_kv(f"lmdb://{tmp_path / 'meta'}"))
    meta.init_root()
    inos = [meta.mknode(ROOT_INODE, f"f{i}".encode(), stat.S_IFREG | 0o644, 0, 0).ino for i in range(3)]
    refs = [ChunkRef(chunk_id(bytes([i]) * 10), 10) for i in range(3)]
    for seq, (ino, ref) in enumerate(zip(inos, refs), start=1):
        meta.commit_content(ino, 10, {0: ref}, journal=(seq, [ref.chunk_id]))
    meta.commit_content(inos[0], 10, {0: refs[0]})  # nothing owed: no entry
    assert meta.journal_entries() == [(seq, ino, [ref.chunk_id]) for seq, (ino, ref) in enumerate(zip(inos, refs), 1)]
    assert meta.advance_durable_point(2) == 2
    assert meta.journal_entries() == [(3, inos[2], [refs[2].chunk_id])] and meta.durable_point() == 2
    assert meta.advance_durable_point(1) == 2  # never back
    meta.kv.close()


# ---- the Operations, with a power loss simulated ----------------------------------------------
async def write(s: Stack, name: bytes, data: bytes, fsync: bool = False) -> int:
    fi, attrs = await s.ops.create(ROOT_INODE, name, 0o644, os.O_RDWR, Ctx())
    for off in range(0, len(data), 1 << 20):
        await s.ops.write(fi.fh, off, data[off:off + (1 << 20)])
    if fsync:
        await s.ops.fsync(fi.fh, False)
    await s.ops.flush(fi.fh)
    await s.ops.release(fi.fh)
    return attrs.st_ino


async def test_fsync_moves_the_durable_point_as_far_as_older_commits_allow(tmp_path, nursery):
    s = Stack(tmp_path, nursery, durable_later=True)  # no uploader: chunks stay in the cache only
    first, second = os.urandom(3000), os.urandom(4000)
    await write(s, b"first", first)
    assert s.cache.is_unsynced(chunk_id(first)) and s.durability.durable_point == 0
    await write(s, b"second", second, fsync=True)  # its chunk is durable, the older commit's is not
    assert not s.cache.is_unsynced(chunk_id(second))
    assert s.durability.snapshot()["durable_point"] == 0 and len(s.meta.journal_entries()) == 2
    ino = (await s.ops.lookup(ROOT_INODE, b"first", Ctx())).st_ino
    fi = await s.ops.open(ino, os.O_RDONLY, Ctx())
    await s.ops.fsync(fi.fh, False)  # the oldest: now both commits are durable
    await s.ops.release(fi.fh)
    assert s.durability.snapshot() == {"not_durable_chunks": 0, "not_durable_bytes": 0, "durable_point": 2,
                                       "last_commit": 2, "damaged_at_start": 0}
    assert s.meta.journal_entries() == []
    await write(s, b"third", os.urandom(5000))
    await s.durability.flush()  # the interval's flush: everything
    assert s.durability.snapshot()["durable_point"] == 3 and s.cache.unsynced() == {}


async def test_a_shared_engine_fsyncs_chunks_before_the_commit_and_keeps_no_journal(tmp_path, nursery):
    s = Stack(tmp_path, nursery, durable_later=False)
    await write(s, b"f", os.urandom(3000))
    assert s.cache.unsynced() == {} and s.meta.journal_entries() == []


async def test_a_power_loss_cuts_back_only_the_files_whose_chunks_it_took(tmp_path, nursery, caplog):
    s = Stack(tmp_path, nursery, durable_later=True)  # no uploader: a lost chunk has no other copy
    await nursery.start(s.collector.run)
    # Committed twice: the first version was flushed, the second's chunk is lost.
    inos = {"rewritten": await write(s, b"rewritten", os.urandom(3000))}
    await s.durability.flush()
    files = {
        "kept": os.urandom(C + 1000),  # not durable, but its chunks reached the disk
        "cut": os.urandom(2 * C + 5),  # its middle chunk is lost: cut to the first
        "gone": os.urandom(2000),  # its only chunk comes back short
        "synced": os.urandom(C + 7),  # fsynced: a power loss cannot take it
    }
    for name, data in files.items():
        inos[name] = await write(s, name.encode(), data, fsync=name == "synced")
    files["shares"] = files["gone"]  # names the lost chunk of "gone" too
    inos["shares"] = await write(s, b"shares", files["shares"])
    files["rewritten"] = os.urandom(3000)
    fi = await s.ops.open(inos["rewritten"], os.O_WRONLY | os.O_TRUNC, Ctx())
    await s.ops.write(fi.fh, 0, files["rewritten"])
    await s.ops.release(fi.fh)
    owed = set(s.cache.unsynced())
    assert owed and not owed & {chunk_id(p) for p in pieces(files["synced"])}

    # The power loss: the metadata is kept as it was, some chunk files are not.
    lost = {chunk_id(pieces(files["cut"])[1]), chunk_id(files["gone"]), chunk_id(files["rewritten"])}
    assert lost <= owed
    os.unlink(s.cache.path(chunk_id(pieces(files["cut"])[1])))
    os.truncate(s.cache.path(chunk_id(files["gone"])), 100)
    os.unlink(s.cache.path(chunk_id(files["rewritten"])))
    s.cache.close()
    nursery.cancel_scope.cancel()

    async with trio.open_nursery() as after:
        restarted = Stack(tmp_path, after, meta=s.meta, durable_later=True)
        restarted.durability.recover(restarted.store)
        expected = {"kept": files["kept"], "cut": pieces(files["cut"])[0], "gone": b"", "shares": b"",
                    "synced": files["synced"], "rewritten": b""}
        for name, data in expected.items():
            assert await restarted.read_file(inos[name]) == data, name
        damaged = {item["ino"]: item for item in restarted.durability.damaged_at_start}
        assert damaged == {
            inos["cut"]: {"ino": inos["cut"], "size_bytes": 2 * C + 5, "cut_to_bytes": C},
            inos["gone"]: {"ino": inos["gone"], "size_bytes": 2000, "cut_to_bytes": 0},
            inos["shares"]: {"ino": inos["shares"], "size_bytes": 2000, "cut_to_bytes": 0},
            inos["rewritten"]: {"ino": inos["rewritten"], "size_bytes": 3000, "cut_to_bytes": 0},
        }
        warned = [r for r in caplog.records if r.getMessage().startswith("file cut short")]
        assert sorted(r.ino for r in warned) == sorted(damaged)
        assert restarted.meta.journal_entries() == [] and restarted.durability.durable_point >= 1
        pending = {chunk for chunk, _, _ in restarted.meta.pending_uploads()}
        assert pending and not pending & lost  # the lost chunks' uploads went with them
        # No file names a chunk that is not there: fsck agrees, and the
        # uploads that are left all succeed.
        await after.start(restarted.uploader.run)
        with trio.fail_after(10):
            await restarted.uploader.wait_idle()
        report = await Fsck(restarted.meta, restarted.store, restarted.cache, MetaCalls(), grace_seconds=3600).run()
        lines, _, clean = render(report)
        assert clean, lines
        after.cancel_scope.cancel()


async def test_after_a_crash_of_the_daemon_alone_nothing_is_cut(tmp_path, nursery):
    s = Stack(tmp_path, nursery, durable_later=True)
    data = os.urandom(C + 10)
    ino = await write(s, b"f", data)
    nursery.cancel_scope.cancel()
    async with trio.open_nursery() as after:
        restarted = Stack(tmp_path, after, meta=s.meta, durable_later=True)
        assert restarted.durability.recover(restarted.store) == []
        assert restarted.meta.journal_entries() == [] and await restarted.read_file(ino) == data
        after.cancel_scope.cancel()


# ---- the real mount ----------------------------------------------------------------------------
def durability_status(m: Mount) -> dict:
    status = request(control_path(m.state_dir), "GET", "/status")
    return {key: status[key] for key in ("not_durable_chunks", "durable_point", "last_commit", "damaged_at_start")}


@pytest.mark.mount
def test_fsync_and_the_flush_interval_make_closed_files_durable(mount_factory, tmp_path: Path):
    faults = tmp_path / "faults.json"
    write_spec(faults, down=True, ops=["put"])  # an uploaded chunk is durable in the store: hold uploads
    m = mount_factory(extra_args=["--flush-interval", "3600"], env={"DATAFS_FAULTS": str(faults)})
    (m.path / "a").write_bytes(os.urandom(C + 100))
    before = durability_status(m)
    assert before["not_durable_chunks"] == 2 and before["durable_point"] < before["last_commit"]
    fd = os.open(m.path / "a", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    after = durability_status(m)
    assert after["not_durable_chunks"] == 0 and after["durable_point"] == after["last_commit"] == before["last_commit"]

    write_spec(faults)  # the uploads may finish: the unmount waits for them
    m.extra_args = ["--flush-interval", "0.5"]
    m.remount()
    (m.path / "b").write_bytes(os.urandom(5000))
    started = time.monotonic()
    while (status := durability_status(m))["durable_point"] < status["last_commit"]:
        assert time.monotonic() - started < 5, "the interval's flush did not come"
        time.sleep(0.05)
    assert status["not_durable_chunks"] == 0 and status["last_commit"] > after["last_commit"]


@pytest.mark.mount
def test_a_power_loss_after_sigkill_cuts_back_what_was_not_durable(mount_factory, tmp_path: Path):
    faults = tmp_path / "faults.json"
    write_spec(faults, down=True, ops=["put"])  # nothing reaches the store: the cache has the only copies
    m = mount_factory(extra_args=["--flush-interval", "3600"],
                      env={"DATAFS_FAULTS": str(faults), "DATAFS_UPLOAD_RETRY_MAX": "0.5"})
    files = {"synced": os.urandom(C + 3), "kept": os.urandom(C + 1000), "cut": os.urandom(2 * C + 5),
             "gone": os.urandom(3000)}
    for name, data in files.items():
        with open(m.path / name, "wb") as f:
            f.write(data)
            if name == "synced":
                os.fsync(f.fileno())
    inos = {name: os.stat(m.path / name).st_ino for name in files}
    m.kill()

    # The power loss: chunk files written since the fsync are cut short or gone.
    chunks = m.state_dir / "cache" / "chunks"
    middle, small = chunk_id(pieces(files["cut"])[1]), chunk_id(files["gone"])
    os.unlink(chunks / middle[:2] / middle)
    os.truncate(chunks / small[:2] / small, 10)
    write_spec(faults)
    m.mount()

    expected = {"synced": files["synced"], "kept": files["kept"], "cut": pieces(files["cut"])[0], "gone": b""}
    for name, data in expected.items():
        assert (m.path / name).read_bytes() == data, name
    assert durability_status(m)["damaged_at_start"] == 2
    warned = [json.loads(line) for line in m.log.splitlines() if '"file cut short' in line]
    assert sorted(item["ino"] for item in warned) == sorted([inos["cut"], inos["gone"]])
    assert "damaged at start: 2 files" in run_cli("status", str(m.path)).stdout
    # The lost chunks' uploads are gone (else this would time out on them), and
    # no file names a chunk that is not there.
    run_cli("sync", str(m.path), "--timeout", "20")
    fsck = m.fsck()
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
