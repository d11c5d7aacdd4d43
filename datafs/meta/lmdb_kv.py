"""The LMDB engine: one environment, one B-tree, copy-on-write pages.

LMDB gives atomic, isolated write transactions (one writer at a time) and
lock-free snapshot reads through a memory map, which is what makes rename and
every other metadata change atomic. The environment is opened with MDB_NOSYNC
(no flush per commit; no MDB_WRITEMAP): a daemon crash (even SIGKILL) never
loses a committed transaction, because the pages are already in the kernel;
`sync()` is called where data must also survive a power loss (every flush
interval, at fsync and at unmount: durability.py). LMDB keeps a transaction
atomic, consistent and isolated across a power loss in this mode only "if
the filesystem preserves write order", which ext4 and XFS do not promise; a
power loss while the kernel writes LMDB's pages back between two syncs can
then damage the file (README, "What is durable when"). MDB_NOMETASYNC would
keep it consistent, at one disk flush per write transaction (measured: 1 to
2.6 ms against 15 us), and every create and close is one.

Every committed transaction is timed (`datafs_meta_transaction_seconds`, by
read or write: its count is the number of transactions, so a hot read pays one
observation and no second counter); a body that raises is counted in
`datafs_meta_transactions_total{result="aborted"}`. One writer at a time means
no conflicts, so there are no restarts to count.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator, TypeVar

import lmdb

from .. import metrics
from .kv import KV, Txn

T = TypeVar("T")

# Address space only; the file grows as data is written.
MAP_SIZE_BYTES = 1 << 40

# Bound once: a label lookup per transaction would cost as much as the observation.
_READ_ABORTED = metrics.META_TXNS.labels("read", "aborted")
_READ_SECONDS = metrics.META_TXN_SECONDS.labels("read")
_WRITE_ABORTED = metrics.META_TXNS.labels("write", "aborted")
_WRITE_SECONDS = metrics.META_TXN_SECONDS.labels("write")


class _LmdbTxn(Txn):
    def __init__(self, txn: lmdb.Transaction):
        self._txn = txn

    def get(self, key: bytes) -> bytes | None:
        return self._txn.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self._txn.put(key, value)

    def delete(self, key: bytes) -> None:
        self._txn.delete(key)

    def scan(self, prefix: bytes, start: bytes | None = None, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        cursor = self._txn.cursor()
        if not cursor.set_range(max(prefix, start) if start is not None else prefix):
            return
        count = 0
        for key, value in cursor:
            if not key.startswith(prefix) or (limit is not None and count >= limit):
                break
            count += 1
            yield key, value


class LmdbKV(KV):
    def __init__(self, path: str, readonly: bool = False):
        self.path = path
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

    def view(self, fn: Callable[[Txn], T], consistent: bool = True) -> T:
        started = time.monotonic()
        try:
            with self._env.begin(write=False, buffers=False) as txn:
                result = fn(_LmdbTxn(txn))
        except BaseException:
            _READ_ABORTED.inc()  # the body raised (often an answer, e.g. ENOENT)
            raise
        _READ_SECONDS.observe(time.monotonic() - started)
        return result

    def transact(self, fn: Callable[[Txn], T]) -> T:
        # One writer at a time: a body never conflicts, so it runs once.
        started = time.monotonic()
        try:
            with self._env.begin(write=True) as txn:
                result = fn(_LmdbTxn(txn))
        except BaseException:
            _WRITE_ABORTED.inc()
            raise
        _WRITE_SECONDS.observe(time.monotonic() - started)
        return result

    def describe(self) -> str:
        return f"lmdb://{self.path}"

    def sync(self) -> None:
        self._env.sync(True)

    def close(self) -> None:
        if not self._env.flags()["readonly"]:
            self._env.sync(True)
        self._env.close()
