"""The peer tier's parts on their own: rendezvous ownership, request
signing, and the chunk server and client talking over real loopback sockets
(with a real chunk cache): authenticated GETs served by sendfile, PUTs
checked against their hash, unauthenticated and malformed requests refused
with no chunk byte sent, and a peer that stalls costs a bounded wait."""

from __future__ import annotations

import os
import socket
import time

import pytest
import trio

from datafs.chunks import chunk_id
from datafs.chunks.cache import ChunkCache
from datafs.peers import auth, ownership
from datafs.peers.client import PeerClient, PeerError
from datafs.peers.server import PeerServer

SECRET = b"fleet-secret-for-tests"


def test_ownership_is_stable_and_balanced():
    chunks = [os.urandom(32).hex() for _ in range(3000)]
    members = [1, 2, 3, 4, 5]
    owners = {c: ownership.owner(c, members) for c in chunks}
    counts = {m: sum(1 for o in owners.values() if o == m) for m in members}
    assert all(450 <= n <= 750 for n in counts.values()), counts  # about 600 each
    assert all(ownership.ranked(c, members)[0] == owners[c] for c in chunks[:100])
    # A sixth node joins: only the chunks it now owns move (about 1/6).
    joined = {c: ownership.owner(c, members + [6]) for c in chunks}
    moved = [c for c in chunks if joined[c] != owners[c]]
    assert all(joined[c] == 6 for c in moved)
    assert 350 <= len(moved) <= 650
    # Node 3 leaves: only its chunks move, each to its runner-up.
    left = {c: ownership.owner(c, [1, 2, 4, 5]) for c in chunks}
    for c in chunks:
        if owners[c] != 3:
            assert left[c] == owners[c]
        else:
            assert left[c] == ownership.ranked(c, members)[1]
    assert ownership.owner(chunks[0], []) is None


def test_signatures_bind_method_path_time_and_secret():
    header = auth.sign(SECRET, "GET", "/chunks/ab", now=1000)
    assert auth.verify(SECRET, "GET", "/chunks/ab", header, now=1010)
    assert not auth.verify(SECRET, "PUT", "/chunks/ab", header, now=1010)
    assert not auth.verify(SECRET, "GET", "/chunks/ac", header, now=1010)
    assert not auth.verify(b"another secret", "GET", "/chunks/ab", header, now=1010)
    assert not auth.verify(SECRET, "GET", "/chunks/ab", header, now=1000 + auth.SKEW_SECONDS + 1)
    for bad in (None, "", "Bearer x", "DATAFS-HMAC t=1000", "DATAFS-HMAC t=x,s=y"):
        assert not auth.verify(SECRET, "GET", "/chunks/ab", bad, now=1000)
    assert SECRET.decode() not in header


@pytest.fixture
async def peer(tmp_path, nursery):
    cache = ChunkCache(tmp_path / "cache", 1 << 30, 0)
    cache.open()
    misses = []

    async def on_miss(chunk: str) -> bool:
        misses.append(chunk)
        return False

    server = PeerServer("127.0.0.1", 0, SECRET, cache, on_miss=on_miss, read_timeout_seconds=2)
    await nursery.start(server.run)
    server.misses = misses
    server.address = f"127.0.0.1:{server.port}"
    yield server
    cache.close()


def _put(cache: ChunkCache, data: bytes) -> str:
    chunk = chunk_id(data)
    cache.put(chunk, data)
    return chunk


async def test_get_serves_cached_chunks_and_reuses_the_connection(peer):
    client = PeerClient(SECRET)
    small, big = os.urandom(1000), os.urandom(4 * 1024 * 1024)
    for data in (small, big, small):
        chunk = _put(peer.cache, data)
        assert await client.get(peer.address, chunk, len(data)) == data
    assert len(client._idle[peer.address]) == 1  # one keep-alive connection did all three
    await client.aclose()


async def test_missing_chunk_asks_on_miss_then_404(peer):
    client = PeerClient(SECRET)
    absent = os.urandom(32).hex()
    with pytest.raises(PeerError, match="404"):
        await client.get(peer.address, absent, 10)
    assert peer.misses == [absent]
    await client.aclose()


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        out = b""
        while b"\r\n\r\n" not in out:
            data = sock.recv(65536)
            if not data:
                break
            out += data
        return out


async def test_requests_without_a_valid_signature_get_no_bytes(peer):
    data = os.urandom(5000)
    chunk = _put(peer.cache, data)
    for headers in (b"", b"Authorization: DATAFS-HMAC t=1,s=00\r\n",
                    ("Authorization: " + auth.sign(b"wrong", "GET", f"/chunks/{chunk}") + "\r\n").encode()):
        reply = await trio.to_thread.run_sync(
            _raw_request, peer.port, f"GET /chunks/{chunk} HTTP/1.1\r\nHost: x\r\n".encode() + headers + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 401")
        assert data[:64] not in reply


async def test_paths_outside_the_cache_are_refused(peer):
    client = PeerClient(SECRET)
    for path in ("/chunks/../../etc/passwd", "/etc/passwd", "/chunks/" + "A" * 64):
        signed = auth.sign(SECRET, "GET", path)
        reply = await trio.to_thread.run_sync(
            _raw_request, peer.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {signed}\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 404"), reply[:40]
    await client.aclose()


async def test_put_keeps_only_bytes_that_match_their_id(peer):
    client = PeerClient(SECRET)
    data = os.urandom(70_000)
    chunk = chunk_id(data)
    await client.put(peer.address, chunk, data)
    assert chunk in peer.cache
    liar = os.urandom(32).hex()
    with pytest.raises(PeerError, match="422"):
        await client.put(peer.address, liar, data)
    assert liar not in peer.cache
    await client.aclose()


async def test_a_peer_that_never_answers_costs_a_bounded_wait(nursery):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does) and never answers
    try:
        client = PeerClient(SECRET, connect_timeout_seconds=1, io_timeout_seconds=1)
        started = time.monotonic()
        with pytest.raises(PeerError):
            await client.get(f"127.0.0.1:{silent.getsockname()[1]}", os.urandom(32).hex(), 100)
        assert time.monotonic() - started < 5
    finally:
        silent.close()


async def test_a_peer_that_is_down_fails_fast():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    client = PeerClient(SECRET, connect_timeout_seconds=1)
    with pytest.raises(PeerError, match="cannot connect"):
        await client.get(f"127.0.0.1:{port}", os.urandom(32).hex(), 100)
