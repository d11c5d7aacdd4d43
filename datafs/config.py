"""One typed settings model for the daemon and the CLI, on pydantic-settings.

Each option is declared once, as a field of `Settings`: its type, default, the
environment names it is read from (`DATAFS_*`; a short name such as
`DATAFS_CACHE_SIZE` first, the field's own long name still accepted) and, for
the options `datafs mount` takes on its command line, its flag. The CLI builds
its mount flags from these fields, so a new option is one new field.

Values come from defaults, then the environment, then the command line (flags
win), and are validated once, in `load()`: every mistake is a `UsageError`
naming the flag or variable it came from, in one line.

Sizes are parsed by pydantic's `ByteSize`: `KB`, `MB`, `GB`, `TB` are powers
of 1000, `KiB`, `MiB`, `GiB`, `TiB` powers of 1024, and the one-letter forms
`K`, `M`, `G`, `T` are binary (as `dd`, `truncate` and `fallocate` read them):
`50G` and `50GiB` are 53,687,091,200 bytes, `50GB` is 50,000,000,000.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (AliasChoices, BeforeValidator, ByteSize, Field, SecretStr, TypeAdapter, ValidationError,
                      field_validator, model_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import fuse_kernel
from .errors import UsageError

CHUNK_SIZE_BYTES = 4 * 1024 * 1024
ENV_PREFIX = "DATAFS_"

_BYTE_SIZE = TypeAdapter(ByteSize)
_ONE_LETTER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp])\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes from '50G', '512MiB', '1.5TB' or a plain count, with ByteSize;
    a one-letter unit is binary (50G = 50GiB)."""
    if isinstance(value, int):
        size = value
    else:
        text = str(value)
        one_letter = _ONE_LETTER_UNIT.match(text)
        if one_letter:
            text = f"{one_letter.group(1)}{one_letter.group(2)}ib"
        try:
            size = int(_BYTE_SIZE.validate_python(text))
        except ValidationError:
            raise ValueError("expected a size such as 50G, 512MiB or 1.5TB (K, M, G, T and KiB... are binary, KB... decimal)") from None
    if size <= 0:
        raise ValueError("must be greater than zero")
    return size


Size = Annotated[int, BeforeValidator(parse_size)]
Seconds = Annotated[float, Field(ge=0)]


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/datafs")
    return Path.home() / ".local" / "share" / "datafs"


def option(default: Any = None, *, env: str | tuple[str, ...] = (), flag: str | None = None, metavar: str | None = None,
           help: str, default_text: str | None = None, default_factory: Any = None) -> Any:
    """A setting: its environment names (primary first; DATAFS_ is added) and,
    if `datafs mount` takes it as a flag, the flag."""
    names = (env,) if isinstance(env, str) else env
    extra = {"env": [ENV_PREFIX + n for n in names], "flag": flag, "metavar": metavar, "default_text": default_text}
    kwargs: dict[str, Any] = {"default_factory": default_factory} if default_factory else {"default": default}
    return Field(validation_alias=AliasChoices(*extra["env"]), description=help, json_schema_extra=extra, **kwargs)


class Settings(BaseSettings):
    """Everything a daemon needs to run; paths are absolute once validated."""

    model_config = SettingsConfigDict(extra="ignore", validate_by_name=True, env_ignore_empty=True,
                                      validate_default=False)

    mountpoint: Path | None = option(env="MOUNTPOINT", help="where the filesystem is mounted")
    state_dir: Path = option(
        env="STATE_DIR", flag="--state-dir", metavar="DIR", default_factory=default_state_dir,
        default_text="/var/lib/datafs as root, else ~/.local/share/datafs",
        help="LMDB metadata, chunk cache, embedded store, log, control socket; one node of one volume")
    meta: str = option(
        "", env="META", flag="--meta", metavar="URL", default_text="embedded LMDB in STATE_DIR",
        help="metadata engine: postgresql://USER@HOST:PORT/DB shares one namespace between nodes")
    volume: str = option("default", env="VOLUME", flag="--volume", metavar="NAME",
                         help="volume name inside the metadata database")
    meta_password_file: Path | None = option(
        env="META_PASSWORD_FILE", flag="--meta-password-file", metavar="FILE",
        help="file holding the metadata database's password (else DATAFS_META_PASSWORD, PGPASSWORD or ~/.pgpass)")
    meta_password: SecretStr | None = option(env="META_PASSWORD", help="the metadata database's password")
    meta_timeout_seconds: Seconds = option(30.0, env=("META_TIMEOUT", "META_TIMEOUT_SECONDS"),
                                           help="a metadata call the database does not answer fails with EIO after this")
    meta_concurrency: int = option(8, env="META_CONCURRENCY", help="connections to a remote metadata engine (per node)")
    session_timeout_seconds: Seconds = option(60.0, env=("SESSION_TIMEOUT", "SESSION_TIMEOUT_SECONDS"),
                                              help="a node silent this long is dead to the others")
    # Shared volumes only (LMDB frees at once): how long an unreferenced chunk
    # stays in the store, and an unlinked inode in the metadata, before they
    # are freed; both cover nodes that may still use them.
    gc_grace_seconds: Seconds = option(3600.0, env=("GC_GRACE", "GC_GRACE_SECONDS"),
                                       help="how long an unreferenced chunk waits before it leaves the store")
    orphan_grace_seconds: Seconds = option(30.0, env=("ORPHAN_GRACE", "ORPHAN_GRACE_SECONDS"),
                                           help="how long an unlinked inode waits before it is freed")
    peer_listen: str = option(
        "", env="PEER_LISTEN", flag="--peer-listen", metavar="HOST:PORT", default_text="off",
        help="serve and read chunks between nodes: the address to listen on, also the one the others use "
             "(needs --meta and the fleet secret)")
    peer_secret_file: Path | None = option(
        env="PEER_SECRET_FILE", flag="--peer-secret-file", metavar="FILE",
        help="file holding the fleet secret peers sign requests with (else DATAFS_PEER_SECRET)")
    peer_secret: SecretStr | None = option(env="PEER_SECRET", help="the fleet secret (at least 16 bytes)")
    peer_timeout_seconds: Seconds = option(5.0, env=("PEER_TIMEOUT", "PEER_TIMEOUT_SECONDS"),
                                           help="each read or write to a peer; connecting takes at most 2 s")
    # Chunk bytes held in memory for peer traffic at once (fetches from peers,
    # shares to owners, chunks peers share with this node), in whole chunks.
    peer_inflight_bytes: Size = option(256 << 20, env=("PEER_INFLIGHT", "PEER_INFLIGHT_BYTES"), default_text="256M",
                                       help="chunk bytes held in memory for peer traffic at once")
    store: str = option(
        "", env="STORE", flag="--store", metavar="URL", default_text="file://STATE_DIR/store",
        help="object store: file:///PATH (an existing directory) or s3://BUCKET[/PREFIX]; recorded in the volume "
             "at its first mount")
    cache_dir: Path | None = option(env="CACHE_DIR", flag="--cache-dir", metavar="DIR", default_text="STATE_DIR/cache",
                                    help="local chunk cache directory (put it on NVMe)")
    cache_size_bytes: Size = option(50 << 30, env=("CACHE_SIZE", "CACHE_SIZE_BYTES"), flag="--cache-size",
                                    metavar="SIZE", default_text="50G", help="local cache byte limit, e.g. 50G")
    cache_min_free_bytes: Size = option(1 << 30, env=("CACHE_MIN_FREE", "CACHE_MIN_FREE_BYTES"), default_text="1G",
                                        help="free-disk floor kept on the cache volume")
    foreground: bool = option(False, env="FOREGROUND", flag="--foreground",
                              help="stay attached (systemd, containers); SIGTERM/SIGINT unmount cleanly")
    log_level: str = option("warning", env="LOG_LEVEL", flag="--log-level", metavar="LEVEL",
                            help="debug, info, warning or error")
    log_format: str = option("json", env="LOG_FORMAT", help="json or text")
    # Kernel caching: short positive timeouts save a round trip per stat while
    # changes from other nodes still show quickly; negative entries are not
    # cached (a file created on another node must appear at once).
    attr_timeout_seconds: Seconds = option(fuse_kernel.ATTR_TIMEOUT_SECONDS, env=("ATTR_TIMEOUT", "ATTR_TIMEOUT_SECONDS"),
                                           help="kernel attribute cache lifetime")
    entry_timeout_seconds: Seconds = option(fuse_kernel.ENTRY_TIMEOUT_SECONDS, env=("ENTRY_TIMEOUT", "ENTRY_TIMEOUT_SECONDS"),
                                            help="kernel entry cache lifetime")
    read_ahead_kb: int = option(fuse_kernel.READ_AHEAD_KB, env="READ_AHEAD_KB", help="the mount's kernel readahead")
    max_background: int = option(fuse_kernel.MAX_BACKGROUND, env="MAX_BACKGROUND",
                                 help="FUSE readahead requests the kernel keeps in flight")
    write_buffer_bytes: Size = option(256 << 20, env=("WRITE_BUFFER", "WRITE_BUFFER_BYTES"), default_text="256M",
                                      help="bytes of writes buffered in memory before they are sealed")
    upload_concurrency: int = option(16, env="UPLOAD_CONCURRENCY", help="parallel chunk uploads")
    flush_interval_seconds: Annotated[float, Field(gt=0)] = option(
        5.0, env=("FLUSH_INTERVAL", "FLUSH_INTERVAL_SECONDS"), flag="--flush-interval", metavar="SECONDS",
        help="embedded metadata: files closed are durable against power loss within this (fsync() at once)")
    fsync_waits_upload: bool = option(False, env="FSYNC_WAITS_UPLOAD", flag="--fsync-waits-upload",
                                      help="fsync returns only once the file is in the object store")
    chunk_wait_timeout_seconds: Seconds = option(
        300.0, env=("CHUNK_WAIT_TIMEOUT", "CHUNK_WAIT_TIMEOUT_SECONDS"),
        help="a read that needs a chunk the store cannot give yet fails with EIO after this")
    write_stall_timeout_seconds: Seconds = option(
        60.0, env=("WRITE_STALL_TIMEOUT", "WRITE_STALL_TIMEOUT_SECONDS"),
        help="a write that needs cache space fails with ENOSPC once no upload has finished for this long")
    upload_retry_max_seconds: Seconds = option(60.0, env=("UPLOAD_RETRY_MAX", "UPLOAD_RETRY_MAX_SECONDS"),
                                               help="the longest backoff between two attempts of a failing upload")
    shutdown_upload_grace_seconds: Seconds = option(
        10.0, env=("SHUTDOWN_UPLOAD_GRACE", "SHUTDOWN_UPLOAD_GRACE_SECONDS"),
        help="at unmount, how long pending uploads may still finish")
    metrics_address: str = option("", env="METRICS_ADDRESS", flag="--metrics-address", metavar="HOST:PORT",
                                  default_text="off", help="serve Prometheus metrics")
    s3_endpoint: str = option("", env="S3_ENDPOINT", flag="--s3-endpoint", metavar="URL", default_text="AWS",
                              help="S3 endpoint URL for MinIO, SeaweedFS, Ceph...")
    s3_region: str = option("", env="S3_REGION", help="S3 region (default: AWS config, else us-east-1)")
    s3_connect_timeout_seconds: Seconds = option(5.0, env=("S3_CONNECT_TIMEOUT", "S3_CONNECT_TIMEOUT_SECONDS"),
                                                 help="an S3 request that cannot connect fails (and is retried) after this")
    s3_read_timeout_seconds: Seconds = option(60.0, env=("S3_READ_TIMEOUT", "S3_READ_TIMEOUT_SECONDS"),
                                              help="an S3 connection silent this long fails (and the request is retried)")

    # ---- validation (runs once, in load()) -----------------------------------------------------
    @field_validator("state_dir", "cache_dir", "mountpoint", "meta_password_file", "peer_secret_file", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.abspath(os.path.expanduser(value)))

    @field_validator("state_dir", mode="after")
    @classmethod
    def _no_comma(cls, value: Path) -> Path:
        if "," in str(value):  # the state dir goes into the mount options
            raise ValueError("must not contain a comma")
        return value

    @field_validator("log_level", mode="after")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("use debug, info, warning or error")
        return value.lower()

    @field_validator("log_format", mode="after")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in ("json", "text"):
            raise ValueError("use json or text")
        return value

    @field_validator("meta", mode="after")
    @classmethod
    def _meta(cls, value: str) -> str:
        if value and (value.partition("://")[0] not in ("postgres", "postgresql", "lmdb") or "://" not in value):
            raise ValueError("unsupported metadata engine: use postgresql://USER@HOST:PORT/DB")
        return value

    @field_validator("volume", mode="after")
    @classmethod
    def _volume(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
            raise ValueError("letters, digits, '.', '_' and '-', at most 63")
        return value

    @field_validator("peer_listen", "metrics_address", mode="after")
    @classmethod
    def _address(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("expected HOST:PORT, e.g. 10.0.0.5:9400")
        return value

    @field_validator("upload_concurrency", "meta_concurrency", "max_background", mode="after")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @model_validator(mode="after")
    def _peer_needs_shared_meta(self) -> "Settings":
        if self.peer_listen:
            if not self.peer_listen.rpartition(":")[0]:
                raise ValueError("invalid --peer-listen: expected HOST:PORT, e.g. 10.0.0.5:9400")
            if not self.shared_meta:
                raise ValueError("--peer-listen needs a shared metadata engine (--meta postgresql://...)")
        return self

    # ---- derived values --------------------------------------------------------------------------
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

    def fleet_secret(self) -> bytes:
        """The fleet secret peers sign their requests with (at least 16 bytes)."""
        if self.peer_secret_file is not None:
            try:
                secret = self.peer_secret_file.read_bytes().strip()
            except OSError as exc:
                raise UsageError(f"cannot read the peer secret file {self.peer_secret_file}: {exc.strerror}") from None
        else:
            secret = self.peer_secret.get_secret_value().encode() if self.peer_secret else b""
        if len(secret) < 16:
            raise UsageError("--peer-listen needs the fleet secret (at least 16 bytes) in DATAFS_PEER_SECRET or --peer-secret-file")
        return secret

    def database_password(self) -> str | None:
        """The metadata engine's password, from a file or DATAFS_META_PASSWORD;
        None lets libpq use PGPASSWORD or ~/.pgpass."""
        if self.meta_password_file is not None:
            try:
                return self.meta_password_file.read_text().strip("\r\n")
            except OSError as exc:
                raise UsageError(f"cannot read the metadata password file {self.meta_password_file}: {exc.strerror}") from None
        return self.meta_password.get_secret_value() if self.meta_password else None

    def public(self) -> dict[str, Any]:
        """The effective settings for a log line: secrets masked, the database
        URL without its password."""
        out: dict[str, Any] = {}
        for name, value in self:
            if isinstance(value, SecretStr):
                value = "**********"
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        out["meta"] = _mask_url(self.meta)
        out["store"] = self.store_url
        return out


def _mask_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if sep and at and ":" in userinfo:
        return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"
    return url


# ---- the one entry point ---------------------------------------------------------------------------
def fields_with_flags() -> list[tuple[str, dict[str, Any]]]:
    """(field name, its declaration) of every option `datafs mount` takes as a flag."""
    return [(name, {**(info.json_schema_extra or {}), "help": info.description, "bool": info.annotation is bool,
                    "default": info.default})
            for name, info in Settings.model_fields.items() if (info.json_schema_extra or {}).get("flag")]


def env_names(name: str) -> list[str]:
    return list((Settings.model_fields[name].json_schema_extra or {}).get("env", []))


def load(**flags: Any) -> Settings:
    """Defaults, then DATAFS_* variables, then `flags` (None: not given);
    validated once. Mistakes are one-line `UsageError`s naming their source."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise UsageError(_one_line(exc, given)) from None


def _one_line(exc: ValidationError, given: dict[str, Any]) -> str:
    error = exc.errors(include_url=False)[0]
    message = error["msg"].removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if not error["loc"]:
        return message
    key = str(error["loc"][0])
    name = key if key in Settings.model_fields else next(
        (n for n in Settings.model_fields if key.upper() in env_names(n)), key)
    if name in given:
        flag = (Settings.model_fields[name].json_schema_extra or {}).get("flag")
        source = flag or name
    else:
        source = next((e for e in env_names(name) if e in os.environ), key.upper())
    value = error.get("input")
    shown = "" if isinstance(value, dict) or value is None else f" {str(value)!r}"
    return f"invalid {source}{shown}: {message}"
