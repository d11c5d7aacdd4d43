"""The transport ceiling: what two Python processes on this machine move over
a loopback TCP connection, 4 MiB at a time, the way the peer tier does it at
its best: the sender `sendfile`s from a file (no copy through Python), the
receiver `recv_into`s one preallocated buffer. No HTTP, no hashing, no cache:
a peer read can approach this figure, never pass it.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time

from .sizes import BLOCK_BYTES


def _send(port: int, path: str, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as f:
        for _ in range(count):
            sent = 0
            while sent < BLOCK_BYTES:
                sent += os.sendfile(sock.fileno(), f.fileno(), sent, BLOCK_BYTES - sent)


def measure(total_bytes: int, work_dir: str) -> float:
    """Bytes per second received over loopback (sendfile -> recv_into)."""
    count = max(1, total_bytes // BLOCK_BYTES)
    with tempfile.NamedTemporaryFile(dir=work_dir, prefix="loopback-") as block:
        block.write(os.urandom(BLOCK_BYTES))
        block.flush()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            sender = multiprocessing.get_context("fork").Process(target=_send, args=(port, block.name, count))
            sender.start()
            try:
                listener.settimeout(30)
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(30)
                    buffer = bytearray(BLOCK_BYTES)
                    view = memoryview(buffer)
                    started = time.perf_counter()
                    for _ in range(count):
                        got = 0
                        while got < BLOCK_BYTES:
                            n = conn.recv_into(view[got:], BLOCK_BYTES - got)
                            if n == 0:
                                raise RuntimeError("the loopback sender closed early")
                            got += n
                    seconds = time.perf_counter() - started
            finally:
                sender.join(30)
                if sender.is_alive():
                    sender.kill()
                    sender.join()
    return count * BLOCK_BYTES / seconds
