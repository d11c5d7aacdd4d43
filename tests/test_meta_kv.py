"""Conformance suite for metadata engines: every engine behind `KV` passes it.

Memory, LMDB and PostgreSQL (a real server, see conftest) run the same tests,
including writers in several threads and in several processes committing
conflicting read-modify-write transactions at once: no update may be lost.
"""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest

from datafs.errors import UsageError
from datafs.meta.kv import KV, open_kv, prefix_end

ENGINES = ["memory", "lmdb", "postgres"]


def _open(engine: str, tmp_path, request) -> KV:
    if engine == "memory":
        return open_kv("memory://")
    if engine == "lmdb":
        return open_kv(f"lmdb://{tmp_path / 'meta'}")
    database = request.getfixturevalue("pg_url")
    return open_kv(database.url, password=database.env["PGPASSWORD"], volume="conformance")


@pytest.fixture(params=ENGINES)
def kv(request, tmp_path) -> KV:
    engine = _open(request.param, tmp_path, request)
    yield engine
    engine.close()


def put(kv: KV, key: bytes, value: bytes) -> None:
    kv.transact(lambda t: t.put(key, value))


def get(kv: KV, key: bytes) -> bytes | None:
    return kv.view(lambda t: t.get(key))


def test_put_get_delete(kv: KV):
    def write(t):
        t.put(b"a", b"1")
        return t.get(b"a")  # a transaction sees its own writes

    assert kv.transact(write) == b"1"
    assert get(kv, b"a") == b"1"
    assert get(kv, b"missing") is None

    def remove(t):
        t.delete(b"a")
        t.delete(b"never-there")
        return t.get(b"a")

    assert kv.transact(remove) is None
    assert get(kv, b"a") is None


def test_get_many_sees_buffered_writes(kv: KV):
    put(kv, b"k1", b"old")
    put(kv, b"k2", b"two")

    def body(t):
        t.put(b"k1", b"new")
        t.delete(b"k2")
        t.put(b"k3", b"three")
        return t.get_many([b"k1", b"k2", b"k3", b"k4"])

    assert kv.transact(body) == {b"k1": b"new", b"k3": b"three"}


def test_failed_write_leaves_no_trace(kv: KV):
    put(kv, b"keep", b"old")

    def body(t):
        t.put(b"keep", b"new")
        t.put(b"extra", b"x")
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        kv.transact(body)
    assert get(kv, b"keep") == b"old"
    assert get(kv, b"extra") is None


def test_scan_is_ordered_and_bounded_by_prefix(kv: KV):
    keys = [b"p\x00\x02", b"p\x00\x01", b"p\x01", b"q", b"o\xff", b"p", b"p\xff\xff"]

    def fill(t):
        for k in keys:
            t.put(k, k + b"!")

    kv.transact(fill)

    def read(t):
        got = list(t.scan(b"p"))
        return (
            got,
            [k for k, _ in t.scan(b"p", b"p\x00\x02")],
            list(t.scan(b"z")),
            [k for k, _ in t.scan(b"p", limit=2)],
            [k for k, _ in t.scan(b"p\xff")],
        )

    got, tail, empty, limited, high = kv.view(read)
    assert [k for k, _ in got] == [b"p", b"p\x00\x01", b"p\x00\x02", b"p\x01", b"p\xff\xff"]
    assert all(v == k + b"!" for k, v in got)
    assert tail == [b"p\x00\x02", b"p\x01", b"p\xff\xff"]
    assert empty == []
    assert limited == [b"p", b"p\x00\x01"]
    assert high == [b"p\xff\xff"]


def test_scan_merges_this_transactions_writes(kv: KV):
    put(kv, b"s1", b"a")
    put(kv, b"s3", b"c")
    put(kv, b"s5", b"e")

    def body(t):
        t.put(b"s2", b"b")
        t.delete(b"s3")
        t.put(b"s5", b"E")
        t.put(b"s6", b"f")
        return list(t.scan(b"s")), list(t.scan(b"s", b"s3", limit=2))

    everything, window = kv.transact(body)
    assert everything == [(b"s1", b"a"), (b"s2", b"b"), (b"s5", b"E"), (b"s6", b"f")]
    assert window == [(b"s5", b"E"), (b"s6", b"f")]


def test_long_scan_spans_pages(kv: KV):
    """More keys than a remote engine fetches per round trip."""

    def fill(t):
        for i in range(1300):
            t.put(b"L" + i.to_bytes(4, "big"), b"")

    kv.transact(fill)
    keys = kv.view(lambda t: [k for k, _ in t.scan(b"L")])
    assert keys == [b"L" + i.to_bytes(4, "big") for i in range(1300)]


def test_scan_start_before_prefix_is_clamped(kv: KV):
    put(kv, b"a1", b"")
    put(kv, b"b1", b"")
    assert kv.view(lambda t: [k for k, _ in t.scan(b"b", b"a")]) == [b"b1"]


def test_counter(kv: KV):
    def body(t):
        return t.incr(b"#n"), t.incr(b"#n", 5), t.incr(b"#n", -2)

    assert kv.transact(body) == (1, 6, 4)
    assert kv.view(lambda t: (t.counter(b"#n"), t.counter(b"#other"))) == (4, 0)


def test_read_snapshot_is_isolated_from_later_writes(kv: KV):
    put(kv, b"k", b"v1")
    seen = []

    def read(t):
        first = t.get(b"k")
        worker = threading.Thread(target=lambda: kv.transact(lambda w: (w.put(b"k", b"v2"), w.put(b"k2", b"x"))))
        worker.start()
        worker.join()
        seen.append((first, t.get(b"k"), t.get(b"k2")))

    kv.view(read)
    assert seen == [(b"v1", b"v1", None)]
    assert get(kv, b"k") == b"v2"


def test_concurrent_writers_serialize(kv: KV):
    """Read-modify-write from many threads loses no update."""

    def bump() -> None:
        for _ in range(100):
            kv.transact(lambda t: t.incr(b"#c"))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert kv.view(lambda t: t.counter(b"#c")) == 400


def test_body_that_conflicts_runs_again(pg_url):
    """A transaction body is a function the engine may rerun: the result
    returned is the one from the run that committed. (LMDB and memory have
    one writer at a time: their bodies cannot interleave.)"""
    kv = open_kv(pg_url.url, password=pg_url.env["PGPASSWORD"])
    runs = []
    barrier = threading.Barrier(2)

    def racer(name: str) -> None:
        def body(t):
            runs.append(name)
            value = t.counter(b"#race")
            if len(runs) <= 2:
                barrier.wait(timeout=5)  # both read before either writes
            t.put(b"#race", (value + 1).to_bytes(8, "big", signed=True))
            return value

        results[name] = kv.transact(body)

    results: dict[str, int] = {}
    try:
        threads = [threading.Thread(target=racer, args=(n,)) for n in "ab"]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(results.values()) == [0, 1]
        assert kv.view(lambda t: t.counter(b"#race")) == 2
        assert len(runs) >= 3  # one side ran again after the conflict
    finally:
        kv.close()


def _process_bumper(url: str, password: str, n: int) -> None:
    engine = open_kv(url, password=password, volume="conformance")
    try:
        for _ in range(n):
            engine.transact(lambda t: (t.incr(b"#p"), t.put(b"last", str(os.getpid()).encode())))
    finally:
        engine.close()


def test_processes_committing_conflicting_transactions(pg_url):
    """Two processes (two nodes) hammer the same keys: every increment lands."""
    kv = open_kv(pg_url.url, password=pg_url.env["PGPASSWORD"], volume="conformance")
    try:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_process_bumper, args=(pg_url.url, pg_url.env["PGPASSWORD"], 150)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        assert kv.view(lambda t: t.counter(b"#p")) == 450
    finally:
        kv.close()


def test_volumes_in_one_database_never_mix(pg_url):
    password = pg_url.env["PGPASSWORD"]
    a = open_kv(pg_url.url, password=password, volume="alpha")
    b = open_kv(pg_url.url, password=password, volume="beta")
    try:
        put(a, b"k", b"from-a")
        assert get(b, b"k") is None
        put(b, b"k", b"from-b")
        assert get(a, b"k") == b"from-a"
        assert b.view(lambda t: list(t.scan(b""))) == [(b"k", b"from-b")]
    finally:
        a.close()
        b.close()


def test_postgres_bad_password_and_missing_database_are_one_line(pg_url):
    with pytest.raises(UsageError) as wrong:
        open_kv(pg_url.url, password="not-the-password")
    assert "password" in str(wrong.value) and "\n" not in str(wrong.value)
    missing = pg_url.url.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(UsageError) as absent:
        open_kv(missing, password=pg_url.env["PGPASSWORD"])
    assert "no_such_db" in str(absent.value)


def test_postgres_describe_masks_password(pg_url):
    from datafs.meta.postgres_kv import mask_url

    assert mask_url("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    kv = open_kv(pg_url.url, password=pg_url.env["PGPASSWORD"])
    try:
        assert pg_url.env["PGPASSWORD"] not in kv.describe()
    finally:
        kv.close()


def test_postgres_survives_a_server_restart(pg_url, pg_server):
    """A broken connection is dropped and the transaction retried on a new one."""
    kv = open_kv(pg_url.url, password=pg_url.env["PGPASSWORD"], timeout_seconds=30)
    try:
        put(kv, b"before", b"1")
        pg_server.restart()
        put(kv, b"after", b"2")
        assert kv.view(lambda t: t.get_many([b"before", b"after"])) == {b"before": b"1", b"after": b"2"}
    finally:
        kv.close()


def test_postgres_down_fails_within_deadline(pg_url, pg_server):
    from datafs.errors import MetaUnavailable
    import time

    kv = open_kv(pg_url.url, password=pg_url.env["PGPASSWORD"], timeout_seconds=2)
    try:
        put(kv, b"x", b"1")
        pg_server.pause()
        started = time.monotonic()
        with pytest.raises(MetaUnavailable):
            kv.view(lambda t: t.get(b"x"))
        assert time.monotonic() - started < 30
    finally:
        pg_server.resume()
        kv.close()


def test_prefix_end():
    assert prefix_end(b"a") == b"b"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") is None


def test_lmdb_survives_reopen(tmp_path):
    kv = open_kv(f"lmdb://{tmp_path / 'm'}")
    put(kv, b"durable", b"yes")
    kv.close()
    kv = open_kv(f"lmdb://{tmp_path / 'm'}")
    assert get(kv, b"durable") == b"yes"
    kv.close()


def test_unknown_engine_is_rejected():
    with pytest.raises(ValueError):
        open_kv("redis://localhost")


def test_get_many_via_follows_a_pointer(kv: KV):
    def fill(t):
        t.put(b"d-entry", (7).to_bytes(8, "big") + b"seq")
        t.put(b"i" + (7).to_bytes(8, "big"), b"the inode")
        t.put(b"d-dangling", (9).to_bytes(8, "big"))
        t.put(b"other", b"x")

    kv.transact(fill)
    got = kv.view(lambda t: t.get_many_via([b"other", b"d-entry"], b"d-entry", b"i"), consistent=False)
    assert got == {b"other": b"x", b"d-entry": (7).to_bytes(8, "big") + b"seq", b"i" + (7).to_bytes(8, "big"): b"the inode"}
    assert kv.view(lambda t: t.get_many_via([b"d-dangling"], b"d-dangling", b"i")) == {b"d-dangling": (9).to_bytes(8, "big")}
    assert kv.view(lambda t: t.get_many_via([b"missing"], b"missing", b"i")) == {}
