"""The fallocate bridge to pyfuse3 (datafs/fuse_fallocate.py), piece by piece:
the hook on this machine's pyfuse3 and libfuse (checked against pyfuse3's own
symbols, in a process of its own), the checks that make it fall back to
EOPNOTSUPP with one warning, and one reply per request whatever the handler
does. The filesystem's side is in test_operations.py, the whole path through
the kernel in test_operator.py."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import subprocess
import sys
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from datafs import fuse_fallocate as ff, fuse_got

from .conftest import REPO

_INIT_WITH_HOOK = r"""
import ctypes, json, sys
import pyfuse3
from elftools.elf.elffile import ELFFile
from datafs import fuse_fallocate as ff, fuse_got

async def handler(*args):
    pass

path = pyfuse3.__file__
name, offset, _, exported = fuse_got.find_import(path, set(ff._SESSION_NEW_TYPES))
base = fuse_got.load_address(path, exported)
entry = ctypes.c_void_p.from_address(base + offset)
before = entry.value
assert ff.FallocateBridge(handler).install()
hooked = entry.value
pyfuse3.init(pyfuse3.Operations(), sys.argv[1], set())
try:
    after = entry.value
    with open(path, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        symbols = {s.name: s["st_value"] for s in symtab.iter_symbols()} if symtab else {}
    out = {"name": name, "hooked": hooked not in (before, after), "after_is_pyfuse3s": after in (
        before, ctypes.cast(getattr(ctypes.CDLL("libfuse3.so.3"), name), ctypes.c_void_p).value)}
    if "__pyx_v_7pyfuse3_fuse_ops" in symbols:
        slots = (ctypes.c_void_p * 44).from_address(base + symbols["__pyx_v_7pyfuse3_fuse_ops"])
        handlers = {i: symbols[f"__pyx_f_7pyfuse3_fuse_{op}"] for i, op in ((15, "read"), (36, "write_buf"), (41, "readdirplus"))}
        out["slots_match_symbols"] = all(slots[i] == base + value for i, value in handlers.items())
        out["fallocate_is_ours"] = slots[40] == ctypes.cast(ff._C_ON_FALLOCATE, ctypes.c_void_p).value
finally:
    pyfuse3.close(unmount=True)
print(json.dumps(out))
"""


@pytest.mark.mount
def test_hook_fills_the_fallocate_slot_of_pyfuse3s_table(tmp_path: Path):
    """pyfuse3.init() with the hook installed: the table it hands to libfuse
    has pyfuse3's handlers where the hook expects them (compared with the
    symbols of pyfuse3's build, where it has them) and ours in `fallocate`,
    and pyfuse3's GOT entry is its own again."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run([sys.executable, "-c", _INIT_WITH_HOOK, str(mountpoint)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["name"] in ff._SESSION_NEW_TYPES
    assert out["hooked"] and out["after_is_pyfuse3s"]
    if "slots_match_symbols" in out:  # a stripped pyfuse3 has no .symtab to compare with
        assert out["slots_match_symbols"] and out["fallocate_is_ours"]


def _pyfuse3_like_table() -> ctypes.Array:
    table = (ctypes.c_void_p * 44)()
    for index in (0, 2, 3, 4, 5, 14, 15, 16, 17, 18, 20, 24, 30, 36, 38, 41):
        table[index] = 0x1000 + index
    return table


def test_register_fills_only_an_empty_slot_of_a_table_laid_out_as_expected():
    table = _pyfuse3_like_table()
    ff._register(ctypes.addressof(table), ctypes.sizeof(table))
    assert table[40] == ctypes.cast(ff._C_ON_FALLOCATE, ctypes.c_void_p).value

    for index, value in ((40, 0x77), (21, 0x77), (15, None)):  # its own fallocate, readdir set, no read
        table = _pyfuse3_like_table()
        table[index] = value
        snapshot = list(table)
        with pytest.raises(ff.Unfit):
            ff._register(ctypes.addressof(table), ctypes.sizeof(table))
        assert list(table) == snapshot, index
    table = _pyfuse3_like_table()
    with pytest.raises(ff.Unfit):  # built with a header too old to have the slot
        ff._register(ctypes.addressof(table), 40 * ctypes.sizeof(ctypes.c_void_p))
    assert table[40] is None


def test_install_falls_back_to_eopnotsupp_with_one_warning(monkeypatch, caplog):
    def unfit(path: str, names: set[str]):
        raise ff.Unfit("no relocation for fuse_session_new")

    async def handler(*args):
        pass

    monkeypatch.setattr(ff, "_bridge", None)
    monkeypatch.setattr(fuse_got, "find_import", unfit)
    with caplog.at_level(logging.WARNING, logger="datafs"):
        assert ff.FallocateBridge(handler).install() is False
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "EOPNOTSUPP" in record.getMessage()
    assert record.reason == "no relocation for fuse_session_new"


def test_c_handler_reads_the_file_handle_and_never_raises(monkeypatch, caplog):
    submitted, replies = [], []

    class Bridge:
        def _submit(self, *args):
            submitted.append(args)

    monkeypatch.setattr(ff, "_reply", lambda req, code: replies.append((req, code)))
    monkeypatch.setattr(ff, "_bridge", Bridge())
    file_info = (ctypes.c_uint64 * 5)(0, 0, 42, 0, 0)  # fh is at byte 16
    ff._C_ON_FALLOCATE(9, 7, 1, 1 << 40, 10, ctypes.addressof(file_info))
    assert submitted == [(9, 7, 1, 1 << 40, 10, 42)] and replies == []

    monkeypatch.setattr(ff, "_bridge", None)  # anything going wrong: EIO, logged
    ff._C_ON_FALLOCATE(10, 7, 0, 0, 10, ctypes.addressof(file_info))
    assert replies == [(10, errno.EIO)]
    assert "unexpected error in request" in caplog.text


async def test_bridge_replies_exactly_once_per_request(monkeypatch, caplog):
    replies: list[tuple[int, int]] = []
    monkeypatch.setattr(ff, "_reply", lambda req, code: replies.append((req, code)))
    release = trio.Event()

    async def handler(fh: int, mode: int, offset: int, length: int) -> None:
        if fh == 2:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if fh == 3:
            raise RuntimeError("a bug")
        if fh == 4:
            await release.wait()

    bridge = ff.FallocateBridge(handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run)
        for fh in (1, 2, 3, 4):
            bridge._submit(100 + fh, 7, 0, 0, 10, fh)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(replies) == [(101, 0), (102, errno.ENOSPC), (103, errno.EIO)]
        assert "unexpected error in request" in caplog.text
        nursery.start_soon(bridge.stop)
        await trio.testing.wait_all_tasks_blocked()
        assert len(replies) == 3  # stop() waits for the request in flight
        release.set()
    assert replies[3:] == [(104, 0)]
    bridge._submit(105, 7, 0, 0, 10, 1)  # the session loop has ended
    assert replies[4:] == [(105, errno.EIO)]


async def test_bridge_answers_eintr_when_the_daemon_is_torn_down(monkeypatch):
    replies: list[tuple[int, int]] = []
    monkeypatch.setattr(ff, "_reply", lambda req, code: replies.append((req, code)))

    async def handler(fh: int, mode: int, offset: int, length: int) -> None:
        await trio.sleep_forever()

    bridge = ff.FallocateBridge(handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run)
        bridge._submit(1, 7, 0, 0, 10, 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert replies == [(1, errno.EINTR)]
