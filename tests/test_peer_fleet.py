"""The peer tier through real mounts: three daemons on one machine sharing a
real PostgreSQL (conftest's `pg_url`) and a real S3 server (SeaweedFS on
127.0.0.1, ports 18720-18727), each serving chunks to the others on its own
loopback port (18740-18749) with a shared fleet secret.

What a fleet user relies on: a node reads what another wrote before it is
uploaded (even with the object store down); nodes reading the same cold file
ask the object store about once per chunk in all, the owners fetching for
everyone; `datafs sync` returns once new chunks are with their owners too; a
peer that lies (wrong bytes), dies (before or in the middle of a read),
stalls (SIGSTOP: it accepts and never answers), or joins and leaves during a
read never fails a read another tier can serve; the fleet secret shows
nowhere.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from typing import Callable

import pytest

from datafs.config import CHUNK_SIZE_BYTES as C

from .conftest import Mount, read_fresh, run_cli, seaweed_fixture, sha, write

pytestmark = pytest.mark.mount

BASE_PORT = 18720
PEER_PORT = 18740
METRICS_PORT = 18750
SECRET = "fleet-secret-" + uuid.uuid4().hex
FAST = {
    "DATAFS_ORPHAN_GRACE": "1",
    "DATAFS_GC_GRACE": "1",
    "DATAFS_SESSION_TIMEOUT": "6",
    "DATAFS_META_TIMEOUT": "5",
    "DATAFS_PEER_SECRET": SECRET,
    "DATAFS_PEER_TIMEOUT": "2",
}


s3 = seaweed_fixture(BASE_PORT)


@pytest.fixture
def fleet(pg_url, s3, mount_factory):  # the database outlives the mounts
    bucket = s3.create_bucket(f"p-{uuid.uuid4().hex[:12]}")
    nodes: list[Mount] = []

    def node(name: str, *, env: dict[str, str] | None = None) -> Mount:
        index = len(nodes)
        args = ["--meta", pg_url.url, "--peer-listen", f"127.0.0.1:{PEER_PORT + index}",
                "--metrics-address", f"127.0.0.1:{METRICS_PORT + index}"]
        if not nodes:
            args += ["--store", f"s3://{bucket}/fleet", "--s3-endpoint", s3.endpoint_url]
        mount = mount_factory(name, extra_args=args, env={**s3.aws_env(), **pg_url.env, **FAST, **(env or {})})
        mount.metrics_port = METRICS_PORT + index
        nodes.append(mount)
        return mount

    return node


def fetches(mount: Mount) -> dict[str, float]:
    """This node's datafs_chunk_fetches_total{result="ok"} by tier."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{mount.metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for tier, value in re.findall(r'datafs_chunk_fetches_total\{result="ok",tier="(\w+)"\} (\S+)', text):
        out[tier] = float(value)
    for tier, value in re.findall(r'datafs_chunk_fetches_total\{tier="(\w+)",result="ok"\} (\S+)', text):
        out[tier] = float(value)
    return out


def wait_members(mount: Mount, count: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = run_cli("status", str(mount.path)).stdout
        line = next((l for l in out.splitlines() if l.startswith("peer tier:")), "")
        if line.count("127.0.0.1:") >= count + 1:  # its own address plus the members
            return
        time.sleep(0.3)
    raise AssertionError(f"{mount.path} did not see {count} peer members: {out}")


def test_a_node_reads_what_another_wrote_while_the_store_is_down(fleet, s3):
    a, b = fleet("a"), fleet("b")
    wait_members(b, 2)
    data = os.urandom(3 * C + 100)
    s3.stop()  # nothing can be uploaded or downloaded now
    try:
        write(a.path / "fresh.bin", data)
        got = read_fresh(b.path / "fresh.bin")
    finally:
        s3.start()
    assert sha(got) == sha(data)
    served = fetches(b)
    # Every chunk came from A: fetched from it, or pushed by it to B as owner.
    assert served.get("peer", 0) >= 1 and served.get("store", 0) == 0, served


def test_cold_readers_ask_the_store_about_once_per_chunk(fleet):
    a, b, c = fleet("a"), fleet("b"), fleet("c")
    for m in (a, b, c):
        wait_members(m, 3)
    chunks = 64
    data = os.urandom(chunks * C)
    write(a.path / "model.bin", data)
    run_cli("sync", str(a.path))
    # Every node's copies go (A wrote them, B and C got theirs as owners):
    # every chunk must now come from the store, once, or from a peer.
    for m in (a, b, c):
        m.umount()
        for cached in (m.state_dir / "cache" / "chunks").rglob("*/*"):
            cached.unlink()
    for m in (a, b, c):
        m.mount()
    for m in (a, b, c):
        wait_members(m, 3)
    before = {m.path.name: fetches(m) for m in (a, b, c)}
    results = {}

    def reader(m: Mount) -> None:
        results[m.path.name] = sha(read_fresh(m.path / "model.bin"))

    threads = [threading.Thread(target=reader, args=(m,)) for m in (b, c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results.values()) == {sha(data)}
    store_gets = sum(fetches(m).get("store", 0) - before[m.path.name].get("store", 0) for m in (a, b, c))
    # 64 chunks read by two nodes: without peers 128 GETs; with owners fetching
    # once for everyone, about 64 (a few more when two ask before one has it).
    assert chunks <= store_gets <= chunks * 1.3, store_gets


def test_a_dead_peer_still_listed_fails_no_read(fleet):
    a, b = fleet("a"), fleet("b")
    wait_members(b, 2)
    data = os.urandom(8 * C)
    write(a.path / "big.bin", data)
    run_cli("sync", str(a.path))
    a.kill()  # its peer server vanishes; B still lists it until its session expires
    assert sha(read_fresh(b.path / "big.bin")) == sha(data)


def test_wrong_secret_peer_gets_nothing(fleet, tmp_path):
    a = fleet("a")
    data = os.urandom(C)
    write(a.path / "secret.bin", data)
    from datafs.chunks import chunk_id
    from datafs.peers import auth

    chunk = chunk_id(data)
    path = f"/chunks/{chunk}"
    request = urllib.request.Request(f"http://127.0.0.1:{PEER_PORT}{path}",
                                     headers={"Authorization": auth.sign(b"not-the-fleet-secret", "GET", path)})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    good = urllib.request.Request(f"http://127.0.0.1:{PEER_PORT}{path}",
                                  headers={"Authorization": auth.sign(SECRET.encode(), "GET", path)})
    assert urllib.request.urlopen(good, timeout=10).read() == data
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert SECRET not in processes and SECRET not in run_cli("status", str(a.path)).stdout
    assert SECRET not in a.log


def test_peer_listen_needs_a_secret_and_a_shared_engine(tmp_path, pg_url):
    target = tmp_path / "m"
    target.mkdir()
    no_secret = run_cli("mount", str(target), "--state-dir", str(tmp_path / "s"), "--meta", pg_url.url,
                        "--store", f"file://{tmp_path}", "--peer-listen", f"127.0.0.1:{PEER_PORT + 9}",
                        env=pg_url.env, check=False)
    assert no_secret.returncode != 0 and "fleet secret" in no_secret.stderr
    no_engine = run_cli("mount", str(target), "--state-dir", str(tmp_path / "s2"),
                        "--peer-listen", f"127.0.0.1:{PEER_PORT + 9}", env={"DATAFS_PEER_SECRET": SECRET}, check=False)
    assert no_engine.returncode != 0 and "--meta" in no_engine.stderr


def counter(mount: Mount, name: str, **labels: str) -> float:
    """One sample of this node's metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{mount.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def paced_read(path, pause_seconds: float) -> Callable[[], bytes]:
    """Start reading a file 4 MiB at a time in a thread, pausing between
    reads, so faults can land mid-read; the returned call waits for the read
    (at most 120 s) and gives its bytes."""
    got: list[bytes] = []

    def read() -> None:
        parts = []
        with open(path, "rb", buffering=0) as f:
            while block := f.read(C):
                parts.append(block)
                time.sleep(pause_seconds)
        got.append(b"".join(parts))

    reader = threading.Thread(target=read)
    reader.start()

    def result() -> bytes:
        reader.join(120)
        assert not reader.is_alive() and got, "the read did not finish"
        return got[0]

    return result


def test_sync_waits_until_new_chunks_reach_their_owners(fleet):
    from datafs.chunks import chunk_id
    from datafs.peers import ownership

    a, b = fleet("a"), fleet("b")
    wait_members(a, 2)
    data = os.urandom(12 * C)
    write(a.path / "shared.bin", data)
    out = run_cli("sync", str(a.path)).stdout
    assert "or for its peers" in out
    status = run_cli("status", str(b.path)).stdout
    b_node = int(re.search(r"node (\d+)", status).group(1))
    peer_line = next(line for line in status.splitlines() if line.startswith("peer tier:"))
    members = [int(n) for n in re.findall(r"(\d+) \(127\.0\.0\.1:\d+\)", peer_line)]
    assert b_node in members and len(members) == 2, status
    owned = [chunk_id(data[i:i + C]) for i in range(0, len(data), C)]
    owned = [c for c in owned if ownership.owner(c, members) == b_node]
    assert owned, "B owns none of 12 chunks: ownership is not spread"
    cached = {p.name for p in (b.state_dir / "cache" / "chunks").rglob("*") if p.is_file()}
    assert set(owned) <= cached, "sync returned before every chunk reached its owner"


def test_a_peer_that_sends_wrong_bytes_is_caught_and_the_read_succeeds(fleet):
    a = fleet("a")
    data = os.urandom(4 * C)
    write(a.path / "model.bin", data)
    run_cli("sync", str(a.path))
    # A's cache now lies: same sizes, one byte changed in every chunk.
    for path in (a.state_dir / "cache" / "chunks").rglob("*"):
        if path.is_file():
            with open(path, "r+b") as f:
                first = f.read(1)
                f.seek(0)
                f.write(bytes([first[0] ^ 0xFF]))
    b = fleet("b")
    wait_members(b, 2)
    assert sha(read_fresh(b.path / "model.bin")) == sha(data)
    assert counter(b, "datafs_chunk_fetches_total", tier="peer", result="corrupt") >= 1
    assert counter(b, "datafs_chunk_fetches_total", tier="peer", result="ok") == 0
    assert "do not match their chunk id" in b.log


def test_a_peer_killed_mid_transfer_fails_no_read(fleet):
    a = fleet("a")
    data = os.urandom(48 * C)
    write(a.path / "big.bin", data)
    run_cli("sync", str(a.path))
    b = fleet("b", env={"DATAFS_PEER_INFLIGHT": "8M"})  # two chunks in memory at once: the bound holds
    wait_members(b, 2)
    result = paced_read(b.path / "big.bin", 0.05)
    deadline = time.monotonic() + 60
    while counter(b, "datafs_chunk_fetches_total", tier="peer", result="ok") < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    a.kill()
    assert sha(result()) == sha(data)
    # Some chunks came from A before it died; the rest from the store.
    assert counter(b, "datafs_chunk_fetches_total", tier="peer", result="ok") >= 4
    assert counter(b, "datafs_chunk_fetches_total", tier="store", result="ok") >= 1


def test_a_stalled_peer_costs_bounded_waits(fleet):
    a = fleet("a")
    data = os.urandom(6 * C)
    write(a.path / "model.bin", data)
    run_cli("sync", str(a.path))
    b = fleet("b")
    wait_members(b, 2)
    os.kill(a.pid, signal.SIGSTOP)  # it accepts connections (the kernel does) and never answers
    try:
        assert sha(read_fresh(b.path / "model.bin")) == sha(data)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert counter(b, "datafs_chunk_fetches_total", tier="store", result="ok") >= 1
    assert counter(b, "datafs_chunk_fetches_total", tier="peer", result="error") >= 1


def test_members_joining_and_leaving_during_a_read(fleet):
    a, b = fleet("a"), fleet("b")
    wait_members(b, 2)
    data = os.urandom(40 * C)
    write(a.path / "big.bin", data)
    run_cli("sync", str(a.path))
    result = paced_read(b.path / "big.bin", 0.1)
    c = fleet("c")  # joins: it now owns a third of the chunks, none of them cached
    wait_members(b, 3)
    c.umount()  # and leaves before the read ends
    assert sha(result()) == sha(data)
