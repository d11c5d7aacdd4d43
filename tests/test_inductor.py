"""The Inductor compile-cache API on a real datafs mount, with real torch.

Worker processes (devtools/inductor_worker.py) play the app: each is a fresh
process with its own empty local working cache, as a new GPU worker would be.
Worker A's compile is the expensive part (~20 s on 2 cores), so it runs once
per module on a module-scoped mount and the tests that need its archive share
it; everything else gets its own mount. Fast tests drive the API in-process
with synthetic cache files and DATAFS_GPU_TYPE set, so the test process never
imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import blake3
import pytest

from datafs import inductor
from datafs.inductor import (
    MANIFEST_NAME,
    load_inductor_cache,
    open_archive,
    scan_local,
    short_gpu_name,
    sync_inductor_cache,
    synchronized_inductor_cache,
    validate_cache_key,
)

from .conftest import REPO, Mount, run_cli

WORKER = REPO / "devtools" / "inductor_worker.py"
WORKER_TIMEOUT_SECONDS = 300


# ---- helpers ---------------------------------------------------------------------------------
def _worker_env(data_dir: Path, local_dir: Path, tmpdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATAFS_", "TORCHINDUCTOR_"))}
    env.update({
        "DATAFS_DATA_DIR": str(data_dir),
        "DATAFS_INDUCTOR_LOCAL_DIR": str(local_dir),
        # torch keeps precompiled headers under $TMPDIR/torchinductor_$USER: keep them out of /tmp.
        "TMPDIR": str(tmpdir),
        "PYTHONPATH": str(REPO),
    })
    env.update(extra or {})
    return env


def _worker_args(mode: str, key: str, *args: str) -> list[str]:
    return [sys.executable, str(WORKER), mode, "--key", key, *args]


def run_worker(mode: str, key: str, *args: str, data_dir: Path, local_dir: Path, tmpdir: Path,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(_worker_args(mode, key, *args), capture_output=True, text=True, cwd=REPO,
                          env=_worker_env(data_dir, local_dir, tmpdir, env), timeout=WORKER_TIMEOUT_SECONDS)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def _assert_valid_archive(path: Path, gpu_type: str = "CPU") -> dict[str, Any]:
    """The archive opens, every CRC is right and every file matches its manifest digest."""
    with open_archive(path, gpu_type) as archive:
        assert archive.usable, archive.problem
        assert archive.zip is not None and archive.zip.testzip() is None
        for rel, entry in archive.files.items():
            assert blake3.blake3(archive.zip.read(rel)).hexdigest() == entry.digest, rel
        return archive.manifest


def _write_entries(local: Path, entries: dict[str, bytes]) -> None:
    for rel, data in entries.items():
        path = local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _fake_cache(tag: str) -> dict[str, bytes]:
    """A few files laid out like an Inductor cache directory."""
    return {
        f"fxgraph/{tag[:2]}/f{tag}/entry": f"graph {tag}".encode() * 100,
        f"aotautograd/a{tag}/entry": f"aot {tag}".encode() * 100,
        f"{tag[:2]}/c{tag}.so": hashlib.sha256(tag.encode()).digest() * 128,
        f"{tag[:2]}/c{tag}.cpp": f"// kernel {tag}\n".encode(),
    }


@pytest.fixture
def api_env(monkeypatch: pytest.MonkeyPatch, datafs_mount: Mount, tmp_path: Path) -> dict[str, Path]:
    """In-process API calls against a fresh mount; each test uses its own local dirs."""
    monkeypatch.setenv("DATAFS_DATA_DIR", str(datafs_mount.path))
    monkeypatch.setenv("DATAFS_GPU_TYPE", "CPU")
    monkeypatch.setenv("DATAFS_INDUCTOR_LOCAL_DIR", str(tmp_path / "local-1"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset-by-test")  # restored after the test
    monkeypatch.delenv("DATAFS_INDUCTOR_FORMAT", raising=False)
    monkeypatch.setenv("DATAFS_INDUCTOR_WAIT_SECONDS", "0")  # one process plays every worker: no one to wait for
    return {"data": datafs_mount.path, "local": tmp_path / "local-1", "tmp": tmp_path}


def _use_local(monkeypatch: pytest.MonkeyPatch, path: Path) -> Path:
    monkeypatch.setenv("DATAFS_INDUCTOR_LOCAL_DIR", str(path))
    return path


# ---- worker A compiles once per module ---------------------------------------------------------------
@dataclasses.dataclass
class SharedRun:
    mount: Mount
    base: Path  # local working caches live here, one per worker
    tmpdir: Path  # TMPDIR for all compile workers: torch's precompiled headers are built once
    a: dict[str, Any]  # worker A's report

    @property
    def archive(self) -> Path:
        return Path(self.a["archive"])


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A module-wide mount (conftest's Mount, so the same mount and cleanup) with
    worker A's published archive: A's 20 s compile is paid once, not per test."""
    base = tmp_path_factory.mktemp("inductor")
    (base / "mnt").mkdir()
    (base / "torch-tmp").mkdir()
    mount = Mount(base / "mnt", base / "state")
    try:
        mount.mount()
        a = run_worker("compile", "tiny/v1", data_dir=mount.path, local_dir=base / "local-a", tmpdir=base / "torch-tmp")
        yield SharedRun(mount, base, base / "torch-tmp", a)
    finally:
        mount.cleanup()


@pytest.mark.mount
def test_second_worker_loads_what_the_first_compiled(shared: Any) -> None:
    """B neither compiles nor traces: Dynamo installs A's precompiled entry, so
    no FX graph is looked up, let alone missed, and the outputs are A's."""
    a = shared.a
    assert a["gpu_type"] == "CPU"
    assert shared.archive == shared.mount.path / "inductor-caches" / "CPU" / "tiny" / "v1.zip"
    assert a["fxgraph_cache_miss"] == 2 and a["fxgraph_cache_hit"] == 0, a  # one graph per input shape
    assert a["graphs_traced"] == 2 and a["dynamo_cache_miss"] == 1, a
    assert a["cpp_kernels_compiled"] > 0
    manifest = _assert_valid_archive(shared.archive)
    assert manifest["format"] == "dir" and manifest["gpu_type"] == "CPU" and manifest["torch"] == a["torch"]
    assert any(name.startswith("dynamo/") for name in manifest["files"]), "no precompiled Dynamo entry was published"
    stamp_after_a = _stamp(shared.archive)

    b = run_worker("compile", "tiny/v1", data_dir=shared.mount.path, local_dir=shared.base / "local-b", tmpdir=shared.tmpdir)
    print(f"\nworker A: ready in {a['ready_seconds']:.2f} s {a['breakdown']}"
          f"\nworker B: ready in {b['ready_seconds']:.2f} s {b['breakdown']}")
    assert b["files_loaded"] > 0
    assert b["dynamo_cache_hit"] == 1 and b["graphs_traced"] == 0, b  # no retrace
    assert b["fxgraph_cache_miss"] == 0 and b["autograd_cache_miss"] == 0, b
    assert b["breakdown"]["dynamo_tracing"] == 0 and b["breakdown"]["inductor_compile"] == 0, b
    assert b["files_compiled"] == 0 and b["cpp_kernels_compiled"] == 0, "B compiled kernels although the cache had them"
    assert b["outputs"] == a["outputs"]
    # B compiled nothing new, so its sync wrote nothing: same file, same mtime.
    assert _stamp(shared.archive) == stamp_after_a


@pytest.mark.mount
def test_without_precompile_the_graphs_still_load(shared: Any) -> None:
    """DATAFS_INDUCTOR_PRECOMPILE=0: B traces again and redoes AOTAutograd (whose
    key includes Dynamo's settings), but every FX graph is a hit and no kernel is
    built (the header setting datafs changes is the same for every worker, so
    the FX keys match)."""
    archive = shared.mount.path / "inductor-caches" / "CPU" / "tiny-noprec" / "v1.zip"
    archive.parent.mkdir(parents=True)
    shutil.copyfile(shared.archive, archive)  # its own key: this worker publishes AOTAutograd entries of its own
    b = run_worker("compile", "tiny-noprec/v1", data_dir=shared.mount.path, local_dir=shared.base / "local-noprec",
                   tmpdir=shared.tmpdir, env={"DATAFS_INDUCTOR_PRECOMPILE": "0"})
    assert b["dynamo_cache_hit"] == 0 and b["graphs_traced"] == 2, b
    assert b["fxgraph_cache_hit"] == 2 and b["fxgraph_cache_miss"] == 0, b
    assert b["cpp_kernels_compiled"] == 0 and b["outputs"] == shared.a["outputs"]


@pytest.mark.mount
def test_failed_guards_and_a_bad_precompiled_entry_fall_back_to_compiling(shared: Any) -> None:
    """Artifacts that do not apply never break a worker: a batch size A never
    saw fails the precompiled entry's guards and is traced and compiled (the
    others still come from A's entry), and is published for the next worker; a
    precompiled entry torch cannot read is traced again, served by the FX cache."""
    key = "tiny-guards/v1"
    archive = shared.mount.path / "inductor-caches" / "CPU" / "tiny-guards" / "v1.zip"
    archive.parent.mkdir(parents=True)
    shutil.copyfile(shared.archive, archive)
    c = run_worker("compile", key, "--batches", "4,8,16", data_dir=shared.mount.path, local_dir=shared.base / "local-guards-c",
                   tmpdir=shared.tmpdir)
    assert c["dynamo_cache_hit"] == 1 and c["graphs_traced"] == 1, c  # only batch 16 traced
    assert c["fxgraph_cache_miss"] == 1 and c["cpp_kernels_compiled"] > 0, c
    assert c["outputs"][:2] == shared.a["outputs"] and "Traceback" not in c["stderr"]
    d = run_worker("compile", key, "--batches", "16,4", data_dir=shared.mount.path, local_dir=shared.base / "local-guards-d",
                   tmpdir=shared.tmpdir)
    assert d["dynamo_cache_hit"] == 1 and d["graphs_traced"] == 0 and d["fxgraph_cache_miss"] == 0, d
    assert d["outputs"] == [c["outputs"][2], c["outputs"][0]]

    # A precompiled entry that does not unpickle: the worker traces and loads the FX graphs.
    bad_key = "tiny-badentry/v1"
    bad = shared.mount.path / "inductor-caches" / "CPU" / "tiny-badentry" / "v1.zip"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(_rewrite_member(shared.archive.read_bytes(), "dynamo/", b"not a pickle"))
    e = run_worker("compile", bad_key, data_dir=shared.mount.path, local_dir=shared.base / "local-badentry", tmpdir=shared.tmpdir)
    assert e["dynamo_cache_error"] == 1 and e["graphs_traced"] == 2, e
    assert e["fxgraph_cache_hit"] == 2 and e["fxgraph_cache_miss"] == 0 and e["outputs"] == shared.a["outputs"], e


def _rewrite_member(data: bytes, prefix: str, content: bytes) -> bytes:
    """The archive with the first member under `prefix` replaced, manifest digest included
    (a well-formed archive whose entry torch cannot use)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    manifest = json.loads(src.read(MANIFEST_NAME))
    target = next(name for name in sorted(manifest["files"]) if name.startswith(prefix))
    manifest["files"][target].update(size=len(content), blake3=blake3.blake3(content).hexdigest())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename == target:
                body = content
            elif info.filename == MANIFEST_NAME:
                body = json.dumps(manifest).encode()
            dst.writestr(info.filename, body)
    return out.getvalue()


@pytest.mark.mount
def test_corrupt_archive_is_survived_and_replaced(shared: Any) -> None:
    broken = shared.mount.path / "inductor-caches" / "CPU" / "broken" / "v1.zip"
    broken.parent.mkdir(parents=True)
    data = shared.archive.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # truncated, as by a crashed copy

    c = run_worker("compile", "broken/v1", data_dir=shared.mount.path, local_dir=shared.base / "local-c", tmpdir=shared.tmpdir)
    assert "ignoring the shared inductor cache" in c["stderr"] and "corrupt" in c["stderr"]
    assert "Traceback" not in c["stderr"]
    assert c["fxgraph_cache_miss"] == 2 and c["cpp_kernels_compiled"] > 0, c  # compiled as if there were no cache
    assert c["outputs"] == shared.a["outputs"]
    manifest = _assert_valid_archive(broken)
    assert any(name.startswith("fxgraph/") for name in manifest["files"])


@pytest.mark.mount
def test_mega_cache_option(shared: Any) -> None:
    if not shared.a["has_mega_cache"]:
        pytest.skip(f"torch {shared.a['torch']} has no torch.compiler.save_cache_artifacts")
    # The publisher starts from a copy of A's warm local cache (so it hits instead
    # of compiling again: the mega-cache records artifacts it used, not only new
    # ones), less A's precompiled entry, so it traces and the FX graphs are recorded.
    local_p = shared.base / "local-mega-p"
    shutil.copytree(shared.base / "local-a", local_p, ignore=lambda d, names: ["dynamo"] if Path(d) == shared.base / "local-a" else [])
    p = run_worker("compile", "tiny-mega/v1", "--format", "mega", data_dir=shared.mount.path, local_dir=local_p, tmpdir=shared.tmpdir)
    archive = Path(p["archive"])
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read(MANIFEST_NAME))
        assert zf.testzip() is None
    assert manifest["format"] == "mega" and len(manifest["blobs"]) == 1
    (blob,) = manifest["blobs"].values()
    assert len(blob["artifacts"]["inductor"]) == 2 and len(blob["artifacts"]["aot_autograd"]) == 2
    assert len(blob["artifacts"]["precompile"]) == 1  # Dynamo's entry travels in the mega-cache too
    stamp = _stamp(archive)

    q = run_worker("compile", "tiny-mega/v1", "--format", "mega", data_dir=shared.mount.path,
                   local_dir=shared.base / "local-mega-q", tmpdir=shared.tmpdir)
    assert q["dynamo_cache_hit"] == 1 and q["graphs_traced"] == 0, q
    assert q["fxgraph_cache_miss"] == 0 and q["autograd_cache_miss"] == 0, q
    assert q["outputs"] == shared.a["outputs"]
    assert _stamp(archive) == stamp  # it used only what was published: nothing new to write
    stats = run_cli("inductor", "stats", "tiny-mega/v1", env={"DATAFS_DATA_DIR": str(shared.mount.path)}).stdout
    assert "format:        mega" in stats and "fx graphs:     2" in stats and "integrity:     ok" in stats, stats


@pytest.mark.mount
def test_cli_ls_stats_rm(shared: Any) -> None:
    env = {"DATAFS_DATA_DIR": str(shared.mount.path)}
    listing = run_cli("inductor", "ls", env=env).stdout
    assert any(line.split()[:2] == ["CPU", "tiny/v1"] for line in listing.splitlines()), listing
    assert "no inductor caches" in run_cli("inductor", "ls", "--gpu", "H100", env=env).stdout

    stats = run_cli("inductor", "stats", "tiny/v1", env=env).stdout
    assert "integrity:     ok" in stats and "format:        dir" in stats, stats
    assert "fx graphs:     2" in stats and "aot autograd:  2" in stats, stats
    kernels = int(stats.split("kernels:")[1].split()[0])
    # Every C++ library in the cache: the model's kernels and torch's CPU ISA probe libraries, built during load.
    assert kernels >= shared.a["cpp_kernels_compiled"] > 0, stats

    # rm on a key of its own, so the shared archive stays for the other tests.
    target = shared.mount.path / "inductor-caches" / "CPU" / "cli" / "gone" / "v1.zip"
    target.parent.mkdir(parents=True)
    shutil.copyfile(shared.archive, target)
    (target.parent / ".v1.zip.lock").touch()
    assert f"removed {target}" in run_cli("inductor", "rm", "cli/gone/v1", "--data-dir", str(shared.mount.path)).stdout
    assert not (shared.mount.path / "inductor-caches" / "CPU" / "cli").exists()
    assert "cli/gone/v1" not in run_cli("inductor", "ls", env=env).stdout

    for args, message in [
        (("rm", "cli/gone/v1"), "no inductor cache 'cli/gone/v1'"),
        (("stats", "../x"), "invalid inductor cache key '../x'"),
        (("ls", "--gpu", "../H100"), "invalid GPU type"),
    ]:
        result = run_cli("inductor", *args, env=env, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    missing = run_cli("inductor", "ls", "--data-dir", str(shared.base / "nowhere"), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# ---- concurrency -------------------------------------------------------------------------------
@pytest.mark.mount
def test_concurrent_syncs_merge_into_one_valid_archive(datafs_mount: Mount, tmp_path: Path) -> None:
    key = "shared/v1"
    start_at = time.time() + 4.0  # all four publish at the same moment
    procs = []
    for n in range(4):
        # No lease: this is about publishers racing, not about waiting for one another.
        env = _worker_env(datafs_mount.path, tmp_path / f"local-{n}", tmp_path,
                          {"DATAFS_GPU_TYPE": "CPU", "DATAFS_INDUCTOR_WAIT_SECONDS": "0"})
        procs.append(subprocess.Popen(
            _worker_args("synthetic", key, "--tag", f"w{n}", "--files", "25", "--start-at", str(start_at)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=WORKER_TIMEOUT_SECONDS)
        assert proc.returncode == 0, err
        assert "could not publish" not in err and "Traceback" not in err, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    archive = datafs_mount.path / "inductor-caches" / "CPU" / "shared" / "v1.zip"
    manifest = _assert_valid_archive(archive)
    expected = {rel for r in results for rel in r["written"]} | {"common/same-everywhere.so"}
    assert set(manifest["files"]) == expected  # every worker's entries survived the race
    leftovers = [n for n in os.listdir(archive.parent) if ".tmp-" in n]
    assert not leftovers


def _start_synthetic(data_dir: Path, tmp_path: Path, key: str, tag: str, compile_seconds: float,
                     wait_seconds: float = 60) -> subprocess.Popen:
    """A worker that plays a compile of `compile_seconds` when the cache gives it
    nothing; its log goes to tmp_path/<tag>.log (see `_log_of`)."""
    env = _worker_env(data_dir, tmp_path / f"local-{tag}", tmp_path,
                      {"DATAFS_GPU_TYPE": "CPU", "DATAFS_INDUCTOR_WAIT_SECONDS": str(wait_seconds)})
    with open(tmp_path / f"{tag}.log", "w") as log:
        proc = subprocess.Popen(_worker_args("synthetic", key, "--tag", tag, "--files", "5", "--compile-seconds", str(compile_seconds)),
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO)
    proc.log_path = tmp_path / f"{tag}.log"  # type: ignore[attr-defined]
    return proc


def _log_of(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()  # type: ignore[attr-defined]


def _finish(proc: subprocess.Popen) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=WORKER_TIMEOUT_SECONDS)
    err = _log_of(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    result = json.loads(out.strip().splitlines()[-1])
    result["stderr"] = err
    return result


@pytest.mark.mount
def test_workers_starting_together_compile_once(datafs_mount: Mount, tmp_path: Path) -> None:
    """Four workers start on a key with no archive: the first takes the lease and
    compiles, the other three wait for its archive and load it instead."""
    key = "lease/v1"
    procs = [_start_synthetic(datafs_mount.path, tmp_path, key, f"w{n}", compile_seconds=3) for n in range(4)]
    results = [_finish(proc) for proc in procs]
    compilers = [r for r in results if r["compiled"]]
    assert len(compilers) == 1, [r["stderr"] for r in results]
    (compiler,) = compilers
    published = set(compiler["written"]) | {"common/same-everywhere.so"}
    for waiter in (r for r in results if not r["compiled"]):
        assert "is compiling" in waiter["stderr"] and "loaded the shared inductor cache" in waiter["stderr"], waiter["stderr"]
        assert set(waiter["loaded"]) == published
    archive = datafs_mount.path / "inductor-caches" / "CPU" / "lease" / "v1.zip"
    assert set(_assert_valid_archive(archive)["files"]) == published
    assert sorted(os.listdir(archive.parent)) == [".v1.zip.lock", "v1.zip"]  # the lease is gone


@pytest.mark.mount
def test_a_dead_lease_holder_is_taken_over(datafs_mount: Mount, tmp_path: Path) -> None:
    """The holder is killed while compiling: the waiting worker sees it gone (a
    process of this host that no longer exists), takes the lease and compiles."""
    key = "lease-dead/v1"
    lease = datafs_mount.path / "inductor-caches" / "CPU" / "lease-dead" / ".v1.zip.lease"
    holder = _start_synthetic(datafs_mount.path, tmp_path, key, "hold", compile_seconds=120)
    try:
        deadline = time.monotonic() + 60
        while not lease.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lease"
            time.sleep(0.05)
        waiter = _start_synthetic(datafs_mount.path, tmp_path, key, "wait", compile_seconds=0.5)
        while "is compiling" not in _log_of(waiter):
            assert waiter.poll() is None and time.monotonic() < deadline, "the second worker did not wait"
            time.sleep(0.05)
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    result = _finish(waiter)
    assert result["compiled"] and "taking over the compile lease" in result["stderr"], result["stderr"]
    archive = lease.with_name("v1.zip")
    assert set(_assert_valid_archive(archive)["files"]) == set(result["written"]) | {"common/same-everywhere.so"}
    assert not lease.exists()


@pytest.mark.mount
def test_publish_remerges_when_the_archive_changes_underneath(api_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the node-local lock (another node publishing), the rename is
    only done onto the version that was merged; a change in between is merged too."""
    key = "race/v1"
    _write_entries(api_env["local"], _fake_cache("mine"))
    rival_local = api_env["tmp"] / "rival"
    _write_entries(rival_local, _fake_cache("rival"))
    real_write = inductor._write_archive
    calls = []

    def write_then_rival_publishes(tmp: Path, plan: Any, base: Any) -> None:
        real_write(tmp, plan, base)
        if not calls:  # a rival on another node publishes while we write
            rival_plan = inductor._DirPlan(rival_local, scan_local(rival_local))
            rival_tmp = tmp.with_name(tmp.name + "-rival")
            real_write(rival_tmp, rival_plan, None)
            os.rename(rival_tmp, tmp.parent / "v1.zip")
        calls.append(tmp)

    monkeypatch.setattr(inductor, "_write_archive", write_then_rival_publishes)
    monkeypatch.setattr(inductor, "_publisher_lock", lambda path: contextlib.nullcontext())
    sync_inductor_cache(key, "")
    assert len(calls) == 2
    manifest = _assert_valid_archive(api_env["data"] / "inductor-caches" / "CPU" / "race" / "v1.zip")
    assert set(manifest["files"]) == set(_fake_cache("mine")) | set(_fake_cache("rival"))


# ---- change detection -----------------------------------------------------------------------
@pytest.mark.mount
def test_no_change_sync_writes_nothing(api_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    key = "quiet/v1"
    dir_hash = load_inductor_cache(key)
    _write_entries(api_env["local"], _fake_cache("q1"))
    sync_inductor_cache(key, dir_hash)
    archive = api_env["data"] / "inductor-caches" / "CPU" / "quiet" / "v1.zip"
    before = _stamp(archive)
    time.sleep(0.01)

    # A new worker loads it and compiles nothing: its syncs leave the archive alone.
    _use_local(monkeypatch, api_env["tmp"] / "local-2")
    with synchronized_inductor_cache(key):
        pass
    dir_hash = load_inductor_cache(key)
    sync_inductor_cache(key, dir_hash)
    sync_inductor_cache(key, dir_hash)
    assert _stamp(archive) == before
    # Files the archive already has, rewritten identically, are not news either.
    _write_entries(api_env["tmp"] / "local-2", _fake_cache("q1"))
    sync_inductor_cache(key, "")
    assert _stamp(archive) == before


@pytest.mark.mount
def test_changed_content_under_the_same_name_is_published(api_env: dict[str, Path]) -> None:
    key = "content/v1"
    entries = _fake_cache("cc")
    dir_hash = load_inductor_cache(key)
    _write_entries(api_env["local"], entries)
    sync_inductor_cache(key, dir_hash)
    dir_hash = load_inductor_cache(key)
    so = next(rel for rel in entries if rel.endswith(".so"))
    (api_env["local"] / so).write_bytes(os.urandom(4096))  # same name, same size, new kernel
    sync_inductor_cache(key, dir_hash)
    with open_archive(api_env["data"] / "inductor-caches" / "CPU" / "content" / "v1.zip", "CPU") as archive:
        assert archive.zip is not None
        assert archive.zip.read(so) == (api_env["local"] / so).read_bytes()


@pytest.mark.mount
def test_context_manager_publishes_when_the_body_raises(api_env: dict[str, Path]) -> None:
    with pytest.raises(RuntimeError, match="warmup failed"):
        with synchronized_inductor_cache("raises/v1"):
            _write_entries(api_env["local"], _fake_cache("rr"))
            raise RuntimeError("warmup failed")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(api_env["local"])
    manifest = _assert_valid_archive(api_env["data"] / "inductor-caches" / "CPU" / "raises" / "v1.zip")
    assert set(manifest["files"]) == set(_fake_cache("rr"))


# ---- bad archives ----------------------------------------------------------------------------
def _corruptions(good: bytes, member: str) -> dict[str, bytes]:
    """Ways a shared archive goes bad, each made from a good one."""
    def flip_member_byte(data: bytes) -> bytes:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            info = zf.getinfo(member)
        at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 2
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]

    return {
        "truncated": good[: len(good) // 2],
        "garbage": os.urandom(len(good)),
        "empty": b"",
        "crc": flip_member_byte(good),
    }


@pytest.mark.mount
@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "crc", "manifest-digest", "traversal"])
def test_bad_archive_is_ignored_then_replaced(api_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture, kind: str) -> None:
    key = f"bad-{kind}/v1"
    _write_entries(api_env["local"], _fake_cache("gd"))
    sync_inductor_cache(key, "")
    archive = api_env["data"] / "inductor-caches" / "CPU" / f"bad-{kind}" / "v1.zip"
    good = archive.read_bytes()
    member = next(name for name in _fake_cache("gd") if name.endswith(".so"))
    if kind == "manifest-digest":
        bad = _rewrite(good, lambda m: m["files"][member].update(blake3="0" * 64))
    elif kind == "traversal":
        bad = _rewrite(good, lambda m: m["files"].__setitem__("../../escaped", m["files"].pop(member)), rename={member: "../../escaped"})
    else:
        bad = _corruptions(good, member)[kind]
    archive.write_bytes(bad)

    local = _use_local(monkeypatch, api_env["tmp"] / f"local-{kind}")
    with caplog.at_level(logging.WARNING, logger="datafs.inductor"):
        dir_hash = load_inductor_cache(key)
    assert any("ignoring the shared inductor cache" in r.getMessage() for r in caplog.records), caplog.text
    assert list(scan_local(local)) == [], "a bad archive left files in the local cache"
    assert not (api_env["tmp"] / "escaped").exists() and not (local.parent / "escaped").exists()
    # The worker compiles as if there were no cache, then publishes a good archive.
    _write_entries(local, _fake_cache("nw"))
    sync_inductor_cache(key, dir_hash)
    manifest = _assert_valid_archive(archive)
    assert set(manifest["files"]) == set(_fake_cache("nw"))


def _rewrite(data: bytes, edit_manifest: Any, rename: dict[str, str] | None = None) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            content = src.read(info.filename)
            if info.filename == MANIFEST_NAME:
                manifest = json.loads(content)
                edit_manifest(manifest)
                content = json.dumps(manifest).encode()
            dst.writestr((rename or {}).get(info.filename, info.filename), content)
    return out.getvalue()


@pytest.mark.mount
def test_other_gpu_type_or_versions_are_ignored(api_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    key = "versions/v1"
    cpu_archive = api_env["data"] / "inductor-caches" / "CPU" / "versions" / "v1.zip"
    _write_entries(api_env["local"], _fake_cache("vv"))
    sync_inductor_cache(key, "")

    # GPU types never mix: an H100 worker looks only under H100/, and an archive
    # copied there by hand is refused by its manifest.
    monkeypatch.setenv("DATAFS_GPU_TYPE", "H100")
    local = _use_local(monkeypatch, api_env["tmp"] / "local-h100")
    load_inductor_cache(key)
    assert list(scan_local(local)) == []
    h100_archive = api_env["data"] / "inductor-caches" / "H100" / "versions" / "v1.zip"
    h100_archive.parent.mkdir(parents=True)
    shutil.copyfile(cpu_archive, h100_archive)
    with caplog.at_level(logging.WARNING, logger="datafs.inductor"):
        load_inductor_cache(key)
    assert "built for GPU type CPU, this machine is H100" in caplog.text
    assert list(scan_local(local)) == []

    # Another torch (or Triton) version: ignored with a warning, then replaced.
    monkeypatch.setenv("DATAFS_GPU_TYPE", "CPU")
    caplog.clear()
    monkeypatch.setattr(inductor, "torch_version", lambda: "2.99.0+cu999")
    local = _use_local(monkeypatch, api_env["tmp"] / "local-newer-torch")
    with caplog.at_level(logging.WARNING, logger="datafs.inductor"):
        dir_hash = load_inductor_cache(key)
    assert "built with torch" in caplog.text and "2.99.0+cu999" in caplog.text
    assert list(scan_local(local)) == []
    _write_entries(local, _fake_cache("nt"))
    sync_inductor_cache(key, dir_hash)
    with zipfile.ZipFile(cpu_archive) as zf:
        manifest = json.loads(zf.read(MANIFEST_NAME))
    assert manifest["torch"] == "2.99.0+cu999" and set(manifest["files"]) == set(_fake_cache("nt"))


@pytest.mark.mount
def test_archive_without_manifest_from_fals_toolkit_loads(api_env: dict[str, Path]) -> None:
    """fal's toolkit zips the cache directory as is; such archives still load."""
    archive = api_env["data"] / "inductor-caches" / "CPU" / "legacy" / "v1.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for rel, data in _fake_cache("lg").items():
            zf.writestr(rel, data)
        zf.writestr("locks/x.lock", b"")
    load_inductor_cache("legacy/v1")
    assert set(scan_local(api_env["local"])) == set(_fake_cache("lg"))


def test_missing_data_dir_never_breaks_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DATAFS_DATA_DIR", str(tmp_path / "not-mounted"))
    monkeypatch.setenv("DATAFS_GPU_TYPE", "CPU")
    monkeypatch.setenv("DATAFS_INDUCTOR_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset-by-test")
    with caplog.at_level(logging.WARNING, logger="datafs.inductor"):
        with synchronized_inductor_cache("nomount/v1"):
            _write_entries(tmp_path / "local", _fake_cache("nm"))
    assert "does not exist: the inductor cache is not shared" in caplog.text
    assert not (tmp_path / "not-mounted").exists()


# ---- keys, names, settings ------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["my-model/v1", "flux/2", "sdxl_turbo/v1.2+fp16", "a"])
def test_good_keys(key: str) -> None:
    assert validate_cache_key(key) == key


@pytest.mark.parametrize("key", ["", "../x", "a/../../x", "/abs/key", "a//b", "a/./b", "x/..", ".hidden/v1",
                                 "a\\b", "has space/v1", "nul\0/v1", "x" * 300, "v1\n", "my-model/v1/"])
def test_bad_keys_are_a_clear_value_error(key: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATAFS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATAFS_INDUCTOR_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset-by-test")
    with pytest.raises(ValueError, match="invalid inductor cache key"):
        validate_cache_key(key)
    with pytest.raises(ValueError, match="invalid inductor cache key"):
        load_inductor_cache(key)
    with pytest.raises(ValueError, match="invalid inductor cache key"):
        sync_inductor_cache(key, "")
    with pytest.raises(ValueError, match="invalid inductor cache key"):
        with synchronized_inductor_cache(key):
            pass
    assert os.listdir(tmp_path) == []  # refused before anything was created


def test_bad_format_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'dir' or 'mega'"):
        load_inductor_cache("fmt/v1", format="tar")
    monkeypatch.setenv("DATAFS_INDUCTOR_FORMAT", "tar")
    with pytest.raises(ValueError, match="'dir' or 'mega'"):
        sync_inductor_cache("fmt/v1", "")


@pytest.mark.parametrize("name, short", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", "A10G"), ("Tesla T4", "T4"),
    ("NVIDIA GeForce RTX 4090", "RTX4090"), ("NVIDIA RTX 6000 Ada Generation", "RTX6000Ada"),
    ("NVIDIA RTX A6000", "RTXA6000"), ("NVIDIA GH200 480GB", "GH200"), ("AMD Instinct MI300X", "MI300X"),
])
def test_short_gpu_names(name: str, short: str) -> None:
    assert short_gpu_name(name) == short


def test_import_is_cheap_and_defaults_match_fal() -> None:
    code = ("import sys, os\n"
            "for k in [k for k in os.environ if k.startswith('DATAFS_')]: del os.environ[k]\n"
            "import datafs.inductor as i\n"
            "assert 'torch' not in sys.modules, 'importing datafs.inductor imported torch'\n"
            "print(i.DATA_DIR, i.LOCAL_INDUCTOR_CACHE_DIR, i.GLOBAL_INDUCTOR_CACHES_DIR)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    assert out == ["/data", "/tmp/inductor-cache", "/data/inductor-caches"]
