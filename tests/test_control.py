"""The control endpoint over a real unix socket: the blocking client against the trio server.

The client blocks, so the tests call it in a thread while the test's own trio
loop serves. Socket paths stay short (AF_UNIX allows about 107 bytes).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import stat
import sys
import time
from pathlib import Path

import pytest
import trio

from datafs.control import ControlError, ControlServer, ControlUnavailable, request, serve_control

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


async def call(path: Path, method: str, url: str, body: dict | None = None, timeout: float | None = 5.0) -> dict:
    return await trio.to_thread.run_sync(functools.partial(request, path, method, url, body, timeout))


def raw_exchange(path: Path, data: bytes, timeout: float = 5.0) -> bytes:
    """Sends raw bytes and returns everything the server answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


async def status_handler(query: dict[str, str], body: dict | None) -> dict:
    return {"pending": 3, "query": query}


async def echo_handler(query: dict[str, str], body: dict | None) -> dict:
    return {"body": body}


async def failing_handler(query: dict[str, str], body: dict | None) -> dict:
    raise RuntimeError("the metadata store is on fire")


async def refusing_handler(query: dict[str, str], body: dict | None) -> dict:
    raise ControlError(409, "a sync is already running")


async def bad_result_handler(query: dict[str, str], body: dict | None) -> dict:
    return {"not json": object()}


ROUTES = {
    ("GET", "/status"): status_handler,
    ("POST", "/sync"): echo_handler,
    ("GET", "/fail"): failing_handler,
    ("POST", "/refuse"): refusing_handler,
    ("GET", "/bad"): bad_result_handler,
}


@pytest.fixture
async def server(tmp_path, nursery):
    sock_path = tmp_path / "ctl.sock"
    srv = ControlServer(sock_path, ROUTES, client_timeout_seconds=0.5)
    await nursery.start(srv.run)
    yield srv
    srv.stop()


async def test_route_answers_json(server):
    assert await call(server.path, "GET", "/status?verbose=1&x=") == {"pending": 3, "query": {"verbose": "1", "x": ""}}


async def test_post_body_reaches_handler(server):
    body = {"paths": ["/data/a", "/data/ü"], "n": 1}
    assert await call(server.path, "POST", "/sync", body) == {"body": body}
    assert await call(server.path, "POST", "/sync") == {"body": None}


async def test_unknown_route_is_404(server):
    with pytest.raises(ControlError) as e:
        await call(server.path, "GET", "/nope")
    assert e.value.status == 404


async def test_wrong_method_is_405(server):
    with pytest.raises(ControlError) as e:
        await call(server.path, "POST", "/status", {})
    assert e.value.status == 405
    assert "POST" in str(e.value)


async def test_bad_json_is_400(server):
    answer = await trio.to_thread.run_sync(
        raw_exchange, server.path,
        b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{not json",
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"not valid JSON" in answer


async def test_non_object_json_is_400(server):
    answer = await trio.to_thread.run_sync(
        raw_exchange, server.path, b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]",
    )
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_malformed_http_is_400(server):
    answer = await trio.to_thread.run_sync(raw_exchange, server.path, b"this is not http\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_handler_exception_is_500_and_server_goes_on(server, caplog):
    with caplog.at_level(logging.ERROR, logger="datafs.control"), pytest.raises(ControlError) as e:
        await call(server.path, "GET", "/fail")
    assert e.value.status == 500
    assert "the metadata store is on fire" in e.value.message
    [record] = [r for r in caplog.records if r.name == "datafs.control"]
    assert record.exc_info is not None and "GET /fail" in record.getMessage()
    assert (await call(server.path, "GET", "/status"))["pending"] == 3


async def test_unserialisable_result_is_500(server, caplog):
    with caplog.at_level(logging.ERROR, logger="datafs.control"), pytest.raises(ControlError) as e:
        await call(server.path, "GET", "/bad")
    assert e.value.status == 500


async def test_control_error_status_passes_through(server):
    with pytest.raises(ControlError) as e:
        await call(server.path, "POST", "/refuse", {})
    assert (e.value.status, str(e.value)) == (409, "a sync is already running")


async def test_large_body_is_413(server):
    with pytest.raises(ControlError) as e:
        await call(server.path, "POST", "/sync", {"blob": "x" * (2 << 20)})
    assert e.value.status == 413
    assert (await call(server.path, "GET", "/status"))["pending"] == 3


async def test_missing_socket_is_unavailable(tmp_path):
    with pytest.raises(ControlUnavailable) as e:
        await call(tmp_path / "none.sock", "GET", "/status")
    assert str(e.value).startswith(f"the datafs daemon is not answering on {tmp_path / 'none.sock'}: ")
    assert "\n" not in str(e.value)


async def test_refused_socket_is_unavailable(tmp_path):
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(os.fspath(path))  # bound, never listening: what a dead daemon leaves
    with pytest.raises(ControlUnavailable, match="refused"):
        await call(path, "GET", "/status")


async def test_silent_server_times_out_as_unavailable(tmp_path):
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(os.fspath(path))
        mute.listen(1)  # accepts into the backlog, never answers
        with pytest.raises(ControlUnavailable, match="no answer within 0.3 s"):
            await call(path, "GET", "/status", timeout=0.3)


async def test_socket_mode_and_removal_on_cancel(tmp_path):
    path = tmp_path / "ctl.sock"
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_control, path, ROUTES))
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            nursery.cancel_scope.cancel()
    finally:
        os.umask(old_umask)
    assert not os.path.lexists(path)


async def test_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(os.fspath(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, ROUTES)
        assert (await call(path, "GET", "/status"))["pending"] == 3
        nursery.cancel_scope.cancel()


async def _start_fails(path) -> BaseException:
    """The error starting a control server on `path` ends with, unwrapped from
    the nursery's exception group (trio >= 0.25 groups them; older ones do not)."""
    with pytest.raises(BaseException) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, ROUTES)
    error = info.value
    while isinstance(error, BaseExceptionGroup):
        assert len(error.exceptions) == 1, error
        error = error.exceptions[0]
    return error


async def test_live_socket_is_not_stolen(server):
    error = await _start_fails(server.path)
    assert isinstance(error, OSError) and "another server" in str(error)
    assert (await call(server.path, "GET", "/status"))["pending"] == 3


async def test_regular_file_is_not_replaced(tmp_path):
    path = tmp_path / "ctl.sock"
    path.write_text("precious")
    assert isinstance(await _start_fails(path), FileExistsError)
    assert path.read_text() == "precious"


async def test_stop_removes_the_socket(tmp_path):
    path = tmp_path / "ctl.sock"
    srv = ControlServer(path, ROUTES)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        srv.stop()
    assert not os.path.lexists(path)


async def test_silent_client_does_not_block_others(server):
    """A client that connects and sends nothing is dropped after the timeout, and others are served meanwhile."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(os.fspath(server.path))
        silent.settimeout(5.0)
        start = time.monotonic()
        for _ in range(3):
            assert (await call(server.path, "GET", "/status"))["pending"] == 3
        assert time.monotonic() - start < 0.5  # served while the silent one still holds its connection
        assert await trio.to_thread.run_sync(silent.recv, 1) == b""  # then it is closed by the server
        assert time.monotonic() - start < 3.0


async def test_slow_request_is_cut_off(server):
    """Trickling the headers does not reset the clock: the whole request has one deadline."""
    def trickle() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(os.fspath(server.path))
            try:
                for byte in b"GET /status HTTP/1.1\r\nHost: x\r\n":
                    sock.sendall(bytes([byte]))
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return sock.recv(1)

    start = time.monotonic()
    assert await trio.to_thread.run_sync(trickle) == b""
    assert time.monotonic() - start < 2.0


async def test_long_handler_has_no_timeout(tmp_path, nursery):
    release = trio.Event()

    async def slow(query, body):
        await release.wait()
        return {"done": True}

    path = tmp_path / "ctl.sock"
    await nursery.start(functools.partial(serve_control, path, {("POST", "/sync"): slow}, client_timeout_seconds=0.2))
    async with trio.open_nursery() as inner:
        inner.start_soon(_release_later, release, 0.6)
        assert await call(path, "POST", "/sync", {}, timeout=None) == {"done": True}


async def _release_later(event: trio.Event, seconds: float) -> None:
    await trio.sleep(seconds)
    event.set()


async def test_concurrent_requests_each_get_their_own_task(tmp_path, nursery):
    both_in = trio.Event()
    inside = 0

    async def meet(query, body):
        nonlocal inside
        inside += 1
        if inside == 2:
            both_in.set()
        with trio.fail_after(3):
            await both_in.wait()
        return {"n": query["n"]}

    path = tmp_path / "ctl.sock"
    await nursery.start(serve_control, path, {("GET", "/meet"): meet})
    results = {}

    async def one(n: str) -> None:
        results[n] = await call(path, "GET", f"/meet?n={n}")

    async with trio.open_nursery() as inner:
        inner.start_soon(one, "1")
        inner.start_soon(one, "2")
    assert results == {"1": {"n": "1"}, "2": {"n": "2"}}


async def test_expect_continue_is_answered(server):
    """curl sends `Expect: 100-continue` for larger bodies and waits for the 100 before sending them."""
    def exchange() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(os.fspath(server.path))
            sock.sendall(b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nExpect: 100-continue\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
            sock.sendall(b'{"a": 1}')
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    answer = await trio.to_thread.run_sync(exchange)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"body": {"a": 1}}


async def test_a_socket_path_longer_than_sun_path_still_works(tmp_path, nursery):
    """A unix socket address holds 107 bytes; a deep state dir must still get
    its control socket (reached through the directory's descriptor)."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    assert len(str(path)) > 120

    async def status(query, body):
        return {"ok": True}

    await nursery.start(ControlServer(path, {("GET", "/status"): status}).run)
    assert path.exists()
    assert await trio.to_thread.run_sync(lambda: request(path, "GET", "/status")) == {"ok": True}
