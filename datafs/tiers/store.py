"""The object-store interface: one object per chunk, keyed by its id.

Object keys spread over prefixes (`chunks/ab/cd/<id>`) so any node can fetch any
chunk by id and dedup works across nodes. Implementations are blocking (boto3,
file I/O) and are called from worker threads with the store's own limiter.
They raise `errors.ChunkMissing` for an absent object and `errors.StoreError`
(with `temporary` set) for anything else; the callers retry temporary errors.
"""

from __future__ import annotations

import abc
import string
from pathlib import Path
from typing import Iterator, NamedTuple

from ..errors import UsageError

_HEX = frozenset(string.hexdigits.lower())


def object_key(chunk_id: str, prefix: str = "") -> str:
    key = f"chunks/{chunk_id[:2]}/{chunk_id[2:4]}/{chunk_id}"
    return f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key


def is_chunk_id(name: str) -> bool:
    """Whether `name` is a chunk id (64 lower-case hex digits), so a listing
    can skip whatever else lives under the prefix."""
    return len(name) == 64 and _HEX.issuperset(name)


class StoredChunk(NamedTuple):
    """One chunk object, as a listing shows it."""

    chunk_id: str
    size_bytes: int
    #: Unix time the object arrived (S3 LastModified, a file's ctime): fsck
    #: leaves unreferenced objects younger than the GC grace alone.
    modified: float


class ObjectStore(abc.ABC):
    #: Short name for logs and metrics labels.
    tier = "store"

    @abc.abstractmethod
    def check(self) -> None:
        """Fail fast at mount time (unreachable, missing bucket, bad credentials): raise UsageError."""

    @abc.abstractmethod
    def put_file(self, chunk_id: str, path: Path) -> None:
        """Store the complete chunk file at `path` under `chunk_id`."""

    @abc.abstractmethod
    def get(self, chunk_id: str) -> bytes:
        """The chunk's bytes (unverified). Raises ChunkMissing if absent."""

    @abc.abstractmethod
    def exists(self, chunk_id: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, chunk_id: str) -> None: ...

    def list_chunks(self) -> Iterator[StoredChunk]:
        """Every chunk object in the store, for fsck. Blocking and paged
        underneath: consume it from a worker thread, a batch at a time.
        Not abstract, so wrappers need not list; fsck then asks `exists`
        chunk by chunk and cannot look for unreferenced objects."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its objects")

    def describe(self) -> str:
        return type(self).__name__


def open_store(url: str, *, s3_endpoint: str = "", s3_region: str = "", s3_timeouts: dict | None = None,
               create_under: Path | None = None) -> ObjectStore:
    """An object store by URL: `file:///path` or `s3://bucket[/prefix]`. A
    file:// directory must exist, unless it lies under `create_under` (the
    state dir, whose default store datafs creates)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise UsageError(f"invalid store URL {url!r}: expected file:///PATH or s3://BUCKET[/PREFIX]")
    if scheme == "file":
        from .file_store import FileStore

        if not rest.startswith("/"):
            raise UsageError(f"invalid store URL {url!r}: file:// needs an absolute path (file:///var/lib/x)")
        root = Path(rest)
        return FileStore(root, create=create_under is not None and root.is_relative_to(create_under))
    if scheme == "s3":
        try:
            from .s3_store import S3Store
        except ImportError:
            raise UsageError("the s3:// store is not available in this build") from None
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UsageError(f"invalid store URL {url!r}: missing bucket name")
        return S3Store(bucket, prefix, endpoint_url=s3_endpoint or None, region=s3_region or None, **(s3_timeouts or {}))
    raise UsageError(f"unsupported store {scheme!r} in {url!r}: use file:// or s3://")
