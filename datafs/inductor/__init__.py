"""The Inductor compile-cache API: one worker compiles, every later worker loads.

`torch.compile` keeps everything it built in TORCHINDUCTOR_CACHE_DIR: FX graph
and AOTAutograd cache entries, C++ `.so` kernels on CPU, Triton kernels on GPU.
That directory stays local (`/tmp/inductor-cache/`, fast and private); a
snapshot of it is shared on the mount as one zip per GPU type and cache key:

    <DATA_DIR>/inductor-caches/<GPU_TYPE>/<cache_key>.zip

The three calls and their names match fal's toolkit, so apps written for it run
unchanged. Invariants:

- A published archive is always whole: it is written under a unique temporary
  name beside its destination, fsynced and renamed over it. A reader opens it
  once and reads that one version, old or new, never a torn one.
- Every archive carries a manifest (format, torch and Triton versions, GPU type,
  size and BLAKE3 of every file). Loading checks it, the CRCs and the digests
  before anything reaches the local cache; a corrupt, foreign or other-version
  archive is reported with a warning and ignored. Loading never raises for a bad
  archive and never leaves a half-extracted cache behind.
- Publishing merges: just before writing, the current shared archive is read
  again and its files are joined with the local ones (local wins on a name
  clash), and the rename happens only if the archive did not change meanwhile
  (else merge again). A per-key flock serializes publishers on one node; nothing
  depends on it: without it the worst case is that the last complete writer wins.
- Nothing is written when nothing is new: same inode, same mtime.
- Between load and sync torch runs with the settings of `torch_settings.py`
  (Dynamo's caching precompile, no precompiled C++ header), the same in every
  worker so the cache keys match; the app's own settings come back at sync.
- Workers that start together on a key with no usable archive compile it once:
  the first takes the key's lease, the others wait a bounded time for its
  archive (`lease.py`).

torch is imported only where it is needed (the mega-cache, GPU detection without
nvidia-smi) and never for the app: `import datafs.inductor` and the CLI stay
cheap, and the torch settings apply only once the app has imported torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import blake3

from . import lease
from .torch_settings import CompileSettings, prepare_compiler, unsavable_class

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("/data")
DEFAULT_LOCAL_DIR = Path("/tmp/inductor-cache/")
CACHES_DIRNAME = "inductor-caches"
MANIFEST_NAME = "datafs-manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("dir", "mega")
CPU_GPU_TYPE = "CPU"

PUBLISH_ATTEMPTS = 5
LOCK_TIMEOUT_SECONDS = 120.0
STALE_TEMP_SECONDS = 3600.0
_COPY_BLOCK_BYTES = 1 << 20
_ZIP64_LIMIT_BYTES = 1 << 31

# One '/'-separated part of a cache key. Parts starting with '.' are kept for
# the temporary and lock files that live beside the archives.
_KEY_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@,-]*")
_KEY_PART_MAX_BYTES = 200


class _Unusable(Exception):
    """The shared archive cannot be used (corrupt, foreign, other versions)."""


# What reading a damaged zip or manifest can raise (besides _Unusable).
_CORRUPTION_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, TypeError, AttributeError)


# ---- settings -----------------------------------------------------------------------------
def data_dir() -> Path:
    """The datafs mount holding shared caches: DATAFS_DATA_DIR, default /data."""
    return Path(os.environ.get("DATAFS_DATA_DIR") or DEFAULT_DATA_DIR)


def caches_root() -> Path:
    return data_dir() / CACHES_DIRNAME


def local_cache_dir() -> Path:
    """The local working cache torch writes into: DATAFS_INDUCTOR_LOCAL_DIR, default /tmp/inductor-cache/."""
    return Path(os.path.abspath(os.environ.get("DATAFS_INDUCTOR_LOCAL_DIR") or DEFAULT_LOCAL_DIR))


def _resolve_format(value: str | None) -> str:
    fmt = (value or os.environ.get("DATAFS_INDUCTOR_FORMAT") or "dir").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"invalid inductor cache format {fmt!r}: use 'dir' or 'mega'")
    return fmt


def validate_cache_key(cache_key: str) -> str:
    """Return the key if it names a file below the caches directory, else ValueError.

    Keys are relative '/'-separated names such as 'my-model/v1'; they become
    paths on a shared filesystem, so '..', absolute paths and empty parts are
    refused rather than normalized.
    """
    if not isinstance(cache_key, str):
        raise ValueError(f"invalid inductor cache key {cache_key!r}: expected a string such as 'my-model/v1'")
    hint = "use a relative name such as 'my-model/v1': letters, digits and '._+=@,-' in '/'-separated parts"
    if not cache_key:
        raise ValueError(f"invalid inductor cache key '': the key is empty; {hint}")
    if cache_key.startswith("/"):
        raise ValueError(f"invalid inductor cache key {cache_key!r}: absolute paths are not allowed; {hint}")
    for part in cache_key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"invalid inductor cache key {cache_key!r}: empty, '.' and '..' parts are not allowed; {hint}")
        if not _KEY_PART_RE.fullmatch(part) or len(part.encode()) > _KEY_PART_MAX_BYTES:
            raise ValueError(f"invalid inductor cache key {cache_key!r}: bad part {part!r}; {hint}")
    return cache_key


def validate_gpu_type(gpu_type: str) -> str:
    if not _KEY_PART_RE.fullmatch(gpu_type or ""):
        raise ValueError(f"invalid GPU type {gpu_type!r}: expected a short name such as H100 or CPU")
    return gpu_type


def archive_path(cache_key: str, gpu_type: str | None = None) -> Path:
    gpu = validate_gpu_type(gpu_type or get_gpu_type())
    return caches_root() / gpu / f"{validate_cache_key(cache_key)}.zip"


# ---- GPU type and versions -------------------------------------------------------------------
_VENDOR_WORDS = {"NVIDIA", "GEFORCE", "TESLA", "QUADRO", "AMD", "INSTINCT", "RADEON", "INTEL(R)", "INTEL"}
_FAMILY_WORDS = {"RTX", "GTX", "TITAN", "PRO"}
_detected_gpu_type: str | None = None


def short_gpu_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA A100-SXM4-80GB' -> 'A100',
    'NVIDIA GeForce RTX 4090' -> 'RTX4090', 'AMD Instinct MI300X' -> 'MI300X'.

    Data-centre names come out as fal's toolkit writes them, so its existing
    archives are found; families that fal would lump together ('GeForce') are
    kept apart, because caches must never mix GPU types.
    """
    words = [w for w in re.split(r"[\s\-]+", name.strip()) if w and w.upper() not in _VENDOR_WORDS]
    if not words:
        return "UNKNOWN"
    short = words[0]
    if short.upper() in _FAMILY_WORDS and len(words) > 1:
        short += words[1]
        if any(w.lower() == "ada" for w in words[2:]):
            short += "Ada"
    short = re.sub(r"[^A-Za-z0-9_.+=@,-]", "", short)
    return short if _KEY_PART_RE.fullmatch(short) else "UNKNOWN"


def get_gpu_type() -> str:
    """The accelerator model in short form (H100, A100, L40S, ...), or 'CPU'.

    DATAFS_GPU_TYPE overrides detection. Otherwise nvidia-smi is asked first
    (cheap, and it does not initialize CUDA in this process), then torch.
    """
    override = os.environ.get("DATAFS_GPU_TYPE")
    if override:
        return validate_gpu_type(override.strip())
    global _detected_gpu_type
    if _detected_gpu_type is None:
        _detected_gpu_type = _detect_gpu_type()
    return _detected_gpu_type


def _detect_gpu_type() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return short_gpu_name(out.stdout.strip().splitlines()[0])
    try:
        import torch

        if torch.cuda.is_available():
            return short_gpu_name(torch.cuda.get_device_name(0))
    except Exception:
        log.debug("torch could not report a GPU", exc_info=True)
    return CPU_GPU_TYPE


def _package_version(*names: str) -> str | None:
    import importlib.metadata

    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def torch_version() -> str | None:
    version = _package_version("torch")
    if version is None and "torch" in sys.modules:
        version = str(sys.modules["torch"].__version__)
    return version


def triton_version() -> str | None:
    return _package_version("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu")


def __getattr__(name: str) -> Any:
    # fal's toolkit exposes these as constants; here they follow the environment.
    if name == "DATA_DIR":
        return data_dir()
    if name == "GPU_TYPE":
        return get_gpu_type()
    if name == "LOCAL_INDUCTOR_CACHE_DIR":
        return local_cache_dir()
    if name == "GLOBAL_INDUCTOR_CACHES_DIR":
        return caches_root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- the local cache ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FileEntry:
    size: int
    digest: str | None  # BLAKE3 hex; None for archives written without a manifest
    mode: int = 0o644


def _hash_file(path: Path) -> tuple[int, str]:
    hasher = blake3.blake3()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_COPY_BLOCK_BYTES):
            hasher.update(block)
            size += len(block)
    return size, hasher.hexdigest()


def _skipped(rel: str) -> bool:
    """Files that are not cache content: torch's lock files and anyone's temporaries."""
    name = rel.rsplit("/", 1)[-1]
    return rel.startswith("locks/") or name.startswith(".") or name.endswith((".lock", ".tmp")) or rel == MANIFEST_NAME


def scan_local(root: Path) -> dict[str, FileEntry]:
    """Every cache file under root, by relative path, with size and content digest."""
    entries: dict[str, FileEntry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not (dirpath == str(root) and d == "locks")]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if _skipped(rel):
                continue
            try:
                st = os.lstat(path)
                if not (st.st_mode & 0o170000 == 0o100000):
                    continue
                size, digest = _hash_file(path)
            except FileNotFoundError:  # removed by torch while we looked
                continue
            entries[rel] = FileEntry(size, digest, 0o755 if st.st_mode & 0o111 else 0o644)
    return entries


def state_hash(entries: dict[str, FileEntry]) -> str:
    """Names, sizes and contents: a kernel rebuilt under the same name changes it."""
    hasher = blake3.blake3()
    for rel in sorted(entries):
        entry = entries[rel]
        hasher.update(f"{rel}\0{entry.size}\0{entry.digest}\n".encode())
    return hasher.hexdigest()


# ---- reading archives -----------------------------------------------------------------------
Stamp = tuple[int, int, int]


@dataclasses.dataclass
class Archive:
    """One version of a shared archive, held open so a concurrent rename cannot swap it."""

    path: Path
    stamp: Stamp | None = None  # (inode, size, mtime_ns); None when there is no archive
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, FileEntry] = dataclasses.field(default_factory=dict)  # format "dir"
    problem: str | None = None  # why it must not be loaded; None when usable
    legacy: bool = False  # written without a manifest (fal's toolkit)
    _file: Any = None
    zip: zipfile.ZipFile | None = None

    @property
    def exists(self) -> bool:
        return self.stamp is not None

    @property
    def usable(self) -> bool:
        return self.exists and self.problem is None

    @property
    def format(self) -> str:
        return str(self.manifest.get("format", "dir"))

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _current_stamp(path: Path) -> Stamp | None:
    try:
        return _stamp(os.stat(path))
    except FileNotFoundError:
        return None


def _safe_member(name: str) -> str:
    if not name or "\\" in name or "\0" in name or name.startswith("/"):
        raise _Unusable(f"unsafe member name {name!r}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise _Unusable(f"unsafe member name {name!r}")
    return name


def open_archive(path: Path, gpu_type: str | None = None, check_versions: bool = True) -> Archive:
    """Open and check one archive; `problem` says why it is not usable. Never raises for bad content."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return Archive(path)
    archive = Archive(path, _stamp(os.fstat(f.fileno())), _file=f)
    try:
        archive.zip = zipfile.ZipFile(f)
        _read_manifest(archive)
        if check_versions:
            _check_compatible(archive, gpu_type or get_gpu_type())
    except _Unusable as exc:
        archive.problem = str(exc)
    except _CORRUPTION_ERRORS as exc:
        archive.problem = f"corrupt archive ({exc.__class__.__name__}: {exc})"
    except OSError as exc:
        archive.problem = f"could not read it ({exc})"
    return archive


def _read_manifest(archive: Archive) -> None:
    assert archive.zip is not None
    infos = {info.filename: info for info in archive.zip.infolist()}
    if MANIFEST_NAME not in infos:
        # An archive from fal's toolkit: no versions to check, sizes from the zip itself.
        archive.legacy = True
        archive.manifest = {"format": "dir"}
        for name, info in infos.items():
            if info.is_dir():
                continue
            rel = _safe_member(name)
            if not _skipped(rel):
                mode = (info.external_attr >> 16) & 0o777
                archive.files[rel] = FileEntry(info.file_size, None, 0o755 if mode & 0o111 else 0o644)
        return
    try:
        manifest = json.loads(archive.zip.read(MANIFEST_NAME))
    except json.JSONDecodeError as exc:
        raise _Unusable(f"corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise _Unusable("corrupt manifest (no known format)")
    if int(manifest.get("manifest_version", 0)) > MANIFEST_VERSION:
        raise _Unusable(f"written by a newer datafs (manifest version {manifest.get('manifest_version')})")
    archive.manifest = manifest
    members = manifest.get("files", {}) if manifest["format"] == "dir" else manifest.get("blobs", {})
    for rel, meta in members.items():
        _safe_member(rel)
        info = infos.get(rel)
        if info is None or info.file_size != meta["size"]:
            raise _Unusable(f"corrupt archive: member {rel!r} is missing or has the wrong size")
        if manifest["format"] == "dir":
            mode = 0o755 if int(meta.get("mode", 0o644)) & 0o111 else 0o644
            archive.files[rel] = FileEntry(int(meta["size"]), str(meta["blake3"]), mode)


def _check_compatible(archive: Archive, gpu_type: str) -> None:
    if archive.legacy:
        return
    manifest = archive.manifest
    if manifest.get("gpu_type") != gpu_type:
        raise _Unusable(f"built for GPU type {manifest.get('gpu_type')}, this machine is {gpu_type}")
    for what, mine in (("torch", torch_version()), ("triton", triton_version())):
        if manifest.get(what) != mine:
            raise _Unusable(f"built with {what} {manifest.get(what) or 'none'}, this process has {what} {mine or 'none'}")


def _read_member(archive: Archive, rel: str, entry_size: int, digest: str | None, sink: Callable[[bytes], None]) -> None:
    """Stream one member to sink; the zip checks its CRC at the end, we check BLAKE3."""
    assert archive.zip is not None
    hasher = blake3.blake3()
    size = 0
    with archive.zip.open(rel) as member:
        while block := member.read(_COPY_BLOCK_BYTES):
            hasher.update(block)
            size += len(block)
            sink(block)
    if size != entry_size or (digest is not None and hasher.hexdigest() != digest):
        raise _Unusable(f"corrupt archive: member {rel!r} does not match its manifest")


# ---- loading --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Loaded:
    """What load saw of the shared archive, so sync knows whether it must repair it."""

    usable: bool


_loaded: dict[str, _Loaded] = {}
_leases: dict[str, lease.Lease] = {}  # archive path -> the compile lease this process holds
#: Where the last load's time went (seconds): waiting for another worker's
#: archive, reading and unpacking it, and preparing the compiler.
load_timings: dict[str, float] = {}
_settings = CompileSettings()


def load_inductor_cache(cache_key: str, *, format: str | None = None) -> str:
    """Point torch at the local working cache, fill it from the shared archive if
    there is a usable one, and return the hash of the local cache's state.

    A missing, corrupt or incompatible archive is logged and skipped: torch then
    compiles as if there were no cache, and `sync_inductor_cache` publishes a good one.
    If another worker is compiling the same key right now (it holds the key's
    lease), this one waits for its archive first, at most
    DATAFS_INDUCTOR_WAIT_SECONDS (see `lease.py`).
    """
    key = validate_cache_key(cache_key)
    _resolve_format(format)  # a bad format is a mistake to report now, not at sync
    wait_seconds = lease.wait_budget_seconds()  # likewise a bad wait budget
    local = local_cache_dir()
    local.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(local)
    _warn_if_caches_disabled()
    _settings.apply()
    usable = False
    path: Path | None = None
    try:
        path = archive_path(key)
        load_timings.clear()
        started = time.perf_counter()
        usable = _load_shared(path, local, wait_seconds)
        load_timings["archive_seconds"] = round(time.perf_counter() - started - load_timings.get("wait_seconds", 0.0), 3)
        started = time.perf_counter()
        prepare_compiler(cpu=get_gpu_type() == CPU_GPU_TYPE)  # after unpacking: the probe's libraries are in the cache
        load_timings["prepare_compiler_seconds"] = round(time.perf_counter() - started, 3)
    except Exception:
        log.warning("could not load the shared inductor cache %s; compiling without it", path or key, exc_info=True)
    if path is not None:
        _loaded[str(path)] = _Loaded(usable)
    return state_hash(scan_local(local))


def _load_shared(path: Path, local: Path, wait_seconds: float) -> bool:
    """Load the archive; if there is no usable one, take the key's lease and
    compile, or wait for the worker that holds it."""
    root = data_dir()
    if not root.is_dir():
        log.warning("data dir %s does not exist: the inductor cache is not shared (set DATAFS_DATA_DIR)", root)
        return False
    loaded, seen = _load_archive(path, local)
    if loaded or wait_seconds <= 0 or str(path) in _leases:
        return loaded
    path.parent.mkdir(parents=True, exist_ok=True)
    held = lease.try_acquire(path)
    if held is None:
        waited = time.perf_counter()
        outcome = lease.wait_for_holder(path, lambda: _current_stamp(path) != seen, wait_seconds)
        load_timings["wait_seconds"] = round(time.perf_counter() - waited, 3)
        if outcome == "published":
            loaded, seen = _load_archive(path, local)
            if loaded:
                return True
        else:
            log.info("going on without the other worker's archive of %s: %s", path.name, outcome)
        held = lease.try_acquire(path)  # its holder is gone: the others may now wait for this one
    if held is not None:
        _leases[str(path)] = held
    return False


def _load_archive(path: Path, local: Path) -> tuple[bool, Stamp | None]:
    """Whether the archive was loaded, and which version of it was looked at."""
    started = time.monotonic()
    with open_archive(path) as archive:
        if not archive.exists:
            log.info("no shared inductor cache at %s", path)
            return False, None
        if archive.problem:
            log.warning("ignoring the shared inductor cache %s: %s", path, archive.problem)
            return False, archive.stamp
        try:
            if archive.format == "mega":
                count = _load_mega(archive)
            else:
                count = _extract(archive, local)
        except _Unusable as exc:
            log.warning("ignoring the shared inductor cache %s: %s", path, exc)
            return False, archive.stamp
        except _CORRUPTION_ERRORS as exc:
            log.warning("ignoring the shared inductor cache %s: corrupt archive (%s: %s)", path, exc.__class__.__name__, exc)
            return False, archive.stamp
        except OSError as exc:
            log.warning("ignoring the shared inductor cache %s: could not unpack it (%s)", path, exc)
            return False, archive.stamp
    log.info("loaded the shared inductor cache %s", path,
             extra={"files": count, "seconds": round(time.monotonic() - started, 3)})
    return True, archive.stamp


def _extract(archive: Archive, local: Path) -> int:
    """Unpack every member into a private directory first, then move files into
    place: a corrupt member leaves the local cache exactly as it was."""
    incoming = local / f".datafs-incoming-{os.getpid()}-{secrets.token_hex(4)}"
    incoming.mkdir()
    try:
        for rel, entry in archive.files.items():
            target = incoming / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                _read_member(archive, rel, entry.size, entry.digest, out.write)
            os.chmod(target, entry.mode)
        moved = 0
        for rel in archive.files:
            dest = local / rel
            if dest.exists():  # the local copy wins, as in a merge
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(incoming / rel, dest)
            moved += 1
        return moved
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def _load_mega(archive: Archive) -> int:
    compiler = _torch_compiler_with_mega_cache()
    if compiler is None:
        raise _Unusable("it is a mega-cache and this torch has no torch.compiler.load_cache_artifacts")
    blobs = []
    for rel, meta in archive.manifest.get("blobs", {}).items():
        chunks: list[bytes] = []
        _read_member(archive, rel, int(meta["size"]), str(meta["blake3"]), chunks.append)
        blobs.append(b"".join(chunks))
    loaded = 0
    for blob in blobs:  # verified first, loaded after: nothing half-applied on corruption
        if compiler.load_cache_artifacts(blob) is None:
            raise _Unusable("torch could not read the mega-cache artifacts")
        loaded += 1
    return loaded


def _torch_compiler_with_mega_cache() -> Any:
    import torch

    compiler = getattr(torch, "compiler", None)
    if compiler is None or not hasattr(compiler, "save_cache_artifacts") or not hasattr(compiler, "load_cache_artifacts"):
        return None
    return compiler


def _warn_if_caches_disabled() -> None:
    off = [var for var in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")
           if os.environ.get(var, "").strip().lower() in ("0", "false")]
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is not None and getattr(inductor_config, "fx_graph_cache", True) is False:
        off.append("torch._inductor.config.fx_graph_cache")
    if off:
        log.warning("%s disabled: compiled graphs will not be reused from the shared cache", ", ".join(off))


# ---- publishing -----------------------------------------------------------------------------
def sync_inductor_cache(cache_key: str, dir_hash: str, *, format: str | None = None) -> None:
    """Publish the local cache if it changed since `dir_hash` (merged with
    whatever other workers published meanwhile); do nothing otherwise. Then
    release the key's compile lease if this worker held it.

    Failures are logged, not raised: a worker that cannot publish still serves.
    """
    key = validate_cache_key(cache_key)
    fmt = _resolve_format(format)
    _settings.save_entries()
    _settings.restore()
    path: Path | None = None
    try:
        path = archive_path(key)
        _sync(path, fmt, dir_hash)
    except Exception:
        log.warning("could not publish the inductor cache %s", path or key, exc_info=True)
    finally:
        held = _leases.pop(str(path), None) if path is not None else None
        if held is not None:
            held.release()


def _sync(path: Path, fmt: str, dir_hash: str) -> None:
    local = local_cache_dir()
    if not local.is_dir():
        log.info("no local inductor cache at %s: nothing to publish", local)
        return
    if not data_dir().is_dir():
        log.warning("data dir %s does not exist: the inductor cache is not shared (set DATAFS_DATA_DIR)", data_dir())
        return
    loaded = _loaded.get(str(path))
    entries = scan_local(local)
    unchanged = bool(dir_hash) and state_hash(entries) == dir_hash
    # A shared archive that was missing or unusable at load is replaced even
    # if this worker compiled nothing new (its local cache may be warm).
    if unchanged and (loaded is None or loaded.usable):
        log.debug("inductor cache unchanged: nothing to publish", extra={"archive": str(path)})
        return
    if fmt == "mega":
        compiler = _torch_compiler_with_mega_cache()
        if compiler is None:
            log.warning("this torch has no mega-cache (torch.compiler.save_cache_artifacts); publishing the directory form")
            fmt = "dir"
    if fmt == "mega":
        published = _publish(path, _MegaPlan(compiler))
    else:
        if not entries:
            return
        published = _publish(path, _DirPlan(local, entries))
    if published:
        _loaded[str(path)] = _Loaded(True)


@contextlib.contextmanager
def synchronized_inductor_cache(cache_key: str, *, format: str | None = None) -> Iterator[None]:
    """Load the shared cache on entry; publish what was compiled on exit, also
    when the body raises (kernels compiled before the error are still good)."""
    dir_hash = load_inductor_cache(cache_key, format=format)
    try:
        yield
    except Exception as exc:
        if _settings.precompile and unsavable_class(exc):
            log.error("torch cannot precompile this model: a class it guards on is defined inside a function or "
                      "another class; define it at module level, or set DATAFS_INDUCTOR_PRECOMPILE=0")
        raise
    finally:
        sync_inductor_cache(cache_key, dir_hash, format=format)


class _DirPlan:
    """Publish the local cache directory, joined with the shared archive's files."""

    format = "dir"

    def __init__(self, local: Path, entries: dict[str, FileEntry]):
        self.local = local
        self.entries = entries

    def has_news(self, base: Archive | None) -> bool:
        if base is None or base.legacy:
            return bool(self.entries)
        return any((e.size, e.digest) != ((b.size, b.digest) if (b := base.files.get(rel)) else None)
                   for rel, e in self.entries.items())

    def write(self, out: zipfile.ZipFile, base: Archive | None) -> dict[str, Any]:
        files: dict[str, dict[str, Any]] = {}
        names = set(self.entries) | (set(base.files) if base else set())
        for rel in sorted(names):
            mine = self.entries.get(rel)
            if mine is not None:
                try:
                    with open(self.local / rel, "rb") as src:
                        files[rel] = _write_member(out, rel, mine.mode, os.fstat(src.fileno()).st_size,
                                                   lambda sink, src=src: _copy_stream(src, sink))
                    continue
                except FileNotFoundError:  # torch replaced or removed it since the scan
                    if base is None or rel not in base.files:
                        continue
            assert base is not None
            theirs = base.files[rel]
            files[rel] = _write_member(out, rel, theirs.mode, theirs.size,
                                       lambda sink, rel=rel, e=theirs: _read_member(base, rel, e.size, e.digest, sink))
        return {"files": files}


class _MegaPlan:
    """Publish torch's portable mega-cache: the artifacts this process compiled or used.

    An archive holds one blob per publishing worker; a blob whose artifacts are
    all in ours is dropped, so workers that compiled the same graphs don't pile up.
    """

    format = "mega"

    def __init__(self, compiler: Any):
        result = compiler.save_cache_artifacts()
        self.blob, info = result if result else (b"", None)
        self.keys: dict[str, list[str]] = {kind: sorted(set(keys)) for kind, keys in (info.artifacts.items() if info else ()) if keys}
        self.digest = blake3.blake3(self.blob).hexdigest()

    def _key_set(self, keys: dict[str, list[str]]) -> set[tuple[str, str]]:
        return {(kind, key) for kind, names in keys.items() for key in names}

    def has_news(self, base: Archive | None) -> bool:
        if not self.blob:
            return False
        if base is None:
            return True
        theirs: set[tuple[str, str]] = set()
        for meta in base.manifest.get("blobs", {}).values():
            theirs |= self._key_set(meta.get("artifacts", {}))
        return not self._key_set(self.keys) <= theirs

    def write(self, out: zipfile.ZipFile, base: Archive | None) -> dict[str, Any]:
        ours = self._key_set(self.keys)
        blobs: dict[str, dict[str, Any]] = {}
        for rel, meta in (base.manifest.get("blobs", {}).items() if base else ()):
            if self._key_set(meta.get("artifacts", {})) <= ours:
                continue
            assert base is not None
            blobs[rel] = _write_member(out, rel, 0o644, int(meta["size"]),
                                       lambda sink, rel=rel, m=meta: _read_member(base, rel, int(m["size"]), str(m["blake3"]), sink))
            blobs[rel]["artifacts"] = meta.get("artifacts", {})
        rel = f"mega/{self.digest}.bin"
        blobs[rel] = _write_member(out, rel, 0o644, len(self.blob), lambda sink: sink(self.blob))
        blobs[rel]["artifacts"] = self.keys
        return {"blobs": blobs}


def _copy_stream(src: Any, sink: Callable[[bytes], None]) -> None:
    while block := src.read(_COPY_BLOCK_BYTES):
        sink(block)


def _write_member(out: zipfile.ZipFile, rel: str, mode: int, size_hint: int,
                  produce: Callable[[Callable[[bytes], None]], Any]) -> dict[str, Any]:
    """Write one member, hashing exactly the bytes that went in (the manifest
    must describe the archive, even if the source changed since it was scanned)."""
    info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    # Level 1: caches are large and mostly compiled code; speed matters more than the last 10 %.
    setattr(info, "compress_level" if hasattr(info, "compress_level") else "_compresslevel", 1)
    info.external_attr = (0o100000 | mode) << 16
    hasher = blake3.blake3()
    size = 0

    def sink(block: bytes) -> None:
        nonlocal size
        hasher.update(block)
        size += len(block)
        dest.write(block)

    with out.open(info, "w", force_zip64=size_hint >= _ZIP64_LIMIT_BYTES) as dest:
        produce(sink)
    return {"size": size, "blake3": hasher.hexdigest(), "mode": mode}


def _publish(path: Path, plan: _DirPlan | _MegaPlan) -> bool:
    """Merge with the shared archive and rename a complete new one over it.

    The rename happens only if the archive is still the version that was merged;
    otherwise the merge is redone (up to PUBLISH_ATTEMPTS, then last writer wins).
    Returns whether anything was written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    started = time.monotonic()
    ignore_shared = False
    with _publisher_lock(path):
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            with open_archive(path) as shared:
                base = None
                if shared.usable and shared.format == plan.format and not ignore_shared:
                    base = shared
                elif shared.exists and shared.usable and not ignore_shared:
                    log.warning("replacing the %s-format inductor cache %s with a %s-format one: use one format per key",
                                shared.format, path, plan.format)
                elif shared.exists:
                    log.info("replacing the shared inductor cache %s: %s", path, shared.problem or "corrupt")
                if not plan.has_news(base):
                    log.debug("the shared inductor cache %s already has everything: nothing to publish", path)
                    return False
                tmp = _temp_path(path)
                try:
                    _write_archive(tmp, plan, base)
                except (_Unusable, *_CORRUPTION_ERRORS) as exc:
                    _unlink(tmp)
                    if base is None:
                        raise
                    log.warning("the shared inductor cache %s is corrupt (%s): replacing it", path, exc)
                    ignore_shared = True
                    continue
                except BaseException:
                    _unlink(tmp)
                    raise
            if attempt < PUBLISH_ATTEMPTS and _current_stamp(path) != shared.stamp:
                log.info("the shared inductor cache %s changed while merging: merging again", path)
                _unlink(tmp)
                continue
            os.rename(tmp, path)
            _fsync_dir(path.parent)
            log.info("published the inductor cache %s", path,
                     extra={"format": plan.format, "seconds": round(time.monotonic() - started, 3)})
            return True
    return False


def _write_archive(tmp: Path, plan: _DirPlan | _MegaPlan, base: Archive | None) -> None:
    with open(tmp, "xb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as out:
            body = plan.write(out, base)
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "format": plan.format,
                "gpu_type": get_gpu_type(),
                "torch": torch_version(),
                "triton": triton_version(),
                "created": time.time(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                **body,
            }
            info = zipfile.ZipInfo(MANIFEST_NAME, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100000 | 0o644) << 16
            out.writestr(info, json.dumps(manifest, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())


def _temp_path(path: Path) -> Path:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64]
    return path.parent / f".{path.name}.tmp-{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _remove_stale_temps(path: Path) -> None:
    """Temporaries left by a worker that died while publishing."""
    prefix = f".{path.name}.tmp-"
    cutoff = time.time() - STALE_TEMP_SECONDS
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            with contextlib.suppress(OSError):
                if os.stat(path.parent / name).st_mtime < cutoff:
                    os.unlink(path.parent / name)


@contextlib.contextmanager
def _publisher_lock(path: Path) -> Iterator[None]:
    """Serialize publishers of one key on this node (best effort, see the module doc)."""
    try:
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        log.debug("no publish lock for %s: %s", path, exc)
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.info("another worker holds the publish lock of %s for %.0f s: publishing without it",
                             path, LOCK_TIMEOUT_SECONDS)
                    break
                time.sleep(0.05)
            except OSError as exc:  # e.g. ENOLCK: locks not supported here
                log.debug("no publish lock for %s: %s", path, exc)
                break
        yield
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EBADF):
            log.debug("fsync of %s failed: %s", path, exc)
    finally:
        os.close(fd)


# ---- listing, inspecting, removing (the CLI) -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CacheListing:
    gpu_type: str
    key: str
    path: Path
    size_bytes: int
    mtime: float


def _gpu_dirs(gpu_type: str | None) -> list[Path]:
    root = caches_root()
    if gpu_type:
        return [root / validate_gpu_type(gpu_type)]
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def list_caches(gpu_type: str | None = None) -> list[CacheListing]:
    found = []
    for gpu_dir in _gpu_dirs(gpu_type):
        for dirpath, dirnames, filenames in os.walk(gpu_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or not name.endswith(".zip"):
                    continue
                path = Path(dirpath) / name
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                key = path.relative_to(gpu_dir).as_posix()[: -len(".zip")]
                found.append(CacheListing(gpu_dir.name, key, path, st.st_size, st.st_mtime))
    return found


def find_caches(cache_key: str, gpu_type: str | None = None) -> list[CacheListing]:
    key = validate_cache_key(cache_key)
    return [c for c in list_caches(gpu_type) if c.key == key]


def remove_cache(cache_key: str, gpu_type: str | None = None) -> list[Path]:
    """Remove a key's archives (every GPU type unless one is given), with their
    lock, lease and temporary files and the directories that become empty."""
    removed = []
    for cache in find_caches(cache_key, gpu_type):
        _unlink(cache.path)
        removed.append(cache.path)
        prefix = f".{cache.path.name}."
        for name in os.listdir(cache.path.parent):
            if name.startswith(prefix) and (name.endswith((".lock", ".lease")) or ".tmp-" in name):
                _unlink(cache.path.parent / name)
        parent = cache.path.parent
        gpu_dir = caches_root() / cache.gpu_type
        while parent != gpu_dir and parent.is_relative_to(gpu_dir):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
    return removed


def describe_archive(path: Path) -> dict[str, Any]:
    """What `datafs inductor stats` shows: versions, integrity, files and kernels."""
    with open_archive(path, check_versions=False) as archive:
        if not archive.exists:
            raise FileNotFoundError(path)
        manifest = archive.manifest
        out: dict[str, Any] = {
            "path": str(path),
            "size_bytes": archive.stamp[1] if archive.stamp else 0,
            "mtime": archive.stamp[2] / 1e9 if archive.stamp else 0.0,
            "format": archive.format,
            "legacy": archive.legacy,
            "gpu_type": manifest.get("gpu_type"),
            "torch": manifest.get("torch"),
            "triton": manifest.get("triton"),
            "host": manifest.get("host"),
            "problem": archive.problem,
        }
        if archive.problem is None and archive.zip is not None:
            try:
                bad = archive.zip.testzip()
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                bad = str(exc)
            if bad:
                out["problem"] = f"corrupt archive (bad member {bad})"
        if archive.format == "mega":
            blobs = manifest.get("blobs", {})
            artifacts: dict[str, set[str]] = {}
            for meta in blobs.values():
                for kind, keys in meta.get("artifacts", {}).items():
                    artifacts.setdefault(kind, set()).update(keys)
            out.update(blobs=len(blobs), artifacts={k: len(v) for k, v in sorted(artifacts.items())},
                       uncompressed_bytes=sum(int(m["size"]) for m in blobs.values()))
        else:
            out.update(count_kernels(archive.files))
        return out


def count_kernels(files: dict[str, FileEntry]) -> dict[str, Any]:
    """Count cache entries by kind from their paths in the Inductor cache layout."""
    names = list(files)
    cpp = sum(1 for n in names if n.endswith(".so") and not n.startswith("triton/"))
    triton = sum(1 for n in names if n.startswith("triton/") and n.endswith((".cubin", ".hsaco", ".spv")))
    return {
        "files": len(names),
        "uncompressed_bytes": sum(e.size for e in files.values()),
        "fx_graphs": sum(1 for n in names if n.startswith("fxgraph/")),
        "aot_autograd": sum(1 for n in names if n.startswith("aotautograd/")),
        "cpp_kernels": cpp,
        "triton_kernels": triton,
        "kernels": cpp + triton,
    }
