"""fallocate(2) on the mount, which pyfuse3 (3.5) has no handler for.

pyfuse3's `init()` clears its static `struct fuse_lowlevel_ops`, fills in its
handlers and passes it to libfuse's `fuse_session_new`, which copies it into
the session. The `fallocate` slot stays empty, so libfuse answers
FUSE_FALLOCATE with ENOSYS and the kernel turns that into EOPNOTSUPP for the
rest of the mount.

The slot can only be filled while that call runs: `install()` points pyfuse3's
own import of `fuse_session_new` (its GOT entry, found from the dynamic
relocations every shared object keeps, stripped or not) at a hook, which puts
the entry back, writes our handler into the table pyfuse3 passes, and calls
the function the entry held. Rejected designs:
- writing the slot in pyfuse3's static table before `init()`: `init()` clears
  the table first, and it is a local symbol found only in an unstripped
  build's `.symtab`;
- writing it into the session after `init()`: `struct fuse_session` is private
  to libfuse and changes between releases;
- a C library that interposes `fuse_session_new`: a compiled part and a
  load-order rule in a pure-Python package, for the same effect.
Everything the hook relies on is checked first: the relocation exists and its
slot holds what the dynamic loader put there, and the table has pyfuse3's
handlers where libfuse 3's ABI (which only ever appends members) puts them
and nothing in `fallocate`. If a check fails, one warning is logged and
fallocate stays EOPNOTSUPP, as before: the mount never depends on this.

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
import mmap
from typing import Awaitable, Callable

import pyfuse3
import trio

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
#: Relocations that make a GOT entry hold a function's address (GLOB_DAT, JUMP_SLOT).
_GOT_RELOCATIONS = {"x64": {6, 7}, "AArch64": {1025, 1026}}


class Unfit(Exception):
    """This pyfuse3 or libfuse is not laid out as the hook expects."""


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
#: C functions made here: libfuse and pyfuse3 may call them as long as the process lives.
_keep_alive: list[object] = []


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


def _load_address(path: str, exported: str) -> int:
    """Where the dynamic loader put the shared object `path` (its link-time
    address 0), found from the address of a symbol it exports."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    libc = ctypes.CDLL(None)
    info = DlInfo()
    entry = ctypes.cast(getattr(ctypes.CDLL(path), exported), ctypes.c_void_p).value
    if not libc.dladdr(ctypes.c_void_p(entry), ctypes.byref(info)) or not info.dli_fbase:
        raise Unfit(f"dladdr does not know {path}")
    return info.dli_fbase


def _find_import(path: str) -> tuple[str, int, int, str]:
    """pyfuse3's import of fuse_session_new, from its dynamic relocations:
    (its name, the offset of its GOT entry, the end of the loaded image, a
    symbol pyfuse3 exports)."""
    from elftools.elf.dynamic import DynamicSegment
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        kinds = _GOT_RELOCATIONS.get(elf.get_machine_arch())
        if kinds is None:
            raise Unfit(f"no GOT relocation types known for {elf.get_machine_arch()}")
        image_end = max(s["p_vaddr"] + s["p_memsz"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
        dynamic = next((s for s in elf.iter_segments() if isinstance(s, DynamicSegment)), None)
        if dynamic is None:
            raise Unfit(f"{path} has no dynamic segment")
        exported = next((s.name for s in dynamic.iter_symbols()
                         if s.name.startswith("PyInit_") and s["st_shndx"] != "SHN_UNDEF"), None)
        if exported is None:
            raise Unfit(f"{path} exports no PyInit_ function")
        for table in dynamic.get_relocation_tables().values():
            for relocation in table.iter_relocations():
                if relocation["r_info_type"] not in kinds:
                    continue
                name = dynamic.get_symbol(relocation["r_info_sym"]).name
                if name in _SESSION_NEW_TYPES:
                    return name, relocation["r_offset"], image_end, exported
    raise Unfit(f"{path} imports none of {', '.join(_SESSION_NEW_TYPES)}")


def _writable(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return perms[1] == "w"
    raise Unfit(f"address {address:#x} is not mapped")


def _protect(address: int, writable: bool) -> None:
    """Full RELRO leaves the GOT read-only once relocated."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = address - address % mmap.PAGESIZE
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    if libc.mprotect(ctypes.c_void_p(page), ctypes.c_size_t(mmap.PAGESIZE), prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of pyfuse3's GOT failed")


def _set_entry(address: int, value: int) -> None:
    locked = not _writable(address)
    if locked:
        _protect(address, True)
    try:
        ctypes.c_void_p.from_address(address).value = value
    finally:
        if locked:
            _protect(address, False)


def _hook_session_new() -> None:
    global _libfuse, _hooked
    if _hooked:
        return  # installed, and not called yet
    path = pyfuse3.__file__
    name, offset, image_end, exported = _find_import(path)
    base = _load_address(path, exported)
    entry = base + offset
    _libfuse = ctypes.CDLL("libfuse3.so.3")  # the one pyfuse3 loaded (same soname)
    _libfuse.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    _libfuse.fuse_reply_err.restype = ctypes.c_int
    original = ctypes.c_void_p.from_address(entry).value or 0
    # Not bound yet (a PLT stub inside pyfuse3), or bound to libfuse's function.
    resolved = ctypes.cast(getattr(_libfuse, name), ctypes.c_void_p).value
    if not (base <= original < base + image_end or original == resolved):
        raise Unfit(f"pyfuse3's GOT entry for {name} holds an unexpected address")
    c_type = _SESSION_NEW_TYPES[name]
    forward = c_type(original)

    def hook(*args: int) -> int | None:
        global _hooked
        try:
            _set_entry(entry, original)
            _hooked = False
            _register(op=args[1], op_size=args[2])
        except Exception as exc:
            _unsupported(exc)
        return forward(*args)

    c_hook = c_type(hook)
    _keep_alive.append(c_hook)
    _set_entry(entry, ctypes.cast(c_hook, ctypes.c_void_p).value)
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
