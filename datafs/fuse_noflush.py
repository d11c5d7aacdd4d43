"""Read-only opens that cost no FLUSH at close.

The kernel sends FUSE_FLUSH at every close(2) of a FUSE file and waits for
the reply. datafs commits a writer's buffered chunks there (close() is the
visibility point); for a file opened read-only there is nothing to do, yet
the round trip (kernel, libfuse, pyfuse3, trio and back) is a good part of
what reading many small files costs: one open, one read, one flush each.

libfuse lets open() answer `noflush` (libfuse 3.10, FOPEN_NOFLUSH), and the
kernel then skips the FLUSH, as long as writeback caching is off (datafs
keeps it off). pyfuse3's FileInfo has no such field, so `install()` points
pyfuse3's import of `fuse_reply_open` at a hook (`fuse_got`) that sets the
bit in the reply's `struct fuse_file_info` when the open was read-only and
did not truncate, then calls libfuse's function. Writers, O_TRUNC opens,
create() (fuse_reply_create) and opendir (its flag is ignored for
directories) are left as they were. RELEASE still comes for every file and
does what it did.

The hook runs for every open, on the trio thread. It never lets an exception
out and always calls libfuse's reply (an open with no reply would hang its
caller). If this pyfuse3 or libfuse is not laid out as expected, one warning
is logged and closes keep sending FLUSH, as before.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

from . import fuse_got
from .fuse_got import Unfit

log = logging.getLogger(__name__)

_REPLY_OPEN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
# struct fuse_file_info (libfuse 3): int flags, then a 32-bit word of bit
# fields: writepage, direct_io, keep_cache, flush, nonseekable,
# flock_release, cache_readdir, noflush (bit 7, libfuse 3.10). Members are
# only ever appended.
_BITS_OFFSET = 4
NOFLUSH = 1 << 7
_FIRST_LIBFUSE = 310  # fuse_version() of libfuse 3.10

_installed = False


def install() -> bool:
    """Make read-only opens answer noflush from now on (once per process).
    Returns False (after one warning) if it cannot be done here."""
    global _installed
    if _installed:
        return True
    try:
        version = fuse_got.libfuse().fuse_version()
        if version < _FIRST_LIBFUSE:
            raise Unfit(f"libfuse {version // 100}.{version % 100} has no noflush (3.10 has)")
        fuse_got.redirect({"fuse_reply_open": _REPLY_OPEN}, _make_hook)
    except Exception as exc:
        log.warning("closing a read-only file keeps costing a FLUSH request", extra={"reason": str(exc)},
                    exc_info=not isinstance(exc, (Unfit, OSError, ImportError)))
        return False
    _installed = True
    return True


def mark(fi: int) -> bool:
    """Set noflush in the fuse_file_info at `fi` if its open was read-only
    and did not truncate. Returns whether it did."""
    flags = ctypes.c_int.from_address(fi).value
    if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
        return False
    bits = ctypes.c_uint32.from_address(fi + _BITS_OFFSET)
    bits.value |= NOFLUSH
    return True


def _make_hook(forward: Callable[[int, int], int]) -> Callable[[int, int], int]:
    def reply_open(req: int, fi: int) -> int:
        try:
            if fi:
                mark(fi)
        except BaseException:  # nothing may leave a ctypes callback; the reply must still go
            log.exception("could not mark a read-only open noflush")
        return forward(req, fi)

    return reply_open
