"""Metadata: a tiny transactional key-value interface (`kv`), its engines
(`lmdb_kv` for real use, `memory_kv` for unit tests), and the filesystem schema
built on it (`store`). A shared multi-node engine plugs in by implementing `KV`
and passing the conformance suite in tests/test_meta_kv.py.
"""

from .kv import KV, Txn, open_kv
from .store import MetaStore, Inode

__all__ = ["KV", "Txn", "open_kv", "MetaStore", "Inode"]
