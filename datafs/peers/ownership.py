"""Which node owns a chunk: rendezvous (highest-random-weight) hashing.

Each (chunk, node) pair gets a pseudo-random weight; the owner is the live
node with the highest. When a node joins, only the chunks it now wins move to
it (about 1/N); when one leaves, only its chunks move, each to its runner-up.
The ranking is also the fallback order when the owner does not answer, so
every node tries the same second choice and the object store is still asked
once per chunk.
"""

from __future__ import annotations

import hashlib
from typing import Iterable


def weight(chunk_id: str, node: int) -> int:
    digest = hashlib.blake2b(bytes.fromhex(chunk_id) + node.to_bytes(8, "big"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(chunk_id: str, members: Iterable[int]) -> list[int]:
    """Members in the order to ask them for `chunk_id`: the owner first."""
    return sorted(members, key=lambda node: (weight(chunk_id, node), node), reverse=True)


def owner(chunk_id: str, members: Iterable[int]) -> int | None:
    best = None
    best_weight = -1
    for node in members:
        w = weight(chunk_id, node)
        if w > best_weight or (w == best_weight and best is not None and node > best):
            best, best_weight = node, w
    return best
