"""The transactional key-value interface every metadata engine implements.

Modelled on JuiceFS's tkv: bytes keys and values, ordered prefix scans and an
atomic counter, all inside transactions. A transaction is a *function* of a
`Txn`, handed to `KV.transact` (read-write) or `KV.view` (read-only): an
optimistic engine (PostgreSQL at SERIALIZABLE) may run it more than once when
it conflicts with another node, so a body has no effects outside the
transaction and never awaits. LMDB has one writer at a time and runs a body
exactly once.

Invariants an engine must keep (tests/test_meta_kv.py checks them all, on
every engine):
- a transaction that raises leaves no trace, and its exception reaches the caller;
- a transaction sees its own writes, and one consistent snapshot of the rest;
- two transactions that conflict never both commit: one is run again;
- `scan` yields keys in ascending byte order, only those starting with `prefix`.

Engines are chosen by URL scheme in `open_kv`. A remote engine sets `remote`,
which tells callers to run transactions in worker threads, off the event loop.
"""

from __future__ import annotations

import abc
import struct
from typing import Callable, Iterable, Iterator, TypeVar

_COUNTER = struct.Struct(">q")

T = TypeVar("T")


class Txn(abc.ABC):
    @abc.abstractmethod
    def get(self, key: bytes) -> bytes | None: ...

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """The values of those `keys` that exist; remote engines fetch them in one round trip."""
        out = {}
        for key in keys:
            value = self.get(key)
            if value is not None:
                out[key] = value
        return out

    def get_many_via(self, keys: list[bytes], via: bytes, prefix: bytes) -> dict[bytes, bytes]:
        """`get_many(keys)`, plus the key `prefix + value_of(via)[:8]` when `via`
        (one of `keys`) exists: following a pointer, as a lookup does from a
        directory entry to its inode. Remote engines do it in one round trip."""
        found = self.get_many(keys)
        pointer = found.get(via)
        if pointer is not None:
            target = prefix + pointer[:8]
            value = self.get(target)
            if value is not None:
                found[target] = value
        return found

    @abc.abstractmethod
    def put(self, key: bytes, value: bytes) -> None: ...

    @abc.abstractmethod
    def delete(self, key: bytes) -> None:
        """Remove `key` if it exists (a blind write: remote engines buffer it)."""

    @abc.abstractmethod
    def scan(self, prefix: bytes, start: bytes | None = None, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Keys starting with `prefix`, from `start` (inclusive) on, ascending,
        at most `limit` of them."""

    def incr(self, key: bytes, delta: int = 1) -> int:
        raw = self.get(key)
        value = (_COUNTER.unpack(raw)[0] if raw else 0) + delta
        self.put(key, _COUNTER.pack(value))
        return value

    def counter(self, key: bytes) -> int:
        raw = self.get(key)
        return _COUNTER.unpack(raw)[0] if raw else 0


class KV(abc.ABC):
    #: Whether transactions wait on the network: callers then run them in
    #: worker threads behind a limiter of their own, never on the event loop.
    remote: bool = False
    #: Whether several nodes share this engine (one namespace for a fleet).
    shared: bool = False

    @abc.abstractmethod
    def transact(self, fn: Callable[[Txn], T]) -> T:
        """Run `fn` in a read-write transaction and commit it; return its result.
        `fn` may run more than once (after a conflict) and must be free of side
        effects outside the transaction."""

    @abc.abstractmethod
    def view(self, fn: Callable[[Txn], T], consistent: bool = True) -> T:
        """Run `fn` read-only. `consistent`: all its reads see one snapshot;
        without it a remote engine may run each read on its own (saving the
        transaction's round trips), for bodies that tolerate a change landing
        between two reads (a lookup racing an unlink just finds nothing)."""

    def sync(self) -> None:
        """Make committed transactions durable against power loss."""

    def describe(self) -> str:
        """The engine's URL with any password masked: safe for logs and status."""
        return type(self).__name__

    def close(self) -> None:
        pass


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def open_kv(url: str, **options) -> KV:
    """Open a metadata engine by URL: `lmdb:///path/dir`, `memory://`, or
    `postgresql://user@host:port/db` (options go to the engine)."""
    scheme, sep, rest = url.partition("://")
    if scheme == "lmdb":
        from .lmdb_kv import LmdbKV

        return LmdbKV(rest)
    if scheme == "memory":
        from .memory_kv import MemoryKV

        return MemoryKV()
    if scheme in ("postgres", "postgresql") and sep:
        from .postgres_kv import PostgresKV

        return PostgresKV(url, **options)
    raise ValueError(f"unknown metadata engine {scheme!r}: use lmdb://, memory:// or postgresql://")
