"""The peer server: other nodes GET chunks from this node's cache, and PUT
chunks they share with their owner.

HTTP/1.1 with h11 on trio, keep-alive. `GET /chunks/<id>` answers 200 with
the chunk's bytes sent by `sendfile` straight from the cache file (no copy
through Python), or, when the chunk is not cached and `on_miss` can bring it
(this node owns it: it fetches it from the object store once for everyone),
after that; else 404. `GET /chunks/<id>?cached` answers from the cache only.
`PUT /chunks/<id>` stores a chunk a peer shares with its owner, after checking its BLAKE3 hash; wrong bytes get 422 and are not
kept. Every request must carry a valid signature (`auth`): without one the
answer is 401 and no chunk byte is sent. Only 64-hex-digit chunk ids are
accepted, so no request names a path outside the cache.

Every read from a client is bounded (`read_timeout_seconds`), so a peer that
connects and stalls holds nothing for long.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
from typing import Awaitable, Callable

import h11
import trio

from .. import metrics
from ..chunks import chunk_id as hash_chunk
from ..chunks.cache import ChunkCache
from . import auth

log = logging.getLogger(__name__)

_CHUNK_PATH = re.compile(r"^/chunks/([0-9a-f]{64})(\?cached)?$")
MAX_CHUNK_BYTES = 4 * 1024 * 1024
RECEIVE_BYTES = 256 * 1024


class _FileRange:
    """A body h11 passes through untouched (`send_with_data_passthrough`), so
    the server can sendfile it."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size

    def __len__(self) -> int:
        return self.size


class PeerServer:
    def __init__(
        self, host: str, port: int, secret: bytes, cache: ChunkCache, *,
        on_miss: Callable[[str], Awaitable[bool]] | None = None,
        read_timeout_seconds: float = 10.0, disk_limiter: trio.CapacityLimiter | None = None,
        budget: trio.Semaphore | None = None,
    ):
        self.host = host
        self.port = port
        self.secret = secret
        self.cache = cache
        self.on_miss = on_miss
        self.read_timeout_seconds = read_timeout_seconds
        self.disk_limiter = disk_limiter or trio.CapacityLimiter(8)
        # Chunk bodies held in memory at once (shared with the peer tier's
        # fetches and shares): a PUT waits for a slot before reading its body.
        self.budget = budget or trio.Semaphore(16)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]  # port 0: the one the kernel chose
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    # ---- one connection -------------------------------------------------------------
    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            while True:
                request = await self._next(stream, conn)
                if not isinstance(request, h11.Request):
                    return
                await self._handle(stream, conn, request)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("peer connection failed", extra={"error": str(exc)})
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def _next(self, stream: trio.SocketStream, conn: h11.Connection):
        with trio.fail_after(self.read_timeout_seconds):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(RECEIVE_BYTES)
                    conn.receive_data(data)
                    continue
                return event

    async def _body(self, stream: trio.SocketStream, conn: h11.Connection) -> bytes | None:
        """The request body, or None if it grows past a chunk."""
        parts, size = [], 0
        while True:
            event = await self._next(stream, conn)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_CHUNK_BYTES:
                    return None
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                return None

    async def _reply(self, stream: trio.SocketStream, conn: h11.Connection, status: int, body: bytes = b"") -> None:
        headers = [("content-length", str(len(body))), ("content-type", "text/plain")]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if body:
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _handle(self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request) -> None:
        """Check the signature and the path before reading any body: a caller
        without the fleet secret gets its 401 and the connection is closed."""
        method = request.method.decode()
        path = request.target.decode(errors="replace")
        header = dict(request.headers).get(b"authorization", b"").decode(errors="replace")
        if not auth.verify(self.secret, method, path, header):
            metrics.PEER_REQUESTS_SERVED.labels(method, "unauthorized").inc()
            await self._reply(stream, conn, 401, b"a valid fleet signature is required\n")
            return
        match = _CHUNK_PATH.match(path)
        if match is None or method not in ("GET", "PUT"):
            metrics.PEER_REQUESTS_SERVED.labels(method, "bad_request").inc()
            status = 405 if match is not None else 404 if method == "GET" else 400
            await self._reply(stream, conn, status, b"GET or PUT /chunks/<id>\n")
            return
        chunk, cached_only = match.group(1), bool(match.group(2))
        if method == "PUT":
            async with self.budget:  # the body is held in memory until it is stored
                await self._store_chunk(stream, conn, chunk, await self._body(stream, conn))
            return
        while not isinstance(await self._next(stream, conn), h11.EndOfMessage):
            pass
        await self._send_chunk(stream, conn, chunk, cached_only)

    async def _send_chunk(self, stream: trio.SocketStream, conn: h11.Connection, chunk: str, cached_only: bool) -> None:
        fd = self._open_cached(chunk)
        if fd is None and not cached_only and self.on_miss is not None and await self.on_miss(chunk):
            fd = self._open_cached(chunk)
        if fd is None:
            metrics.PEER_REQUESTS_SERVED.labels("GET", "miss").inc()
            await self._reply(stream, conn, 404, b"not here\n")
            return
        try:
            size = os.fstat(fd).st_size
            headers = [("content-length", str(size)), ("content-type", "application/octet-stream")]
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
            for piece in conn.send_with_data_passthrough(h11.Data(data=_FileRange(fd, size))):
                if isinstance(piece, _FileRange):
                    await self._sendfile(stream, piece)
                else:
                    await stream.send_all(piece)
            await stream.send_all(conn.send(h11.EndOfMessage()))
            metrics.PEER_REQUESTS_SERVED.labels("GET", "ok").inc()
            metrics.PEER_SERVED_BYTES.inc(size)
        finally:
            os.close(fd)

    def _open_cached(self, chunk: str) -> int | None:
        if chunk not in self.cache:
            return None
        try:
            return os.open(self.cache.path(chunk), os.O_RDONLY)
        except FileNotFoundError:  # evicted a moment ago
            return None

    async def _sendfile(self, stream: trio.SocketStream, body: _FileRange) -> None:
        """On a worker thread: a chunk not in the page cache is read from the
        disk inside sendfile, which must not stall the event loop."""
        await trio.to_thread.run_sync(self._sendfile_blocking, stream.socket.fileno(), body.fd, body.size,
                                      limiter=self.disk_limiter)

    def _sendfile_blocking(self, sock_fd: int, fd: int, size: int) -> None:
        poller = select.poll()
        poller.register(sock_fd, select.POLLOUT)
        offset = 0
        while offset < size:
            try:
                offset += os.sendfile(sock_fd, fd, offset, size - offset)
            except BlockingIOError:  # the socket is non-blocking (trio's): wait until it drains
                if not poller.poll(self.read_timeout_seconds * 1000):
                    raise trio.TooSlowError() from None

    async def _store_chunk(self, stream: trio.SocketStream, conn: h11.Connection, chunk: str, body: bytes | None) -> None:
        if body is None:
            metrics.PEER_REQUESTS_SERVED.labels("PUT", "bad_request").inc()
            await self._reply(stream, conn, 413, b"larger than a chunk\n")
            return
        actual = await trio.to_thread.run_sync(hash_chunk, body, limiter=self.disk_limiter)
        if actual != chunk:
            metrics.PEER_REQUESTS_SERVED.labels("PUT", "corrupt").inc()
            log.error("a peer shared bytes that do not match their chunk id", extra={"chunk": chunk, "actual": actual})
            await self._reply(stream, conn, 422, b"bytes do not hash to the chunk id\n")
            return
        await trio.to_thread.run_sync(self.cache.put, chunk, body, False, limiter=self.disk_limiter)
        metrics.PEER_REQUESTS_SERVED.labels("PUT", "ok").inc()
        await self._reply(stream, conn, 204)
