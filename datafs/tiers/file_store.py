"""The embedded default object store: a directory, for one node with no server.

It usually shares a disk with the chunk cache, so `put_file` hard-links the
cache file instead of copying it: each byte written is on disk once, and the
cache can evict its name while the store keeps the data. Across filesystems it
falls back to copy, fsync, rename.

Like S3's PUT, `put_file` returns once the object is durable: the file is
fsynced before its rename into place and the directory after it. The cache
writes chunks without fsync on the embedded engine (durability.py), and a
chunk the store has may leave the cache at once, so the store's copy must not
depend on the cache's flush. It is the uploader's thread that waits, not a
writer.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .. import metrics
from ..chunks.cache import fsync_path
from ..errors import ChunkMissing, StoreError, UsageError
from .store import ObjectStore, StoredChunk, is_chunk_id, object_key


class FileStore(ObjectStore):
    tier = "store"

    def __init__(self, root: Path, create: bool = True):
        self.root = Path(root)
        # A directory someone names must exist already: when it is a mount
        # (NFS, a second disk) that is missing, creating it would quietly put
        # the chunks on the wrong disk. The default inside the state dir is
        # datafs's own and is created.
        self.create = create

    def describe(self) -> str:
        return f"file://{self.root}"

    def check(self) -> None:
        if not self.create and not self.root.is_dir():
            raise UsageError(f"store directory {self.root} does not exist: create it first (mkdir -p {self.root}), "
                             "or leave out --store for the embedded store in the state dir")
        try:
            (self.root / "chunks").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot use store directory {self.root}: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise UsageError(f"store directory {self.root} is not writable")

    def _path(self, chunk_id: str) -> Path:
        return self.root / object_key(chunk_id)

    def put_file(self, chunk_id: str, path: Path) -> None:
        with metrics.store_request("PUT"):
            self._put_file(chunk_id, path)

    def _put_file(self, chunk_id: str, path: Path) -> None:
        final = self._path(chunk_id)
        if final.exists():
            return
        new_directory = not final.parent.is_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / uuid.uuid4().hex
        try:
            try:
                os.link(path, tmp)
                linked = True
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                linked = False
            if linked:
                fsync_path(tmp)
            else:
                with open(path, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
            os.rename(tmp, final)
            fsync_path(final.parent)
            if new_directory:  # the fan-out directories' own entries (chunks/ab/cd)
                fsync_path(final.parent.parent)
                fsync_path(final.parent.parent.parent)
        except FileNotFoundError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"chunk file {path} vanished before upload: {exc}", temporary=False) from None
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"writing {final}: {exc}", temporary=True) from None

    def get(self, chunk_id: str) -> bytes:
        with metrics.store_request("GET"):
            try:
                with open(self._path(chunk_id), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                raise ChunkMissing(chunk_id) from None
            except OSError as exc:
                raise StoreError(f"reading chunk {chunk_id}: {exc}", temporary=True) from None

    def exists(self, chunk_id: str) -> bool:
        with metrics.store_request("HEAD"):
            return self._path(chunk_id).exists()

    def delete(self, chunk_id: str) -> None:
        with metrics.store_request("DELETE"):
            self._path(chunk_id).unlink(missing_ok=True)

    def list_chunks(self) -> Iterator[StoredChunk]:
        """In id order. The age is the file's ctime, which its hard link (or
        rename) into the store set: its mtime is when the chunk was written
        to the cache, which can be much earlier than its upload."""
        try:
            for first in _subdirs(self.root / "chunks"):
                for second in _subdirs(first):
                    with metrics.store_request("LIST"):  # a page: one directory of chunks
                        entries = sorted(_scandir(second), key=lambda e: e.name)
                    for entry in entries:
                        if not is_chunk_id(entry.name) or object_key(entry.name) != f"chunks/{first.name}/{second.name}/{entry.name}":
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # deleted while listing
                        yield StoredChunk(entry.name, st.st_size, st.st_ctime)
        except OSError as exc:
            raise StoreError(f"listing {self.root}: {exc}", temporary=True) from None


def _scandir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _subdirs(path: Path) -> list[Path]:
    return [Path(e.path) for e in sorted(_scandir(path), key=lambda e: e.name) if e.is_dir(follow_symlinks=False)]
