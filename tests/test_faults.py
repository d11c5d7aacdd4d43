"""The fault matrix, through the real mount (issue 10). Every case checks the
same three things: no committed byte is lost, the mount keeps serving, and it
recovers without a human, each within a bounded time.

Object-store faults come from `datafs.tiers.faults` (the daemon wraps its store
when DATAFS_FAULTS names a spec file, which the test rewrites while the daemon
runs) in front of a real S3 server, SeaweedFS on 127.0.0.1 ports 18800-18807
(18808: a metrics endpoint); one case stops and restarts that server for real.
Local-disk faults use a small tmpfs as the cache volume and damage cache files
behind the daemon's back. The daemon is SIGKILLed at random points of a
write-heavy workload. The PostgreSQL engine restarted or stopped mid-workload is
covered in test_fleet.py (test_engine_restart_mid_workload_loses_nothing,
test_engine_down_is_eio_after_a_bounded_wait_and_then_recovers).

Timeouts are shortened through their settings so each wait is seconds, not
minutes: the write stall and the chunk wait (3 s), the upload backoff and the
upload grace at unmount (1 s).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from datafs.chunks import chunk_id
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.mounts import pid_alive
from datafs.tiers.faults import write_spec

from . import crash_writer
from .conftest import Mount, run_cli, seaweed_fixture

BASE_PORT = 18800
METRICS_PORT = 18808
WAIT = 3.0  # the write stall and the chunk wait, in seconds
FAST = {
    "DATAFS_WRITE_STALL_TIMEOUT": str(WAIT),
    "DATAFS_CHUNK_WAIT_TIMEOUT": str(WAIT),
    "DATAFS_UPLOAD_RETRY_MAX": "1",
    "DATAFS_SHUTDOWN_UPLOAD_GRACE": "1",
}


s3 = seaweed_fixture(BASE_PORT)


@pytest.fixture
def bucket(s3) -> str:
    return s3.create_bucket(f"f-{uuid.uuid4().hex[:12]}")


class Faults:
    """The spec file a running daemon re-reads (see datafs/tiers/faults.py)."""

    def __init__(self, path: Path):
        self.path = path
        self.set()

    def set(self, **spec) -> None:
        write_spec(self.path, **spec)


@pytest.fixture
def faults(tmp_path) -> Faults:
    """Request it after mount_factory: it is torn down first, so the fsck
    after the test sees the store without faults."""
    spec = Faults(tmp_path / "faults.json")
    yield spec
    spec.set()


def s3_mount(mount_factory, s3, bucket, faults: Faults | None = None, *, name="node", args=(), env=None) -> Mount:
    extra = ["--store", f"s3://{bucket}/fleet", "--s3-endpoint", s3.endpoint_url, *args]
    full_env = {**s3.aws_env(), **FAST, **(env or {})}
    if faults is not None:
        full_env["DATAFS_FAULTS"] = str(faults.path)
    return mount_factory(name, extra_args=extra, env=full_env)


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_fresh(path: Path) -> bytes:
    """Read through the daemon, not the kernel's page cache."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


def evict(m: Mount, data: bytes) -> None:
    """Delete a file's chunks from the local cache behind the daemon's back,
    so its next read goes to the object store (the file must be uploaded)."""
    for i in range(0, len(data), C):
        (m.state_dir / "cache" / "chunks" / chunk_id(data[i:i + C])[:2] / chunk_id(data[i:i + C])).unlink(missing_ok=True)


def timed_read(path: Path) -> tuple[bytes | int, float]:
    """(the bytes, or the errno) and how long the read took."""
    started = time.monotonic()
    try:
        result: bytes | int = read_fresh(path)
    except OSError as exc:
        result = exc.errno
    return result, time.monotonic() - started


def dd(target: Path, mib: int) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(["dd", "if=/dev/urandom", f"of={target}", "bs=1M", f"count={mib}"],
                            capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


def status(m: Mount) -> subprocess.CompletedProcess:
    return run_cli("status", str(m.path), check=False)


def eventually(check, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def metric(name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


# ---- the story: the store down and the cache full ---------------------------------
def test_store_down_with_a_full_cache_fails_writes_early_and_recovers_by_itself(mount_factory, s3, bucket, faults):
    m = s3_mount(mount_factory, s3, bucket, faults, args=["--cache-size", "64M", "--metrics-address", f"127.0.0.1:{METRICS_PORT}"])
    kept, cold = os.urandom(C // 4), os.urandom(2 * C)
    write(m.path / "kept", kept)
    write(m.path / "cold", cold)
    run_cli("sync", str(m.path))
    evict(m, cold)
    faults.set(down=True)

    # A 200 MiB write into a 64 MiB cache while the store is down: write()
    # fails with ENOSPC after the stall timeout, and nothing of it stays.
    result, took = dd(m.path / "big", 200)
    assert result.returncode != 0 and "No space left on device" in result.stderr, result.stderr
    assert took < 64 / 20 + 4 * WAIT, took  # local-disk speed for the cache, then one stall, not minutes
    assert os.stat(m.path / "big").st_size == 0  # the file as last committed: no phantom size
    assert (m.path / "big").read_bytes() == b""
    got, took = timed_read(m.path / "cold")  # not cached: the store is needed
    assert got == errno.EIO and WAIT - 0.5 < took < WAIT + 5, (got, took)

    # Small writes go on; their uploads fail, and everything says so the same way.
    write(m.path / "during", b"written during the outage")
    assert read_fresh(m.path / "during") == b"written during the outage"
    assert eventually(lambda: status(m).returncode == 1)
    st = status(m)
    assert "pending uploads:  1 chunks" in st.stdout and "failing uploads:  1" in st.stdout, st.stdout
    assert "uploads are failing" in st.stderr
    assert metric("datafs_uploads_pending") == 1 and metric('datafs_uploads_failing{state="committed"}') == 1
    sync = run_cli("sync", str(m.path), "--timeout", "2", check=False)
    assert sync.returncode != 0 and "still pending" in sync.stderr and "failing" in sync.stderr, sync.stderr
    assert "sync: 1 chunks" in sync.stderr  # progress lines when not on a terminal

    # The store comes back: no restart, no deletion, nothing by hand.
    faults.set()
    sync = run_cli("sync", str(m.path), "--timeout", "30")
    assert "uploaded" in sync.stdout
    st = status(m)
    assert st.returncode == 0 and "pending uploads:  0 chunks" in st.stdout and "failing uploads:  0" in st.stdout, st
    assert metric("datafs_uploads_pending") == 0 and metric('datafs_uploads_failing{state="committed"}') == 0
    started = time.monotonic()
    write(m.path / "after", b"4 b.")
    assert time.monotonic() - started < 2
    assert read_fresh(m.path / "cold") == cold
    assert read_fresh(m.path / "kept") == kept  # (the failed write may have evicted it: it was uploaded)
    # A burst larger than the cache now works, and leaves the cache within its limit.
    result, _ = dd(m.path / "big", 100)
    assert result.returncode == 0, result.stderr
    assert os.stat(m.path / "big").st_size == 100 << 20
    assert metric("datafs_cache_bytes") <= 64 << 20
    run_cli("sync", str(m.path), "--timeout", "60")
    m.umount()


# ---- object store: slow, flaky, damaged bodies, down for real --------------------------------
def test_slow_store_delays_uploads_not_writes_and_bounds_reads(mount_factory, s3, bucket, faults):
    m = s3_mount(mount_factory, s3, bucket, faults)
    faults.set(delay_seconds=1.0)
    files = {f"f{i}": os.urandom(C + i) for i in range(3)}
    started = time.monotonic()
    for name, data in files.items():
        write(m.path / name, data)
    assert time.monotonic() - started < 3  # closes are local
    run_cli("sync", str(m.path), "--timeout", "60")
    evict(m, files["f0"])
    got, took = timed_read(m.path / "f0")
    assert got == files["f0"] and took >= 1.0
    faults.set(delay_seconds=WAIT + 3)  # slower than a reader may wait
    evict(m, files["f1"])
    got, took = timed_read(m.path / "f1")
    assert got == errno.EIO and took < WAIT + 2.5, (got, took)
    faults.set()
    assert read_fresh(m.path / "f1") == files["f1"]


def test_flaky_store_500_and_503_are_retried_and_nothing_is_lost(mount_factory, s3, bucket, faults):
    m = s3_mount(mount_factory, s3, bucket, faults)
    faults.set(fail_every=3, errors=[500, 503])
    files = {f"f{i}": os.urandom(C + 1000 * i) for i in range(6)}
    for name, data in files.items():
        write(m.path / name, data)
    run_cli("sync", str(m.path), "--timeout", "60")
    for data in files.values():
        evict(m, data)
    for name, data in files.items():
        assert sha(read_fresh(m.path / name)) == sha(data), name
    assert "SlowDown" in m.log and "InternalError" in m.log
    faults.set()
    assert status(m).returncode == 0


def test_truncated_or_corrupt_bodies_are_never_returned(mount_factory, s3, bucket, faults):
    m = s3_mount(mount_factory, s3, bucket, faults)
    files = {"a": os.urandom(2 * C), "b": os.urandom(C + 3)}
    for name, data in files.items():
        write(m.path / name, data)
    run_cli("sync", str(m.path))
    faults.set(get_body="truncate", body_every=2)  # every other GET is cut short: retried
    evict(m, files["a"])
    assert read_fresh(m.path / "a") == files["a"]
    assert "chunk failed verification" in m.log
    faults.set(get_body="corrupt")  # every GET: EIO within the chunk wait, never bad bytes
    evict(m, files["b"])
    got, took = timed_read(m.path / "b")
    assert got == errno.EIO and took < WAIT + 3, (got, took)
    faults.set()
    assert read_fresh(m.path / "b") == files["b"]


def test_real_store_stopped_and_restarted(mount_factory, s3, bucket):
    m = s3_mount(mount_factory, s3, bucket)
    before = os.urandom(2 * C)
    write(m.path / "before", before)
    run_cli("sync", str(m.path))
    evict(m, before[:C])
    s3.stop(grace_seconds=1)
    try:
        during = os.urandom(C + 5)
        write(m.path / "during", during)  # the cache is the first home
        assert read_fresh(m.path / "during") == during
        got, took = timed_read(m.path / "before")  # its first chunk is only in the store
        assert got == errno.EIO and took < WAIT + 8, (got, took)  # (a refused connection may take a while)
        assert eventually(lambda: status(m).returncode == 1, timeout=30)
        assert "pending uploads:  2 chunks" in status(m).stdout
        assert run_cli("sync", str(m.path), "--timeout", "1", check=False).returncode != 0
    finally:
        s3.start()
    run_cli("sync", str(m.path), "--timeout", "60")
    assert status(m).returncode == 0
    assert read_fresh(m.path / "before") == before
    m.umount()


# ---- local disk: the cache volume full, cache files damaged ---------------------------------
@pytest.fixture
def cache_volume(tmp_path) -> Path:
    """A 48 MiB tmpfs for the chunk cache (the tests run as root)."""
    path = tmp_path / "cachefs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_cache_volume_full(cache_volume, mount_factory, s3, bucket, faults):
    m = s3_mount(mount_factory, s3, bucket, faults, args=["--cache-dir", str(cache_volume), "--cache-size", "1G"],
                 env={"DATAFS_CACHE_MIN_FREE": "4M"})
    result, _ = dd(m.path / "larger-than-the-volume", 80)  # uploads free the volume as it goes
    assert result.returncode == 0, result.stderr
    run_cli("sync", str(m.path), "--timeout", "60")
    faults.set(down=True)
    small = os.urandom(1000)
    write(m.path / "small", small)  # committed, and only here until the store is back
    result, took = dd(m.path / "stuck", 80)  # now nothing can leave: the volume fills
    assert result.returncode != 0 and "No space left on device" in result.stderr, result.stderr
    assert took < 48 / 20 + 4 * WAIT
    assert os.stat(m.path / "stuck").st_size == 0
    assert read_fresh(m.path / "small") == small
    faults.set()
    result, _ = dd(m.path / "stuck", 40)
    assert result.returncode == 0, result.stderr
    run_cli("sync", str(m.path), "--timeout", "60")
    with open(m.path / "larger-than-the-volume", "rb") as f:
        assert len(f.read()) == 80 << 20


def test_damaged_or_deleted_cache_files_are_read_again_from_the_store(mount_factory, s3, bucket):
    m = s3_mount(mount_factory, s3, bucket)
    data = os.urandom(3 * C)
    write(m.path / "f", data)
    run_cli("sync", str(m.path))
    assert read_fresh(m.path / "f") == data  # the daemon has the cache files open now
    chunks = [m.state_dir / "cache" / "chunks" / c[:2] / c for c in (chunk_id(data[i:i + C]) for i in range(0, 3 * C, C))]
    with open(chunks[0], "r+b") as f:  # bytes changed in place
        f.seek(100)
        f.write(b"rot")
    chunks[1].unlink()  # deleted
    os.truncate(chunks[2], C // 2)  # cut short
    assert read_fresh(m.path / "f") == data
    assert "cache file failed verification" in m.log
    assert status(m).returncode == 0


def test_a_damaged_only_copy_is_reported_not_returned(mount_factory, s3, bucket, faults):
    m = s3_mount(mount_factory, s3, bucket, faults)
    m.fsck_after = False  # the volume is damaged on purpose: fsck rightly complains
    faults.set(down=True)
    data = os.urandom(C)
    write(m.path / "f", data)
    path = m.state_dir / "cache" / "chunks" / chunk_id(data)[:2] / chunk_id(data)
    with open(path, "r+b") as f:
        f.write(b"rot")
    got, _ = timed_read(m.path / "f")
    assert got == errno.EIO  # not the damaged bytes
    faults.set()
    assert eventually(lambda: "missing or damaged" in status(m).stdout, timeout=20)
    assert status(m).returncode == 1


# ---- the daemon killed mid-workload -------------------------------------------------------------
def test_sigkill_at_random_points_leaves_every_file_old_or_new(mount_factory, tmp_path):
    m = mount_factory("crash")
    log_path = tmp_path / "writes.log"
    log_path.touch()
    rng = random.Random(1010)
    for round_no in range(20):
        writer = subprocess.Popen([sys.executable, str(Path(__file__).with_name("crash_writer.py")), str(m.path),
                                   str(log_path), str(round_no)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.7))
        m.kill()
        writer.kill()
        writer.wait(timeout=30)
        m.mount()
        done: dict[str, int] = {}
        started: dict[str, int] = {}
        for line in log_path.read_text().splitlines():
            kind, name, version = line.split()
            (done if kind == "done" else started)[name] = int(version)
        found = {}
        for name, last_started in started.items():
            allowed = {last_started, done.get(name, 0)}  # the one in progress, or the last one done
            path = m.path / name
            if not path.exists():
                assert done.get(name, 0) == 0, f"round {round_no}: {name} vanished"
                continue
            got = sha(read_fresh(path))
            # Version 0 is the empty file an in-place writer created before the crash.
            versions = [v for v in allowed if sha(crash_writer.content(name, v) if v else b"") == got]
            assert versions, f"round {round_no}: {name} is neither version {sorted(allowed)}"
            found[name] = versions[0]
        with open(log_path, "a") as log:  # what the next round's checks start from
            log.writelines(f"done {name} {version}\n" for name, version in found.items())
        for tmp in m.path.glob(".*.tmp"):
            tmp.unlink()
    assert len(found) >= 4  # the workload got far enough to matter


# ---- waits never hold an unmount ----------------------------------------------------------------
def test_umount_is_not_held_by_a_reader_waiting_for_the_store(mount_factory, s3, bucket, faults):
    m = s3_mount(mount_factory, s3, bucket, faults, env={"DATAFS_CHUNK_WAIT_TIMEOUT": "120"})
    data = os.urandom(C)
    write(m.path / "f", data)
    run_cli("sync", str(m.path))
    evict(m, data)
    faults.set(down=True)
    reader = subprocess.Popen([sys.executable, "-c", f"import os; f = open({str(m.path / 'f')!r}, 'rb'); "
                               "os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED); f.read()"],
                              stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert reader.poll() is None  # waiting for the chunk (it could wait 120 s)
    started = time.monotonic()
    run_cli("umount", str(m.path), timeout=60)
    assert time.monotonic() - started < 10
    assert reader.wait(timeout=10) != 0 and "Input/output error" in reader.stderr.read()
    # The same wait ends on SIGTERM too: the daemon exits at once.
    faults.set()
    m.mount()
    evict(m, data)
    faults.set(down=True)
    reader = subprocess.Popen([sys.executable, "-c", f"import os; f = open({str(m.path / 'f')!r}, 'rb'); "
                               "os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED); f.read()"],
                              stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    pid = m.pid
    os.kill(pid, signal.SIGTERM)
    assert reader.wait(timeout=10) != 0
    assert eventually(lambda: not pid_alive(pid), timeout=20)
    faults.set()


def test_umount_reports_a_daemon_that_died(mount_factory):
    m = mount_factory("dead")
    write(m.path / "f", b"committed")
    m.kill()
    result = run_cli("umount", str(m.path), check=False)
    assert result.returncode == 1 and "had died" in result.stderr and "Traceback" not in result.stderr, result.stderr
    m.mount()
    assert (m.path / "f").read_bytes() == b"committed"
    dead = status(m)
    assert dead.returncode == 0
    m.kill()
    dead = run_cli("status", str(m.path), check=False)
    assert dead.returncode != 0 and "not running" in dead.stderr, dead.stderr


def test_writes_that_cannot_be_committed_at_shutdown_are_reported(tmp_path, s3, bucket, faults):
    """SIGTERM while a file holds writes the full cache cannot take: the
    daemon waits the stall timeout for space, then says which file lost what
    (log, exit report) and exits 1; `datafs umount` prints the same report."""
    mnt, state = tmp_path / "fg-mnt", tmp_path / "fg-state"
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAFS_")}
    env.update({**s3.aws_env(), **FAST, "DATAFS_FAULTS": str(faults.path)})
    log_path = tmp_path / "daemon.log"  # a foreground daemon logs to stderr
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "datafs", "mount", str(mnt), "--foreground", "--state-dir", str(state),
             "--store", f"s3://{bucket}/fleet", "--s3-endpoint", s3.endpoint_url, "--cache-size", "8M"],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        assert eventually(lambda: any(f" {mnt} " in line for line in open("/proc/self/mountinfo")), timeout=30)
        faults.set(down=True)
        write(mnt / "fills-the-cache", os.urandom(2 * C))  # committed, pinned until uploaded: the cache is full
        fd = os.open(mnt / "open", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"buffered, not committed" * 1000)
        ino = os.fstat(fd).st_ino
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=WAIT + 30) == 1
        with contextlib.suppress(OSError):
            os.close(fd)  # (ENOTCONN: the mount is gone; the descriptor is closed all the same)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    report = json.loads((state / "exit.json").read_text())
    assert [item["ino"] for item in report["lost"]] == [ino] and "cache is full" in report["lost"][0]["error"]
    assert report["pending_chunks"] == 2 and report["failing_chunks"] == 2
    assert "uncommitted writes lost at shutdown" in log_path.read_text()
    # What `datafs umount` prints from such a report.
    from datafs import cli
    from datafs.mounts import MountInfo

    info = MountInfo(str(mnt), "fuse.datafs", f"datafs:{state}", "0:0")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli._report_exit(info, report["pid"]) == 1
    lines = err.getvalue().splitlines()
    assert lines[0].startswith(f"datafs: inode {ino} (") and "not committed" in lines[0]
    assert "2 committed chunks" in lines[1] and "upload when" in lines[1]
    assert "1 file(s) could not be committed" in lines[2]
