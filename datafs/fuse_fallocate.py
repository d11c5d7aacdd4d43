"""fallocate(2) on the mount, which pyfuse3 (3.5) has no handler for.

pyfuse3's `init()` clears its static `struct fuse_lowlevel_ops`, fills in its
handlers and passes it to libfuse's `fuse_session_new`, which copies it into
the session. The `fallocate` slot stays empty, so libfuse answers
FUSE_FALLOCATE with ENOSYS and the kernel turns that into EOPNOTSUPP for the
rest of the mount.

The slot can only be filled while that call runs: `install()` points pyfuse3's
own import of `fuse_session_new` at a hook (`fuse_got`), which puts the entry
back, writes our handler into the table pyfuse3 passes, and calls the
function the entry held. Rejected designs:
- writing the slot in pyfuse3's static table before `init()`: `init()` clears
  the table first, and it is a local symbol found only in an unstripped
  build's `.symtab`;
- writing it into the session after `init()`: `struct fuse_session` is private
  to libfuse and changes between releases.
Everything the hook relies on is checked first: `fuse_got`'s checks of the
GOT entry, and the table has pyfuse3's handlers where libfuse 3's ABI (which
only ever appends members) puts them and nothing in `fallocate`. If a check
fails, one warning is logged and fallocate stays EOPNOTSUPP, as before: the
mount never depends on this.

Requests: libfuse calls the handler from `fuse_session_process_buf`, inside
pyfuse3's session loop, on the trio thread with the GIL held. It must not
block, so it starts a task in this module's nursery and returns. The task
awaits the filesystem's handler and replies exactly once with `fuse_reply_err`
(0 is success): the errno of the handler's FUSEError, EIO (logged) for
anything else, EINTR if the daemon is being torn down. There is one task per
request, like pyfuse3's own: each is a caller blocked in fallocate(2), so the
kernel bounds them. The daemon waits for them (`stop()`) before its last
commits, and its nursery, this one inside it, ends before the session is
destroyed: no reply outlives the session.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from typing import Awaitable, Callable

import pyfuse3
import trio

from . import fuse_got
from .fuse_got import Unfit

log = logging.getLogger(__name__)

#: The filesystem's side: (file handle, mode, offset, length); raises
#: pyfuse3.FUSEError for an errno.
Handler = Callable[[int, int, int, int], Awaitable[None]]

_POINTER_BYTES = ctypes.sizeof(ctypes.c_void_p)
# Members of struct fuse_lowlevel_ops (libfuse 3), by index. pyfuse3 always
# sets the first four and never the next two.
_READ, _WRITE, _WRITE_BUF, _READDIRPLUS = 15, 16, 36, 41
_READDIR, _BMAP = 21, 33
_FALLOCATE = 40
# struct fuse_file_info: int flags, two 32-bit words of bit fields, uint64_t fh.
_FH_OFFSET = 16

_FALLOCATE_TYPE = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
)
_P, _SIZE = ctypes.c_void_p, ctypes.c_size_t
#: What pyfuse3 may import to create its session, and its C type: the libfuse
#: 3.17 headers turn fuse_session_new() into fuse_session_new_versioned().
_SESSION_NEW_TYPES = {
    "fuse_session_new": ctypes.CFUNCTYPE(_P, _P, _P, _SIZE, _P),
    "fuse_session_new_versioned": ctypes.CFUNCTYPE(_P, _P, _P, _SIZE, _P, _P),
}
class FallocateBridge:
    """Carries FUSE_FALLOCATE requests from libfuse to `handler` and back.

    `install()` before `pyfuse3.init()`; `run` in the daemon's nursery before
    `pyfuse3.main()`; `stop()` once it has returned."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        self._stopped = trio.Event()

    def install(self) -> bool:
        """Make the next `pyfuse3.init()` register the fallocate handler.
        Returns False (after one warning) if it cannot be done here."""
        global _bridge
        _bridge = self
        try:
            _hook_session_new()
        except Exception as exc:
            _unsupported(exc)
            return False
        return True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._closing.wait()  # then the nursery waits for the requests in flight
        finally:
            self._nursery = None
            self._stopped.set()

    async def stop(self) -> None:
        """Wait for the requests in flight (the session loop has ended)."""
        self._closing.set()
        await self._stopped.wait()

    def _submit(self, req: int, ino: int, mode: int, offset: int, length: int, fh: int) -> None:
        """(Called from libfuse, on the trio thread.)"""
        if self._nursery is None or self._closing.is_set():
            log.error("fallocate request while the mount is not being served", extra={"ino": ino})
            _reply(req, errno.EIO)
            return
        self._nursery.start_soon(self._serve, req, ino, mode, offset, length, fh)

    async def _serve(self, req: int, ino: int, mode: int, offset: int, length: int, fh: int) -> None:
        code = errno.EIO
        try:
            await self.handler(fh, mode, offset, length)
            code = 0
        except pyfuse3.FUSEError as exc:
            code = exc.errno
        except trio.Cancelled:
            code = errno.EINTR
            raise
        except Exception:
            log.exception("unexpected error in request", extra={"op": "fallocate", "ino": ino})
        finally:
            _reply(req, code)


# ---- the C side ------------------------------------------------------------------------------
_bridge: FallocateBridge | None = None
_libfuse: ctypes.CDLL | None = None
#: Whether the hook is in pyfuse3's GOT, waiting for `pyfuse3.init()`.
_hooked = False


def _on_fallocate(req: int, ino: int, mode: int, offset: int, length: int, fi: int) -> None:
    # An exception must never leave a ctypes callback: the request would get
    # no reply and its caller would hang in fallocate(2) for good.
    try:
        if not fi or _bridge is None:
            raise RuntimeError("no file handle" if not fi else "no fallocate bridge")
        fh = ctypes.c_uint64.from_address(fi + _FH_OFFSET).value
        _bridge._submit(req, ino, mode, offset, length, fh)
    except BaseException:
        log.exception("unexpected error in request", extra={"op": "fallocate", "ino": ino})
        _reply(req, errno.EIO)


#: Lives as long as the process: libfuse's session keeps its address.
_C_ON_FALLOCATE = _FALLOCATE_TYPE(_on_fallocate)


def _unsupported(exc: Exception) -> None:
    log.warning("fallocate(2) stays unsupported on this mount (EOPNOTSUPP)", extra={"reason": str(exc)},
                exc_info=not isinstance(exc, (Unfit, OSError, ImportError)))


def _reply(req: int, code: int) -> None:
    try:
        assert _libfuse is not None
        result = _libfuse.fuse_reply_err(req, code)
    except BaseException:
        log.exception("could not answer a fallocate request")
        return
    if result:  # the kernel no longer waits for it (interrupted, unmounted)
        log.debug("fuse_reply_err failed", extra={"op": "fallocate", "error": errno.errorcode.get(-result, result)})


def _hook_session_new() -> None:
    global _libfuse, _hooked
    if _hooked:
        return  # installed, and not called yet
    _libfuse = fuse_got.libfuse()
    _libfuse.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    _libfuse.fuse_reply_err.restype = ctypes.c_int

    def make(forward: Callable) -> Callable:
        def hook(*args: int) -> int | None:
            global _hooked
            try:
                redirected.restore()
                _hooked = False
                _register(op=args[1], op_size=args[2])
            except Exception as exc:
                _unsupported(exc)
            return forward(*args)
        return hook

    redirected = fuse_got.redirect(_SESSION_NEW_TYPES, make)
    _hooked = True


def _register(op: int, op_size: int) -> None:
    """Write the fallocate handler into the table pyfuse3 hands to libfuse."""
    if op_size < (_FALLOCATE + 1) * _POINTER_BYTES:
        raise Unfit(f"pyfuse3's fuse_lowlevel_ops has {op_size} bytes, too few for fallocate")
    slots = (ctypes.c_void_p * (op_size // _POINTER_BYTES)).from_address(op)
    if not all(slots[i] for i in (_READ, _WRITE, _WRITE_BUF, _READDIRPLUS)) or slots[_READDIR] or slots[_BMAP]:
        raise Unfit("pyfuse3's handler table is not laid out as libfuse 3's struct fuse_lowlevel_ops")
    if slots[_FALLOCATE]:
        raise Unfit("pyfuse3 registers a fallocate handler of its own")
    slots[_FALLOCATE] = ctypes.cast(_C_ON_FALLOCATE, ctypes.c_void_p).value
    log.debug("fallocate handler registered")
