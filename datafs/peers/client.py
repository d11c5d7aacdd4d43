"""The peer client: fetch a chunk from another node, or share one with it.

Connections are kept per peer and reused. Every network wait is bounded:
connecting (`connect_timeout_seconds`) and each read or write
(`io_timeout_seconds`), so a peer that is down, stalls or dies mid-transfer
costs one bounded wait and the caller goes on to the next tier. The response
headers are parsed by h11; the body is received straight into one buffer of
the chunk's size (`recv_into`), with no intermediate copies. The caller
verifies the bytes against the chunk id: a peer is never trusted.
"""

from __future__ import annotations

import collections

import h11
import trio

from . import auth

RECEIVE_BYTES = 256 * 1024


class PeerError(Exception):
    """The peer could not give this chunk (down, slow, refused, or absent).
    `absent`: it answered that it does not have it, which is no fault."""

    def __init__(self, message: str, *, absent: bool = False):
        super().__init__(message)
        self.absent = absent


class _Stale(Exception):
    """The connection was closed before an answer began: try a new one."""


class PeerClient:
    def __init__(self, secret: bytes, *, connect_timeout_seconds: float = 2.0, io_timeout_seconds: float = 5.0,
                 idle_per_peer: int = 8):
        self.secret = secret
        self.connect_timeout_seconds = connect_timeout_seconds
        self.io_timeout_seconds = io_timeout_seconds
        self.idle_per_peer = idle_per_peer
        self._idle: dict[str, collections.deque[trio.SocketStream]] = collections.defaultdict(collections.deque)

    async def _connect(self, address: str) -> tuple[trio.SocketStream, bool]:
        """A connection to `address` and whether it was reused from the pool."""
        pool = self._idle[address]
        if pool:
            return pool.pop(), True
        host, _, port = address.rpartition(":")
        try:
            with trio.fail_after(self.connect_timeout_seconds):
                return await trio.open_tcp_stream(host, int(port)), False
        except (OSError, trio.TooSlowError) as exc:
            raise PeerError(f"cannot connect to peer {address}: {exc or 'timed out'}") from None

    def _release(self, address: str, stream: trio.SocketStream) -> None:
        if len(self._idle[address]) < self.idle_per_peer:
            self._idle[address].append(stream)
        else:
            stream.socket.close()

    async def get(self, address: str, chunk_id: str, length: int, *, cached_only: bool = False) -> bytearray:
        """The chunk's bytes as the peer sends them (unverified). `cached_only`:
        the peer answers from its cache or not at all (it never fetches the
        chunk for us). A pooled connection the peer has closed meanwhile is
        retried once on a new one."""
        path = f"/chunks/{chunk_id}" + ("?cached" if cached_only else "")
        for attempt in range(2):
            stream, reused = await self._connect(address)
            try:
                return await self._get_on(stream, address, path, chunk_id, length)
            except _Stale:
                if not reused or attempt:
                    raise PeerError(f"peer {address} closed the connection") from None

    async def _get_on(self, stream: trio.SocketStream, address: str, path: str, chunk_id: str, length: int) -> bytearray:
        reusable = False
        sent = False
        try:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target=path, headers=[
                ("host", address), ("authorization", auth.sign(self.secret, "GET", path)),
            ])
            with trio.fail_after(self.io_timeout_seconds):
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            sent = True
            response = await self._response(stream, conn)
            if response.status_code != 200:
                await self._drain(stream, conn)
                reusable = True
                raise PeerError(f"peer {address} answered {response.status_code} for chunk {chunk_id}",
                                absent=response.status_code == 404)
            size = int(dict(response.headers).get(b"content-length", b"-1"))
            if size != length:
                raise PeerError(f"peer {address} sent {size} bytes for a chunk of {length}")
            body = bytearray(length)
            view = memoryview(body)
            got = 0
            while True:  # what h11 already buffered past the headers
                event = conn.next_event()
                if not isinstance(event, h11.Data):
                    break
                view[got:got + len(event.data)] = event.data
                got += len(event.data)
            while got < length:
                with trio.fail_after(self.io_timeout_seconds):
                    n = await stream.socket.recv_into(view[got:], length - got)
                if n == 0:
                    raise PeerError(f"peer {address} closed the connection mid-chunk")
                got += n
            reusable = True  # exactly the body was read: the stream is at a message boundary
            return body
        except _Stale:
            raise
        except PeerError:
            raise
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                h11.RemoteProtocolError, ValueError) as exc:
            if not sent or isinstance(exc, (trio.BrokenResourceError, ConnectionResetError)):
                raise _Stale() from None
            raise PeerError(f"peer {address} failed for chunk {chunk_id}: {exc or 'timed out'}") from None
        finally:
            if reusable:
                self._release(address, stream)
            else:
                stream.socket.close()

    async def put(self, address: str, chunk_id: str, data: bytes | bytearray | memoryview) -> None:
        """Share a chunk with its owner."""
        path = f"/chunks/{chunk_id}"
        stream, _ = await self._connect(address)
        try:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="PUT", target=path, headers=[
                ("host", address), ("authorization", auth.sign(self.secret, "PUT", path)),
                ("content-length", str(len(data))),
            ])
            with trio.fail_after(self.io_timeout_seconds * 4):
                await stream.send_all(conn.send(request))
                await stream.send_all(conn.send(h11.Data(data=bytes(data))))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            response = await self._response(stream, conn)
            await self._drain(stream, conn)
            self._release(address, stream)
            if response.status_code not in (200, 204):
                raise PeerError(f"peer {address} refused chunk {chunk_id}: {response.status_code}")
        except (_Stale, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                h11.RemoteProtocolError) as exc:
            stream.socket.close()
            raise PeerError(f"sharing chunk {chunk_id} with {address} failed: {exc or 'closed or timed out'}") from None

    async def _response(self, stream: trio.SocketStream, conn: h11.Connection) -> h11.Response:
        with trio.fail_after(self.io_timeout_seconds):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        raise _Stale()
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    return event
                if isinstance(event, h11.ConnectionClosed):
                    raise _Stale()
                raise PeerError(f"unexpected answer from the peer: {type(event).__name__}")

    async def _drain(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        with trio.fail_after(self.io_timeout_seconds):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return

    async def aclose(self) -> None:
        for pool in self._idle.values():
            while pool:
                pool.pop().socket.close()
