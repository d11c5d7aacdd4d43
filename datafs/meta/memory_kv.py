"""An in-memory engine for unit tests: a sorted dict behind one lock.

Writes go to a copy that replaces the committed map only when the block ends
without an exception, which gives the same all-or-nothing behaviour as LMDB.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from typing import Iterator

from .kv import KV, Txn


class _MemTxn(Txn):
    def __init__(self, data: dict[bytes, bytes], writable: bool):
        self._data = data
        self._writable = writable
        self._keys: list[bytes] | None = None

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(bytes(key))

    def put(self, key: bytes, value: bytes) -> None:
        if not self._writable:
            raise RuntimeError("put in a read transaction")
        self._data[bytes(key)] = bytes(value)
        self._keys = None

    def delete(self, key: bytes) -> bool:
        if not self._writable:
            raise RuntimeError("delete in a read transaction")
        self._keys = None
        return self._data.pop(bytes(key), None) is not None

    def scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        keys = sorted(self._data)
        begin = max(prefix, start) if start is not None else prefix
        for key in keys[bisect.bisect_left(keys, begin):]:
            if not key.startswith(prefix):
                break
            value = self._data.get(key)
            if value is not None:
                yield key, value


class MemoryKV(KV):
    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def read(self) -> Iterator[Txn]:
        yield _MemTxn(dict(self._data), writable=False)

    @contextlib.contextmanager
    def write(self) -> Iterator[Txn]:
        with self._lock:
            working = dict(self._data)
            yield _MemTxn(working, writable=True)
            self._data = working
