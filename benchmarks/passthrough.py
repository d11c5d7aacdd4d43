"""A pyfuse3 passthrough filesystem: the ceiling of any Python FUSE daemon.

`python -m benchmarks.passthrough BACKING MOUNTPOINT` mirrors BACKING at
MOUNTPOINT, in the foreground, until it is unmounted or gets SIGTERM or
SIGINT (then it unmounts itself). The benchmark runs datafs's workloads on it
too: what it measures is the kernel's FUSE, pyfuse3 and a trio event loop on
this disk with nothing on top, so a datafs row that misses its target can be
held against what no Python daemon on pyfuse3 would reach either.

To stay a ceiling it does the least a correct filesystem can: every request
is served inline on the event loop with one or two plain syscalls, with no
thread hops, hashing or metadata engine. The kernel sees what datafs gives it
(`datafs.fuse_kernel`): the same mount options, attribute and entry cache
lifetimes, readahead and background request limit, and open files keep their
page cache (`keep_cache`), as datafs's do.

Invariants:
- Every inode the kernel knows holds an O_PATH descriptor of its backing
  file and a lookup count. Each reply that hands the kernel an entry (lookup,
  create, mkdir, each readdir entry) adds one; `forget()` takes them off and
  closes the descriptor at zero. Names are never stored: a rename or unlink
  needs no bookkeeping, and an unlinked file stays reachable while the kernel
  knows it (the descriptor also keeps its inode number from being reused).
- Inode numbers are the backing filesystem's (its root is pyfuse3's
  ROOT_INODE), so BACKING must be one filesystem: entries on another device
  are refused with EXDEV.
- A file is opened again through /proc/self/fd/N of its O_PATH descriptor;
  each handle is a backing descriptor of its own, read and written at the
  kernel's offsets (pread/pwrite).
- No hard links, symlinks, device nodes or extended attributes (ENOSYS): no
  workload makes them.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import logging
import os
import resource
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

from datafs import fuse_kernel

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE, which os.rename lacks."""
    if _libc.renameat2(old_dir_fd, old, new_dir_fd, new, ctypes.c_uint(flags)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _proc(fd: int) -> str:
    """A path that reopens, truncates or changes the file behind `fd`, even an O_PATH one."""
    return f"/proc/self/fd/{fd}"


def _served(method):
    """A request handler from a plain method: the backing syscall's errno is the reply."""
    @functools.wraps(method)
    async def handler(*args):
        try:
            return method(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    return handler


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False  # as datafs
    supports_dot_lookup = False  # no NFS export: the kernel never looks up "." or ".."

    def __init__(self, backing: Path):
        super().__init__()
        root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY)
        root = os.fstat(root_fd)
        self._dev, self._root_ino = root.st_dev, root.st_ino
        self._fds: dict[int, int] = {pyfuse3.ROOT_INODE: root_fd}  # inode -> O_PATH descriptor
        self._lookups: dict[int, int] = {}  # inode -> lookup count; the root's is never counted
        self._listings: dict[int, list[bytes]] = {}  # directory handle -> names since opendir/rewind
        self._uid, self._gid = os.geteuid(), os.getegid()

    # ---- inodes and lookup counts ------------------------------------------------------
    def _attrs(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        if st.st_dev != self._dev:
            raise OSError(errno.EXDEV, "another filesystem under the backing dir")
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.ROOT_INODE if st.st_ino == self._root_ino else st.st_ino
        attrs.generation = 0
        attrs.entry_timeout = fuse_kernel.ENTRY_TIMEOUT_SECONDS
        attrs.attr_timeout = fuse_kernel.ATTR_TIMEOUT_SECONDS
        attrs.st_mode, attrs.st_nlink, attrs.st_size = st.st_mode, st.st_nlink, st.st_size
        attrs.st_uid, attrs.st_gid, attrs.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        attrs.st_blksize, attrs.st_blocks = st.st_blksize, st.st_blocks
        attrs.st_atime_ns, attrs.st_mtime_ns, attrs.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return attrs

    def _open_path(self, dir_fd: int, name: bytes) -> tuple[int, pyfuse3.EntryAttributes]:
        """An O_PATH descriptor of `name` and its entry; not yet counted."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            return fd, self._attrs(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise

    def _count(self, fd: int, attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """The kernel now knows this entry: one more lookup; keep one descriptor per inode."""
        ino = attrs.st_ino
        if ino in self._fds:
            os.close(fd)
        else:
            self._fds[ino] = fd
        if ino != pyfuse3.ROOT_INODE:
            self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return attrs

    def _entry(self, dir_fd: int, name: bytes) -> pyfuse3.EntryAttributes:
        return self._count(*self._open_path(dir_fd, name))

    def _own(self, dir_fd: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """A new entry belongs to the caller, not to the daemon (allow_other as root)."""
        if (ctx.uid, ctx.gid) != (self._uid, self._gid):
            os.chown(name, ctx.uid, ctx.gid, dir_fd=dir_fd, follow_symlinks=False)

    async def forget(self, inode_list) -> None:
        for ino, count in inode_list:
            left = self._lookups.get(ino, 0) - count
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            if ino != pyfuse3.ROOT_INODE and ino in self._fds:
                os.close(self._fds.pop(ino))

    @_served
    def lookup(self, parent_inode, name, ctx):
        return self._entry(self._fds[parent_inode], name)

    @_served
    def getattr(self, inode, ctx):
        return self._attrs(os.fstat(self._fds[inode]))

    @_served
    def setattr(self, inode, attr, fields, fh, ctx):
        fd = self._fds[inode]
        if fields.update_size:
            if fh is None:
                os.truncate(_proc(fd), attr.st_size)
            else:
                os.ftruncate(fh, attr.st_size)
        if fields.update_mode:
            os.chmod(_proc(fd), stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(_proc(fd), attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            now = os.fstat(fd)
            os.utime(_proc(fd), ns=(attr.st_atime_ns if fields.update_atime else now.st_atime_ns,
                                    attr.st_mtime_ns if fields.update_mtime else now.st_mtime_ns))
        return self._attrs(os.fstat(fd))

    # ---- files -------------------------------------------------------------------------
    # The kernel has applied O_APPEND's offset and the caller's umask already:
    # the backing descriptor takes neither (the daemon runs with umask 0).
    @_served
    def open(self, inode, flags, ctx):
        fh = os.open(_proc(self._fds[inode]), flags & ~(os.O_APPEND | os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_served
    def create(self, parent_inode, name, mode, flags, ctx):
        dir_fd = self._fds[parent_inode]
        fh = os.open(name, (flags | os.O_CREAT) & ~os.O_APPEND, stat.S_IMODE(mode), dir_fd=dir_fd)
        try:
            self._own(dir_fd, name, ctx)
            attrs = self._entry(dir_fd, name)
        except BaseException:
            os.close(fh)
            raise
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), attrs

    @_served
    def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @_served
    def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    @_served
    def flush(self, fh):
        pass  # nothing is buffered here: close() has nothing to make visible

    @_served
    def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    @_served
    def release(self, fh):
        os.close(fh)

    # ---- the namespace -----------------------------------------------------------------
    @_served
    def mkdir(self, parent_inode, name, mode, ctx):
        dir_fd = self._fds[parent_inode]
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=dir_fd)
        self._own(dir_fd, name, ctx)
        return self._entry(dir_fd, name)

    @_served
    def unlink(self, parent_inode, name, ctx):
        os.unlink(name, dir_fd=self._fds[parent_inode])

    @_served
    def rmdir(self, parent_inode, name, ctx):
        os.rmdir(name, dir_fd=self._fds[parent_inode])

    @_served
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        _renameat2(self._fds[parent_inode_old], name_old, self._fds[parent_inode_new], name_new, flags)

    @_served
    def statfs(self, ctx):
        st = os.statvfs(_proc(self._fds[pyfuse3.ROOT_INODE]))
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    # ---- directories -------------------------------------------------------------------
    @_served
    def opendir(self, inode, ctx):
        return os.open(_proc(self._fds[inode]), os.O_RDONLY | os.O_DIRECTORY)

    @_served
    def readdir(self, fh, start_id, token):
        """Entries from a listing taken at the first call (offset 0): the
        offsets are positions in it, so nothing is skipped or repeated when the
        directory changes meanwhile, and a large directory is read once."""
        if start_id == 0 or fh not in self._listings:
            with os.scandir(fh) as entries:
                self._listings[fh] = [os.fsencode(entry.name) for entry in entries]
        names = self._listings[fh]
        for position in range(start_id, len(names)):
            try:
                fd, attrs = self._open_path(fh, names[position])
            except FileNotFoundError:
                continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, names[position], attrs, position + 1):
                os.close(fd)
                break
            self._count(fd, attrs)  # readdirplus: the kernel now knows this entry

    @_served
    def releasedir(self, fh):
        self._listings.pop(fh, None)
        os.close(fh)


async def serve(mountpoint: Path, use_nursery=None) -> None:
    """pyfuse3's main loop with datafs's kernel tuning, until the mount goes
    or SIGTERM/SIGINT comes. `use_nursery(nursery)`, if given, gets the
    nursery first (for the operations' background tasks)."""
    async with trio.open_nursery() as nursery:
        if use_nursery is not None:
            use_nursery(nursery)
        nursery.start_soon(_unmount_on_signal)
        nursery.start_soon(fuse_kernel.tune, mountpoint, fuse_kernel.READ_AHEAD_KB, fuse_kernel.MAX_BACKGROUND)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _unmount_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()  # main() returns; close() below unmounts
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.passthrough",
                                     description="Mirror BACKING at MOUNTPOINT through pyfuse3 (foreground).")
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.umask(0)
    # One O_PATH descriptor per inode the kernel knows: a listed directory of 10,000 entries holds 10,000.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    backing, mountpoint = args.backing.resolve(), args.mountpoint.resolve()
    try:
        operations = Passthrough(backing)
        pyfuse3.init(operations, str(mountpoint), fuse_kernel.mount_options(f"passthrough:{backing}", "passthrough"))
    except (OSError, RuntimeError) as exc:
        print(f"passthrough: cannot mount {backing} at {mountpoint}: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(serve, mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
