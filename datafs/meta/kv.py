"""The transactional key-value interface every metadata engine implements.

Modelled on JuiceFS's tkv: bytes keys and values, snapshot reads, exclusive
write transactions that commit as a whole or not at all, ordered prefix scans
and an atomic counter. Engines are chosen by URL scheme in `open_kv`.

Invariants an engine must keep (tests/test_meta_kv.py checks them):
- a write transaction that raises leaves no trace;
- a read transaction sees one consistent snapshot, never a half-applied write;
- `scan` yields keys in ascending byte order, only those starting with `prefix`.
"""

from __future__ import annotations

import abc
import struct
from typing import ContextManager, Iterator

_COUNTER = struct.Struct(">q")


class Txn(abc.ABC):
    @abc.abstractmethod
    def get(self, key: bytes) -> bytes | None: ...

    @abc.abstractmethod
    def put(self, key: bytes, value: bytes) -> None: ...

    @abc.abstractmethod
    def delete(self, key: bytes) -> bool:
        """Remove `key`; return whether it existed."""

    @abc.abstractmethod
    def scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Keys starting with `prefix`, from `start` (inclusive) on, ascending."""

    def incr(self, key: bytes, delta: int = 1) -> int:
        raw = self.get(key)
        value = (_COUNTER.unpack(raw)[0] if raw else 0) + delta
        self.put(key, _COUNTER.pack(value))
        return value

    def counter(self, key: bytes) -> int:
        raw = self.get(key)
        return _COUNTER.unpack(raw)[0] if raw else 0


class KV(abc.ABC):
    @abc.abstractmethod
    def read(self) -> ContextManager[Txn]:
        """A read-only snapshot."""

    @abc.abstractmethod
    def write(self) -> ContextManager[Txn]:
        """An exclusive transaction: commits when the block ends, aborts if it raises."""

    def sync(self) -> None:
        """Make committed transactions durable against power loss."""

    def close(self) -> None:
        pass


def open_kv(url: str) -> KV:
    """Open a metadata engine by URL: `lmdb:///path/dir` or `memory://`."""
    scheme, _, rest = url.partition("://")
    if scheme == "lmdb":
        from .lmdb_kv import LmdbKV

        return LmdbKV(rest)
    if scheme == "memory":
        from .memory_kv import MemoryKV

        return MemoryKV()
    raise ValueError(f"unknown metadata engine {scheme!r} in {url!r}")

