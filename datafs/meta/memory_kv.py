"""An in-memory engine for unit tests: a sorted dict behind one lock.

A write runs against a copy that replaces the committed map only when the body
returns, which gives the same all-or-nothing behaviour as the real engines.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterator, TypeVar

from .kv import KV, Txn

T = TypeVar("T")


class _MemTxn(Txn):
    def __init__(self, data: dict[bytes, bytes], writable: bool):
        self._data = data
        self._writable = writable

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(bytes(key))

    def put(self, key: bytes, value: bytes) -> None:
        if not self._writable:
            raise RuntimeError("put in a read transaction")
        self._data[bytes(key)] = bytes(value)

    def delete(self, key: bytes) -> None:
        if not self._writable:
            raise RuntimeError("delete in a read transaction")
        self._data.pop(bytes(key), None)

    def scan(self, prefix: bytes, start: bytes | None = None, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        keys = sorted(self._data)
        begin = max(prefix, start) if start is not None else prefix
        count = 0
        for key in keys[bisect.bisect_left(keys, begin):]:
            if not key.startswith(prefix) or (limit is not None and count >= limit):
                break
            value = self._data.get(key)
            if value is not None:
                count += 1
                yield key, value


class MemoryKV(KV):
    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def view(self, fn: Callable[[Txn], T], consistent: bool = True) -> T:
        return fn(_MemTxn(dict(self._data), writable=False))

    def transact(self, fn: Callable[[Txn], T]) -> T:
        with self._lock:
            working = dict(self._data)
            result = fn(_MemTxn(working, writable=True))
            self._data = working
            return result

    def describe(self) -> str:
        return "memory://"
