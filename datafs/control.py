"""The daemon's local control endpoint: small JSON requests over a unix socket.

The CLI (`datafs status`, `datafs sync`, later `warmup` and `stats`) asks the
running daemon instead of opening the metadata store itself or reading a
status file: the daemon is the one owner of its metadata and upload state, so
its answers are current and no second process ever holds the store open
(a shared engine would not even be reachable that way).

The protocol is plain HTTP/1.1 (`h11`) with JSON bodies, so a person can poke
it with `curl --unix-socket`. Routes are keyed by (method, path); a handler
gets the query string as a dict (last value wins) and the JSON object body (or
None) and returns a JSON object. Invariants:

- Authentication is the socket file's mode: it is created 0600 before the
  server listens, so only its owner (root, for a daemon run as root) can
  connect. Put it in a directory that only the owner can write (the state dir).
- The socket file exists exactly while the server runs: a stale file left by a
  dead daemon is replaced, a live one (something answers on it) is never
  stolen, and the file is removed when the server stops, unless another
  server has replaced it meanwhile.
- A client cannot pin a task: the whole request must arrive within
  `client_timeout_seconds`, a response must be taken within the same time, and
  a body larger than `max_body_bytes` gets 413. Handlers themselves have no
  time limit (a sync waits for its uploads); a handler runs to its end even if
  the client has gone, and its answer is then dropped.
- A failing handler never stops the server: `ControlError(status, message)`
  becomes that status with {"error": message}; any other exception is logged
  with its traceback and becomes 500.
- One request per connection (the response says `Connection: close`).

The client side (`request`) is blocking, for the CLI, and turns every way of
not reaching the daemon into one `ControlUnavailable` with a one-line message.
"""

from __future__ import annotations

import contextlib
import errno
import http
import http.client
import json
import logging
import os
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import trio

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, str], "dict[str, Any] | None"], Awaitable[dict[str, Any]]]

MAX_BODY_BYTES = 1 << 20
CLIENT_TIMEOUT_SECONDS = 10.0
#: After a 413, this much more of the rejected body is read and discarded so
#: that the client, still sending, gets to read the 413 instead of a broken pipe.
_DRAIN_BYTES = 16 << 20
_RECEIVE_BYTES = 64 * 1024
_MAX_HEADER_BYTES = 16 * 1024


#: A unix socket address holds at most 107 bytes (sun_path). Longer paths are
#: reached through the directory's descriptor under /proc/self/fd instead, so
#: a deep state dir still gets its control socket.
_SUN_PATH_MAX = 100


@contextlib.contextmanager
def _address(path: Path | str) -> Iterator[str]:
    """An address for bind/connect that names `path`, however long it is."""
    raw = os.fspath(path)
    if len(os.fsencode(raw)) < _SUN_PATH_MAX:
        yield raw
        return
    directory, name = os.path.split(os.path.abspath(raw))
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


class ControlError(Exception):
    """A request the daemon answered with an error status; str() is the message for people."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"ControlError({self.status}, {self.message!r})"


class ControlUnavailable(Exception):
    """No answer from the daemon: no socket, refused, timed out or cut off."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"the datafs daemon is not answering on {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# ---- server ------------------------------------------------------------------------------------


class ControlServer:
    """Serves `routes` on a unix socket at `path` until stopped or cancelled.

    Start it with `await nursery.start(server.run)`: it returns once the socket
    accepts connections. `stop()` (or cancelling the nursery) ends it, cancels
    the requests in flight and removes the socket file. An instance runs once.
    """

    def __init__(
        self,
        path: Path,
        routes: dict[tuple[str, str], Handler],
        *,
        client_timeout_seconds: float = CLIENT_TIMEOUT_SECONDS,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        self.path = Path(path)
        self.routes = dict(routes)
        self.client_timeout_seconds = client_timeout_seconds
        self.max_body_bytes = max_body_bytes
        self._known_paths = {route_path for _, route_path in self.routes}
        self._cancel_scope = trio.CancelScope()

    def stop(self) -> None:
        self._cancel_scope.cancel()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._cancel_scope:
            sock, bound = await self._bind()
            try:
                await trio.serve_listeners(
                    self._serve_connection, [trio.SocketListener(sock)], task_status=task_status,
                )
            finally:
                sock.close()
                self._remove_socket_file(bound)

    async def _bind(self) -> tuple[trio.socket.SocketType, os.stat_result]:
        await self._clear_stale_socket()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = None
        try:
            with _address(self.path) as address:
                await sock.bind(address)
            bound = os.lstat(self.path)
            # Nobody can connect between bind and listen, so the mode is right
            # before the first connection whatever the umask was.
            os.chmod(self.path, 0o600)
            sock.listen(64)
        except BaseException:
            sock.close()
            if bound is not None:
                self._remove_socket_file(bound)
            raise
        log.info("control endpoint listening on %s", self.path)
        return sock, bound

    async def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "not a socket, refusing to replace it", os.fspath(self.path))
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with trio.move_on_after(1.0), _address(self.path) as address:
                await probe.connect(address)
                raise OSError(errno.EADDRINUSE, "another server is answering on this socket", os.fspath(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listening: a dead daemon's socket
        finally:
            probe.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _remove_socket_file(self, bound: os.stat_result) -> None:
        try:
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ---- one connection ----

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        try:
            try:
                request = await self._read_request(stream, conn)
            except h11.RemoteProtocolError as e:
                log.info("control: malformed request: %s", e)
                await self._send_error(stream, conn, e.error_status_hint, f"malformed request: {e}")
                return
            except _BodyTooLarge:
                await self._send_error(stream, conn, 413, f"request body larger than {self.max_body_bytes} bytes")
                await self._drain(stream, conn)
                return
            if request is None:
                return
            method, target, raw_body = request
            status, payload = await self._dispatch(method, target, raw_body)
            await self._send(stream, conn, status, payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nobody is left to answer
        except _ClientTooSlow as e:
            log.info("control: dropped a client that took over %.1f s to %s", self.client_timeout_seconds, e)
        except Exception:
            log.exception("control: connection failed")

    async def _read_request(self, stream: trio.abc.Stream, conn: h11.Connection) -> tuple[str, str, bytes] | None:
        """The next request as (method, target, body), or None if the client closed without one."""
        request: h11.Request | None = None
        body = bytearray()
        with trio.move_on_after(self.client_timeout_seconds) as deadline:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if conn.they_are_waiting_for_100_continue:
                        await self._send_events(stream, conn, h11.InformationalResponse(status_code=100, headers=[]))
                    conn.receive_data(await stream.receive_some(_RECEIVE_BYTES))
                elif isinstance(event, h11.Request):
                    request = event
                    length = _header(event.headers, b"content-length")
                    if length is not None and int(length) > self.max_body_bytes:
                        raise _BodyTooLarge
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.max_body_bytes:
                        raise _BodyTooLarge
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    return request.method.decode("ascii"), request.target.decode("latin-1"), bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    return None
        assert deadline.cancelled_caught
        raise _ClientTooSlow("send its request")

    async def _dispatch(self, method: str, target: str, raw_body: bytes) -> tuple[int, dict[str, Any]]:
        url = urllib.parse.urlsplit(target)
        handler = self.routes.get((method, url.path))
        if handler is None:
            if url.path in self._known_paths:
                allowed = sorted(m for m, p in self.routes if p == url.path)
                return 405, {"error": f"{method} is not allowed on {url.path} (only {', '.join(allowed)})"}
            return 404, {"error": f"no route {method} {url.path}"}
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        body: dict[str, Any] | None = None
        if raw_body:
            try:
                body = json.loads(raw_body)
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                return 400, {"error": f"request body is not valid JSON: {e}"}
            if not isinstance(body, dict):
                return 400, {"error": "request body must be a JSON object"}
        try:
            result = await handler(query, body)
            if not isinstance(result, dict):
                raise TypeError(f"handler returned {type(result).__name__}, not a dict")
            json.dumps(result)  # fail here, as a 500, rather than halfway through the answer
        except ControlError as e:
            if 400 <= e.status <= 599:
                return e.status, {"error": e.message}
            log.error("control %s %s: ControlError with status %d, answering 500", method, url.path, e.status)
            return 500, {"error": e.message}
        except Exception as e:
            log.exception("control %s %s failed", method, url.path)
            return 500, {"error": f"{type(e).__name__}: {e}"}
        return 200, result

    async def _send(self, stream: trio.abc.Stream, conn: h11.Connection, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode() + b"\n"
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"connection", b"close"),
        ]
        await self._send_events(
            stream, conn, h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=data), h11.EndOfMessage(),
        )

    async def _send_error(self, stream: trio.abc.Stream, conn: h11.Connection, status: int, message: str) -> None:
        # After a protocol error h11 lets us answer only if no response was started.
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send(stream, conn, status, {"error": message})
        except h11.LocalProtocolError:
            pass

    async def _send_events(self, stream: trio.abc.Stream, conn: h11.Connection, *events: h11.Event) -> None:
        data = b"".join(conn.send(event) or b"" for event in events)
        with trio.move_on_after(self.client_timeout_seconds) as deadline:
            await stream.send_all(data)
        if deadline.cancelled_caught:
            raise _ClientTooSlow("take its answer")

    async def _drain(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        """Reads and drops what the client is still sending, bounded in time and bytes."""
        left = _DRAIN_BYTES
        with trio.move_on_after(self.client_timeout_seconds):
            while left > 0:
                data = await stream.receive_some(_RECEIVE_BYTES)
                if not data:
                    return
                left -= len(data)


class _BodyTooLarge(Exception):
    pass


class _ClientTooSlow(Exception):
    pass


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:  # h11 lower-cases header names
            return value
    return None


async def serve_control(
    path: Path,
    routes: dict[tuple[str, str], Handler],
    *,
    task_status=trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """`ControlServer(path, routes, **options).run()`, for `nursery.start(serve_control, ...)`."""
    await ControlServer(path, routes, **options).run(task_status=task_status)


# ---- client (blocking, for the CLI) ------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float | None):
        super().__init__("datafs", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            with _address(self.socket_path) as address:
                sock.connect(address)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(path: Path, method: str, url: str, body: dict[str, Any] | None = None, timeout: float | None = 10.0) -> dict[str, Any]:
    """Sends one request to the daemon's control socket and returns its JSON answer.

    `timeout` bounds each wait on the socket (connect, send, each read of the
    answer); pass None for a request that may legitimately take long, such as
    a sync. Raises `ControlUnavailable` when the daemon cannot be reached or
    stops answering, `ControlError` for any answer but 200.
    """
    path = Path(path)
    payload = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if payload is not None:
        headers["Content-Type"] = "application/json"
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, url, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise ControlUnavailable(path, _unavailable_reason(e, timeout)) from e
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if response.status != 200:
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise ControlError(response.status, answer["error"])
        text = data.decode("utf-8", "replace").strip()[:200]
        raise ControlError(response.status, f"HTTP {response.status} {response.reason}" + (f": {text}" if text else ""))
    if not isinstance(answer, dict):
        raise ControlUnavailable(path, "the answer is not a JSON object")
    return answer


def _unavailable_reason(e: BaseException, timeout: float | None) -> str:
    if isinstance(e, FileNotFoundError):
        return "no control socket (is the daemon running?)"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (the daemon has stopped?)"
    if isinstance(e, PermissionError):
        return "permission denied (the control socket is for its owner only: run as root)"
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return f"no answer within {timeout:g} s" if timeout is not None else "timed out"
    if isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
        return "the connection was closed before an answer (the daemon stopped or restarted?)"
    return str(e) or type(e).__name__
