"""The object-store tier through the real mount, against a real S3 server
(SeaweedFS on 127.0.0.1, ports 18500-18507; metrics on 18509): upload after close, read-back on a
node with an empty cache, crash and outage recovery, corruption, late chunks."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from datafs.chunks import chunk_id
from datafs.control import ControlError, request
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.state_files import control_path
from datafs.tiers.store import object_key

from .conftest import Mount, run_cli, seaweed_fixture

BASE_PORT = 18500
METRICS_PORT = 18509


s3 = seaweed_fixture(BASE_PORT)


@pytest.fixture
def bucket(s3) -> str:
    return s3.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


def s3_mount(mount_factory, s3, bucket, name="node", *, env=None, state_dir=None, cache_dir=None, args=()) -> Mount:
    args = ["--store", f"s3://{bucket}/fleet", "--s3-endpoint", s3.endpoint_url, *args]
    if cache_dir is not None:
        args += ["--cache-dir", str(cache_dir)]
    return mount_factory(name, extra_args=args, env={**s3.aws_env(), **(env or {})}, state_dir=state_dir)


def expected_chunks(data: bytes) -> list[str]:
    return [chunk_id(data[i:i + C]) for i in range(0, len(data), C)]


def bucket_keys(s3, bucket: str) -> set[str]:
    client = s3.client()
    keys = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys |= {obj["Key"] for obj in page.get("Contents", [])}
    return keys


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_closed_file_is_in_the_bucket_after_sync(mount_factory, s3, bucket):
    m = s3_mount(mount_factory, s3, bucket)
    data = os.urandom(2 * C + 1234)
    write(m.path / "model.bin", data)
    run_cli("sync", str(m.path), str(m.path / "model.bin"))
    client = s3.client()
    for chunk in expected_chunks(data):
        body = client.get_object(Bucket=bucket, Key=object_key(chunk, "fleet"))["Body"].read()
        assert chunk_id(body) == chunk
    assert b"pending uploads:  0 chunks" in run_cli("status", str(m.path)).stdout.encode()


def test_fresh_node_with_empty_cache_reads_everything_from_s3(mount_factory, s3, bucket, tmp_path):
    a = s3_mount(mount_factory, s3, bucket, "a")
    files = {"big.bin": os.urandom(3 * C + 77), "small.txt": b"hello\n", "d/nested.bin": os.urandom(C)}
    (a.path / "d").mkdir()
    for name, data in files.items():
        write(a.path / name, data)
    run_cli("sync", str(a.path))
    a.umount()
    # Node B: a copy of the metadata, its own empty cache.
    b_state = tmp_path / "b-state"
    b_state.mkdir()
    shutil.copytree(a.state_dir / "meta", b_state / "meta")
    b = s3_mount(mount_factory, s3, bucket, "b", state_dir=b_state)
    assert not any((b_state / "cache" / "chunks").rglob("*/*")) if (b_state / "cache" / "chunks").exists() else True
    for name, data in files.items():
        assert sha((b.path / name).read_bytes()) == sha(data), name
    assert sum(1 for _ in (b_state / "cache" / "chunks").rglob("*/*")) == len({c for d in files.values() for c in expected_chunks(d)})


def test_sigkill_after_close_resumes_upload_on_restart(mount_factory, s3, bucket):
    m = s3_mount(mount_factory, s3, bucket)
    s3.stop()  # keep the upload from happening before the crash
    try:
        data = os.urandom(C + 5)
        write(m.path / "f", data)
        assert (m.path / "f").read_bytes() == data
        m.kill()
    finally:
        s3.start()
    m.mount()
    run_cli("sync", str(m.path), "--timeout", "60")
    keys = bucket_keys(s3, bucket)
    assert {object_key(c, "fleet") for c in expected_chunks(data)} <= keys
    assert (m.path / "f").read_bytes() == data


def test_store_outage_writes_locally_and_uploads_when_it_returns(mount_factory, s3, bucket):
    m = s3_mount(mount_factory, s3, bucket)
    before = os.urandom(C // 2)
    write(m.path / "before", before)
    run_cli("sync", str(m.path))
    s3.stop()
    try:
        during = os.urandom(C + 3)
        write(m.path / "during", during)  # succeeds: the cache is the first home
        assert (m.path / "during").read_bytes() == during
        assert (m.path / "before").read_bytes() == before
        # Exit 1 once the first upload attempt has failed, 0 before: either way
        # both chunks are pending.
        result = run_cli("status", str(m.path), check=False)
        assert result.returncode in (0, 1), result.stderr
        assert "pending uploads:  2 chunks" in result.stdout, result.stdout
    finally:
        s3.start()
    run_cli("sync", str(m.path), "--timeout", "90")
    assert {object_key(c, "fleet") for c in expected_chunks(during)} <= bucket_keys(s3, bucket)


def _cold_remount(m: Mount) -> None:
    """Unmount, empty the local cache, mount again: every read goes to S3."""
    m.umount()
    shutil.rmtree(m.state_dir / "cache")
    m.mount()


def test_corrupted_object_is_detected_never_returned(mount_factory, s3, bucket):
    m = s3_mount(mount_factory, s3, bucket, env={"DATAFS_CHUNK_WAIT_TIMEOUT": "2"})
    data = os.urandom(5000)
    write(m.path / "f", data)
    run_cli("sync", str(m.path))
    key = object_key(chunk_id(data), "fleet")
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"X" + data[1:])
    _cold_remount(m)
    with pytest.raises(OSError) as exc:
        (m.path / "f").read_bytes()
    assert exc.value.errno == 5  # EIO
    assert "failed verification" in m.log
    ino = os.stat(m.path / "f").st_ino
    assert f"reading inode {ino}" in m.log and chunk_id(data) in m.log  # names the file and the chunk
    s3.client().put_object(Bucket=bucket, Key=key, Body=data)  # repaired: reads work again
    assert (m.path / "f").read_bytes() == data


def test_read_waits_for_a_chunk_that_appears_late(mount_factory, s3, bucket):
    m = s3_mount(mount_factory, s3, bucket)
    data = os.urandom(C + 100)
    write(m.path / "f", data)
    run_cli("sync", str(m.path))
    client = s3.client()
    late = expected_chunks(data)[1]
    key = object_key(late, "fleet")
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.delete_object(Bucket=bucket, Key=key)  # as if another node were still uploading it
    _cold_remount(m)
    timer = threading.Timer(2.0, lambda: s3.client().put_object(Bucket=bucket, Key=key, Body=body))
    timer.start()
    try:
        started = time.monotonic()
        got = (m.path / "f").read_bytes()
    finally:
        timer.join()
    assert got == data
    assert time.monotonic() - started >= 1.5


def test_bad_store_settings_fail_before_mounting(tmp_path, s3):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cases = {
        "does not exist": ["--store", "s3://no-such-bucket-here", "--s3-endpoint", s3.endpoint_url],
        "cannot reach": ["--store", "s3://x", "--s3-endpoint", "http://127.0.0.1:18508"],
    }
    for expected, args in cases.items():
        result = run_cli("mount", str(mnt), "--state-dir", str(tmp_path / "state"), *args, env=s3.aws_env(), check=False)
        assert result.returncode != 0
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not os.path.ismount(mnt)


def _cached_chunks(state_dir: Path) -> set[str]:
    root = state_dir / "cache" / "chunks"
    return {p.name for p in root.rglob("*/*")} if root.exists() else set()


def _fuse_reads(m: Mount) -> float:
    return request(control_path(m.state_dir), "GET", "/stats")["fuse_ops_by_op"].get("read", 0)


def test_warmup_fills_an_empty_cache_so_reads_survive_a_store_outage(mount_factory, s3, bucket, tmp_path):
    m = s3_mount(mount_factory, s3, bucket)
    (m.path / "model" / "shards").mkdir(parents=True)
    # A file of 5 chunks: more than one 16 MiB request to the daemon.
    files = {f"model/shards/{i}.bin": os.urandom(C + i * 1000) for i in range(3)}
    files["model/shards/big.bin"] = os.urandom(5 * C - 3)
    files["model/config.json"] = b'{"layers": 2}\n'
    for name, data in files.items():
        write(m.path / name, data)
    run_cli("sync", str(m.path))
    _cold_remount(m)
    assert _cached_chunks(m.state_dir) == set()
    local = tmp_path / "local"  # not on datafs: read through, in the same command
    local.mkdir()
    (local / "x").write_bytes(b"y" * 1000)
    reads_before = _fuse_reads(m)
    result = run_cli("warmup", str(m.path / "model"), str(local))
    total = sum(len(data) for data in files.values()) + 1000
    assert f"warmed 6 files, {total / (1 << 20):.1f} MiB" in result.stdout, result.stdout
    wanted = {c for data in files.values() for c in expected_chunks(data)}
    assert wanted <= _cached_chunks(m.state_dir)
    # The daemon fetched them itself: no byte went through the mount.
    assert _fuse_reads(m) == reads_before
    s3.stop()  # everything must now come from the local cache
    try:
        for name, data in files.items():
            assert sha((m.path / name).read_bytes()) == sha(data), name
    finally:
        s3.start()


def test_warm_requests_are_checked(datafs_mount):
    socket = control_path(datafs_mount.state_dir)
    for body in ({}, {"inode": "1"}, {"inode": 1, "offset": -1}, {"inode": 1, "length": 0}, {"inode": True}):
        with pytest.raises(ControlError) as caught:
            request(socket, "POST", "/warm", body)
        assert caught.value.status == 400, body
    # An inode with no chunks (the root directory) warms nothing.
    assert request(socket, "POST", "/warm", {"inode": 1}) == {"bytes": 0, "not_kept_bytes": 0}


def test_warmup_of_a_missing_path_is_one_line_and_nonzero(datafs_mount):
    result = run_cli("warmup", str(datafs_mount.path / "nope"), check=False)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_fsync_can_wait_for_the_object_store(mount_factory, s3, bucket):
    m = s3_mount(mount_factory, s3, bucket, env={"DATAFS_FSYNC_WAITS_UPLOAD": "1"})
    data = os.urandom(2 * C + 9)
    with open(m.path / "f", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        # No `datafs sync`: fsync itself returned only once the bucket had it.
        assert {object_key(c, "fleet") for c in expected_chunks(data)} <= bucket_keys(s3, bucket)


def store_requests() -> dict[str, float]:
    """Object-store requests the daemon made so far, by method."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "datafs_object_store_requests_total":
                counts[sample.labels["method"]] = counts.get(sample.labels["method"], 0.0) + sample.value
    return counts


def test_new_chunks_are_put_without_asking_and_a_copy_is_not_put_again(mount_factory, s3, bucket):
    """A new file's chunks go up with one PUT each and no HEAD: the volume
    knows nobody uploaded them, and a chunk whose early upload finished is
    only marked at the commit. A copy of the file PUTs nothing: the store is
    asked (HEAD) about its large chunks, each at most once."""
    m = s3_mount(mount_factory, s3, bucket, args=["--metrics-address", f"127.0.0.1:{METRICS_PORT}"])
    data = os.urandom(3 * C + 100)
    write(m.path / "a", data)
    run_cli("sync", str(m.path))
    first = store_requests()
    assert (first.get("PUT"), first.get("HEAD", 0)) == (4, 0)
    assert {object_key(c, "fleet") for c in expected_chunks(data)} <= bucket_keys(s3, bucket)
    write(m.path / "b", data)
    run_cli("sync", str(m.path))
    second = store_requests()
    assert second.get("PUT") == 4
    # Each large chunk asked about at most once (one sealed at the close is
    # not uploaded early; the commit finds it uploaded and owes nothing).
    assert 1 <= second.get("HEAD", 0) <= 3
    assert b"pending uploads:  0 chunks" in run_cli("status", str(m.path)).stdout.encode()
    assert (m.path / "b").read_bytes() == data
