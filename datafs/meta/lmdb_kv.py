"""The LMDB engine: one environment, one B-tree, copy-on-write pages.

LMDB gives atomic, isolated write transactions (one writer at a time) and
lock-free snapshot reads through a memory map, which is what makes rename and
every other metadata change atomic. The environment is opened without a sync
per commit: a daemon crash (even SIGKILL) never loses a committed transaction,
because the pages are already in the kernel; `sync()` is called where data must
also survive a power loss (after file-content commits and on fsync).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import lmdb

from .kv import KV, Txn

# Address space only; the file grows as data is written.
MAP_SIZE_BYTES = 1 << 40


class _LmdbTxn(Txn):
    def __init__(self, txn: lmdb.Transaction):
        self._txn = txn

    def get(self, key: bytes) -> bytes | None:
        return self._txn.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self._txn.put(key, value)

    def delete(self, key: bytes) -> bool:
        return self._txn.delete(key)

    def scan(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        cursor = self._txn.cursor()
        if not cursor.set_range(max(prefix, start) if start is not None else prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            yield key, value


class LmdbKV(KV):
    def __init__(self, path: str, readonly: bool = False):
        if not readonly:
            os.makedirs(path, exist_ok=True)
        self._env = lmdb.open(
            path,
            readonly=readonly,
            map_size=MAP_SIZE_BYTES,
            subdir=True,
            sync=False,
            metasync=False,
            max_readers=512,
            max_spare_txns=16,
        )

    @contextlib.contextmanager
    def read(self) -> Iterator[Txn]:
        with self._env.begin(write=False, buffers=False) as txn:
            yield _LmdbTxn(txn)

    @contextlib.contextmanager
    def write(self) -> Iterator[Txn]:
        with self._env.begin(write=True) as txn:
            yield _LmdbTxn(txn)

    def sync(self) -> None:
        self._env.sync(True)

    def close(self) -> None:
        if not self._env.flags()["readonly"]:
            self._env.sync(True)
        self._env.close()
