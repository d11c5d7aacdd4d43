"""The peer client: fetch a chunk from another node, or share one with it.

A transfer runs in a worker thread on a blocking socket, behind its own
limiter, as the object-store client does: receiving 4 MiB is a kernel copy
that releases the GIL, so it runs beside the event loop (which goes on
serving FUSE requests) instead of on it. The body is received straight into
one buffer of the chunk's size (`recv_into`) and, on the same thread, hashed
by the caller's `verify`; a share is sent by `sendfile` from the cache file.
Only the response headers go through h11.

Connections are kept per peer and reused. Every network wait is bounded:
connecting (`connect_timeout_seconds`) and each read or write
(`io_timeout_seconds`), so a peer that is down, stalls or dies mid-transfer
costs one bounded wait and the caller goes on to the next tier. A caller
cancelled meanwhile (its read ended) abandons the thread, which ends at the
next timeout at most. A peer is never trusted: the caller verifies the bytes
against the chunk id.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from typing import Callable, TypeVar

import h11
import trio

from ..meta.calls import _ABANDON_KW
from . import auth

RECEIVE_BYTES = 256 * 1024
T = TypeVar("T")


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
                 idle_per_peer: int = 8, concurrency: int = 16):
        self.secret = secret
        self.connect_timeout_seconds = connect_timeout_seconds
        self.io_timeout_seconds = io_timeout_seconds
        self.idle_per_peer = idle_per_peer
        self.limiter = trio.CapacityLimiter(concurrency)
        self._idle: dict[str, collections.deque[socket.socket]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    # ---- async API -----------------------------------------------------------------
    async def get(self, address: str, chunk_id: str, length: int, *, cached_only: bool = False,
                  verify: Callable[[bytearray], T] | None = None) -> bytearray | tuple[bytearray, T]:
        """The chunk's bytes as the peer sends them (unverified), or, given
        `verify`, (bytes, verify(bytes)) computed on the same thread.
        `cached_only`: the peer answers from its cache or not at all (it never
        fetches the chunk for us)."""
        return await trio.to_thread.run_sync(
            self.get_blocking, address, chunk_id, length, cached_only, verify,
            limiter=self.limiter, **{_ABANDON_KW: True},
        )

    async def put(self, address: str, chunk_id: str, data: bytes | bytearray | memoryview | None = None, *,
                  path: os.PathLike | None = None) -> None:
        """Share a chunk with its owner: `data`, or the file at `path` (sent by sendfile)."""
        await trio.to_thread.run_sync(self.put_blocking, address, chunk_id, data, path,
                                      limiter=self.limiter, **{_ABANDON_KW: True})

    async def aclose(self) -> None:
        with self._lock:
            for pool in self._idle.values():
                while pool:
                    pool.pop().close()

    # ---- connections ------------------------------------------------------------------
    def _connect(self, address: str) -> tuple[socket.socket, bool]:
        """A connection to `address` and whether it was reused from the pool."""
        with self._lock:
            pool = self._idle[address]
            if pool:
                return pool.pop(), True
        host, _, port = address.rpartition(":")
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=self.connect_timeout_seconds)
        except OSError as exc:
            raise PeerError(f"cannot connect to peer {address}: {exc.strerror or exc or 'timed out'}") from None
        sock.settimeout(self.io_timeout_seconds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, False

    def _release(self, address: str, sock: socket.socket) -> None:
        with self._lock:
            if len(self._idle[address]) < self.idle_per_peer:
                self._idle[address].append(sock)
                return
        sock.close()

    # ---- GET ----------------------------------------------------------------------------
    def get_blocking(self, address: str, chunk_id: str, length: int, cached_only: bool = False,
                     verify: Callable[[bytearray], T] | None = None):
        path = f"/chunks/{chunk_id}" + ("?cached" if cached_only else "")
        for attempt in range(2):
            sock, reused = self._connect(address)
            try:
                body = self._get_on(sock, address, path, chunk_id, length)
                return body if verify is None else (body, verify(body))
            except _Stale:
                # A pooled connection the peer closed meanwhile: once more on a new one.
                if not reused or attempt:
                    raise PeerError(f"peer {address} closed the connection") from None
        raise AssertionError("unreachable")

    def _get_on(self, sock: socket.socket, address: str, path: str, chunk_id: str, length: int) -> bytearray:
        reusable = False
        sent = False
        try:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target=path, headers=[
                ("host", address), ("authorization", auth.sign(self.secret, "GET", path)),
            ])
            sock.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
            sent = True
            response = self._response(sock, conn)
            if response.status_code != 200:
                self._drain(sock, conn)
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
                n = sock.recv_into(view[got:], length - got)
                if n == 0:
                    raise PeerError(f"peer {address} closed the connection mid-chunk")
                got += n
            reusable = True  # exactly the body was read: the stream is at a message boundary
            return body
        except (_Stale, PeerError):
            raise
        except (OSError, h11.RemoteProtocolError, ValueError) as exc:
            if not sent or isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                raise _Stale() from None
            what = "timed out" if isinstance(exc, socket.timeout) else (getattr(exc, "strerror", None) or exc)
            raise PeerError(f"peer {address} failed for chunk {chunk_id}: {what}") from None
        finally:
            if reusable:
                self._release(address, sock)
            else:
                sock.close()

    # ---- PUT ----------------------------------------------------------------------------
    def put_blocking(self, address: str, chunk_id: str, data: bytes | bytearray | memoryview | None = None,
                     path: os.PathLike | None = None) -> None:
        target = f"/chunks/{chunk_id}"
        source = sock = None
        try:
            if path is not None:
                source = open(path, "rb")  # noqa: SIM115 (closed below)
            sock, _ = self._connect(address)
            size = os.fstat(source.fileno()).st_size if source is not None else len(data)
            conn = h11.Connection(h11.CLIENT)
            sock.sendall(conn.send(h11.Request(method="PUT", target=target, headers=[
                ("host", address), ("authorization", auth.sign(self.secret, "PUT", target)),
                ("content-length", str(size)),
            ])))
            if source is not None:
                sock.sendfile(source, 0, size)
            else:
                sock.sendall(data)
            # The body went around h11 (this connection object is not used
            # again), which reads the answer all the same.
            response = self._response(sock, conn)
            self._drain(sock, conn)
            self._release(address, sock)
            sock = None
            if response.status_code not in (200, 204):
                raise PeerError(f"peer {address} refused chunk {chunk_id}: {response.status_code}")
        except FileNotFoundError:
            raise PeerError(f"chunk {chunk_id} left the cache before it was shared") from None
        except (_Stale, OSError, h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            what = "timed out" if isinstance(exc, socket.timeout) else (getattr(exc, "strerror", None) or exc or "closed")
            raise PeerError(f"sharing chunk {chunk_id} with {address} failed: {what}") from None
        finally:
            if source is not None:
                source.close()
            if sock is not None:
                sock.close()

    # ---- responses ------------------------------------------------------------------------
    def _response(self, sock: socket.socket, conn: h11.Connection) -> h11.Response:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(RECEIVE_BYTES)
                if not data:
                    raise _Stale()
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise _Stale()
            raise PeerError(f"unexpected answer from the peer: {type(event).__name__}")

    def _drain(self, sock: socket.socket, conn: h11.Connection) -> None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(RECEIVE_BYTES))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return
