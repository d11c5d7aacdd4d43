"""One namespace for several nodes: daemons on one machine sharing a real
PostgreSQL (conftest's `pg_url`) and a real S3 server (SeaweedFS on 127.0.0.1,
ports 18600-18607), each node with its own mountpoint, state dir and cache.

What a fleet user relies on: a file closed on one node is there, byte for
byte, on the others; close-to-open consistency; names and attributes within
the 1 s cache timeouts; open-unlinked files stay readable on other nodes;
concurrent creates into one directory never fail; garbage collection never
takes a chunk another node still uses; a killed node leaves old or new files,
never torn ones, and its unuploaded chunks are reported and resume; the
engine down is EIO after a bounded wait, never a hung mount; bad engine
settings are one line at mount; the password shows nowhere.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.tiers.store import object_key
from datafs.chunks import chunk_id

from .conftest import Mount, read_fresh, run_cli, seaweed_fixture, sha, write

pytestmark = pytest.mark.mount

BASE_PORT = 18600
#: Short graces and timeouts so cross-node lifetimes play out within a test.
FAST = {
    "DATAFS_ORPHAN_GRACE": "1",
    "DATAFS_GC_GRACE": "1",
    "DATAFS_SESSION_TIMEOUT": "3",
    "DATAFS_META_TIMEOUT": "4",
}


s3 = seaweed_fixture(BASE_PORT)


@pytest.fixture
def fleet(pg_url, s3, mount_factory):  # the database outlives the mounts
    """`fleet(name)` mounts one more node of one volume; the first records the store."""
    bucket = s3.create_bucket(f"f-{uuid.uuid4().hex[:12]}")
    nodes: list[Mount] = []

    def node(name: str, *, env: dict[str, str] | None = None, extra: list[str] | None = None,
             state_dir: Path | None = None) -> Mount:
        args = ["--meta", pg_url.url]
        if not nodes:
            args += ["--store", f"s3://{bucket}/fleet", "--s3-endpoint", s3.endpoint_url]
        mount = mount_factory(name, extra_args=args + (extra or []),
                              env={**s3.aws_env(), **pg_url.env, **FAST, **(env or {})}, state_dir=state_dir)
        nodes.append(mount)
        return mount

    node.bucket = bucket  # type: ignore[attr-defined]
    return node


def eventually(check, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def status(mount: Mount) -> str:
    return run_cli("status", str(mount.path)).stdout


def bucket_keys(s3, bucket: str) -> set[str]:
    client = s3.client()
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys |= {obj["Key"] for obj in page.get("Contents", [])}
    return keys


# ---- sharing ----------------------------------------------------------------------------
def test_file_closed_on_one_node_is_on_the_others(fleet):
    a = fleet("a")
    b = fleet("b")  # only --meta: store and endpoint come from the volume
    data = os.urandom(3 * C + 4321)
    write(a.path / "model.bin", data)
    (a.path / "models" / "llama").mkdir(parents=True)
    (a.path / "models" / "llama" / "config.json").write_text('{"layers": 2}')
    got = eventually(lambda: read_fresh(b.path / "model.bin"), timeout=5)
    assert sha(got) == sha(data)
    assert (b.path / "models" / "llama" / "config.json").read_text() == '{"layers": 2}'
    assert os.stat(b.path / "model.bin").st_ino == os.stat(a.path / "model.bin").st_ino
    out = status(b)
    assert "volume default, node 2" in out and "live nodes:       1 (" in out


def test_close_to_open_sees_the_new_content(fleet):
    a, b = fleet("a"), fleet("b")
    v1, v2, v3 = os.urandom(C + 100), os.urandom(C + 100), os.urandom(5000)
    write(a.path / "f", v1)
    assert eventually(lambda: read_fresh(b.path / "f") == v1, timeout=5)
    read_fresh(b.path / "f")  # B's kernel now caches v1's pages
    write(a.path / "f", v2)  # same size: only the mtime tells
    assert read_fresh(b.path / "f") == v2
    write(a.path / "f", v3)
    assert eventually(lambda: os.stat(b.path / "f").st_size == 5000, timeout=3)
    assert read_fresh(b.path / "f") == v3


def test_names_change_on_other_nodes_within_the_timeout(fleet):
    a, b = fleet("a"), fleet("b")
    (a.path / "d").mkdir()
    (a.path / "d" / "old").write_bytes(b"x")
    assert eventually(lambda: (b.path / "d" / "old").exists(), timeout=3)
    os.rename(a.path / "d" / "old", a.path / "d" / "new")
    os.chmod(a.path / "d" / "new", 0o600)
    started = time.monotonic()
    assert eventually(lambda: not (b.path / "d" / "old").exists() and (b.path / "d" / "new").exists(), timeout=3)
    assert eventually(lambda: os.stat(b.path / "d" / "new").st_mode & 0o777 == 0o600, timeout=3)
    assert time.monotonic() - started < 3
    os.unlink(a.path / "d" / "new")
    assert eventually(lambda: sorted(os.listdir(b.path / "d")) == [], timeout=3)


def test_unlinked_on_one_node_stays_readable_where_it_is_open(fleet):
    a, b = fleet("a"), fleet("b")
    data = os.urandom(2 * C + 77)
    write(a.path / "held", data)
    assert eventually(lambda: os.path.exists(b.path / "held"), timeout=3)
    inodes_before = int(status(a).split("inodes:")[1].split()[0])
    with open(b.path / "held", "rb") as held:
        first = held.read(1000)
        time.sleep(1.5)  # B's open is recorded in the engine
        os.unlink(a.path / "held")
        time.sleep(4)  # past the orphan grace and a collector pass on A
        os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        rest = held.read()
    assert first + rest == data
    assert not (a.path / "held").exists()
    # Closed everywhere now: the inode is freed (counts flush within seconds).
    eventually(lambda: int(status(a).split("inodes:")[1].split()[0]) < inodes_before, timeout=15, interval=0.5)


def _creator(root: str, node: str, count: int, errors) -> None:
    for i in range(count):
        try:
            with open(os.path.join(root, "shared", f"{node}-{i:04d}"), "wb") as f:
                f.write(node.encode())
        except OSError as exc:
            errors.put(f"{node}-{i}: {exc}")


def test_creates_into_one_directory_from_three_nodes_all_succeed(fleet):
    nodes = [fleet(name) for name in ("a", "b", "c")]
    (nodes[0].path / "shared").mkdir()
    eventually(lambda: all((n.path / "shared").is_dir() for n in nodes), timeout=3)
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    count = 120
    procs = [ctx.Process(target=_creator, args=(str(n.path), name, count, errors)) for n, name in zip(nodes, "abc")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == []
    expected = {f"{name}-{i:04d}" for name in "abc" for i in range(count)}
    for n in nodes:
        assert eventually(lambda: set(os.listdir(n.path / "shared")) == expected, timeout=3)


def test_listing_is_stable_while_another_node_creates_and_deletes(fleet):
    a, b = fleet("a"), fleet("b")
    d = a.path / "dir"
    d.mkdir()
    originals = [f"o{i:04d}" for i in range(600)]
    for name in originals:
        (d / name).write_bytes(b"")
    eventually(lambda: len(os.listdir(b.path / "dir")) == 600, timeout=3)
    listed: list[str] = []
    deleted = set(originals[300::3])
    with os.scandir(b.path / "dir") as it:
        for entry in it:
            listed.append(entry.name)
            if len(listed) == 100:  # B is mid-listing: A changes the directory
                for name in deleted:
                    os.unlink(d / name)
                for i in range(200):
                    (d / f"n{i:04d}").write_bytes(b"")
    assert len(listed) == len(set(listed)), "an entry was listed twice"
    assert set(originals) - deleted <= set(listed), "a surviving entry was skipped"


def test_gc_keeps_chunks_another_node_still_references(fleet, s3, tmp_path):
    a, b, c = fleet("a"), fleet("b"), fleet("c")
    data = os.urandom(2 * C)
    write(a.path / "from-a", data)
    write(b.path / "from-b", data)
    write(c.path / "from-c", data)
    for n in (a, b, c):
        run_cli("sync", str(n.path))
    keys = {object_key(chunk_id(data[i:i + C]), "fleet") for i in (0, C)}
    assert keys <= bucket_keys(s3, fleet.bucket)
    os.unlink(c.path / "from-c")
    time.sleep(5)  # orphan grace, GC grace and collector passes on every node
    assert keys <= bucket_keys(s3, fleet.bucket)
    d = fleet("d")  # an empty cache: everything comes from the bucket
    assert read_fresh(d.path / "from-a") == data and read_fresh(d.path / "from-b") == data
    os.unlink(a.path / "from-a")
    os.unlink(b.path / "from-b")
    eventually(lambda: not keys & bucket_keys(s3, fleet.bucket), timeout=40, interval=1)


def test_gc_during_a_commit_of_the_same_bytes_loses_nothing(fleet, s3):
    """Node C deletes its copy while A and B commit the same content: after
    every collector has run, both files read back from the bucket alone."""
    a, b, c = fleet("a"), fleet("b"), fleet("c")
    data = os.urandom(C + 999)
    write(c.path / "doomed", data)
    run_cli("sync", str(c.path))
    threads = [
        threading.Thread(target=write, args=(a.path / "x", data)),
        threading.Thread(target=write, args=(b.path / "y", data)),
        threading.Thread(target=os.unlink, args=(c.path / "doomed",)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in (a, b):
        run_cli("sync", str(n.path))
    time.sleep(5)
    fresh = fleet("fresh")
    assert read_fresh(fresh.path / "x") == data and read_fresh(fresh.path / "y") == data


# ---- failures ---------------------------------------------------------------------------
def _rewriter(path: str, versions: list[bytes], stop) -> None:
    i = 0
    while not stop.is_set():
        try:
            with open(path, "wb") as f:
                f.write(versions[i % len(versions)])
        except OSError:
            return
        i += 1


def test_killed_node_leaves_old_or_new_never_torn(fleet):
    """SIGKILL a node mid-write: the others see one complete committed state,
    a whole version or the empty file that open(O_TRUNC) commits, never a
    torn one. Chunks the dead node committed but never uploaded exist only
    there (until the peer tier), so the content is read once it is back."""
    a, b = fleet("a"), fleet("b")
    versions = [bytes([1]) * (2 * C + 500), bytes([2]) * (C + 7), bytes([3]) * (3 * C + 11)]
    sizes = {len(v) for v in versions} | {0}
    write(a.path / "w", versions[0])
    run_cli("sync", str(a.path))
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    writer = ctx.Process(target=_rewriter, args=(str(a.path / "w"), versions, stop))
    writer.start()
    time.sleep(1.5)
    a.kill()
    stop.set()
    writer.join(timeout=30)
    if writer.is_alive():
        writer.kill()
    time.sleep(1.2)  # past B's attribute cache
    assert os.stat(b.path / "w").st_size in sizes
    a.mount()  # same state dir: its pending uploads resume
    run_cli("sync", str(a.path))
    assert read_fresh(b.path / "w") in versions + [b""]


def test_dead_node_chunks_are_at_risk_until_it_returns(fleet, s3):
    a, b = fleet("a"), fleet("b")
    data = os.urandom(C + 10)
    s3.stop()  # A's upload cannot happen before the crash
    try:
        write(a.path / "only-on-a", data)
        a.kill()
        out = eventually(lambda: (o := status(b)) and "chunks at risk:   0" not in o and o, timeout=20, interval=0.5)
        assert "only on node 1" in out
    finally:
        s3.start()
    a.mount()  # same state dir: node 1 again, its pending uploads resume
    run_cli("sync", str(a.path))
    eventually(lambda: "chunks at risk:   0" in status(b), timeout=20, interval=0.5)
    assert read_fresh(b.path / "only-on-a") == data


def test_engine_down_is_eio_after_a_bounded_wait_and_then_recovers(fleet, pg_server):
    a = fleet("a")
    data = os.urandom(C)
    write(a.path / "cached", data)
    held = open(a.path / "cached", "rb")
    try:
        assert held.read(10) == data[:10]
        pg_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(OSError) as failed:
                os.stat(a.path / "never-created")
            assert failed.value.errno == 5  # EIO
            assert time.monotonic() - started < 30
            os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert held.read() == data[10:]  # cached chunks of an open file still read
        finally:
            pg_server.resume()
    finally:
        held.close()
    write(a.path / "after", b"back")
    assert eventually(lambda: (a.path / "after").read_bytes() == b"back", timeout=10)
    assert read_fresh(a.path / "cached") == data


def test_engine_restart_mid_workload_loses_nothing(fleet, pg_server):
    a, b = fleet("a"), fleet("b")
    written = {}
    for i in range(20):
        written[f"f{i}"] = os.urandom(1000 + i)
        write(a.path / f"f{i}", written[f"f{i}"])
        if i == 10:
            pg_server.restart()
    for name, data in written.items():
        assert eventually(lambda: read_fresh(b.path / name) == data, timeout=10)


# ---- mount-time checks and secrets --------------------------------------------------------
def _mount_fails(tmp_path: Path, *args: str, env: dict[str, str]) -> str:
    target = tmp_path / f"m-{uuid.uuid4().hex[:6]}"
    target.mkdir()
    result = run_cli("mount", str(target), "--state-dir", str(tmp_path / f"s-{uuid.uuid4().hex[:6]}"), *args,
                     env=env, check=False, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datafs: "), result.stderr
    assert not any(str(target) in line for line in open("/proc/self/mountinfo"))
    return lines[0]


def test_bad_engine_settings_are_one_line_at_mount(tmp_path, pg_url, pg_server, s3):
    base = {**s3.aws_env(), **FAST}
    wrong = _mount_fails(tmp_path, "--meta", pg_url.url, "--store", f"file://{tmp_path}", env={**base, "PGPASSWORD": "wrong"})
    assert "password" in wrong
    missing = _mount_fails(tmp_path, "--meta", pg_url.url.rsplit("/", 1)[0] + "/nope", env={**base, **pg_url.env})
    assert "nope" in missing
    unreachable = _mount_fails(tmp_path, "--meta", "postgresql://datafs@127.0.0.1:9/x", env=base)
    assert "cannot connect" in unreachable
    no_store = _mount_fails(tmp_path, "--meta", pg_url.url, env={**base, **pg_url.env})
    assert "--store" in no_store
    in_url = _mount_fails(tmp_path, "--meta", pg_url.url.replace("@", ":hunter2@"), env=base)
    assert "process list" in in_url and "hunter2" not in in_url


def test_later_nodes_need_only_meta_and_cannot_change_the_store(fleet, tmp_path, pg_url, s3):
    fleet("a")
    other = _mount_fails(tmp_path, "--meta", pg_url.url, "--store", "s3://another/bucket",
                         env={**s3.aws_env(), **pg_url.env, **FAST})
    assert "leave out --store" in other


def test_two_volumes_in_one_database_never_mix(pg_url, s3, mount_factory):
    made = []
    for name in ("one", "two"):
        bucket = s3.create_bucket(f"v-{uuid.uuid4().hex[:12]}")
        made.append(mount_factory(name, extra_args=[
            "--meta", pg_url.url, "--volume", name, "--store", f"s3://{bucket}/v", "--s3-endpoint", s3.endpoint_url,
        ], env={**s3.aws_env(), **pg_url.env, **FAST}))
    (made[0].path / "only-in-one").write_bytes(b"1")
    time.sleep(1.2)
    assert os.listdir(made[1].path) == []
    assert "volume two" in status(made[1])


def test_password_shows_nowhere(pg_url, s3, mount_factory, tmp_path):
    secret_file = tmp_path / "pw"
    secret_file.write_text(pg_url.env["PGPASSWORD"] + "\n")
    os.chmod(secret_file, 0o600)
    bucket = s3.create_bucket(f"p-{uuid.uuid4().hex[:12]}")
    m = mount_factory("p", extra_args=[
        "--meta", pg_url.url, "--meta-password-file", str(secret_file),
        "--store", f"s3://{bucket}/p", "--s3-endpoint", s3.endpoint_url, "--metrics-address", "127.0.0.1:18690",
        "--log-level", "debug",
    ], env={**s3.aws_env(), **FAST})
    (m.path / "f").write_bytes(b"x")
    password = pg_url.env["PGPASSWORD"]
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert password not in processes
    assert password not in status(m)
    import urllib.request

    metrics = urllib.request.urlopen("http://127.0.0.1:18690/metrics", timeout=10).read().decode()
    assert "datafs_meta_transactions_total" in metrics and password not in metrics
    m.umount()
    assert password not in m.log and "postgresql://datafs@" in m.log
