"""Whole chunk files written and read around the page cache (O_DIRECT).

A chunk this node writes goes to its cache file and, soon after, to the
object store; the file is read back once, for that upload. Through the page
cache each byte would be copied into a page of its own and kept there,
beside the copy the kernel already holds in the mount's own page cache: two
cached copies of every byte written, and the CPU to fill the second. With
O_DIRECT the disk takes the bytes from, and gives them back into, a reused
buffer. Measured on this project's 2-core VM, 256 x 4 MiB files
with the page cache dropped first: 2.6 s of CPU buffered, 0.1 s direct
(whose freshly allocated pages are the VM's costliest; on any machine the
copy and the page allocation go).

Only whole, aligned lengths of at least `DIRECT_MIN_BYTES` go this way
(every full 4 MiB chunk); a filesystem that refuses O_DIRECT (EINVAL: some
FUSE filesystems, tmpfs before Linux 6.6) is remembered per directory, and
plain I/O is used there.
Callers run these in worker threads. The chunk-sized, page-aligned buffers
O_DIRECT needs come from a pool: taken for one write, or for the life of an
upload's read, then given back, the most recently used first (its pages are
the warmest); the pool keeps at most `SPARE_BUFFERS` idle.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Iterator

from ..config import CHUNK_SIZE_BYTES

#: O_DIRECT needs offsets, lengths and buffer addresses aligned to the
#: device's logical block size: 4 KiB covers every common one.
ALIGN = 4096
#: Smaller chunks (small files' tails) stay in the page cache: a read soon
#: after is likely, and their copy is cheap.
DIRECT_MIN_BYTES = 1 << 20

#: Idle buffers kept for reuse: enough for every upload (16) and cache write
#: (8) in flight at the default settings (96 MiB). More are made while more
#: are in use; a pool smaller than what is in use made and freed buffers all
#: the time, and on this project's test VM a fresh buffer's first touch costs
#: more than its I/O.
SPARE_BUFFERS = 24

_refused: set[str] = set()  # directories whose filesystem refused O_DIRECT
_spare: list[mmap.mmap] = []
_spare_lock = threading.Lock()


@contextlib.contextmanager
def _buffer() -> Iterator[mmap.mmap]:
    """A page-aligned, chunk-sized buffer, for the duration of the block."""
    with _spare_lock:
        buf = _spare.pop() if _spare else None
    if buf is None:
        buf = mmap.mmap(-1, CHUNK_SIZE_BYTES)
    try:
        yield buf
    finally:
        with _spare_lock:
            if len(_spare) < SPARE_BUFFERS:
                _spare.append(buf)
                buf = None
        if buf is not None:
            buf.close()


def usable(directory: str, size: int) -> bool:
    """Whether `size` bytes in `directory` go around the page cache."""
    return DIRECT_MIN_BYTES <= size <= CHUNK_SIZE_BYTES and size % ALIGN == 0 and directory not in _refused


def _refuse(directory: str, exc: OSError) -> bool:
    """Remember a filesystem that refused O_DIRECT; False for other errors."""
    if exc.errno != errno.EINVAL:
        return False
    _refused.add(directory)
    return True


def create(path: str, data: bytes | bytearray | memoryview) -> int | None:
    """Create `path` (O_EXCL) holding `data`, written around the page cache;
    the open descriptor, or None if this filesystem refuses O_DIRECT (then
    nothing was created). The caller syncs (O_DIRECT skips the page cache,
    not the disk's own cache or the file's metadata) and closes it."""
    directory = os.path.dirname(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    except OSError as exc:
        if _refuse(directory, exc):
            return None
        raise
    try:
        size = len(data)
        with _buffer() as buf:
            buf[:size] = data
            with memoryview(buf) as whole:
                view = whole[:size]
                try:
                    done = 0
                    while done < size:
                        done += os.pwrite(fd, view[done:], done)
                finally:
                    view.release()
    except BaseException as exc:
        os.close(fd)
        os.unlink(path)
        if isinstance(exc, OSError) and _refuse(directory, exc):
            return None
        raise
    return fd


@contextlib.contextmanager
def read_whole(path: str, size: int) -> Iterator[memoryview | None]:
    """The `size` bytes of `path` read around the page cache, as a view of a
    pooled buffer valid inside the block; None if the file's size differs or
    its filesystem refuses O_DIRECT."""
    directory = os.path.dirname(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if _refuse(directory, exc):
            yield None
            return
        raise
    with _buffer() as buf, memoryview(buf) as whole:
        try:
            done = 0
            while done < len(buf):
                n = os.preadv(fd, [whole[done:]], done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if not _refuse(directory, exc):
                raise
            done = -1
        finally:
            os.close(fd)
        if done != size:
            yield None
            return
        view = whole[:size]
        try:
            yield view
        finally:
            view.release()
