"""Chunks: the 4 MiB unit of content, named by its BLAKE3 hex digest."""

from __future__ import annotations

import blake3

from ..config import CHUNK_SIZE_BYTES

__all__ = ["CHUNK_SIZE_BYTES", "chunk_id", "ZERO_CHUNK"]

ZERO_CHUNK = bytes(CHUNK_SIZE_BYTES)


def chunk_id(data: bytes | bytearray | memoryview) -> str:
    """The chunk's name: BLAKE3 of its bytes, hex. Uses all cores for 4 MiB inputs."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
