"""The throwaway PostgreSQL server (devtools/postgres.py) that the
metadata-engine tests and the benchmarks stand on.

The session server (`pg_server`, port 19450) and its per-test databases
(`pg_url`) are checked for what the engine relies on: password-only TCP, a
URL without the password, databases that go away with their connections.
Restart, pause and stop get servers of their own (ports 19451-19453), so the
session server is never disturbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from devtools import postgres
from devtools.postgres import PostgresError, PostgresServer
from datafs.mounts import pid_alive

RESTART_PORT, STOP_PORT, PAUSE_PORT = 19451, 19452, 19453
TMP = Path(tempfile.gettempdir()).resolve()


@pytest.fixture
def own_server():
    """A server of the test's own, on the port the test names; always stopped."""
    servers = []

    def start(port: int, **kwargs) -> PostgresServer:
        servers.append(PostgresServer(port, **kwargs).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _tcp_refused(**kwargs) -> str:
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(connect_timeout=10, **kwargs).close()
    return str(caught.value)


def test_the_password_connects_over_tcp_and_nothing_else_does(pg_server, pg_url):
    assert pg_url.url == f"postgresql://{pg_server.user}@127.0.0.1:{pg_server.port}/{pg_url.name}"
    assert pg_server.password not in pg_url.url
    assert pg_url.env == {"PGPASSWORD": pg_server.password}

    with psycopg.connect(pg_url.url, password=pg_server.password) as conn:
        user, database, address = conn.execute(
            "SELECT current_user, current_database(), host(inet_server_addr())").fetchone()
    assert (user, database, address) == (pg_server.user, pg_url.name, "127.0.0.1")

    # As a daemon gets it: the URL on its command line, the password in its environment.
    probe = "import os, psycopg; psycopg.connect(os.environ['URL']).close(); print('ok')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | pg_url.env | {"URL": pg_url.url}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr

    assert "password authentication failed" in _tcp_refused(conninfo=pg_url.url, password="wrong")
    assert "no password supplied" in _tcp_refused(conninfo=pg_url.url, password="")
    # The superuser has no password and no way in over TCP.
    assert "password" in _tcp_refused(host="127.0.0.1", port=pg_server.port, user="postgres", dbname="postgres",
                                      password="")


def test_each_test_gets_a_fresh_database_that_is_dropped_with_its_connections(pg_server, pg_url):
    with psycopg.connect(pg_url.url, password=pg_server.password) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
        assert tables == 0
        conn.execute("CREATE TABLE inodes (ino bigint PRIMARY KEY)")  # the role owns its database

    other = pg_server.create_database("launcher_drop_me")
    left_open = psycopg.connect(other.url, password=pg_server.password)
    pg_server.drop_database(other.name)  # a connection still open must not block the drop
    with pg_server.connect() as admin:
        names = [row[0] for row in admin.execute("SELECT datname FROM pg_database")]
    assert other.name not in names and pg_url.name in names
    with pytest.raises(psycopg.OperationalError):
        left_open.execute("SELECT 1")
    left_open.close()


def test_restart_keeps_the_data_the_port_and_the_password(own_server):
    server = own_server(RESTART_PORT, durable=True)
    database = server.create_database("kept")
    with psycopg.connect(database.url, password=server.password) as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('before the restart')")
    workdir, old_pid = server.workdir, server.pid
    held = psycopg.connect(database.url, password=server.password)

    server.restart()

    assert server.workdir == workdir and server.pid != old_pid and not pid_alive(old_pid)
    with pytest.raises(psycopg.OperationalError):  # clients see their connection drop...
        held.execute("SELECT 1")
    held.close()
    with psycopg.connect(database.url, password=server.password) as conn:  # ...and reconnect
        assert conn.execute("SELECT v FROM t").fetchall() == [("before the restart",)]
        assert conn.execute("SHOW fsync").fetchone() == ("on",)


def test_stop_leaves_no_process_no_dir_and_a_free_port(own_server):
    server = own_server(STOP_PORT)
    database = server.create_database("busy")
    conn = psycopg.connect(database.url, password=server.password)
    conn.execute("BEGIN; CREATE TABLE t (v int)")  # an open transaction must not hold the stop up
    processes = [server.pid, *postgres._children(server.pid)]
    workdir = server.workdir
    assert len(processes) > 2 and workdir.parent == TMP and (workdir / "data" / "PG_VERSION").exists()

    server.stop()
    server.stop()  # idempotent

    assert [pid for pid in processes if pid_alive(pid)] == []
    assert not workdir.exists()
    assert list(TMP.glob(f"datafs-pg-{STOP_PORT}-*")) == []
    assert postgres._port_free(STOP_PORT)
    conn.close()


def test_pause_hangs_queries_until_resume_and_stop_still_works(own_server):
    server = own_server(PAUSE_PORT)
    database = server.create_database("hung")
    conn = psycopg.connect(database.url, password=server.password, autocommit=True)
    server.pause()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (conn.execute("SELECT 1"), done.set()), daemon=True)
    worker.start()
    assert not done.wait(0.5), "a query finished while the server was paused"
    server.resume()
    assert done.wait(10)
    worker.join()
    conn.close()

    server.pause()
    started = time.monotonic()
    server.stop()  # a paused server is resumed, then shut down: no wait for the SIGKILL
    assert time.monotonic() - started < 10


def test_errors_are_one_clear_line(monkeypatch, tmp_path, pg_server):
    with pytest.raises(PostgresError, match=f"port {pg_server.port} on 127.0.0.1 already in use"):
        PostgresServer(pg_server.port).start()
    assert len(list(TMP.glob(f"datafs-pg-{pg_server.port}-*"))) == 1  # the session server's only

    monkeypatch.setattr(postgres, "DEBIAN_ROOT", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PostgresError, match="apt-get install postgresql"):
        postgres.postgres_bindir()
