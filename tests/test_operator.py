"""What an operator uses to run the fleet, checked against a real mount.

`datafs stats` and its control route count what a copy through the mount
does; the Grafana dashboard names only series a live daemon exports; the
deploy manifests (Kubernetes, Prometheus, compose, systemd) parse and carry
the fields that make a node work; `datafs env` prints lines a shell accepts;
and two POSIX corners (chown and set-gid, fallocate in every mode the kernel
passes to FUSE) behave as the local disk does. Loopback ports 18940-18949
belong to this module (metrics).
"""

from __future__ import annotations

import configparser
import ctypes
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from datafs import metrics
from datafs.chunks import chunk_id
from datafs.control import request
from datafs.state_files import control_path
from datafs.errors import ChunkMissing, StoreError
from datafs.fs import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from datafs.tiers.file_store import FileStore

from .conftest import REPO, Mount, run_cli, sha, wait_until

MiB = 1 << 20
METRICS_PORT = 18941
DEPLOY = REPO / "deploy"


def _stats(m: Mount) -> dict:
    return request(control_path(m.state_dir), "GET", "/stats")


def _read_uncached(path: Path) -> bytes:
    """Read through FUSE, not the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while data := os.read(fd, MiB):
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


# ---- datafs stats -----------------------------------------------------------------------------
def test_stats_counts_what_a_copy_does(mount_factory: Callable[..., Mount]):
    m = mount_factory("stats")
    data = os.urandom(9 * MiB + 123)
    before = _stats(m)
    (m.path / "copy").write_bytes(data)
    assert _read_uncached(m.path / "copy") == data
    after = _stats(m)

    assert after["write_bytes"] - before["write_bytes"] == len(data)
    assert after["fuse_ops"] > before["fuse_ops"]
    # Just written, so every read was a cache hit.
    assert after["cache_misses"] == before["cache_misses"]
    assert after["cache_hit_bytes"] - before["cache_hit_bytes"] >= len(data)
    assert after["read_bytes"]["cache"] - before["read_bytes"].get("cache", 0) >= len(data)
    assert after["meta_transactions"] > before["meta_transactions"]


def test_stats_once_shows_a_copy_in_progress(mount_factory: Callable[..., Mount]):
    """The line `datafs stats --once` prints moves while a writer copies."""
    m = mount_factory("stats-cli")
    stop = threading.Event()
    block = os.urandom(MiB)

    def copy() -> None:
        for _ in range(10_000):  # bounded; ends as soon as the view has been read
            with open(m.path / "stream", "wb") as f:
                for _ in range(4):
                    f.write(block)
            if stop.is_set():
                return

    writer = threading.Thread(target=copy)
    writer.start()
    try:
        result = run_cli("stats", str(m.path), "--once", "--interval", "0.5")
    finally:
        stop.set()
        writer.join()
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout  # two header lines, one row
    assert "read MiB/s" in lines[0] and "hit%" in lines[1]
    fields = lines[2].split()
    assert len(fields) == 12, lines[2]
    ops, write_mib = float(fields[0]), float(fields[4])
    assert ops > 0 and write_mib > 0, lines[2]


def test_stats_on_a_path_that_is_not_mounted_is_one_line(tmp_path: Path):
    result = run_cli("stats", str(tmp_path), "--once", check=False)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "not mounted" in result.stderr, result.stderr


# ---- metrics and the dashboard ---------------------------------------------------------------
def _dashboard_series() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    names = set()
    for expr in exprs:
        names.update(re.findall(r"\b((?:datafs|process)_[a-z0-9_]+)\b", expr))
    return names


def test_dashboard_uses_only_series_a_live_daemon_exports(mount_factory: Callable[..., Mount]):
    # A cache smaller than the file: reading it back must fetch evicted chunks
    # from the store, so the miss and GET series have samples too.
    m = mount_factory("metrics", ["--cache-size", "12M", "--metrics-address", f"127.0.0.1:{METRICS_PORT}"])
    data = os.urandom(6 * 4 * MiB)
    (m.path / "big").write_bytes(data)
    (m.path / "copy").write_bytes(data)  # its chunks are asked for (HEAD), not put again
    run_cli("sync", str(m.path))
    assert _read_uncached(m.path / "big") == data

    # The read returns once it has the bytes; the fetched chunks are kept in
    # the cache just after, and room for them is made first: until those
    # writes end, the cache can be empty. Scrape once they have.
    def cache_chunks() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
        found = re.search(r"^datafs_cache_chunks (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    wait_until(lambda: cache_chunks() > 0, 10, "the read's chunks to be kept in the cache")
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    declared: set[str] = set()
    sampled: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        declared.update({family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"})
        for sample in family.samples:
            sampled[sample.name] = sampled.get(sample.name, 0.0) + sample.value

    wanted = _dashboard_series()
    assert len(wanted) >= 25, sorted(wanted)
    assert not wanted - declared, f"the dashboard names series the daemon does not export: {sorted(wanted - declared)}"
    # What this test did shows in the series an operator looks at first.
    for name in ("datafs_fuse_ops_total", "datafs_read_bytes_total", "datafs_write_bytes_total", "datafs_upload_bytes_total",
                 "datafs_cache_hits_total", "datafs_cache_misses_total", "datafs_cache_miss_bytes_total",
                 "datafs_cache_evictions_total", "datafs_object_store_request_seconds_count",
                 "datafs_meta_transaction_seconds_count", "datafs_meta_operation_seconds_count", "datafs_cache_chunks",
                 "datafs_cache_limit_bytes"):
        assert sampled.get(name, 0) > 0, name
    for method in ("GET", "PUT", "HEAD"):
        assert f'datafs_object_store_requests_total{{method="{method}",result="ok"}}' in text, method
    for line in text.splitlines():
        if line.startswith("datafs_"):
            assert line.split("{")[0].split(" ")[0] in declared
    assert "password" not in text.lower() and "secret" not in text.lower()


def test_object_store_requests_are_counted_by_method_and_result(tmp_path: Path):
    """On a registry of the test's own: an absent object is `missing` for GET
    and a plain answer for HEAD; every method is counted once per request."""
    registry = metrics.new_registry()

    def count(method: str, result: str) -> float:
        return registry.get_sample_value("datafs_object_store_requests_total", {"method": method, "result": result}) or 0.0

    store = FileStore(tmp_path / "store")
    store.check()
    data = os.urandom(1000)
    chunk = chunk_id(data)
    (tmp_path / "chunk").write_bytes(data)
    keys = [("GET", "missing"), ("HEAD", "ok"), ("PUT", "ok"), ("GET", "ok"), ("LIST", "ok"), ("DELETE", "ok"), ("PUT", "error")]
    before = {key: count(*key) for key in keys}
    with pytest.raises(ChunkMissing):
        store.get(chunk)
    assert store.exists(chunk) is False
    store.put_file(chunk, tmp_path / "chunk")
    assert store.get(chunk) == data
    assert [c.chunk_id for c in store.list_chunks()] == [chunk]
    store.delete(chunk)
    with pytest.raises(StoreError):
        store.put_file(chunk, tmp_path / "vanished")
    assert {key: count(*key) - before[key] for key in keys} == {key: 1.0 for key in keys}
    assert registry.get_sample_value("datafs_object_store_request_seconds_count", {"method": "PUT"}) >= 2


# ---- deploy/ ----------------------------------------------------------------------------------
def test_kubernetes_daemonset_mounts_for_the_host():
    documents = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "datafs-daemonset.yaml").read_text()) if d]
    (ds,) = [d for d in documents if d["kind"] == "DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    assert container["command"][:3] == ["datafs", "mount", "/data"] and "--foreground" in container["command"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {v["mountPath"]: v for v in container["volumeMounts"]}
    assert volumes[mounts["/dev/fuse"]["name"]]["hostPath"]["path"] == "/dev/fuse"
    assert mounts["/data"]["mountPropagation"] == "Bidirectional"
    assert volumes[mounts["/data"]["name"]]["hostPath"]["path"] == "/data"
    env = {e["name"]: e for e in container["env"]}
    cache = volumes[mounts[env["DATAFS_CACHE_DIR"]["value"]]["name"]]
    assert "hostPath" in cache
    assert "hostPath" in volumes[mounts[env["DATAFS_STATE_DIR"]["value"]]["name"]]
    # Secrets come from a Secret, never from the manifest.
    for name in ("DATAFS_META_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"] and "value" not in env[name]

    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["datafs", "umount", "/data"]
    probe = " ".join(container["livenessProbe"]["exec"]["command"])
    assert "datafs status /data" in probe
    assert pod["terminationGracePeriodSeconds"] > 120  # longer than umount's own wait

    # Prometheus finds it where it serves.
    port = ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
    assert env["DATAFS_METRICS_ADDRESS"]["value"].endswith(f":{port}")


def test_prometheus_example_scrapes_datafs():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert all(t.rpartition(":")[2].isdigit() for t in jobs["datafs"]["static_configs"][0]["targets"])
    kube = jobs["datafs-kubernetes"]
    assert kube["kubernetes_sd_configs"][0]["role"] == "pod"
    keep = [r for r in kube["relabel_configs"] if r.get("action") == "keep"]
    assert any(r["regex"] == "datafs" for r in keep)


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((DEPLOY / "datafs.service").read_text())
    return unit


def test_compose_runs_postgres_minio_and_two_nodes():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert any("postgres" in s.get("image", "") for s in services.values())
    assert any("minio" in s.get("image", "") for s in services.values())
    for name, service in services.items():  # pinned: a tag, and not one that moves
        tag = service["image"].rpartition(":")[2] if ":" in service.get("image", "") else ""
        assert tag and tag != "latest", (name, service.get("image"))
    nodes = {name: s for name, s in services.items() if "/dev/fuse" in str(s.get("devices", []))}
    assert len(nodes) >= 2, sorted(services)
    grace = int(_unit()["Service"]["TimeoutStopSec"])
    for name, node in nodes.items():
        environment = node.get("environment", {})
        if isinstance(environment, list):  # the KEY=value form
            environment = dict(item.partition("=")[::2] for item in environment)
        assert environment["DATAFS_META"].startswith("postgresql://"), name
        assert environment["DATAFS_STORE"].startswith("s3://"), name
        # Built once from the Dockerfile; nothing installed at start, no checkout mounted.
        assert node["build"]["dockerfile"] == "deploy/Dockerfile" and "command" not in node, name
        assert not any(str(v).startswith(".:") for v in node["volumes"]), name
        assert node["stop_grace_period"] == f"{grace}s", name
        data = [v for v in node["volumes"] if isinstance(v, dict) and v["target"] == "/data"]
        assert data and data[0]["bind"]["propagation"] == "rshared", name
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert base and all(":" in b and not b.endswith(":latest") for b in base), base
    assert 'ENTRYPOINT ["datafs", "mount", "/data", "--foreground"]' in dockerfile


def test_systemd_unit_waits_for_the_mount():
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "notify"  # started only once the daemon says the mount is up
    assert service["ExecStart"].split()[:3] == ["datafs", "mount", "/data"] and "--foreground" in service["ExecStart"]
    assert service["ExecStop"].split()[:3] == ["datafs", "umount", "/data"]
    assert int(service["TimeoutStopSec"]) >= 120
    assert service["EnvironmentFile"] == "-/etc/default/datafs"
    assert unit["Install"]["WantedBy"]
    # The example environment file names only variables datafs reads.
    from datafs.config import Settings

    known = {env for field in Settings.model_fields.values() for env in (field.json_schema_extra or {})["env"]}
    example = re.findall(r"^#?(DATAFS_[A-Z0-9_]+)=", (DEPLOY / "datafs.default").read_text(), re.M)
    assert example and set(example) <= known, set(example) - known


@pytest.mark.mount
def test_foreground_mount_tells_systemd_when_it_is_ready(tmp_path: Path):
    """READY=1 arrives on $NOTIFY_SOCKET only once /data is the mount, and
    STOPPING=1 when SIGTERM starts the shutdown."""
    from datafs import mounts

    mountpoint, notify_path = tmp_path / "mnt", tmp_path / "notify"
    mountpoint.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAFS_")} | {"NOTIFY_SOCKET": str(notify_path)}
    daemon = subprocess.Popen([sys.executable, "-m", "datafs", "mount", str(mountpoint), "--foreground",
                               "--state-dir", str(tmp_path / "state")], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = listener.recv(4096).decode()
        assert "READY=1" in ready.splitlines() and f"MAINPID={daemon.pid}" in ready, ready
        info = mounts.find_mount(mountpoint)
        assert info is not None and info.is_datafs
        (mountpoint / "after-ready").write_bytes(b"on the mount")
        daemon.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode().splitlines()
        assert daemon.wait(timeout=60) == 0, daemon.stderr.read()
        assert not (mountpoint / "after-ready").exists()  # it went into datafs, not the directory beneath
    finally:
        listener.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        daemon.stdout.close()
        daemon.stderr.close()


# ---- datafs env ---------------------------------------------------------------------------------
def test_env_prints_lines_a_shell_accepts(tmp_path: Path):
    mountpoint = tmp_path / "my data"
    out = run_cli("env", str(mountpoint)).stdout
    shell = subprocess.run(["sh", "-c", f'{out}\necho "$HF_HOME|$HF_HUB_CACHE|$TORCH_HOME"'], capture_output=True, text=True, check=True)
    assert shell.stdout.strip() == f"{mountpoint}/.cache/huggingface|{mountpoint}/.cache/huggingface/hub|{mountpoint}/.cache/torch"
    assert run_cli("env").stdout.splitlines()[0] == "export HF_HOME=/data/.cache/huggingface"


# ---- POSIX corners against the local disk ------------------------------------------------------
def _chown_modes(root: Path) -> dict[str, int]:
    """st_mode after chown, for set-id bits with and without execute."""
    out = {}
    cases = {"suid-exec": 0o4755, "sgid-exec": 0o2755, "sgid-noexec": 0o2644, "both-noexec": 0o6644,
             "both-group-exec": 0o6754, "suid-noexec": 0o4644}
    for name, mode in cases.items():
        for change in ("uid", "gid"):
            path = root / f"{name}-{change}"
            path.write_bytes(b"x")
            os.chmod(path, mode)
            os.chown(path, 1234 if change == "uid" else -1, 5678 if change == "gid" else -1)
            out[path.name] = os.stat(path).st_mode
    directory = root / "sgid-dir"
    directory.mkdir()
    os.chmod(directory, 0o2775)
    os.chown(directory, 1234, 5678)
    out[directory.name] = os.stat(directory).st_mode
    return out


def test_chown_keeps_setgid_without_group_execute_like_local_disk(mount_factory: Callable[..., Mount], tmp_path: Path):
    m = mount_factory("chown")
    local = tmp_path / "local"
    local.mkdir()
    expected = _chown_modes(local)
    assert expected["sgid-noexec-uid"] & stat.S_ISGID  # the rule being compared
    assert {k: oct(v) for k, v in _chown_modes(m.path).items()} == {k: oct(v) for k, v in expected.items()}


def _preallocate(root: Path) -> dict[str, tuple[int, bytes]]:
    """posix_fallocate on an empty file, inside existing data, and past the end."""
    out = {}
    for name, initial, offset, length in (("empty", b"", 0, 10_000), ("inside", b"a" * 5000, 100, 1000),
                                          ("past-end", b"b" * 3000, 2 * MiB, 4097)):
        path = root / name
        path.write_bytes(initial)
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, offset, length)
        finally:
            os.close(fd)
        data = path.read_bytes()
        out[name] = (len(data), data)
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_COLLAPSE_RANGE = 0x08


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2): 0, or the errno it failed with."""
    return 0 if _libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


KEEP, PUNCH, ZERO = FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
#: (mode, offset, length), in order, on a file of 9 MiB + 123 random bytes:
#: every mode inside the data, across a 4 MiB chunk boundary and past the end.
FALLOCATE_STEPS = [
    (0, 100, 1000),                      # inside the data: nothing to do
    (KEEP, 8 * MiB, 8 * MiB),            # past the end, the size kept
    (0, 9 * MiB, 2 * MiB),               # past the end: the file grows, zeros
    (PUNCH | KEEP, 3 * MiB, 2 * MiB),    # across a chunk boundary: a part of two chunks
    (ZERO, 10, 20),                      # a few bytes
    (ZERO, 7 * MiB, 2 * MiB),            # across a boundary, over data and zeros
    (PUNCH | KEEP, 8 * MiB, 8 * MiB),    # the last chunk whole, and past the end
    (ZERO | KEEP, 10 * MiB, 4 * MiB),    # past the end, the size kept
    (ZERO, 11 * MiB - 5, 2 * MiB),       # past the end: the file grows into a new chunk
    (PUNCH | KEEP, 4 * MiB, 4 * MiB),    # exactly one chunk, written to since the last commit
    (PUNCH, 0, 10),                      # EOPNOTSUPP: a hole keeps the size
    (PUNCH | ZERO | KEEP, 0, 10),        # EOPNOTSUPP: one or the other
    (0, 0, 0),                           # EINVAL
    (KEEP, -1, 10),                      # EINVAL
]


def _fallocate_steps(path: Path, data: bytes) -> tuple[list[tuple[int, int, str]], list[bool]]:
    """Run FALLOCATE_STEPS on a new file at `path`: per step the errno, the
    size and a digest of the content as read through the same descriptor;
    and per successful step whether both mtime and ctime moved."""
    path.write_bytes(data)
    results, times_moved = [], []
    fd = os.open(path, os.O_RDWR)
    try:
        for mode, offset, length in FALLOCATE_STEPS:
            before = os.fstat(fd)
            code = _fallocate(fd, mode, offset, length)
            after = os.fstat(fd)
            if code == 0:
                times_moved.append(after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns)
            results.append((code, after.st_size, sha(os.pread(fd, after.st_size + 1, 0))))
    finally:
        os.close(fd)
    return results, times_moved


def test_fallocate_matches_local_disk(mount_factory: Callable[..., Mount], tmp_path: Path):
    m = mount_factory("falloc")
    local = tmp_path / "local"
    local.mkdir()
    assert _preallocate(m.path) == _preallocate(local)
    assert _read_uncached(m.path / "past-end") == (local / "past-end").read_bytes()

    data = os.urandom(9 * MiB + 123)
    expected, _ = _fallocate_steps(local / "file", data)
    assert [code for code, _, _ in expected] == [0] * 10 + [errno.EOPNOTSUPP] * 2 + [errno.EINVAL] * 2  # the sequence tests what it says
    mounted = m.path / "file"
    got, times_moved = _fallocate_steps(mounted, data)
    assert got == expected
    assert times_moved == [True] * 10  # every successful call moves both, as on ext4
    final = (local / "file").read_bytes()
    assert len(final) == 13 * MiB - 5
    assert _read_uncached(mounted) == final  # committed at close, read through FUSE
    m.remount()
    assert _read_uncached(mounted) == final

    # Modes the kernel does not pass to FUSE, and room the cache disk does not have.
    fd = os.open(mounted, os.O_RDWR)
    try:
        assert _fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, MiB) == errno.EOPNOTSUPP
        assert _fallocate(fd, 0, 0, 1 << 50) == errno.ENOSPC
        assert _fallocate(fd, KEEP, 0, 1 << 50) == errno.ENOSPC
        assert os.fstat(fd).st_size == len(final)
    finally:
        os.close(fd)
    for root in (local, m.path):  # a directory is never open for writing
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert _fallocate(fd, 0, 0, 10) == errno.EBADF
        finally:
            os.close(fd)
    assert _read_uncached(mounted) == final
