"""Whole chunks written by this node, or fetched for a reader on it, go to
the cache around the page cache (O_DIRECT); written ones are read back that
way for their upload, fetched ones are served from memory meanwhile. Small
chunks, chunks fetched for a peer and filesystems that refuse O_DIRECT use
the page cache."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

import pytest

from datafs.chunks import chunk_id, direct_io
from datafs.chunks.cache import ChunkCache
from datafs.config import CHUNK_SIZE_BYTES as C
from datafs.meta.store import ChunkRef
from datafs.tiers.chain import ChunkSource
from datafs.tiers.file_store import FileStore
from datafs.tiers.s3_store import _chunk_file_bytes

from .conftest import resident_pages


def test_a_whole_chunk_written_skips_the_page_cache_and_reads_back(tmp_path: Path):
    cache = ChunkCache(tmp_path, 1 << 30, 0)
    cache.open()
    whole, small = os.urandom(C), os.urandom(64 << 10)
    for data in (whole, small):
        assert cache.put(chunk_id(data), data, defer_sync=True)
    assert resident_pages(cache.path(chunk_id(whole))) == 0
    assert resident_pages(cache.path(chunk_id(small))) == len(small) // mmap.PAGESIZE
    assert cache.verify(chunk_id(whole)) and cache.verify(chunk_id(small))
    with _chunk_file_bytes(cache.path(chunk_id(whole))) as data:  # the upload's read
        assert isinstance(data, memoryview) and data == whole
    assert resident_pages(cache.path(chunk_id(whole))) == 0
    with _chunk_file_bytes(cache.path(chunk_id(small))) as data:
        assert data == small


class _CountingStore(FileStore):
    def __init__(self, root: Path):
        super().__init__(root)
        self.gets = 0

    def get(self, chunk_id: str) -> bytes:
        self.gets += 1
        return super().get(chunk_id)


def _source_over_a_store(tmp_path: Path, *chunks: bytes) -> tuple[ChunkSource, _CountingStore]:
    store = _CountingStore(tmp_path / "store")
    store.check()
    for data in chunks:
        staged = tmp_path / f"staged-{chunk_id(data)}"
        staged.write_bytes(data)
        store.put_file(chunk_id(data), staged)
    cache = ChunkCache(tmp_path / "cache", 1 << 30, 0)
    cache.open()
    return ChunkSource(cache, store, prefetch_chunks=1, wait_timeout_seconds=5), store


async def test_a_chunk_fetched_for_a_reader_is_read_from_memory_once_and_skips_the_page_cache(tmp_path: Path):
    """A reader's fetched chunk is served from memory until it has been read
    whole, and its cache file is written around the page cache; then reads
    come from that file."""
    data = os.urandom(C)
    ref = ChunkRef(chunk_id(data), C)
    source, store = _source_over_a_store(tmp_path, data)
    quarter = C // 4
    assert bytes(await source.read(ref, 0, quarter)) == data[:quarter]  # fetched: one GET
    assert store.gets == 1 and ref.chunk_id in source.cache
    assert resident_pages(source.cache.path(ref.chunk_id)) == 0
    for offset in range(quarter, C, quarter):  # the rest from memory: the file stays out of it
        assert bytes(await source.read(ref, offset, quarter)) == data[offset:offset + quarter]
    assert resident_pages(source.cache.path(ref.chunk_id)) == 0
    # Read whole once: memory lets it go, and the cache file serves it.
    assert bytes(await source.read(ref, 100, 5000)) == data[100:5100]
    assert resident_pages(source.cache.path(ref.chunk_id)) > 0
    assert store.gets == 1


async def test_chunks_fetched_for_readers_are_pushed_out_of_memory_oldest_first(tmp_path: Path):
    """Chunks fetched but not read through are kept up to two prefetch
    windows; older ones are read from their cache files."""
    datas = [os.urandom(C) for _ in range(3)]
    source, store = _source_over_a_store(tmp_path, *datas)
    refs = [ChunkRef(chunk_id(d), C) for d in datas]
    for ref, data in zip(refs, datas):
        assert bytes(await source.read(ref, 0, 4096)) == data[:4096]
    assert store.gets == 3
    # Two windows of one chunk each: the first chunk went, the others stay.
    assert [resident_pages(source.cache.path(r.chunk_id)) for r in refs] == [0, 0, 0]
    assert bytes(await source.read(refs[0], 4096, C - 4096)) == datas[0][4096:]
    assert resident_pages(source.cache.path(refs[0].chunk_id)) > 0
    for ref, data in zip(refs[1:], datas[1:]):
        assert bytes(await source.read(ref, 4096, C - 4096)) == data[4096:]
        assert resident_pages(source.cache.path(ref.chunk_id)) == 0
    assert store.gets == 3


async def test_a_chunk_fetched_for_a_peer_stays_in_the_page_cache(tmp_path: Path):
    """The peer server sends a chunk it fetched from its cache file at once:
    that file is written through the page cache."""
    data = os.urandom(C)
    source, _ = _source_over_a_store(tmp_path, data)
    assert await source.fetch(ChunkRef(chunk_id(data), C)) == data
    assert resident_pages(source.cache.path(chunk_id(data))) == C // mmap.PAGESIZE


def test_a_filesystem_refusing_o_direct_gets_plain_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Where O_DIRECT is refused (EINVAL, as some FUSE filesystems do), the
    chunk is written and read back all the same, and that directory is not
    asked again."""
    real_open = os.open
    refused = []

    def open_refusing_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io, "_refused", set())
    monkeypatch.setattr(os, "open", open_refusing_direct)
    cache = ChunkCache(tmp_path, 1 << 30, 0)
    cache.open()
    data, other = os.urandom(C), os.urandom(C)
    assert cache.put(chunk_id(data), data, defer_sync=True)
    assert cache.put(chunk_id(other), other, defer_sync=True)
    assert len(refused) == 1  # the second chunk was not tried that way
    assert cache.path(chunk_id(data)).read_bytes() == data
    with _chunk_file_bytes(cache.path(chunk_id(other))) as data:
        assert data == other
    assert len(refused) == 2  # the chunks' directory is asked once too
    assert os.listdir(cache.temp_path().parent) == []  # no temp file left behind


def test_a_file_whose_size_changed_is_read_plainly(tmp_path: Path):
    path = tmp_path / "chunk"
    path.write_bytes(os.urandom(C))
    with direct_io.read_whole(str(path), C - 4096) as data:
        assert data is None
    with direct_io.read_whole(str(path), C) as data:
        assert data == path.read_bytes()


def test_buffers_are_reused_and_few_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Buffers go back to the pool after use, the last one first; beyond
    SPARE_BUFFERS, idle ones are freed."""
    monkeypatch.setattr(direct_io, "_spare", [])
    path = tmp_path / "chunk"
    path.write_bytes(os.urandom(C))
    with direct_io.read_whole(str(path), C) as data:
        first = data.obj
    with direct_io.read_whole(str(path), C) as data:
        assert data.obj is first
    with contextlib.ExitStack() as stack:
        views = [stack.enter_context(direct_io.read_whole(str(path), C)) for _ in range(direct_io.SPARE_BUFFERS + 2)]
        assert len({id(v.obj) for v in views}) == direct_io.SPARE_BUFFERS + 2
    assert len(direct_io._spare) == direct_io.SPARE_BUFFERS
