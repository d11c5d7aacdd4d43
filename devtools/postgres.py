"""A throwaway PostgreSQL server for tests and benchmarks.

The shared metadata engine is tested, and compared with JuiceFS, against a
real PostgreSQL (Debian's `postgresql` package), not a mock. Everything here
exists to make its start and stop dependable and self-contained:

- The server lives in one temp dir of its own (`datafs-pg-PORT-*`): the data
  dir and the unix socket, never /var/run/postgresql. `stop()` removes the dir,
  so nothing is left in /tmp; dynamic shared memory is mmap'ed files in the
  data dir (not /dev/shm), so that goes with it.
- PostgreSQL refuses to run as root: as root, initdb and the postmaster run as
  the `postgres` user the Debian package creates, with root's groups dropped,
  and the temp dir is chowned to it. Its parent dir must be searchable by
  that user (/tmp and /var/tmp are).
- TCP is 127.0.0.1 only, and password-only (scram-sha-256) for the one
  application role (`datafs`, may create databases, not a superuser). The
  superuser `postgres` has no password and can only come in through the unix
  socket, whose dir only the server's owner (and root) can enter: that is how
  `create_database()` and `drop_database()` run.
- `dsn()` has no password in it: the password goes separately (`pg_env()`,
  PGPASSWORD), so it is never in a command line or a log.
- `stop()` asks for a fast shutdown (SIGINT to the postmaster, as `pg_ctl stop
  -m fast` does), waits, then SIGKILLs the postmaster and each of its
  children by PID (they call setsid(), so they are not in its process group)
  and removes a SysV segment a killed postmaster leaves. It is idempotent and
  also runs at interpreter exit, so an aborted test run leaves no server.
- `durable=False` (tests) turns off fsync, synchronous commits and full-page
  writes: a crash of the machine loses the data, which a test never needs.
  Benchmarks use `durable=True`, PostgreSQL's defaults.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

from datafs.mounts import pid_alive, processes

HOST = "127.0.0.1"
SUPERUSER = "postgres"
#: The OS account the server runs as when we are root (Debian's package creates it).
SERVER_ACCOUNT = "postgres"
#: Where Debian installs each server version: DEBIAN_ROOT/VERSION/bin.
DEBIAN_ROOT = Path("/usr/lib/postgresql")
#: A unix socket path holds at most 107 bytes on Linux.
MAX_SOCKET_PATH = 107


class PostgresError(RuntimeError):
    """The test server could not be found, started or administered."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres"))


def postgres_bindir() -> Path:
    """The bin dir of the newest PostgreSQL server installed.

    Debian keeps the server out of PATH, in /usr/lib/postgresql/VERSION/bin;
    `pg_config` (libpq-dev, often absent) and PATH are the fallbacks for
    other layouts.
    """
    for bindir in sorted(DEBIAN_ROOT.glob("*/bin"), key=_version_key, reverse=True):
        if _has_server(bindir):
            return bindir
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out and _has_server(Path(out)):
            return Path(out)
    postgres = shutil.which("postgres")
    if postgres and _has_server(Path(postgres).parent):
        return Path(postgres).parent
    raise PostgresError(
        "the PostgreSQL server (initdb, postgres) is not installed: apt-get install postgresql")


def _server_account() -> pwd.struct_passwd | None:
    """Who the server runs as: the `postgres` user if we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        raise PostgresError(
            f"running as root, and there is no `{SERVER_ACCOUNT}` user to run PostgreSQL as "
            f"(PostgreSQL refuses root): apt-get install postgresql creates it") from None


def _searchable_by(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether `account` may enter `path` and every dir above it."""
    groups = {account.pw_gid, *os.getgrouplist(account.pw_name, account.pw_gid)}
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def check_parent_dir(parent_dir: Path) -> None:
    """Raise PostgresError unless the server's account can reach a temp dir made in `parent_dir`."""
    account = _server_account()
    if account is not None and not _searchable_by(Path(parent_dir).resolve(), account):
        raise PostgresError(
            f"the `{account.pw_name}` user cannot enter {parent_dir}: "
            f"start the PostgreSQL server under a world-searchable dir such as /tmp or /var/tmp")


def _port_free(port: int) -> bool:
    # SO_REUSEADDR, as PostgreSQL binds, so a port in TIME_WAIT counts as free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid`: the postmaster's backends and helpers."""
    return processes(parent=pid)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _lock_file_lines(data_dir: Path) -> list[str]:
    """postmaster.pid: pid, data dir, start time, port, socket dir, listen
    address, "shm key  shm id", status ("ready" once it accepts connections)."""
    try:
        return (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return []


def _remove_sysv_segment(lines: list[str]) -> None:
    """A SIGKILLed postmaster leaves its small SysV segment; nothing else would remove it."""
    try:
        shm_id = int(lines[6].split()[1])
    except (IndexError, ValueError):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmctl(shm_id, 0, None)  # IPC_RMID; fails harmlessly if it is gone already


def _terminate(proc: subprocess.Popen, data_dir: Path, grace_seconds: float) -> None:
    """Fast shutdown, then SIGKILL by PID if it does not finish in time.

    Module-level (not a method) so `weakref.finalize` can run it at exit
    without keeping the server object alive.
    """
    if proc.poll() is not None:
        return
    _signal([proc.pid, *_children(proc.pid)], signal.SIGCONT)  # a paused server cannot shut down
    proc.send_signal(signal.SIGINT)  # "fast": roll back open transactions, checkpoint, exit
    try:
        proc.wait(timeout=grace_seconds)
        return
    except subprocess.TimeoutExpired:
        pass
    lines = _lock_file_lines(data_dir)
    children = _children(proc.pid)
    proc.kill()  # the postmaster first, so it cannot fork replacements
    proc.wait(timeout=30)
    _signal(children, signal.SIGKILL)
    _wait_gone(children, 30)
    _remove_sysv_segment(lines)


def _cleanup(proc: subprocess.Popen | None, workdir: Path, grace_seconds: float) -> None:
    if proc is not None:
        _terminate(proc, workdir / "data", grace_seconds)
    shutil.rmtree(workdir, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class PostgresDatabase:
    """One database on the server, as a client sees it."""

    name: str
    url: str  # postgresql://USER@127.0.0.1:PORT/NAME, no password in it
    env: dict[str, str]  # {"PGPASSWORD": ...}: the password, for a child process's environment


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1:PORT, in a temp dir of its own.

    Usage::

        with PostgresServer(19450) as server:
            db = server.create_database("meta_test")
            psycopg.connect(db.url, password=server.password)
            subprocess.run([...], env={**os.environ, **db.env})
    """

    def __init__(self, port: int, parent_dir: Path | None = None, durable: bool = False, user: str = "datafs",
                 password: str | None = None, max_connections: int = 200):
        self.port = port
        self.host = HOST
        self.parent_dir = Path(parent_dir or tempfile.gettempdir()).resolve()
        self.durable = durable
        self.user = user
        self.password = password or secrets.token_hex(16)
        self.max_connections = max_connections
        self.workdir: Path | None = None  # made by start(), removed by stop()
        self.paused = False
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    # ---- where things are --------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self._dir() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._dir()

    @property
    def log_path(self) -> Path:
        return self._dir() / "postgres.log"

    def _dir(self) -> Path:
        if self.workdir is None:
            raise PostgresError("the PostgreSQL server has not been started")
        return self.workdir

    @property
    def pid(self) -> int | None:
        """The postmaster's PID."""
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def dsn(self, dbname: str) -> str:
        """A libpq URL for `dbname` as the application role, without the password."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def pg_env(self) -> dict[str, str]:
        """Environment variables that give a child process (a datafs daemon, psql) the password."""
        return {"PGPASSWORD": self.password}

    # ---- start and stop ----------------------------------------------------------------
    def _settings(self) -> str:
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "unix_socket_permissions": "0700",
            "max_connections": str(self.max_connections),
            "dynamic_shared_memory_type": "mmap",  # in the data dir, not /dev/shm: removed with it
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
            "timezone": "'UTC'",
        }
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        return "\n# devtools.postgres\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())

    def _hba(self) -> str:
        return (
            "# devtools.postgres: the superuser only through the unix socket (a dir only the\n"
            "# server's owner and root can enter); TCP only from 127.0.0.1, only with a password.\n"
            "local all all trust\n"
            f"host all all {HOST}/32 scram-sha-256\n"
        )

    def _run_as_server(self, account, **kwargs) -> dict:
        """Popen arguments that run a child as the server's account, in a clean environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", HOME=str(self._dir()))
        kwargs.update(env=env, cwd=self._dir(), stdin=subprocess.DEVNULL)
        if account is not None:
            kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        return kwargs

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _init(self, bindir: Path, account) -> None:
        """A new temp dir, owned by the server's account, holding a fresh cluster."""
        check_parent_dir(self.parent_dir)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"datafs-pg-{self.port}-", dir=self.parent_dir))
        # No server yet, but the dir must go whatever happens next.
        self._finalizer = weakref.finalize(self, _cleanup, None, self.workdir, 0)
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise PostgresError(f"the socket path {socket_path} is too long for a unix socket: use a shorter parent dir")
        if account is not None:
            os.chown(self.workdir, account.pw_uid, account.pw_gid)
        command = [
            str(bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--encoding=UTF8", "--no-locale",
            "--auth-local=trust", "--auth-host=scram-sha-256", *([] if self.durable else ["--no-sync"]),
        ]
        with open(self.log_path, "ab") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=120,
                                    **self._run_as_server(account))
        if result.returncode != 0:
            raise PostgresError(f"initdb failed with status {result.returncode}; log tail:\n{self._log_tail()}")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(self._settings())
        (self.data_dir / "pg_hba.conf").write_text(self._hba())

    def _ready(self) -> bool:
        lines = _lock_file_lines(self.data_dir)
        if len(lines) < 8 or lines[0].strip() != str(self.pid) or lines[7].strip() != "ready":
            return False
        try:
            socket.create_connection((HOST, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _launch(self, bindir: Path, account, timeout_seconds: float) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        with open(self.log_path, "ab") as log:
            # A new session: a Ctrl-C at the terminal reaches the test runner,
            # which then stops the server in order, not the postmaster directly.
            self._proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(self.data_dir)], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, **self._run_as_server(account))
        self._finalizer = weakref.finalize(self, _cleanup, self._proc, self.workdir, 10.0)
        self.paused = False
        deadline = time.monotonic() + timeout_seconds
        while not self._ready():
            if self._proc.poll() is not None:
                raise PostgresError(f"PostgreSQL exited with status {self._proc.returncode} during start; "
                                    f"log tail:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise PostgresError(f"PostgreSQL on port {self.port} was not ready within {timeout_seconds} s; "
                                    f"log tail:\n{self._log_tail()}")
            time.sleep(0.05)

    def start(self, timeout_seconds: float = 60) -> "PostgresServer":
        """Create a cluster in a new temp dir and start it; return once it accepts
        connections on 127.0.0.1 and the application role exists."""
        if self.running:
            raise PostgresError(f"PostgreSQL on port {self.port} is already running (pid {self.pid})")
        self.stop()  # reap and clean up after an earlier run that died
        bindir = postgres_bindir()
        account = _server_account()
        if not _port_free(self.port):
            raise PostgresError(f"cannot start PostgreSQL: port {self.port} on {HOST} already in use")
        try:
            self._init(bindir, account)
            self._launch(bindir, account, timeout_seconds)
            self._admin_execute("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}", self.user, password=self.password)
        except BaseException:
            self.stop()
            raise
        return self

    def _shutdown(self, grace_seconds: float) -> None:
        """End the server, keeping its dir."""
        if self._proc is not None:
            if self._finalizer is not None:
                self._finalizer.detach()
            _terminate(self._proc, self.data_dir, grace_seconds)
            self._finalizer = weakref.finalize(self, _cleanup, None, self.workdir, 0)
            self._proc = None
        self.paused = False

    def restart(self, grace_seconds: float = 30, timeout_seconds: float = 60) -> None:
        """Stop the server and start it again on the same data dir and port, as
        an engine restart mid-workload would; clients see their connections drop."""
        self._dir()  # raises if it was never started
        self._shutdown(grace_seconds)
        try:
            self._launch(postgres_bindir(), _server_account(), timeout_seconds)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_seconds: float = 30) -> None:
        """Stop the server and remove its temp dir; safe to call twice, or before start()."""
        # detach() hands the arguments to exactly one caller (it is atomic), so
        # two concurrent stops, or a stop and the exit hook, never both run.
        claimed = self._finalizer.detach() if self._finalizer is not None else None
        if claimed is not None:
            _, _, (proc, workdir, _), _ = claimed
            _cleanup(proc, workdir, grace_seconds)
        self._finalizer = None
        self._proc = None
        self.workdir = None
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP the postmaster and every backend: the engine hangs, connections
        stay open and every query waits, as with a stuck database host."""
        if not self.running:
            raise PostgresError("the PostgreSQL server is not running")
        os.kill(self.pid, signal.SIGSTOP)  # first, so it forks nothing new meanwhile
        _signal(_children(self.pid), signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.running:
            _signal([*_children(self.pid), self.pid], signal.SIGCONT)
        self.paused = False

    def __enter__(self) -> "PostgresServer":
        return self.start() if not self.running else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- administration, as the superuser over the unix socket ------------------------------
    def connect(self, dbname: str = "postgres"):
        """A psycopg connection (autocommit) as the superuser, through the unix socket."""
        try:
            import psycopg
        except ImportError:
            raise PostgresError("psycopg is not installed: pip install 'psycopg[binary]'") from None
        if not self.running:
            raise PostgresError("the PostgreSQL server is not running")
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=dbname,
                               autocommit=True, connect_timeout=10)

    def _admin_execute(self, statement: str, *identifiers: str, password: str | None = None) -> None:
        from psycopg import sql

        args = [sql.Identifier(name) for name in identifiers]
        if password is not None:
            args.append(sql.Literal(password))
        with self.connect() as conn:
            conn.execute(sql.SQL(statement).format(*args))

    def create_database(self, name: str) -> PostgresDatabase:
        """A new, empty database owned by the application role."""
        self._admin_execute("CREATE DATABASE {} OWNER {}", name, self.user)
        return PostgresDatabase(name, self.dsn(name), self.pg_env())

    def drop_database(self, name: str) -> None:
        """Drop `name` if it exists, ending any connection still open to it first."""
        with self.connect() as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        # FORCE also ends a connection that arrived in between.
        self._admin_execute("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)
