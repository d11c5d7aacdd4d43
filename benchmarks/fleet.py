"""`python -m benchmarks fleet`: the peer tier, measured on one machine.

Several datafs daemons share one PostgreSQL namespace and one SeaweedFS
bucket, each with its own mountpoint, state dir, cache and loopback ports,
as nodes of a fleet would. One run measures, in order:

1. the transport ceiling: sendfile -> recv_into between two processes over
   loopback (`loopback.py`), and the object store's GET ceiling (boto3, 16
   threads, `objstore.py`);
2. a cold sequential read of one file from the object store: a node without
   the peer tier reads a file node A wrote (A synced it first);
3. the same read from a peer: node B, which joined after the write, reads the
   file while A still has it in its cache (page cache dropped before each
   read, so A reads its disk); then B reads it once more from its own cache,
   which is what the mount itself reaches (no peer read can beat it);
4. a fleet warmup: A leaves and its copies are gone; three fresh nodes
   cold-read a model tree at the same time. Reported: wall time, MiB/s per
   node, and how many GETs the object store served against the tree's chunk
   count (1.0 means each chunk was fetched once for the whole fleet, 3.0 that
   every node fetched its own); then three more fresh nodes, without the peer
   tier, do the same, for comparison. On one machine every node shares the
   same cores, so the wall times say less than the GET counts do;
5. the peak RSS of every daemon (VmHWM).

Ratios are against the ceilings measured in the same run. Progress goes to
stderr, the Markdown table to stdout and `fleet.md`/`fleet.json` under --out.
Everything started is stopped (by PID) and the work dir removed, also on an
error or Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import loopback, system
from .errors import BenchError
from .objstore import measure_ceiling, prepare_bucket
from .sizes import BLOCK_BYTES, GiB, MiB, human_bytes
from .targets import REPO, child_env, create_database

SECRET = "benchmark-fleet-secret-" + os.urandom(8).hex()
READ_BYTES = 4 * MiB


@dataclasses.dataclass(frozen=True)
class FleetSizes:
    mode: str
    file_bytes: int
    tree_files: int
    tree_file_bytes: int
    ceiling_objects: int

    @property
    def tree_bytes(self) -> int:
        return self.tree_files * self.tree_file_bytes


MODES = {
    "full": FleetSizes("full", 1 * GiB, 4, 1 * GiB, 256),
    "quick": FleetSizes("quick", 256 * MiB, 4, 128 * MiB, 64),
    "tiny": FleetSizes("tiny", 16 * MiB, 2, 8 * MiB, 8),
}


@dataclasses.dataclass
class Row:
    name: str
    value: float
    unit: str
    note: str = ""


class Node:
    """One datafs daemon of the fleet, mounted through the CLI as a user would."""

    def __init__(self, workdir: Path, name: str, *, meta_url: str, env: dict[str, str], metrics_port: int,
                 peer_port: int | None, store_args: list[str]):
        self.name = name
        self.dir = workdir / name
        self.mountpoint = self.dir / "mnt"
        self.state_dir = self.dir / "state"
        self.meta_url, self.env, self.metrics_port = meta_url, env, metrics_port
        self.peer_port, self.store_args = peer_port, store_args
        self.mounted = False

    def _cli(self, *args: str, timeout_seconds: float = 600) -> None:
        try:
            result = subprocess.run([sys.executable, "-m", "datafs", *args], capture_output=True, text=True, cwd=REPO,
                                    env=self.env, stdin=subprocess.DEVNULL, timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name}: datafs {args[0]} did not finish within {timeout_seconds:.0f} s") from None
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise BenchError(f"{self.name}: datafs {args[0]} failed: {lines[-1] if lines else result.returncode}; "
                             f"log tail:\n{system.tail(self.state_dir / 'datafs.log')}")

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        peer = ["--peer-listen", f"127.0.0.1:{self.peer_port}"] if self.peer_port else []
        self._cli("mount", str(self.mountpoint), "--state-dir", str(self.state_dir), "--meta", self.meta_url,
                  "--metrics-address", f"127.0.0.1:{self.metrics_port}", *peer, *self.store_args)
        self.mounted = True

    def umount(self) -> None:
        if self.mounted:
            self._cli("umount", str(self.mountpoint))
            self.mounted = False

    def sync(self) -> None:
        self._cli("sync", str(self.mountpoint), "--timeout", "1200", timeout_seconds=1300)

    def wipe_cache(self) -> None:
        assert not self.mounted
        shutil.rmtree(self.state_dir / "cache", ignore_errors=True)

    def _metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def fetches(self) -> dict[str, float]:
        """Chunks fetched into this node's cache, by the tier that served them."""
        out: dict[str, float] = {}
        for line in self._metrics().splitlines():
            if line.startswith("datafs_chunk_fetches_total{") and 'result="ok"' in line:
                tier = re.search(r'tier="(\w+)"', line).group(1)
                out[tier] = float(line.rsplit(" ", 1)[1])
        return out

    def members(self) -> int:
        match = re.search(r"^datafs_peer_members (\S+)$", self._metrics(), re.M)
        return int(float(match.group(1))) if match else 0

    def wait_members(self, count: int, timeout_seconds: float = 60) -> None:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.members() == count:
                return
            time.sleep(0.2)
        raise BenchError(f"{self.name} did not see {count} peer members within {timeout_seconds:.0f} s")

    def peak_rss_bytes(self) -> int | None:
        from datafs.state_files import read_daemon_pid

        return system.peak_rss_bytes(read_daemon_pid(self.state_dir))

    def stop(self) -> None:
        """Unmount; if that fails, kill the daemon by its PID and detach the mount."""
        if system.mount_fstype(self.mountpoint):
            try:
                self._cli("umount", str(self.mountpoint), timeout_seconds=120)
            except BenchError:
                pass
        system.end_daemon(self.state_dir, self.mountpoint)
        self.mounted = False


def write_file(path: Path, size_bytes: int) -> None:
    """Fresh random data (never deduplicated against an earlier run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size_bytes
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n


def read_file(path: Path) -> int:
    buffer = bytearray(READ_BYTES)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def timed_read(path: Path, expected: int) -> float:
    """MiB/s of one cold sequential read."""
    started = time.perf_counter()
    got = read_file(path)
    seconds = time.perf_counter() - started
    if got != expected:
        raise BenchError(f"read {got} bytes of {path}, expected {expected}")
    return got / MiB / seconds


def _progress(text: str) -> None:
    print(f"[fleet] {text}", file=sys.stderr, flush=True)


def run(mode: str, base_port: int, work_parent: Path, keep: bool = False) -> tuple[list[Row], dict]:
    from devtools.postgres import PostgresError, PostgresServer
    from devtools.seaweed import SeaweedError, SeaweedServer

    sizes = MODES[mode]
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    workdir = Path(tempfile.mkdtemp(prefix="datafs-fleet-", dir=work_parent))
    workdir.chmod(0o711)  # PostgreSQL's account enters it
    server = SeaweedServer(workdir / "weed", base_port)
    pg = PostgresServer(base_port + 9, parent_dir=workdir, durable=True)
    nodes: list[Node] = []
    rows: list[Row] = []
    started_at = time.monotonic()
    try:
        _progress(f"{mode} mode: file {human_bytes(sizes.file_bytes)}, tree {sizes.tree_files} x "
                  f"{human_bytes(sizes.tree_file_bytes)}; work dir {workdir}")
        try:
            server.start()
            pg.start()
        except (SeaweedError, PostgresError) as exc:
            raise BenchError(str(exc)) from None
        client = server.client()
        bucket = prepare_bucket(server, client, "fleet-bench")
        meta_url = create_database(pg, "datafs_fleet")
        env = child_env({**server.aws_env(), **pg.pg_env(), "DATAFS_PEER_SECRET": SECRET})

        _progress("ceilings: loopback sendfile -> recv_into, boto3 GET")
        ceiling = loopback.measure(max(sizes.file_bytes, 256 * MiB), str(workdir)) / MiB
        rows.append(Row("loopback ceiling (sendfile -> recv_into)", ceiling, "MiB/s"))
        _, s3_get = measure_ceiling(server, client, sizes.ceiling_objects, 16)
        rows.append(Row("object store GET ceiling (boto3, 16 threads)", s3_get / MiB, "MiB/s"))

        def node(name: str, *, peer: bool, first: bool = False) -> Node:
            index = len(nodes)
            store = ["--store", f"s3://{bucket}/fleet", "--s3-endpoint", server.endpoint_url] if first else []
            n = Node(workdir, name, meta_url=meta_url, env=env, metrics_port=base_port + 20 + index,
                     peer_port=base_port + 10 + index if peer else None, store_args=store)
            nodes.append(n)
            n.mount()
            return n

        a = node("a", peer=True, first=True)
        _progress(f"A writes {human_bytes(sizes.file_bytes)} and syncs it")
        write_file(a.mountpoint / "model.bin", sizes.file_bytes)
        a.sync()

        s = node("s", peer=False)
        system.drop_page_cache()
        _progress("S (no peer tier) reads it cold from the object store")
        store_read = timed_read(s.mountpoint / "model.bin", sizes.file_bytes)
        rows.append(Row("cold read from the object store", store_read, "MiB/s",
                        f"{store_read / (s3_get / MiB):.2f}x the GET ceiling"))

        b = node("b", peer=True)
        b.wait_members(2)
        system.drop_page_cache()
        _progress("B (joined after the write) reads it cold from A")
        before = b.fetches()
        peer_read = timed_read(b.mountpoint / "model.bin", sizes.file_bytes)
        after = b.fetches()
        from_peer = after.get("peer", 0) - before.get("peer", 0)
        from_store = after.get("store", 0) - before.get("store", 0)
        rows.append(Row("cold read from a peer", peer_read, "MiB/s",
                        f"{peer_read / store_read:.2f}x the store read, {peer_read / ceiling:.2f}x loopback; "
                        f"chunks: {from_peer:.0f} from the peer, {from_store:.0f} from the store"))
        system.drop_page_cache()
        _progress("B reads it again, now from its own cache: the mount's own ceiling")
        cache_read = timed_read(b.mountpoint / "model.bin", sizes.file_bytes)
        rows.append(Row("read from the local cache (page cache dropped)", cache_read, "MiB/s",
                        f"the peer read is {peer_read / cache_read:.2f}x this"))

        _progress(f"A writes a model tree of {sizes.tree_files} x {human_bytes(sizes.tree_file_bytes)}")
        tree = [f"tree/shard-{i:02d}.bin" for i in range(sizes.tree_files)]
        for name in tree:
            write_file(a.mountpoint / name, sizes.tree_file_bytes)
        a.sync()
        rss = {n.name: n.peak_rss_bytes() for n in nodes}
        for gone in (a, s, b):
            gone.umount()
            gone.wipe_cache()
        b.mount()
        c, d = node("c", peer=True), node("d", peer=True)
        readers = [b, c, d]
        for n in readers:
            n.wait_members(3)
        system.drop_page_cache()
        _progress("B, C and D cold-read the tree at once")
        before_all = {n.name: n.fetches() for n in readers}

        def warm(n: Node) -> float:
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                got = sum(pool.map(read_file, [n.mountpoint / name for name in tree]))
            if got != sizes.tree_bytes:
                raise BenchError(f"{n.name} read {got} bytes of the tree, expected {sizes.tree_bytes}")
            return time.perf_counter() - started

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(readers)) as pool:
            per_node = list(pool.map(warm, readers))
        wall = time.perf_counter() - started
        gets = sum(n.fetches().get("store", 0) - before_all[n.name].get("store", 0) for n in readers)
        chunks = sizes.tree_files * -(-sizes.tree_file_bytes // BLOCK_BYTES)
        mib = sizes.tree_bytes / MiB
        rows.append(Row("fleet warmup: 3 nodes cold-read the tree, wall time", wall, "s",
                        f"{mib / max(per_node):.0f} MiB/s per node (slowest), {3 * mib / wall:.0f} MiB/s in all"))
        rows.append(Row("fleet warmup: object-store GETs per chunk of the tree", gets / chunks, "x",
                        f"{gets:.0f} GETs for {chunks} chunks read by 3 nodes (3.0 = no sharing)"))
        for n in readers:
            rss[n.name] = n.peak_rss_bytes()
            n.umount()
        _progress("the same warmup by three fresh nodes without the peer tier")
        alone = [node(name, peer=False) for name in ("e", "f", "g")]
        system.drop_page_cache()
        before_all = {n.name: n.fetches() for n in alone}
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(alone)) as pool:
            list(pool.map(warm, alone))
        alone_wall = time.perf_counter() - started
        alone_gets = sum(n.fetches().get("store", 0) - before_all[n.name].get("store", 0) for n in alone)
        rows.append(Row("fleet warmup without the peer tier, wall time", alone_wall, "s",
                        f"{3 * mib / alone_wall:.0f} MiB/s in all, {alone_gets / chunks:.2f} GETs per chunk; "
                        f"the warmup with peers took {wall / alone_wall:.2f}x this time"))
        for n in nodes:
            if n.mounted:
                rss[n.name] = max(rss.get(n.name) or 0, n.peak_rss_bytes() or 0)
        rss = {name: peak for name, peak in rss.items() if name not in ("e", "f", "g")}
        for name, peak in sorted(rss.items()):
            if peak:
                rows.append(Row(f"daemon peak RSS, node {name}", peak / MiB, "MiB"))
    finally:
        for n in reversed(nodes):
            n.stop()
        pg.stop()
        server.stop()
        if keep:
            _progress(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = {"mode": mode, "sizes": dataclasses.asdict(sizes), "duration_seconds": time.monotonic() - started_at,
            "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return rows, meta


def markdown(rows: list[Row], meta: dict) -> str:
    sizes = meta["sizes"]
    lines = [
        f"datafs fleet benchmark, {meta['mode']} mode, {meta['started_at']}: file {human_bytes(sizes['file_bytes'])}, "
        f"tree {sizes['tree_files']} x {human_bytes(sizes['tree_file_bytes'])}; "
        f"{meta['duration_seconds']:.0f} s in all",
        "",
        "| measurement | value | unit | notes |",
        "|---|---:|---|---|",
    ]
    for row in rows:
        value = f"{row.value:,.2f}" if row.value < 100 else f"{row.value:,.0f}"
        lines.append(f"| {row.name} | {value} | {row.unit} | {row.note} |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    """Run and report; errors are the caller's (`__main__`) to print."""
    rows, meta = run(args.mode, args.base_port, args.work_dir.resolve(), args.keep)
    text = markdown(rows, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.md").write_text(text)
    (args.out / "fleet.json").write_text(json.dumps(
        {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n")
    print(text, end="")
    return 0
