"""Read-only opens answered noflush (datafs/fuse_noflush.py): through the real
mount, closing a file opened read-only sends no FLUSH while a writer's close
still does and still commits; piece by piece, which opens are marked, that
the hook always replies, and the fallback to FLUSH with one warning."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

from datafs import fuse_got, fuse_noflush
from datafs.control import request
from datafs.state_files import control_path

from .conftest import Mount


def _ops(m: Mount) -> dict[str, float]:
    return request(control_path(m.state_dir), "GET", "/stats")["fuse_ops_by_op"]


def test_closing_a_read_only_file_sends_no_flush(mount_factory: Callable[..., Mount]):
    m = mount_factory("noflush")
    data = os.urandom(100_000)
    before = _ops(m)
    fd = os.open(m.path / "file", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.close(fd)
    written = _ops(m)
    assert written.get("flush", 0) == before.get("flush", 0) + 1  # a writer's close commits

    for _ in range(5):  # seen by a new reader at once: the flush committed it
        fd = os.open(m.path / "file", os.O_RDONLY)
        try:
            assert os.pread(fd, len(data) + 1, 0) == data
        finally:
            os.close(fd)
    read = _ops(m)
    assert read["open"] == written.get("open", 0) + 5
    assert read.get("flush", 0) == written.get("flush", 0)

    fd = os.open(m.path / "file", os.O_RDWR)  # read-write: flushed as before
    os.pwrite(fd, b"new", 0)
    os.close(fd)
    assert _ops(m).get("flush", 0) == read.get("flush", 0) + 1
    m.remount()
    assert (m.path / "file").read_bytes() == b"new" + data[3:]


def _file_info(flags: int, bits: int = 0) -> ctypes.Array:
    info = (ctypes.c_uint32 * 10)()  # int flags, a word of bit fields, padding, fh, ...
    info[0], info[1] = flags & 0xFFFFFFFF, bits
    return info


def _bits(info: ctypes.Array) -> int:
    return info[1]


def test_only_read_only_opens_that_keep_the_data_are_marked():
    keep_cache = 1 << 2
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_NOATIME, os.O_RDONLY | os.O_DIRECTORY):
        info = _file_info(flags, keep_cache)
        assert fuse_noflush.mark(ctypes.addressof(info))
        assert _bits(info) == keep_cache | fuse_noflush.NOFLUSH and info[0] == flags  # nothing else touched
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_APPEND, os.O_RDONLY | os.O_TRUNC):
        info = _file_info(flags, keep_cache)
        assert not fuse_noflush.mark(ctypes.addressof(info))
        assert _bits(info) == keep_cache, flags


def test_hook_always_calls_libfuses_reply(monkeypatch, caplog):
    replies = []

    def forward(req: int, fi: int) -> int:
        replies.append((req, fi, _bits(info)))
        return -2

    hook = fuse_noflush._make_hook(forward)
    info = _file_info(os.O_RDONLY)
    assert hook(7, ctypes.addressof(info)) == -2  # libfuse's result, passed back
    assert replies == [(7, ctypes.addressof(info), fuse_noflush.NOFLUSH)]

    def broken(fi: int) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fuse_noflush, "mark", broken)
    info = _file_info(os.O_RDONLY)
    assert hook(8, ctypes.addressof(info)) == -2
    assert replies[1] == (8, ctypes.addressof(info), 0)
    assert "could not mark a read-only open noflush" in caplog.text


def test_install_falls_back_to_flush_with_one_warning(monkeypatch, caplog):
    def unfit(c_types, make):
        raise fuse_got.Unfit("no relocation for fuse_reply_open")

    monkeypatch.setattr(fuse_noflush, "_installed", False)
    monkeypatch.setattr(fuse_got, "redirect", unfit)
    with caplog.at_level(logging.WARNING, logger="datafs"):
        assert fuse_noflush.install() is False
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "FLUSH" in record.getMessage()
    assert record.reason == "no relocation for fuse_reply_open"
    assert fuse_noflush._installed is False
