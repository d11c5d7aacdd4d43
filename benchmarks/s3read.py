"""The least a Python FUSE daemon can do to serve a cold read from the object
store: the pyfuse3 ceiling of the cold-read row.

`python -m benchmarks.s3read MOUNTPOINT --endpoint URL --bucket B --prefix P
--objects N` shows one read-only file, `MOUNTPOINT/cold`, made of N objects of
4 MiB each, named as datafs names chunks under P (`block_ids`: chunk-like
names, not hashes of the bytes), in the foreground, until it is unmounted or
gets SIGTERM or SIGINT (then it unmounts itself). Credentials come from the
environment (AWS_ACCESS_KEY_ID, ...), as boto3 reads them.

A read of block i starts GETs of blocks i .. i+WINDOW-1 that are not in
flight yet (the read-ahead a cold sequential reader needs: a GET's latency is
hidden behind the ones before it), each in a worker thread, and waits for
block i. Each GET is datafs's own (`S3Store.get`: one signed request on
boto3's pool, the cheapest this project has found), so the two differ only
in what datafs does around it. The bytes stay in memory until the read of a
block's last byte, and are handed to the kernel as they are. Nothing else:
no hashing, no disk cache, no metadata. Whatever a real daemon (datafs: verify the
hash, keep the chunk in its cache) does on top can only be slower, so on this
machine a cold read through pyfuse3 cannot beat this one. It mounts with
datafs's kernel settings (`datafs.fuse_kernel`) and its window is datafs's
prefetch window.
"""

from __future__ import annotations

import argparse
import errno
import logging
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

from datafs import fuse_kernel
from datafs.chunks import chunk_id
from datafs.tiers.s3_store import S3Store

from .passthrough import serve

BLOCK_BYTES = 4 << 20
#: GETs in flight ahead of the reader: datafs's prefetch window (`prefetch_chunks`).
WINDOW = 16
FILE_NAME = b"cold"
FILE_INODE = pyfuse3.ROOT_INODE + 1
#: Attributes never change: the kernel may keep them for the whole run.
ATTR_TIMEOUT_SECONDS = 300


def block_ids(count: int) -> list[str]:
    """The names of the file's blocks in the bucket: chunk ids, so that
    `S3Store` finds them where it finds datafs's chunks."""
    return [chunk_id(b"s3read block %d" % i) for i in range(count)]


class _Block:
    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: Exception | None = None


class ColdFile(pyfuse3.Operations):
    def __init__(self, store: S3Store, keys: list[str]):
        super().__init__()
        self.store, self.keys = store, keys
        self.nursery: trio.Nursery | None = None  # where the GETs run: set once the loop runs
        self.size_bytes = len(keys) * BLOCK_BYTES
        self.blocks: dict[int, _Block] = {}
        self.limiter = trio.CapacityLimiter(WINDOW)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.attr_timeout = attrs.entry_timeout = ATTR_TIMEOUT_SECONDS
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode, attrs.st_nlink = stat.S_IFDIR | 0o555, 2
        else:
            attrs.st_mode, attrs.st_nlink, attrs.st_size = stat.S_IFREG | 0o444, 1, self.size_bytes
        return attrs

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INODE)

    async def open(self, inode, flags, ctx):
        if flags & (1 | 2):  # O_WRONLY, O_RDWR
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        end = min(off + size, self.size_bytes)
        pieces = []
        while off < end:
            index, start = divmod(off, BLOCK_BYTES)
            stop = min(BLOCK_BYTES, end - index * BLOCK_BYTES)
            for ahead in range(index, min(index + WINDOW, len(self.keys))):
                if ahead not in self.blocks:
                    self.blocks[ahead] = _Block()
                    self.nursery.start_soon(self._fetch, ahead)
            block = self.blocks[index]
            await block.done.wait()
            if block.error is not None:
                del self.blocks[index]
                raise pyfuse3.FUSEError(errno.EIO)
            pieces.append(memoryview(block.data)[start:stop])
            if stop == BLOCK_BYTES:  # its last byte is read: a sequential reader is done with it
                del self.blocks[index]
            off = index * BLOCK_BYTES + stop
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _fetch(self, index: int) -> None:
        block = self.blocks[index]
        try:
            block.data = await trio.to_thread.run_sync(self.store.get, self.keys[index], limiter=self.limiter)
        except Exception as exc:  # the reader reports it as EIO
            logging.getLogger(__name__).error("GET %s failed: %s", self.keys[index], exc)
            block.error = exc
        finally:
            block.done.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.s3read",
                                     description="Serve N 4 MiB objects as MOUNTPOINT/cold through pyfuse3 (foreground).")
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--endpoint", required=True, help="S3 endpoint URL")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="", help="the objects are under PREFIX/chunks/, as datafs's chunks")
    parser.add_argument("--objects", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.objects < 1:
        parser.error("--objects must be at least 1")
    store = S3Store(args.bucket, args.prefix, args.endpoint)
    mountpoint = args.mountpoint.resolve()
    operations = ColdFile(store, block_ids(args.objects))
    try:
        pyfuse3.init(operations, str(mountpoint), fuse_kernel.mount_options("s3read", "s3read"))
    except (OSError, RuntimeError) as exc:
        print(f"s3read: cannot mount at {mountpoint}: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(serve, mountpoint, lambda nursery: setattr(operations, "nursery", nursery))
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
