"""POSIX behaviour through the real kernel mount (embedded file:// store),
on both metadata engines: the embedded LMDB and a shared PostgreSQL (the
fleet engine, with short grace periods so freeing plays out within a test).

Each test mounts datafs with the real CLI and checks that it behaves like a
local filesystem: byte-exact content at and around the 4 MiB chunk size,
partial writes, holes and truncation, dedup, rename (with flags, and atomic
under concurrent readers), open-unlinked files, links, xattrs, errno values,
attributes and permissions, persistence across remount and across SIGKILL of
the daemon, statfs, a 100k-entry directory, concurrent writers and readers,
O_APPEND, O_DIRECT and mmap.

Reads that must come from the daemon rather than the kernel's page cache drop
the file's cached pages first (`posix_fadvise(DONTNEED)`), since datafs keeps
the page cache across opens. Loops are bounded in count and in time.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import multiprocessing
import os
import platform
import random
import stat
import struct
import time
from pathlib import Path
from typing import Callable

import pytest

from datafs.chunks import chunk_id
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.tiers.store import object_key

from .conftest import Mount, wait_until

pytestmark = pytest.mark.mount

MiB = 1 << 20
#: What a fleet node sets so that unlinked files and chunks are freed within a test.
FLEET_ENV = {"DATAFS_ORPHAN_GRACE": "1", "DATAFS_GC_GRACE": "1", "DATAFS_SESSION_TIMEOUT": "5"}


@pytest.fixture(params=["lmdb", "postgres"])
def engine(request) -> str:
    return request.param


@pytest.fixture
def datafs_mount(engine: str, request, tmp_path) -> Mount:
    """One node: embedded LMDB, or PostgreSQL (its store a file:// dir in the
    state dir, where `in_store` looks). The database is set up first, so it
    is dropped only after the mount is gone."""
    database = request.getfixturevalue("pg_url") if engine == "postgres" else None
    mount_factory = request.getfixturevalue("mount_factory")
    if database is None:
        return mount_factory()
    state_dir = tmp_path / "node-state"
    return mount_factory(
        extra_args=["--meta", database.url, "--store", f"file://{state_dir / 'store'}"],
        env={**database.env, **FLEET_ENV}, state_dir=state_dir,
    )
# Freeing is woken by the inode deletion, but a chunk still uploading is
# skipped until the collector's next 30 s pass.
GC_TIMEOUT_SECONDS = 45.0


# ---- helpers ------------------------------------------------------------------------
def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: Path, data: bytes, block: int = MiB) -> None:
    with open(path, "wb") as f:
        view = memoryview(data)
        for pos in range(0, len(view), block):
            f.write(view[pos:pos + block])


def read_uncached(path: Path) -> bytes:
    """The file's bytes as the daemon serves them, not the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while True:
            block = os.read(fd, 4 * MiB)
            if not block:
                return bytes(out)
            out += block
    finally:
        os.close(fd)


def sha_uncached(path: Path) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while True:
            block = os.read(fd, MiB)
            if not block:
                return digest.hexdigest()
            digest.update(block)
    finally:
        os.close(fd)


def chunk_ids(data: bytes) -> set[str]:
    """The chunks datafs stores for `data`: one per 4 MiB piece, none for all-zero pieces."""
    return {chunk_id(data[i:i + C]) for i in range(0, len(data), C) if any(data[i:i + C])}


def cached_chunks(m: Mount) -> dict[str, list[Path]]:
    """Every chunk file in the mount's cache dir, by id (a list, to catch duplicates)."""
    out: dict[str, list[Path]] = {}
    root = m.state_dir / "cache" / "chunks"
    if root.exists():
        for sub in root.iterdir():
            for entry in sub.iterdir():
                out.setdefault(entry.name, []).append(entry)
    return out


def in_store(m: Mount, chunk: str) -> bool:
    return (m.state_dir / "store" / object_key(chunk)).exists()


def expect_errno(code: int, fn: Callable, *args, **kwargs) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, f"{fn.__name__}{args}: expected {errno.errorcode[code]}, got {info.value!r}"


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


def renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    args = (_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    func = getattr(libc, "renameat2", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        result = func(*args)
    else:  # glibc older than 2.28
        libc.syscall.restype = ctypes.c_long
        result = libc.syscall(
            ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), ctypes.c_int(args[0]), ctypes.c_char_p(args[1]),
            ctypes.c_int(args[2]), ctypes.c_char_p(args[3]), ctypes.c_uint(flags),
        )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything a user can observe about a tree, for before/after comparisons."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
                xattrs = ()
            else:
                body = sha_uncached(path) if stat.S_ISREG(st.st_mode) else None
                xattrs = tuple(sorted((k, os.getxattr(path, k)) for k in os.listxattr(path)))
            out[str(path.relative_to(root))] = (
                st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, body, xattrs,
            )
    return out


# ---- content ------------------------------------------------------------------------
def test_round_trip_at_chunk_sizes(datafs_mount: Mount):
    m = datafs_mount
    files = {size: os.urandom(size) for size in (0, 1, C - 1, C, C + 1)}
    for size, data in files.items():
        write_file(m.path / f"f{size}", data)
    for size, data in files.items():
        path = m.path / f"f{size}"
        assert os.stat(path).st_size == size
        assert sha(path.read_bytes()) == sha(data)
        assert sha_uncached(path) == sha(data)
    assert {c for data in files.values() for c in chunk_ids(data)} <= set(cached_chunks(m))
    m.remount()
    for size, data in files.items():
        assert os.stat(m.path / f"f{size}").st_size == size
        assert sha_uncached(m.path / f"f{size}") == sha(data)


def test_round_trip_100_mib_in_1_mib_blocks(datafs_mount: Mount):
    path = datafs_mount.path / "big.bin"
    size = 100 * MiB + 12345
    written = hashlib.sha256()
    pieces = []
    with open(path, "wb", buffering=0) as f:
        for pos in range(0, size, MiB):
            block = os.urandom(min(MiB, size - pos))
            written.update(block)
            pieces.append(block)
            assert f.write(block) == len(block)
    assert os.stat(path).st_size == size
    assert sha_uncached(path) == written.hexdigest()
    assert chunk_ids(b"".join(pieces)) <= set(cached_chunks(datafs_mount))


def test_writes_across_chunk_boundaries(datafs_mount: Mount):
    path = datafs_mount.path / "f"
    model = bytearray(os.urandom(3 * C + 100))
    write_file(path, bytes(model))

    def pwrite(offset: int, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)
        model[offset:offset + len(data)] = data

    pwrite(C - MiB // 2, os.urandom(MiB))  # spans the 4 MiB boundary
    assert read_uncached(path) == model
    pwrite(C + 1000, os.urandom(10))  # small, in the middle of an existing chunk
    pwrite(2 * C - 3, os.urandom(C + 6))  # covers all of chunk 2, a little of 1 and 3
    pwrite(3 * C + 50, os.urandom(200))  # runs past the end: grows the file
    assert os.stat(path).st_size == len(model) == 3 * C + 250
    assert read_uncached(path) == model

    # Written through one descriptor, visible through another before close.
    with open(path, "r+b", buffering=0) as writer, open(path, "rb", buffering=0) as reader:
        data = os.urandom(3 * MiB)
        writer.seek(C - MiB)
        writer.write(data)
        model[C - MiB:C + 2 * MiB] = data
        reader.seek(C - MiB - 5)
        assert reader.read(3 * MiB + 10) == bytes(model[C - MiB - 5:C + 2 * MiB + 5])
    assert read_uncached(path) == model
    datafs_mount.remount()
    assert read_uncached(path) == model


def test_sparse_file_reads_zeros_in_holes(datafs_mount: Mount):
    m = datafs_mount
    path = m.path / "sparse"
    before = set(cached_chunks(m))
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(3 * C + 5)
        f.write(b"tail")
    assert os.stat(path).st_size == 3 * C + 9
    expected = b"head" + bytes(3 * C + 1) + b"tail"
    assert read_uncached(path) == expected
    assert len(set(cached_chunks(m)) - before) == 2  # chunks 1 and 2 are holes, stored as nothing

    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"middle", C + C // 2)  # fill part of a hole
        os.lseek(fd, 5 * C, os.SEEK_SET)  # seek past the end, write, hole in between
        os.write(fd, b"end")
    finally:
        os.close(fd)
    expected = bytearray(expected) + bytes(5 * C - len(expected)) + b"end"
    expected[C + C // 2:C + C // 2 + 6] = b"middle"
    assert os.stat(path).st_size == 5 * C + 3
    assert read_uncached(path) == expected
    m.remount()
    assert os.stat(path).st_size == 5 * C + 3
    assert read_uncached(path) == expected

    far = 10 << 30  # chunk indexes past 2**11, offsets past 2**32
    with open(m.path / "far", "wb") as f:
        f.seek(far)
        f.write(b"far")
    assert os.stat(m.path / "far").st_size == far + 3
    with open(m.path / "far", "rb") as f:
        assert os.pread(f.fileno(), 16, far - 8) == bytes(8) + b"far"
        assert os.pread(f.fileno(), MiB, 5 << 30) == bytes(MiB)


def test_truncate_grow_shrink_and_regrow(datafs_mount: Mount):
    m = datafs_mount
    path = m.path / "t"
    write_file(path, b"x" * 100)
    os.truncate(path, C + 10)  # grow: the new part reads as zeros
    assert os.stat(path).st_size == C + 10
    assert read_uncached(path) == b"x" * 100 + bytes(C - 90)

    data = os.urandom(3 * C)
    write_file(path, data)
    os.truncate(path, C + 100)  # shrink into chunk 1
    assert os.stat(path).st_size == C + 100
    assert read_uncached(path) == data[:C + 100]
    os.truncate(path, 2 * C + 5)  # grow again: the cut part must not come back
    assert read_uncached(path) == data[:C + 100] + bytes(C - 95)

    # The same on an open descriptor with uncommitted writes, checked before close.
    data = os.urandom(2 * C + 7)
    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, data)
        os.ftruncate(fd, C // 2)
        assert os.fstat(fd).st_size == C // 2
        os.ftruncate(fd, C + 3)
        assert os.pread(fd, C + 100, 0) == data[:C // 2] + bytes(C // 2 + 3)
        os.pwrite(fd, b"after", C + 3)
        assert os.fstat(fd).st_size == C + 8
    finally:
        os.close(fd)
    expected = data[:C // 2] + bytes(C // 2 + 3) + b"after"
    assert read_uncached(path) == expected

    # O_TRUNC on a multi-chunk file, then a short write.
    with open(path, "wb") as f:
        f.write(b"short")
    assert os.stat(path).st_size == 5
    assert read_uncached(path) == b"short"
    os.truncate(path, 0)
    assert read_uncached(path) == b""
    m.remount()
    assert os.stat(path).st_size == 0


def test_truncate_while_another_descriptor_has_unwritten_data(datafs_mount: Mount):
    path = datafs_mount.path / "t"
    data = os.urandom(3 * C)
    write_file(path, data)
    # Shrink to a chunk multiple, then grow: nothing of chunks 1 and 2 comes back.
    os.truncate(path, C)
    os.truncate(path, 3 * C)
    assert read_uncached(path) == data[:C] + bytes(2 * C)

    # Shrink mid-chunk, then write past the cut: the gap reads as zeros.
    write_file(path, data)
    os.truncate(path, C + 100)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"beyond", 2 * C + 10)
    finally:
        os.close(fd)
    assert read_uncached(path) == data[:C + 100] + bytes(C - 90) + b"beyond"

    # A truncate by path while another descriptor holds uncommitted writes.
    fresh = os.urandom(2 * C + 1000)
    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
    try:
        os.write(fd, fresh)
        os.truncate(path, C + 10)
        assert os.stat(path).st_size == C + 10
        os.pwrite(fd, b"tail", C + 10)
        assert os.pread(fd, 2 * C, 0) == fresh[:C + 10] + b"tail"
    finally:
        os.close(fd)
    assert read_uncached(path) == fresh[:C + 10] + b"tail"
    datafs_mount.remount()
    assert read_uncached(path) == fresh[:C + 10] + b"tail"


def test_identical_files_share_chunks(datafs_mount: Mount):
    m = datafs_mount
    data = os.urandom(2 * C + 1234)
    ids = chunk_ids(data)
    write_file(m.path / "a", data)
    write_file(m.path / "b", data)
    cached = cached_chunks(m)
    for chunk in ids:
        assert [p.relative_to(m.state_dir) for p in cached[chunk]] == [Path("cache/chunks", chunk[:2], chunk)]
    assert len(cached) == len(ids) == 3

    # Changing one copy leaves the other intact.
    changed = bytearray(data)
    changed[10:20] = b"0123456789"
    with open(m.path / "b", "r+b") as f:
        f.seek(10)
        f.write(b"0123456789")
    assert read_uncached(m.path / "a") == data
    assert read_uncached(m.path / "b") == changed
    assert set(cached_chunks(m)) == ids | chunk_ids(bytes(changed))

    # The chunk only "a" holds goes once "a" is gone; the shared ones stay.
    only_a = ids - chunk_ids(bytes(changed))
    assert len(only_a) == 1
    os.unlink(m.path / "a")
    wait_until(lambda: not only_a & set(cached_chunks(m)), GC_TIMEOUT_SECONDS, "the unshared chunk to be collected")
    assert set(cached_chunks(m)) == chunk_ids(bytes(changed))
    assert read_uncached(m.path / "b") == changed


def test_mmap_shared_read(datafs_mount: Mount):
    path = datafs_mount.path / "mapped"
    data = os.urandom(C + 4096 + 17)
    write_file(path, data)
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapped:
            assert len(mapped) == len(data)
            assert mapped[C - 10:C + 10] == data[C - 10:C + 10]
            assert mapped[-17:] == data[-17:]
            assert sha(mapped[:]) == sha(data)


def test_writable_mmap_direct_io_and_copy_file_range(datafs_mount: Mount):
    root = datafs_mount.path
    data = bytearray(os.urandom(2 * C))
    write_file(root / "f", bytes(data))
    with open(root / "f", "r+b") as f:
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED) as mapped:
            mapped[C - 2:C + 2] = b"MMAP"
            mapped.flush()
    data[C - 2:C + 2] = b"MMAP"
    assert read_uncached(root / "f") == data

    # O_DIRECT bypasses the page cache on both sides; buffers must be aligned.
    aligned = mmap.mmap(-1, C + 4096)
    aligned.write(os.urandom(C + 4096))
    fd = os.open(root / "direct", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        assert os.write(fd, aligned) == C + 4096
    finally:
        os.close(fd)
    back = mmap.mmap(-1, C + 4096)
    fd = os.open(root / "direct", os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.readv(fd, [back]) == C + 4096
    finally:
        os.close(fd)
    assert back[:] == aligned[:]

    src = os.open(root / "f", os.O_RDONLY)
    dst = os.open(root / "copy", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        copied = 0
        while copied < len(data):
            n = os.copy_file_range(src, dst, len(data) - copied)
            assert n > 0
            copied += n
    finally:
        os.close(src)
        os.close(dst)
    assert read_uncached(root / "copy") == data
    datafs_mount.remount()
    assert read_uncached(root / "f") == data
    assert read_uncached(root / "direct") == aligned[:]


# ---- namespace ------------------------------------------------------------------------
def test_rename_flags_and_directory_moves(datafs_mount: Mount):
    root = datafs_mount.path
    (root / "a").write_bytes(b"A")
    (root / "b").write_bytes(b"B")

    expect_errno(errno.EEXIST, renameat2, root / "a", root / "b", RENAME_NOREPLACE)
    assert (root / "a").read_bytes() == b"A" and (root / "b").read_bytes() == b"B"
    renameat2(root / "a", root / "c", RENAME_NOREPLACE)
    assert not (root / "a").exists() and (root / "c").read_bytes() == b"A"

    renameat2(root / "b", root / "c", RENAME_EXCHANGE)
    assert (root / "b").read_bytes() == b"A" and (root / "c").read_bytes() == b"B"
    expect_errno(errno.ENOENT, renameat2, root / "b", root / "missing", RENAME_EXCHANGE)
    expect_errno(errno.EINVAL, renameat2, root / "b", root / "c", RENAME_EXCHANGE | RENAME_NOREPLACE)

    # Exchange a file with a directory across directories: link counts follow.
    (root / "d1").mkdir()
    (root / "d2" / "sub").mkdir(parents=True)
    (root / "d2" / "sub" / "f").write_bytes(b"in sub")
    renameat2(root / "b", root / "d2" / "sub", RENAME_EXCHANGE)
    assert (root / "d2" / "sub").read_bytes() == b"A"
    assert (root / "b" / "f").read_bytes() == b"in sub"
    assert os.stat(root / "d2").st_nlink == 2
    assert os.stat(root / "b" / "..").st_ino == os.stat(root).st_ino

    # A directory with content moves across directories.
    os.rename(root / "b", root / "d1" / "moved")
    assert (root / "d1" / "moved" / "f").read_bytes() == b"in sub"
    assert os.listdir(root / "d1") == ["moved"]
    assert os.stat(root / "d1").st_nlink == 3
    assert os.stat(root / "d1" / "moved" / "..").st_ino == os.stat(root / "d1").st_ino

    # Over an existing file: the old one is replaced, an open descriptor keeps it.
    (root / "old").write_bytes(b"old content")
    with open(root / "old", "rb") as still_open:
        os.rename(root / "c", root / "old")
        assert (root / "old").read_bytes() == b"B"
        assert still_open.read() == b"old content"
    assert not (root / "c").exists()

    expect_errno(errno.EINVAL, os.rename, root / "d1", root / "d1" / "moved" / "inside")
    (root / "empty").mkdir()
    os.rename(root / "d1" / "moved", root / "empty")  # onto an empty directory
    assert (root / "empty" / "f").read_bytes() == b"in sub"
    (root / "d1" / "x").mkdir()
    expect_errno(errno.ENOTEMPTY, os.rename, root / "d1" / "x", root / "empty")
    expect_errno(errno.ENOTDIR, os.rename, root / "d1" / "x", root / "old")
    expect_errno(errno.EISDIR, os.rename, root / "old", root / "d1" / "x")
    expect_errno(errno.ENOENT, os.rename, root / "nothing", root / "d1" / "y")

    # Onto another name of the same file: nothing happens, both names stay.
    os.link(root / "old", root / "old-link")
    os.rename(root / "old", root / "old-link")
    assert os.stat(root / "old").st_nlink == 2 and (root / "old-link").read_bytes() == b"B"
    os.unlink(root / "old-link")

    # Exchange two directories in different parents: each '..' follows.
    (root / "d2" / "other").mkdir()
    renameat2(root / "empty", root / "d2" / "other", RENAME_EXCHANGE)
    assert (root / "d2" / "other" / "f").read_bytes() == b"in sub"
    assert os.listdir(root / "empty") == []
    assert os.stat(root / "d2" / "other" / "..").st_ino == os.stat(root / "d2").st_ino
    assert os.stat(root / "empty" / "..").st_ino == os.stat(root).st_ino
    renameat2(root / "empty", root / "d2" / "other", RENAME_EXCHANGE)

    datafs_mount.remount()
    assert sorted(os.listdir(root)) == ["d1", "d2", "empty", "old"]
    assert (root / "empty" / "f").read_bytes() == b"in sub"
    assert os.stat(root / "d1").st_nlink == 3 and os.stat(root).st_nlink == 5


def test_open_unlinked_file_lives_until_closed(datafs_mount: Mount):
    m = datafs_mount
    path = m.path / "doomed"
    data = bytearray(os.urandom(2 * C + 10))
    write_file(path, bytes(data))
    old_chunks = chunk_ids(bytes(data))
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists() and os.listdir(m.path) == []
        assert os.fstat(fd).st_nlink == 0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(data) + 1, 0) == data
        head, tail = os.urandom(MiB), os.urandom(C)
        os.pwrite(fd, head, 0)
        os.pwrite(fd, tail, len(data))
        data[:MiB] = head
        data += tail
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.fstat(fd).st_size == len(data)
        assert os.pread(fd, len(data), 0) == data
        all_chunks = old_chunks | chunk_ids(bytes(data))
        assert all_chunks <= set(cached_chunks(m))
    finally:
        os.close(fd)
    wait_until(lambda: not all_chunks & set(cached_chunks(m)), GC_TIMEOUT_SECONDS, "the unlinked file's chunks to be freed")
    assert not any(in_store(m, chunk) for chunk in all_chunks)


def test_hard_links(datafs_mount: Mount):
    root = datafs_mount.path
    (root / "dir").mkdir()
    data = os.urandom(C + 5)
    write_file(root / "a", data)
    os.link(root / "a", root / "b")
    os.link(root / "a", root / "dir" / "c")
    st = os.stat(root / "a")
    assert st.st_nlink == 3
    assert os.stat(root / "b").st_ino == os.stat(root / "dir" / "c").st_ino == st.st_ino
    with open(root / "b", "r+b") as f:
        f.write(b"through b")
    assert read_uncached(root / "a")[:9] == b"through b"
    os.unlink(root / "a")
    assert os.stat(root / "b").st_nlink == 2
    assert read_uncached(root / "dir" / "c") == b"through b" + data[9:]
    expect_errno(errno.EEXIST, os.link, root / "b", root / "dir" / "c")
    expect_errno(errno.EPERM, os.link, root / "dir", root / "dirlink")
    expect_errno(errno.ENOENT, os.link, root / "a", root / "again")
    datafs_mount.remount()
    assert os.stat(root / "b").st_nlink == 2
    os.unlink(root / "dir" / "c")
    assert os.stat(root / "b").st_nlink == 1
    assert read_uncached(root / "b") == b"through b" + data[9:]


def test_symlinks(datafs_mount: Mount):
    root = datafs_mount.path
    (root / "dir").mkdir()
    (root / "dir" / "file").write_bytes(b"target content")
    os.symlink("dir/file", root / "rel")
    os.symlink(str(root / "dir"), root / "abs")
    os.symlink("nowhere", root / "dangling")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")

    assert os.readlink(root / "rel") == "dir/file"
    st = os.lstat(root / "rel")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("dir/file")
    assert os.stat(root / "rel").st_ino == os.stat(root / "dir" / "file").st_ino
    assert (root / "rel").read_bytes() == b"target content"
    assert os.listdir(root / "abs") == ["file"]
    assert (root / "abs" / "file").read_bytes() == b"target content"

    assert os.path.lexists(root / "dangling") and not os.path.exists(root / "dangling")
    expect_errno(errno.ENOENT, open, root / "dangling", "rb")
    expect_errno(errno.ELOOP, open, root / "loop1", "rb")
    expect_errno(errno.ELOOP, os.stat, root / "loop2")
    expect_errno(errno.EEXIST, os.symlink, "x", root / "rel")
    expect_errno(errno.EINVAL, os.readlink, root / "dir" / "file")

    long_target = "t" * 4095
    os.symlink(long_target, root / "long")
    assert os.readlink(root / "long") == long_target
    # Writing through a dangling link creates its target.
    with open(root / "dangling", "wb") as f:
        f.write(b"created")
    assert (root / "nowhere").read_bytes() == b"created"
    datafs_mount.remount()
    assert os.readlink(root / "rel") == "dir/file" and os.readlink(root / "long") == long_target
    assert (root / "rel").read_bytes() == b"target content"


def test_xattrs(datafs_mount: Mount):
    root = datafs_mount.path
    path = root / "f"
    path.write_bytes(b"x")
    (root / "d").mkdir()
    assert os.listxattr(path) == []
    os.setxattr(path, "user.one", b"1")
    os.setxattr(path, "user.empty", b"")
    os.setxattr(path, "user.big", b"v" * 65536)
    os.setxattr(root / "d", "user.on_dir", b"dir value")
    assert os.getxattr(path, "user.one") == b"1"
    assert os.getxattr(path, "user.empty") == b""
    assert os.getxattr(path, "user.big") == b"v" * 65536
    assert sorted(os.listxattr(path)) == ["user.big", "user.empty", "user.one"]
    assert os.listxattr(root / "d") == ["user.on_dir"]

    expect_errno(errno.EEXIST, os.setxattr, path, "user.one", b"2", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, path, "user.none", b"2", os.XATTR_REPLACE)
    os.setxattr(path, "user.one", b"replaced", os.XATTR_REPLACE)
    os.setxattr(path, "user.new", b"created", os.XATTR_CREATE)
    assert os.getxattr(path, "user.one") == b"replaced"
    assert os.getxattr(path, "user.new") == b"created"

    os.removexattr(path, "user.one")
    expect_errno(errno.ENODATA, os.getxattr, path, "user.one")
    expect_errno(errno.ENODATA, os.removexattr, path, "user.one")
    expect_errno(errno.ENOENT, os.getxattr, root / "missing", "user.one")
    assert sorted(os.listxattr(path)) == ["user.big", "user.empty", "user.new"]
    datafs_mount.remount()
    assert sorted(os.listxattr(path)) == ["user.big", "user.empty", "user.new"]
    assert os.getxattr(path, "user.big") == b"v" * 65536
    assert os.getxattr(root / "d", "user.on_dir") == b"dir value"


def test_errno_values(datafs_mount: Mount):
    root = datafs_mount.path
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "file").write_bytes(b"data")

    expect_errno(errno.ENOENT, os.stat, root / "missing")
    expect_errno(errno.ENOENT, open, root / "missing", "rb")
    expect_errno(errno.ENOENT, os.unlink, root / "missing")
    expect_errno(errno.ENOENT, os.rmdir, root / "missing")
    expect_errno(errno.ENOENT, os.mkdir, root / "missing" / "child")
    expect_errno(errno.ENOENT, os.listdir, root / "missing")

    expect_errno(errno.EEXIST, os.mkdir, root / "dir")
    expect_errno(errno.EEXIST, os.mkdir, root / "file")
    expect_errno(errno.EEXIST, os.open, root / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.EEXIST, os.mknod, root / "file")

    expect_errno(errno.ENOTEMPTY, os.rmdir, root / "dir")
    expect_errno(errno.EISDIR, os.open, root / "dir", os.O_WRONLY)
    expect_errno(errno.EISDIR, os.unlink, root / "dir")
    expect_errno(errno.EISDIR, os.truncate, root / "dir", 0)
    expect_errno(errno.ENOTDIR, os.rmdir, root / "file")
    expect_errno(errno.ENOTDIR, os.stat, root / "file" / "x")
    expect_errno(errno.ENOTDIR, os.listdir, root / "file")
    expect_errno(errno.ENOTDIR, os.open, root / "file", os.O_RDONLY | os.O_DIRECTORY)
    expect_errno(errno.ENOTDIR, os.mkdir, root / "file" / "x")

    long_name = "n" * 256
    expect_errno(errno.ENAMETOOLONG, os.open, root / long_name, os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, root / long_name)
    expect_errno(errno.ENAMETOOLONG, os.stat, root / long_name)
    expect_errno(errno.ENAMETOOLONG, os.symlink, "x", root / long_name)
    expect_errno(errno.ENAMETOOLONG, os.rename, root / "file", root / long_name)
    expect_errno(errno.ENAMETOOLONG, os.link, root / "file", root / long_name)
    (root / ("n" * 255)).write_bytes(b"ok")  # NAME_MAX itself is fine
    assert os.statvfs(root).f_namemax == 255

    (root / "gone").mkdir()
    gone_fd = os.open(root / "gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(root / "gone")
        expect_errno(errno.ENOENT, os.open, "x", os.O_CREAT | os.O_WRONLY, dir_fd=gone_fd)
        expect_errno(errno.ENOENT, os.mkdir, "x", dir_fd=gone_fd)
        assert os.listdir(gone_fd) == []
    finally:
        os.close(gone_fd)

    expect_errno(errno.EINVAL, os.truncate, root / "file", -1)
    expect_errno(errno.EINVAL, os.rmdir, f"{root}/dir/.")  # pathlib would drop the "."
    expect_errno(errno.EINVAL, os.rename, root / "dir", root / "dir" / "sub" / "x")
    expect_errno(errno.EINVAL, os.setxattr, root / "file", "user.x", b"v", 0x40)
    assert (root / "file").read_bytes() == b"data"


def test_modes_owners_and_times_survive_remount(datafs_mount: Mount):
    root = datafs_mount.path
    (root / "f").write_bytes(b"x")
    (root / "d").mkdir()
    os.symlink("f", root / "l")
    os.chown(root / "f", 1234, 5678)
    os.chmod(root / "f", 0o4751)
    os.chown(root / "d", 42, 43)
    os.chmod(root / "d", 0o3710)
    os.chown(root / "l", 7, 8, follow_symlinks=False)
    times = {"f": (1_000_000_001_123_456_789, 1_234_567_891_987_654_321), "d": (5, 999_999_999), "l": (1, 2)}
    for name, ns in times.items():
        os.utime(root / name, ns=ns, follow_symlinks=False)

    def observed() -> dict[str, tuple]:
        out = {}
        for name in times:
            st = os.lstat(root / name)
            out[name] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        return out

    before = observed()
    assert before["f"][:5] == (0o4751, 1234, 5678, *times["f"])
    assert before["d"][:5] == (0o3710, 42, 43, *times["d"])
    assert before["l"][1:5] == (7, 8, *times["l"])
    datafs_mount.remount()
    assert observed() == before
    # chown clears set-user-ID on a file, as on a local filesystem.
    os.chown(root / "f", 1, 1)
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o751


def test_times_follow_changes(datafs_mount: Mount):
    root = datafs_mount.path
    (root / "d").mkdir()
    path = root / "d" / "f"
    path.write_bytes(b"one")
    past = 1_000_000_000_000_000_000
    os.utime(path, ns=(past, past))
    os.utime(root / "d", ns=(past, past))

    before_write = time.time_ns()
    with open(path, "ab") as f:
        f.write(b"two")
    st = os.stat(path)
    assert st.st_mtime_ns >= before_write - 10**9 and st.st_ctime_ns >= st.st_mtime_ns - 10**9
    assert st.st_atime_ns == past  # noatime, and a write does not touch atime

    os.utime(path, ns=(past, past))
    os.chmod(path, 0o600)
    st = os.stat(path)
    assert st.st_mtime_ns == past and st.st_ctime_ns > past  # chmod: ctime only

    (root / "d" / "new").write_bytes(b"")
    assert os.stat(root / "d").st_mtime_ns > past  # creating an entry changes the directory

    # cp -p: times set while the data is not yet committed survive the close.
    fd = os.open(root / "d" / "copy", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, os.urandom(C + 1))
        os.utime(fd, ns=(past + 1, past + 2))
    finally:
        os.close(fd)
    assert os.stat(root / "d" / "copy").st_mtime_ns == past + 2
    datafs_mount.remount()
    st = os.stat(root / "d" / "copy")
    assert (st.st_atime_ns, st.st_mtime_ns) == (past + 1, past + 2)
    assert os.stat(path).st_mtime_ns == past


def test_umask_and_set_group_id_directories(datafs_mount: Mount):
    root = datafs_mount.path
    old_umask = os.umask(0o027)
    try:
        os.close(os.open(root / "f", os.O_CREAT | os.O_WRONLY, 0o777))
        os.mkdir(root / "d", 0o777)
        os.mknod(root / "n", 0o666 | stat.S_IFREG)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(root / "n").st_mode) == 0o640

    os.chown(root / "d", -1, 4242)
    os.chmod(root / "d", 0o2775)
    (root / "d" / "file").write_bytes(b"")
    os.mkdir(root / "d" / "sub")
    assert os.stat(root / "d" / "file").st_gid == 4242
    sub = os.stat(root / "d" / "sub")
    assert sub.st_gid == 4242 and sub.st_mode & stat.S_ISGID


def _as_user(dir_fd: int, uid: int, results) -> None:
    """In a child: drop to `uid` and report what it may do under the mount."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    outcome = {}
    for name, flags in (("private", os.O_RDONLY), ("public", os.O_RDONLY), ("public", os.O_WRONLY),
                        ("locked/inner", os.O_RDONLY)):
        try:
            os.close(os.open(name, flags, dir_fd=dir_fd))
            outcome[(name, flags)] = 0
        except OSError as exc:
            outcome[(name, flags)] = exc.errno
    try:
        os.unlink("public", dir_fd=dir_fd)
        outcome["unlink"] = 0
    except OSError as exc:
        outcome["unlink"] = exc.errno
    results.put(outcome)


def test_permissions_are_enforced_for_other_users(datafs_mount: Mount):
    root = datafs_mount.path
    (root / "private").write_bytes(b"secret")
    os.chmod(root / "private", 0o600)
    (root / "public").write_bytes(b"hello")
    os.chmod(root / "public", 0o644)
    (root / "locked").mkdir(mode=0o700)
    (root / "locked" / "inner").write_bytes(b"x")
    os.chmod(root / "locked" / "inner", 0o644)
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # the path above the mount is root-only
    try:
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        _run([ctx.Process(target=_as_user, args=(dir_fd, 12345, results))])
        outcome = results.get(timeout=5)
    finally:
        os.close(dir_fd)
    assert outcome == {
        ("private", os.O_RDONLY): errno.EACCES,
        ("public", os.O_RDONLY): 0,
        ("public", os.O_WRONLY): errno.EACCES,
        ("locked/inner", os.O_RDONLY): errno.EACCES,
        "unlink": errno.EACCES,  # root's directory is 0755
    }
    assert (root / "public").read_bytes() == b"hello"


def test_statfs_reports_the_cache_volume(datafs_mount: Mount):
    fs = os.statvfs(datafs_mount.path)
    disk = os.statvfs(datafs_mount.state_dir)
    assert fs.f_frsize * fs.f_blocks == disk.f_frsize * disk.f_blocks
    tolerance = max(disk.f_frsize * disk.f_blocks // 100, 256 * MiB)
    assert abs(fs.f_frsize * fs.f_bavail - disk.f_frsize * disk.f_bavail) <= tolerance
    assert abs(fs.f_frsize * fs.f_bfree - disk.f_frsize * disk.f_bfree) <= tolerance
    assert fs.f_files >= fs.f_ffree > 0 and fs.f_namemax == 255
    # Inodes in use (f_files - f_ffree) are datafs's own count, whatever the disk does.
    for i in range(10):
        (datafs_mount.path / f"f{i}").write_bytes(b"")
    after = os.statvfs(datafs_mount.path)
    assert after.f_files - after.f_ffree == fs.f_files - fs.f_ffree + 10


def test_kernel_readahead_and_background_limit_are_raised(mount_factory):
    """Sequential reads of the cache need large requests and many of them in
    flight; both are kernel settings of the mount, set after FUSE_INIT."""
    m = mount_factory(env={"DATAFS_MAX_BACKGROUND": "48", "DATAFS_READ_AHEAD_KB": "8192"})
    major, minor = os.major(os.stat(m.path).st_dev), os.minor(os.stat(m.path).st_dev)
    connection = Path("/sys/fs/fuse/connections") / str(major << 20 | minor)
    readahead = Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb")
    deadline = time.monotonic() + 10
    while True:
        try:
            settings = (readahead.read_text().strip(), (connection / "max_background").read_text().strip(),
                        (connection / "congestion_threshold").read_text().strip())
        except FileNotFoundError:
            settings = None
        if settings == ("8192", "48", "36") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert settings == ("8192", "48", "36")


# ---- concurrency ----------------------------------------------------------------------
def _run(foreground: list, background: list = (), stop=None, timeout: float = 60.0) -> None:
    """Run `foreground` processes to completion while `background` ones run
    until `stop` is set. Every process is gone when this returns."""
    everyone = [*background, *foreground]
    try:
        for p in everyone:
            p.start()
        deadline = time.monotonic() + timeout
        for p in foreground:
            p.join(max(0.1, deadline - time.monotonic()))
        if stop is not None:
            stop.set()
        for p in background:
            p.join(max(0.1, deadline + 10 - time.monotonic()))
        assert not any(p.is_alive() for p in everyone), f"processes still running after {timeout:.0f} s"
        assert [p.exitcode for p in everyone] == [0] * len(everyone)
    finally:
        if stop is not None:
            stop.set()
        for p in everyone:
            if p.is_alive():
                p.kill()
                p.join()


_HEADER = struct.Struct(">Q32s")  # payload length, sha256 of the payload


def _version(writer: int, iteration: int) -> bytes:
    """A self-describing file version; some cross the 4 MiB chunk size."""
    rng = random.Random(writer * 1000 + iteration)
    size = C + rng.randrange(MiB) if iteration % 10 == 3 else rng.randrange(256 * 1024)
    payload = rng.randbytes(size)
    return _HEADER.pack(size, hashlib.sha256(payload).digest()) + payload


def _check_version(data: bytes) -> str | None:
    """None if `data` is one complete version, else what is wrong with it."""
    if len(data) < _HEADER.size:
        return f"short read of {len(data)} bytes"
    size, digest = _HEADER.unpack_from(data)
    if len(data) != _HEADER.size + size:
        return f"{len(data)} bytes for a version of {_HEADER.size + size}"
    if hashlib.sha256(data[_HEADER.size:]).digest() != digest:
        return f"content of a {size}-byte version does not match its hash"
    return None


def _rename_writer(directory: str, writer: int, iterations: int) -> None:
    for i in range(iterations):
        tmp = os.path.join(directory, f".tmp-{writer}-{i}")
        with open(tmp, "wb") as f:
            f.write(_version(writer, i))
        os.rename(tmp, os.path.join(directory, "current"))


def _rename_reader(directory: str, stop, deadline: float, results) -> None:
    reads, problems = 0, []
    while not stop.is_set() and time.monotonic() < deadline and len(problems) < 5:
        with open(os.path.join(directory, "current"), "rb") as f:
            data = f.read()
        reads += 1
        problem = _check_version(data)
        if problem:
            problems.append(problem)
    results.put((reads, problems))


def test_parallel_readers_of_small_files_commit_nothing(mount_factory):
    """32 readers at once over many small files (a model tree's configs and
    shards): every byte right, and closing files that were only read records
    nothing in the metadata engine. The engine does not matter here: LMDB."""
    from concurrent.futures import ThreadPoolExecutor

    from datafs import control
    from datafs.state_files import control_path

    mount = mount_factory()
    files = {}
    for i in range(256):
        path = mount.path / f"d{i % 8}" / f"f{i:03d}"
        path.parent.mkdir(exist_ok=True)
        files[path] = os.urandom(16 << 10)
        path.write_bytes(files[path])
    before = control.request(control_path(mount.state_dir), "GET", "/stats")
    with ThreadPoolExecutor(32) as readers:
        got = dict(zip(files, readers.map(lambda p: p.read_bytes(), files)))
    after = control.request(control_path(mount.state_dir), "GET", "/stats")
    assert got == files
    assert after["commits"] == before["commits"]
    opened = after["fuse_ops_by_op"].get("open", 0) - before["fuse_ops_by_op"].get("open", 0)
    assert opened == len(files)


def test_rename_over_a_name_is_atomic_for_concurrent_readers(datafs_mount: Mount):
    directory = str(datafs_mount.path)
    (datafs_mount.path / "current").write_bytes(_version(99, 0))
    ctx = multiprocessing.get_context("fork")
    stop, results = ctx.Event(), ctx.Queue()
    deadline = time.monotonic() + 60
    writers = [ctx.Process(target=_rename_writer, args=(directory, w, 30)) for w in range(4)]
    readers = [ctx.Process(target=_rename_reader, args=(directory, stop, deadline, results)) for _ in range(2)]
    _run(writers, readers, stop)
    outcomes = [results.get(timeout=5) for _ in readers]
    assert all(problems == [] for _, problems in outcomes), outcomes
    assert all(reads > 10 for reads, _ in outcomes), outcomes
    assert _check_version((datafs_mount.path / "current").read_bytes()) is None
    assert sorted(os.listdir(directory)) == ["current"]


def _file_writer(path: str, seed: int) -> None:
    """Write a file in shuffled 256 KiB pieces, some spanning chunk boundaries."""
    rng = random.Random(seed)
    data = rng.randbytes(3 * C + seed * 4099)
    pieces = [(pos, data[pos:pos + 256 * 1024 + 7]) for pos in range(0, len(data), 256 * 1024 + 7)]
    rng.shuffle(pieces)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for pos, piece in pieces:
            os.pwrite(fd, piece, pos)
    finally:
        os.close(fd)


def test_concurrent_writers_to_different_files(datafs_mount: Mount):
    ctx = multiprocessing.get_context("fork")
    paths = [str(datafs_mount.path / f"w{i}") for i in range(4)]
    _run([ctx.Process(target=_file_writer, args=(p, i)) for i, p in enumerate(paths)])
    for i, p in enumerate(paths):
        expected = random.Random(i).randbytes(3 * C + i * 4099)
        assert os.stat(p).st_size == len(expected)
        assert sha_uncached(Path(p)) == sha(expected), f"{p} differs"


_GROWTH_PIECE = (bytes(range(1, 256)) * 33)[:8192]  # no zero byte in it


def _grow_across_boundaries(path: str, boundaries: int) -> None:
    """Write 8 KiB straddling chunk boundary k, then close (commit), for k = 1, 2, ..."""
    for k in range(1, boundaries + 1):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, _GROWTH_PIECE, k * C - 4096)
        finally:
            os.close(fd)


def _boundary_reader(path: str, stop, deadline: float, results) -> None:
    """Read the last straddling piece, plus 4 KiB of the committed chunk before it,
    from the daemon; a zero byte means a written byte read back as a hole."""
    fd = os.open(path, os.O_RDONLY)
    reads, zero_reads = 0, 0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            k = (os.fstat(fd).st_size - 4096) // C
            if k < 1:
                time.sleep(0.001)
                continue
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            data = os.pread(fd, 12288, k * C - 8192)
            reads += 1
            zero_reads += b"\0" in data[4096:]
    finally:
        os.close(fd)
    results.put((reads, zero_reads))


def test_reads_racing_commits_see_every_written_byte(datafs_mount: Mount):
    """A read spanning a committed chunk and a buffered one must not lose the
    buffered part to a commit (another process's close) landing in between."""
    path = datafs_mount.path / "growing"
    path.write_bytes(b"")
    ctx = multiprocessing.get_context("fork")
    stop, results = ctx.Event(), ctx.Queue()
    readers = [ctx.Process(target=_boundary_reader, args=(str(path), stop, time.monotonic() + 60, results))
               for _ in range(2)]
    _run([ctx.Process(target=_grow_across_boundaries, args=(str(path), 150))], readers, stop)
    outcomes = [results.get(timeout=5) for _ in readers]
    assert sum(reads for reads, _ in outcomes) >= 50, outcomes
    assert [zeros for _, zeros in outcomes] == [0, 0], f"(reads, reads with zeros) per reader: {outcomes}"


_RECORD = struct.Struct(">IIII")  # writer, sequence number, payload length, crc32


def _appender(path: str, writer: int, count: int) -> None:
    import zlib

    rng = random.Random(writer)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for seq in range(count):
            payload = rng.randbytes(rng.randrange(1, 20000))
            record = _RECORD.pack(writer, seq, len(payload), zlib.crc32(payload)) + payload
            assert os.write(fd, record) == len(record)
    finally:
        os.close(fd)


def test_o_append_from_two_processes_loses_nothing(datafs_mount: Mount):
    import zlib

    path = datafs_mount.path / "log"
    path.write_bytes(b"")
    ctx = multiprocessing.get_context("fork")
    count = 300
    _run([ctx.Process(target=_appender, args=(str(path), w, count)) for w in (1, 2)])
    data = read_uncached(path)
    seen: dict[int, list[int]] = {1: [], 2: []}
    pos = 0
    while pos < len(data):
        writer, seq, length, crc = _RECORD.unpack_from(data, pos)
        payload = data[pos + _RECORD.size:pos + _RECORD.size + length]
        assert writer in seen and len(payload) == length and zlib.crc32(payload) == crc, f"bad record at {pos}"
        seen[writer].append(seq)
        pos += _RECORD.size + length
    assert seen == {1: list(range(count)), 2: list(range(count))}
    assert os.stat(path).st_size == len(data)


def _exclusive_creator(directory: str, names: int, results) -> None:
    won = []
    for i in range(names):
        try:
            os.close(os.open(os.path.join(directory, f"n{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            won.append(i)
        except FileExistsError:
            pass
    results.put(won)


def test_exclusive_create_has_one_winner(datafs_mount: Mount):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    names = 300
    _run([ctx.Process(target=_exclusive_creator, args=(str(datafs_mount.path), names, results))
                    for _ in range(4)])
    won = [i for _ in range(4) for i in results.get(timeout=5)]
    assert sorted(won) == list(range(names))
    assert len(os.listdir(datafs_mount.path)) == names


def test_directory_with_100k_entries(datafs_mount: Mount, engine: str):
    directory = datafs_mount.path / "big"
    directory.mkdir()
    # A transaction per create over the network: 4,000 (eight of the
    # engine's 512-row scan pages, so the deletes cross page boundaries)
    # keeps the PostgreSQL run within CI's budget; the benchmark times a 10k
    # listing on both engines.
    count = 100_000 if engine == "lmdb" else 4_000
    names = [f"entry-{i:06d}" for i in range(count)]
    started = time.monotonic()
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # relative names: no walk from /
    try:
        for name in names:
            os.mknod(name, dir_fd=dir_fd)
        created = time.monotonic()
        listed = os.listdir(directory)
        assert len(listed) == count and set(listed) == set(names)
        assert os.stat(names[-1], dir_fd=dir_fd).st_size == 0

        # Delete while listing: every eighth entry already returned, and now
        # and then one not returned yet. Entries never deleted must come back
        # exactly once; deleted ones at most once.
        seen: list[str] = []
        seen_set: set[str] = set()
        deleted: set[str] = set()
        tail = iter(reversed(names))
        with os.scandir(directory) as entries:
            for entry in entries:
                seen.append(entry.name)
                seen_set.add(entry.name)
                if len(seen) % 8 == 0 and entry.name not in deleted:
                    os.unlink(entry.name, dir_fd=dir_fd)
                    deleted.add(entry.name)
                if len(seen) % 32 == 0:
                    victim = next(tail)
                    if victim not in deleted and victim not in seen_set:
                        os.unlink(victim, dir_fd=dir_fd)
                        deleted.add(victim)
    finally:
        os.close(dir_fd)
    assert len(seen) == len(seen_set), "an entry was returned twice"
    assert set(names) - deleted <= seen_set, "an entry was skipped"
    assert sorted(os.listdir(directory)) == sorted(set(names) - deleted)
    assert len(deleted) > count // 8
    print(f"{count} entries: create {created - started:.1f} s, list and delete {time.monotonic() - created:.1f} s")


# ---- persistence and crashes ------------------------------------------------------------
def _build_tree(root: Path) -> None:
    (root / "models" / "llama" / "shards").mkdir(parents=True)
    (root / "empty-dir").mkdir(mode=0o700)
    write_file(root / "models" / "llama" / "shards" / "0.bin", os.urandom(C + 77))
    write_file(root / "models" / "llama" / "config.json", b'{"layers": 32}')
    write_file(root / "models" / "zero", b"")
    with open(root / "models" / "sparse", "wb") as f:
        f.seek(2 * C)
        f.write(b"end")
    os.link(root / "models" / "llama" / "config.json", root / "config-link.json")
    os.symlink("models/llama/config.json", root / "config")
    os.symlink("../dangling", root / "models" / "broken")
    os.chmod(root / "models" / "llama" / "config.json", 0o640)
    os.chown(root / "models" / "zero", 1000, 2000)
    os.setxattr(root / "models" / "llama" / "shards" / "0.bin", "user.checksum", b"abc123")
    os.setxattr(root / "empty-dir", "user.note", b"kept")
    os.utime(root / "models" / "llama" / "shards" / "0.bin", ns=(1_600_000_000_123_456_789, 1_700_000_000_987_654_321))
    os.utime(root / "models" / "broken", ns=(11, 22), follow_symlinks=False)


def test_tree_is_identical_after_remount(datafs_mount: Mount):
    root = datafs_mount.path
    _build_tree(root)
    before = snapshot(root)
    assert len(before) == 11
    datafs_mount.remount()
    assert snapshot(root) == before
    datafs_mount.remount()  # and a second time, with nothing written in between
    assert snapshot(root) == before


def test_closed_files_survive_sigkill_and_orphans_are_freed(datafs_mount: Mount):
    m = datafs_mount
    root = m.path
    _build_tree(root)
    files = {f"f{i}": os.urandom(i * MiB + i) for i in range(1, 10, 2)}  # 1 to 9 MiB
    for name, data in files.items():
        write_file(root / name, data)
    os.rename(root / "f1", root / "models" / "f1-moved")
    files["models/f1-moved"] = files.pop("f1")
    write_file(root / "f3", files["f3"][::-1])  # rewritten and closed: the new version counts
    files["f3"] = files["f3"][::-1]
    for name in ("models/llama/shards/0.bin", "models/llama/config.json", "models/sparse", "models/zero"):
        files[name] = (root / name).read_bytes()

    # Still open at the crash: fsynced content survives; unflushed writes to a
    # committed file leave its last committed version, whole. (Nothing may
    # open and close f5 after those writes: any close commits the inode.)
    synced = os.urandom(C + 99)
    synced_fd = os.open(root / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(synced_fd, synced)
    os.fsync(synced_fd)
    files["synced"] = synced
    before = snapshot(root)
    dirty_fd = os.open(root / "f5", os.O_WRONLY)
    os.pwrite(dirty_fd, os.urandom(C), 0)  # a whole chunk: sealed into the cache, never committed
    os.pwrite(dirty_fd, b"partial", 2 * C + 5)

    # An open, unlinked file whose content was committed (fsync) before the crash.
    orphan_data = os.urandom(C + 123)
    orphan_chunks = chunk_ids(orphan_data)
    orphan_fd = os.open(root / "orphan", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(orphan_fd, orphan_data)
    os.fsync(orphan_fd)
    os.unlink(root / "orphan")
    assert orphan_chunks <= set(cached_chunks(m))
    # Uploaded before the crash, so no pending upload pins it after the restart.
    wait_until(lambda: all(in_store(m, c) for c in orphan_chunks), 10, "the orphan's chunks to be uploaded")

    m.kill()
    with pytest.raises(OSError) as dead:
        os.listdir(root)  # always asks the daemon (a stat may be answered from the kernel's cache)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    for fd in (synced_fd, dirty_fd, orphan_fd):
        try:
            os.close(fd)
        except OSError:
            pass  # the connection is gone; the descriptor is closed anyway

    m.mount()
    assert snapshot(root) == before
    for name, data in files.items():
        assert sha_uncached(root / name) == sha(data), name
    assert not (root / "orphan").exists()

    # The orphan is freed and the never-committed chunk dropped: the cache
    # holds exactly the chunks the surviving files reference.
    referenced = {c for data in files.values() for c in chunk_ids(data)}
    wait_until(lambda: set(cached_chunks(m)) == referenced, GC_TIMEOUT_SECONDS, "the cache to hold only referenced chunks")
    assert not any(in_store(m, chunk) for chunk in orphan_chunks)

    # The mount works and can be cleanly remounted.
    write_file(root / "after", b"after the crash")
    m.remount()
    assert (root / "after").read_bytes() == b"after the crash"
    assert sha_uncached(root / "f9") == sha(files["f9"])
