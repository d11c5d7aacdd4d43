"""The object-store interface: one object per chunk, keyed by its id.

Object keys spread over prefixes (`chunks/ab/cd/<id>`) so any node can fetch any
chunk by id and dedup works across nodes. Implementations are blocking (boto3,
file I/O) and are called from worker threads with the store's own limiter.
They raise `errors.ChunkMissing` for an absent object and `errors.StoreError`
(with `temporary` set) for anything else; the callers retry temporary errors.
"""

from __future__ import annotations

import abc
from pathlib import Path

from ..errors import UsageError


def object_key(chunk_id: str, prefix: str = "") -> str:
    key = f"chunks/{chunk_id[:2]}/{chunk_id[2:4]}/{chunk_id}"
    return f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key


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

    def describe(self) -> str:
        return type(self).__name__


def open_store(url: str, *, s3_endpoint: str = "", s3_region: str = "") -> ObjectStore:
    """An object store by URL: `file:///path` or `s3://bucket[/prefix]`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise UsageError(f"invalid store URL {url!r}: expected file:///PATH or s3://BUCKET[/PREFIX]")
    if scheme == "file":
        from .file_store import FileStore

        if not rest.startswith("/"):
            raise UsageError(f"invalid store URL {url!r}: file:// needs an absolute path (file:///var/lib/x)")
        return FileStore(Path(rest))
    if scheme == "s3":
        try:
            from .s3_store import S3Store
        except ImportError:
            raise UsageError("the s3:// store is not available in this build") from None
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UsageError(f"invalid store URL {url!r}: missing bucket name")
        return S3Store(bucket, prefix, endpoint_url=s3_endpoint or None, region=s3_region or None)
    raise UsageError(f"unsupported store {scheme!r} in {url!r}: use file:// or s3://")
