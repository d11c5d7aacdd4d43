"""Conformance suite for metadata engines: every engine behind `KV` must pass it.

A shared multi-node engine added later runs the same tests by adding itself to
the `kv` fixture's parameters.
"""

from __future__ import annotations

import threading

import pytest

from datafs.meta.kv import KV, open_kv


@pytest.fixture(params=["memory", "lmdb"])
def kv(request, tmp_path) -> KV:
    engine = open_kv("memory://" if request.param == "memory" else f"lmdb://{tmp_path / 'meta'}")
    yield engine
    engine.close()


def test_put_get_delete(kv: KV):
    with kv.write() as t:
        t.put(b"a", b"1")
        assert t.get(b"a") == b"1"  # a transaction sees its own writes
    with kv.read() as t:
        assert t.get(b"a") == b"1"
        assert t.get(b"missing") is None
    with kv.write() as t:
        assert t.delete(b"a") is True
        assert t.delete(b"a") is False
    with kv.read() as t:
        assert t.get(b"a") is None


def test_failed_write_leaves_no_trace(kv: KV):
    with kv.write() as t:
        t.put(b"keep", b"old")
    with pytest.raises(RuntimeError):
        with kv.write() as t:
            t.put(b"keep", b"new")
            t.put(b"extra", b"x")
            raise RuntimeError("abort")
    with kv.read() as t:
        assert t.get(b"keep") == b"old"
        assert t.get(b"extra") is None


def test_scan_is_ordered_and_bounded_by_prefix(kv: KV):
    keys = [b"p\x00\x02", b"p\x00\x01", b"p\x01", b"q", b"o\xff", b"p"]
    with kv.write() as t:
        for k in keys:
            t.put(k, k + b"!")
    with kv.read() as t:
        got = list(t.scan(b"p"))
        assert [k for k, _ in got] == [b"p", b"p\x00\x01", b"p\x00\x02", b"p\x01"]
        assert all(v == k + b"!" for k, v in got)
        assert [k for k, _ in t.scan(b"p", b"p\x00\x02")] == [b"p\x00\x02", b"p\x01"]
        assert list(t.scan(b"z")) == []


def test_scan_start_before_prefix_is_clamped(kv: KV):
    with kv.write() as t:
        t.put(b"a1", b"")
        t.put(b"b1", b"")
    with kv.read() as t:
        assert [k for k, _ in t.scan(b"b", b"a")] == [b"b1"]


def test_counter(kv: KV):
    with kv.write() as t:
        assert t.incr(b"#n") == 1
        assert t.incr(b"#n", 5) == 6
        assert t.incr(b"#n", -2) == 4
    with kv.read() as t:
        assert t.counter(b"#n") == 4
        assert t.counter(b"#other") == 0


def test_read_snapshot_is_isolated_from_later_writes(kv: KV):
    with kv.write() as t:
        t.put(b"k", b"v1")
    with kv.read() as snapshot:
        with kv.write() as t:
            t.put(b"k", b"v2")
            t.put(b"k2", b"x")
        assert snapshot.get(b"k") == b"v1"
        assert snapshot.get(b"k2") is None
    with kv.read() as t:
        assert t.get(b"k") == b"v2"


def test_concurrent_writers_serialize(kv: KV):
    """Read-modify-write from many threads loses no update."""

    def bump() -> None:
        for _ in range(200):
            with kv.write() as t:
                t.incr(b"#c")

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with kv.read() as t:
        assert t.counter(b"#c") == 800


def test_lmdb_survives_reopen(tmp_path):
    kv = open_kv(f"lmdb://{tmp_path / 'm'}")
    with kv.write() as t:
        t.put(b"durable", b"yes")
    kv.close()
    kv = open_kv(f"lmdb://{tmp_path / 'm'}")
    with kv.read() as t:
        assert t.get(b"durable") == b"yes"
    kv.close()


def test_unknown_engine():
    with pytest.raises(ValueError, match="unknown metadata engine"):
        open_kv("redis://localhost")
