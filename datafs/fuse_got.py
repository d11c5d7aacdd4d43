"""Pointing one of pyfuse3's imports from libfuse at a Python function.

pyfuse3 (3.5) leaves out two things libfuse can do: a fallocate handler
(`fuse_fallocate`) and the `noflush` open flag (`fuse_noflush`). Both are
reached the same way: pyfuse3 calls libfuse through its GOT, one entry per
imported function, found from the dynamic relocations every shared object
keeps, stripped or not. `redirect()` writes a ctypes callback into the entry;
the callback gets the function the entry held, to call on.

Everything is checked before the entry is written: the relocation exists, the
entry holds what the dynamic loader put there (a PLT stub inside pyfuse3 not
bound yet, or libfuse's function), and the page is mapped (full RELRO leaves
it read-only: it is made writable for the one write). A failed check raises
`Unfit`; the callers then log one warning and go on without the feature.
Rejected: a C library that interposes the function (a compiled part and a
load-order rule in a pure-Python package, for the same effect).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Callable

import pyfuse3

#: Relocations that make a GOT entry hold a function's address (GLOB_DAT, JUMP_SLOT).
_GOT_RELOCATIONS = {"x64": {6, 7}, "AArch64": {1025, 1026}}


class Unfit(Exception):
    """This pyfuse3 or libfuse is not laid out as a hook expects."""


#: C functions made here: libfuse and pyfuse3 may call them as long as the process lives.
_keep_alive: list[object] = []


@functools.cache
def libfuse() -> ctypes.CDLL:
    """The libfuse pyfuse3 loaded (same soname)."""
    return ctypes.CDLL("libfuse3.so.3")


class Redirect:
    """One of pyfuse3's GOT entries, now holding a callback."""

    def __init__(self, entry: int, original: int):
        self.entry = entry
        self.original = original

    def restore(self) -> None:
        """Give the entry back the function it held."""
        set_entry(self.entry, self.original)


def redirect(c_types: dict[str, type], make: Callable[[Callable], Callable]) -> Redirect:
    """Point pyfuse3's import of whichever of `c_types` (name -> ctypes
    CFUNCTYPE) it has at `make(forward)`, where `forward` calls the
    function the entry held. Raises Unfit (or OSError, ImportError) when it
    cannot be done here; nothing is written then."""
    path = pyfuse3.__file__
    name, offset, image_end, exported = find_import(path, set(c_types))
    base = load_address(path, exported)
    entry = base + offset
    original = ctypes.c_void_p.from_address(entry).value or 0
    resolved = ctypes.cast(getattr(libfuse(), name), ctypes.c_void_p).value
    if not (base <= original < base + image_end or original == resolved):
        raise Unfit(f"pyfuse3's GOT entry for {name} holds an unexpected address")
    c_type = c_types[name]
    c_hook = c_type(make(c_type(original)))
    _keep_alive.append(c_hook)
    set_entry(entry, ctypes.cast(c_hook, ctypes.c_void_p).value)
    return Redirect(entry, original)


def load_address(path: str, exported: str) -> int:
    """Where the dynamic loader put the shared object `path` (its link-time
    address 0), found from the address of a symbol it exports."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    libc = ctypes.CDLL(None)
    info = DlInfo()
    symbol = ctypes.cast(getattr(ctypes.CDLL(path), exported), ctypes.c_void_p).value
    if not libc.dladdr(ctypes.c_void_p(symbol), ctypes.byref(info)) or not info.dli_fbase:
        raise Unfit(f"dladdr does not know {path}")
    return info.dli_fbase


def find_import(path: str, names: set[str]) -> tuple[str, int, int, str]:
    """The shared object's import of one of `names`, from its dynamic
    relocations: (its name, the offset of its GOT entry, the end of the loaded
    image, a symbol the object exports)."""
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
                if name in names:
                    return name, relocation["r_offset"], image_end, exported
    raise Unfit(f"{path} imports none of {', '.join(sorted(names))}")


def _writable(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return perms[1] == "w"
    raise Unfit(f"address {address:#x} is not mapped")


def _protect(address: int, writable: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    page = address - address % mmap.PAGESIZE
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    if libc.mprotect(ctypes.c_void_p(page), ctypes.c_size_t(mmap.PAGESIZE), prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of pyfuse3's GOT failed")


def set_entry(address: int, value: int) -> None:
    locked = not _writable(address)
    if locked:
        _protect(address, True)
    try:
        ctypes.c_void_p.from_address(address).value = value
    finally:
        if locked:
            _protect(address, False)
