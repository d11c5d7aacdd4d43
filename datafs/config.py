"""One typed settings model for the daemon and the CLI.

Values come from defaults, then `DATAFS_*` environment variables, then command
line flags (flags win). Every parse error is a `UsageError` with one clear line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from .errors import UsageError

CHUNK_SIZE_BYTES = 4 * 1024 * 1024

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, what: str = "size") -> int:
    """Parse '50G', '512MiB', '1.5T' or a plain byte count (binary units)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageError(f"invalid {what} {text!r}: expected a number with an optional unit K, M, G, T (e.g. 50G)")
    number, unit, _ = match.groups()
    value = int(float(number) * _UNITS[unit.lower()])
    if value <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be greater than zero")
    return value


def parse_seconds(text: str, what: str = "duration") -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: expected a number of seconds") from None
    if value < 0:
        raise UsageError(f"invalid {what} {text!r}: must not be negative")
    return value


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/datafs")
    return Path.home() / ".local" / "share" / "datafs"


@dataclasses.dataclass
class Settings:
    """Everything a daemon needs to run. Paths are absolute after `resolve()`."""

    mountpoint: Path | None = None
    state_dir: Path = dataclasses.field(default_factory=default_state_dir)
    # Metadata engine URL: empty means the embedded LMDB in <state_dir>/meta;
    # postgresql://user@host:port/db shares one namespace between nodes.
    meta: str = ""
    volume: str = "default"  # several volumes can share one database
    meta_password_file: Path | None = None  # else DATAFS_META_PASSWORD, PGPASSWORD or ~/.pgpass
    meta_timeout_seconds: float = 30.0  # a metadata call fails with EIO after this
    meta_concurrency: int = 8  # connections to a remote engine (per node)
    session_timeout_seconds: float = 60.0  # a node silent this long is dead to the others
    # Shared volumes only (LMDB frees at once): how long an unreferenced chunk
    # stays in the store, and an unlinked inode in the metadata, before they
    # are freed; both cover nodes that may still use them.
    gc_grace_seconds: float = 3600.0
    orphan_grace_seconds: float = 30.0
    # The peer tier: HOST:PORT to serve chunks on, and the address the other
    # nodes use; empty runs no peer server and reads no peers.
    peer_listen: str = ""
    peer_secret_file: Path | None = None  # else DATAFS_PEER_SECRET
    peer_timeout_seconds: float = 5.0  # each read or write to a peer; connecting takes at most 2 s
    # Chunk bytes held in memory for peer traffic at once (fetches from peers,
    # shares to owners, chunks peers share with this node), in whole chunks.
    peer_inflight_bytes: int = 256 << 20
    store: str = ""  # URL; empty means file://<state_dir>/store
    cache_dir: Path | None = None  # default <state_dir>/cache
    cache_size_bytes: int = 50 << 30
    cache_min_free_bytes: int = 1 << 30
    foreground: bool = False
    log_level: str = "warning"
    log_format: str = "json"
    # Kernel caching: attributes and entries are only changed through this
    # mount on a single node, so short positive timeouts are safe and save a
    # round trip per stat; negative entries are not cached (a file created on
    # another node must appear at once once metadata is shared).
    attr_timeout_seconds: float = 1.0
    entry_timeout_seconds: float = 1.0
    read_ahead_kb: int = 16384
    write_buffer_bytes: int = 256 << 20
    upload_concurrency: int = 16
    fsync_waits_upload: bool = False
    chunk_wait_timeout_seconds: float = 300.0  # a read that needs a chunk it cannot get fails with EIO after this
    # A write that needs cache space waits for uploads to free some; it fails
    # with ENOSPC once no upload has finished for this long.
    write_stall_timeout_seconds: float = 60.0
    upload_retry_max_seconds: float = 60.0  # the longest backoff between two attempts of a failing upload
    shutdown_upload_grace_seconds: float = 10.0  # at unmount, how long pending uploads may still finish
    metrics_address: str = ""  # host:port for the Prometheus endpoint; empty = off
    s3_endpoint: str = ""
    s3_region: str = ""
    s3_connect_timeout_seconds: float = 5.0  # an S3 request that cannot connect fails (and is retried) after this
    s3_read_timeout_seconds: float = 60.0  # an S3 connection silent this long fails (and the request is retried)

    ENV_PREFIX = "DATAFS_"

    @property
    def lmdb_dir(self) -> Path:
        return self.state_dir / "meta"

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir or (self.state_dir / "cache")

    @property
    def spill_dir(self) -> Path:
        return self.state_dir / "tmp"

    @property
    def store_url(self) -> str:
        return self.store or f"file://{self.state_dir / 'store'}"

    @property
    def shared_meta(self) -> bool:
        return bool(self.meta) and not self.meta.startswith("lmdb://")

    def peer_secret(self) -> bytes:
        """The fleet secret peers sign their requests with (at least 16 bytes)."""
        if self.peer_secret_file is not None:
            try:
                secret = self.peer_secret_file.read_bytes().strip()
            except OSError as exc:
                raise UsageError(f"cannot read the peer secret file {self.peer_secret_file}: {exc.strerror}") from None
        else:
            secret = os.environ.get("DATAFS_PEER_SECRET", "").encode()
        if len(secret) < 16:
            raise UsageError("--peer-listen needs the fleet secret (at least 16 bytes) in DATAFS_PEER_SECRET or --peer-secret-file")
        return secret

    def meta_password(self) -> str | None:
        """The metadata engine's password, from a file or DATAFS_META_PASSWORD;
        None lets libpq use PGPASSWORD or ~/.pgpass."""
        if self.meta_password_file is not None:
            try:
                return self.meta_password_file.read_text().strip("\r\n")
            except OSError as exc:
                raise UsageError(f"cannot read the metadata password file {self.meta_password_file}: {exc.strerror}") from None
        return os.environ.get("DATAFS_META_PASSWORD") or None

    def resolve(self) -> "Settings":
        self.state_dir = Path(os.path.abspath(os.path.expanduser(self.state_dir)))
        if self.cache_dir is not None:
            self.cache_dir = Path(os.path.abspath(os.path.expanduser(self.cache_dir)))
        if self.mountpoint is not None:
            self.mountpoint = Path(os.path.abspath(os.path.expanduser(self.mountpoint)))
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise UsageError(f"invalid log level {self.log_level!r}: use debug, info, warning or error")
        if self.log_format not in ("json", "text"):
            raise UsageError(f"invalid log format {self.log_format!r}: use json or text")
        if self.meta:
            scheme = self.meta.partition("://")[0]
            if scheme not in ("postgres", "postgresql", "lmdb") or "://" not in self.meta:
                raise UsageError(f"unsupported metadata engine {self.meta.split('://')[0]!r}: use postgresql://USER@HOST:PORT/DB")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", self.volume):
            raise UsageError(f"invalid volume name {self.volume!r}: letters, digits, '.', '_' and '-', at most 63")
        if self.meta_password_file is not None:
            self.meta_password_file = Path(os.path.abspath(os.path.expanduser(self.meta_password_file)))
        if self.peer_secret_file is not None:
            self.peer_secret_file = Path(os.path.abspath(os.path.expanduser(self.peer_secret_file)))
        if self.peer_listen:
            host, sep, port = self.peer_listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UsageError(f"invalid --peer-listen {self.peer_listen!r}: expected HOST:PORT, e.g. 10.0.0.5:9400")
            if not self.shared_meta:
                raise UsageError("--peer-listen needs a shared metadata engine (--meta postgresql://...)")
        return self


_CONVERTERS: dict[str, Any] = {
    "state_dir": Path,
    "cache_dir": Path,
    "meta_password_file": Path,
    "peer_secret_file": Path,
    "peer_timeout_seconds": lambda v: parse_seconds(v, "peer timeout"),
    "peer_inflight_bytes": lambda v: parse_size(v, "peer in-flight bytes"),
    "meta_timeout_seconds": lambda v: parse_seconds(v, "metadata timeout"),
    "session_timeout_seconds": lambda v: parse_seconds(v, "session timeout"),
    "gc_grace_seconds": lambda v: parse_seconds(v, "garbage-collection grace period"),
    "orphan_grace_seconds": lambda v: parse_seconds(v, "orphan grace period"),
    "mountpoint": Path,
    "cache_size_bytes": lambda v: parse_size(v, "cache size"),
    "cache_min_free_bytes": lambda v: parse_size(v, "cache free-space floor"),
    "write_buffer_bytes": lambda v: parse_size(v, "write buffer size"),
    "foreground": lambda v: v.lower() in ("1", "true", "yes", "on"),
    "fsync_waits_upload": lambda v: v.lower() in ("1", "true", "yes", "on"),
    "attr_timeout_seconds": lambda v: parse_seconds(v, "attribute timeout"),
    "entry_timeout_seconds": lambda v: parse_seconds(v, "entry timeout"),
    "chunk_wait_timeout_seconds": lambda v: parse_seconds(v, "chunk wait timeout"),
    "write_stall_timeout_seconds": lambda v: parse_seconds(v, "write stall timeout"),
    "upload_retry_max_seconds": lambda v: parse_seconds(v, "upload retry backoff"),
    "shutdown_upload_grace_seconds": lambda v: parse_seconds(v, "shutdown upload grace period"),
    "s3_connect_timeout_seconds": lambda v: parse_seconds(v, "S3 connect timeout"),
    "s3_read_timeout_seconds": lambda v: parse_seconds(v, "S3 read timeout"),
}

# Environment names users write: DATAFS_CACHE_SIZE rather than DATAFS_CACHE_SIZE_BYTES.
_ENV_ALIASES = {
    "CACHE_SIZE": "cache_size_bytes",
    "CACHE_MIN_FREE": "cache_min_free_bytes",
    "WRITE_BUFFER": "write_buffer_bytes",
    "ATTR_TIMEOUT": "attr_timeout_seconds",
    "ENTRY_TIMEOUT": "entry_timeout_seconds",
    "CHUNK_WAIT_TIMEOUT": "chunk_wait_timeout_seconds",
    "WRITE_STALL_TIMEOUT": "write_stall_timeout_seconds",
    "UPLOAD_RETRY_MAX": "upload_retry_max_seconds",
    "SHUTDOWN_UPLOAD_GRACE": "shutdown_upload_grace_seconds",
    "S3_CONNECT_TIMEOUT": "s3_connect_timeout_seconds",
    "S3_READ_TIMEOUT": "s3_read_timeout_seconds",
    "META_TIMEOUT": "meta_timeout_seconds",
    "SESSION_TIMEOUT": "session_timeout_seconds",
    "GC_GRACE": "gc_grace_seconds",
    "ORPHAN_GRACE": "orphan_grace_seconds",
    "PEER_TIMEOUT": "peer_timeout_seconds",
    "PEER_INFLIGHT": "peer_inflight_bytes",
}


def _convert(name: str, raw: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(Settings)}[name]
    if name in _CONVERTERS:
        return _CONVERTERS[name](raw)
    if field.type in ("int", int):
        try:
            return int(raw)
        except ValueError:
            raise UsageError(f"invalid value {raw!r} for {name}: expected an integer") from None
    return raw


def from_env(environ: dict[str, str] | None = None) -> Settings:
    """Settings from defaults overlaid with DATAFS_* variables."""
    environ = os.environ if environ is None else environ
    settings = Settings()
    names = {f.name for f in dataclasses.fields(Settings)}
    for key, raw in environ.items():
        if not key.startswith(Settings.ENV_PREFIX) or key in ("DATAFS_DATA_DIR", "DATAFS_META_PASSWORD", "DATAFS_PEER_SECRET"):
            continue
        short = key[len(Settings.ENV_PREFIX):]
        name = _ENV_ALIASES.get(short, short.lower())
        if name in names:
            setattr(settings, name, _convert(name, raw))
    return settings


def apply_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """Overlay CLI flags (already-parsed strings or values); None means 'not given'."""
    for name, value in overrides.items():
        if value is None:
            continue
        setattr(settings, name, _convert(name, value) if isinstance(value, str) else value)
    return settings
