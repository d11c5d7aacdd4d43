"""S3Store against a real S3 server (SeaweedFS), plus narrow error-path tests.

One SeaweedFS per module on ports 18300-18307 (this suite owns 18300-18399;
18310-18317 are for the launcher's own test, 18399 is kept closed). Error
classification for failures a healthy server will not produce (throttling,
5xx, dropped connections) is tested with botocore's Stubber and hand-made
exceptions: nothing else here is mocked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import blake3
import pytest
from botocore.exceptions import (
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)
from botocore.stub import Stubber

from devtools.seaweed import SeaweedServer, weed_binary
from datafs.errors import ChunkMissing, StoreError, UsageError
from datafs.mounts import pid_alive
from datafs.tiers.s3_store import S3Store, classify_error
from datafs.tiers.store import open_store

BASE_PORT = 18300
LAUNCHER_TEST_BASE_PORT = 18310
CLOSED_PORT = 18399
BUCKET = "datafs-s3-test"
PREFIX = "team/models"
CHUNK_SIZE = 4 * 1024 * 1024


def _leftover_sockets(base_port: int) -> list[Path]:
    return [p for port in range(base_port, base_port + 8) for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A running SeaweedFS with BUCKET created; stopped by PID afterwards."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"), base_port=BASE_PORT)
    with server:
        server.create_bucket(BUCKET)
        pid = server.pid
        yield server
    assert not pid_alive(pid), f"weed (pid {pid}) survived stop()"
    assert not _leftover_sockets(BASE_PORT)


@pytest.fixture(scope="module")
def aws_env(seaweed: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The server's credentials in the environment, as a daemon would get
    them, and nothing from the developer's own AWS setup."""
    empty = tmp_path_factory.mktemp("no-aws-config")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_") and name != "AWS_CA_BUNDLE":
                mp.delenv(name)
        mp.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name, value in seaweed.aws_env().items():
            mp.setenv(name, value)
        yield seaweed.aws_env()


@pytest.fixture
def store(seaweed: SeaweedServer, aws_env: dict[str, str]) -> S3Store:
    s3 = S3Store(BUCKET, PREFIX, endpoint_url=seaweed.endpoint_url)
    s3.check()
    return s3


def _chunk_file(tmp_path: Path, data: bytes) -> tuple[str, Path]:
    chunk_id = blake3.blake3(data).hexdigest()
    path = tmp_path / chunk_id
    path.write_bytes(data)
    return chunk_id, path


# ---- round trips against the real server -------------------------------------------

@pytest.mark.parametrize("size_bytes", [0, 1, CHUNK_SIZE], ids=["empty", "one-byte", "4MiB"])
def test_put_get_exists_delete_round_trip(store: S3Store, tmp_path: Path, size_bytes: int) -> None:
    data = os.urandom(size_bytes)
    chunk_id, path = _chunk_file(tmp_path, data)
    assert not store.exists(chunk_id)

    store.put_file(chunk_id, path)
    assert store.exists(chunk_id)
    assert store.get(chunk_id) == data
    store.put_file(chunk_id, path)  # a second upload of the same chunk is harmless
    assert store.get(chunk_id) == data

    store.delete(chunk_id)
    assert not store.exists(chunk_id)
    with pytest.raises(ChunkMissing):
        store.get(chunk_id)
    store.delete(chunk_id)  # idempotent


def test_put_and_get_of_a_chunk_need_no_client_call(store: S3Store, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUT or GET answered whole is served by the plain signed request; only
    failures (here: an absent key) go through the client, which classifies them."""
    calls = []
    get_object = store._client.get_object
    monkeypatch.setattr(store._client, "get_object", lambda **kw: (calls.append(kw["Key"]), get_object(**kw))[1])
    monkeypatch.setattr(store._client, "put_object", lambda **kw: pytest.fail("PUT through the client"))
    for size_bytes in (0, 16 << 10, CHUNK_SIZE):
        data = os.urandom(size_bytes)
        chunk_id, path = _chunk_file(tmp_path, data)
        store.put_file(chunk_id, path)
        assert store.get(chunk_id) == data
    assert calls == []
    absent = blake3.blake3(b"not there").hexdigest()
    with pytest.raises(ChunkMissing):
        store.get(absent)
    assert len(calls) == 1


def test_get_absent_chunk_raises_chunk_missing(store: S3Store) -> None:
    absent = blake3.blake3(b"never uploaded").hexdigest()
    with pytest.raises(ChunkMissing) as info:
        store.get(absent)
    assert info.value.chunk_id == absent
    assert not store.exists(absent)


def test_object_keys_land_under_the_prefix(store: S3Store, seaweed: SeaweedServer, tmp_path: Path) -> None:
    chunk_id, path = _chunk_file(tmp_path, b"where does this land?")
    store.put_file(chunk_id, path)
    listed = seaweed.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    keys = [obj["Key"] for obj in listed.get("Contents", [])]
    assert f"{PREFIX}/chunks/{chunk_id[:2]}/{chunk_id[2:4]}/{chunk_id}" in keys
    store.delete(chunk_id)


def test_no_prefix_puts_keys_at_the_bucket_root(seaweed: SeaweedServer, aws_env: dict, tmp_path: Path) -> None:
    root_store = S3Store(BUCKET, "", endpoint_url=seaweed.endpoint_url)
    chunk_id, path = _chunk_file(tmp_path, b"at the root")
    root_store.put_file(chunk_id, path)
    head = seaweed.client().head_object(Bucket=BUCKET, Key=f"chunks/{chunk_id[:2]}/{chunk_id[2:4]}/{chunk_id}")
    assert head["ContentLength"] == len(b"at the root")
    root_store.delete(chunk_id)


def test_list_chunks_pages_through_its_prefix_only(seaweed: SeaweedServer, aws_env: dict, tmp_path: Path) -> None:
    """fsck's listing: every chunk under PREFIX/chunks/ across pages (1000 keys
    each), in id order, with size and age; nothing else under the prefix and
    nothing of a neighbouring prefix."""
    listing = S3Store(BUCKET, f"{PREFIX}/listing", endpoint_url=seaweed.endpoint_url)
    neighbour = S3Store(BUCKET, f"{PREFIX}/listing-other", endpoint_url=seaweed.endpoint_url)
    files = [_chunk_file(tmp_path, i.to_bytes(4, "big")) for i in range(1003)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: listing.put_file(*item), files))
    neighbour.put_file(*files[0])
    seaweed.client().put_object(Bucket=BUCKET, Key=f"{PREFIX}/listing/chunks/README", Body=b"not a chunk")
    listed = list(listing.list_chunks())
    assert [c.chunk_id for c in listed] == sorted(chunk for chunk, _ in files)
    assert {c.size_bytes for c in listed} == {4}
    assert all(abs(time.time() - c.modified) < 300 for c in listed)


def test_concurrent_threads_share_one_client(store: S3Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """32 worker threads on one store: no errors and no 'connection pool is full'."""
    files = [_chunk_file(tmp_path, os.urandom(64 * 1024)) for _ in range(64)]

    def round_trip(item: tuple[str, Path]) -> bool:
        chunk_id, path = item
        store.put_file(chunk_id, path)
        ok = store.get(chunk_id) == path.read_bytes()
        store.delete(chunk_id)
        return ok

    with caplog.at_level(logging.WARNING, logger="urllib3"):
        with ThreadPoolExecutor(max_workers=32) as pool:
            assert all(pool.map(round_trip, files))
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_put_of_vanished_file_is_permanent(store: S3Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        store.put_file("ab" * 32, tmp_path / "gone")
    assert info.value.temporary is False


def test_get_from_closed_port_is_temporary(aws_env: dict) -> None:
    unreachable = S3Store(BUCKET, PREFIX, endpoint_url=f"http://127.0.0.1:{CLOSED_PORT}")
    with pytest.raises(StoreError) as info:
        unreachable.get("ab" * 32)
    assert info.value.temporary is True
    assert not isinstance(info.value, ChunkMissing)


def test_open_store_s3_url(seaweed: SeaweedServer, aws_env: dict, tmp_path: Path) -> None:
    opened = open_store(f"s3://{BUCKET}/{PREFIX}", s3_endpoint=seaweed.endpoint_url)
    assert isinstance(opened, S3Store)
    assert (opened.bucket, opened.prefix, opened.region) == (BUCKET, PREFIX, "us-east-1")
    opened.check()
    chunk_id, path = _chunk_file(tmp_path, b"opened by URL")
    opened.put_file(chunk_id, path)
    assert opened.get(chunk_id) == b"opened by URL"
    opened.delete(chunk_id)


# ---- check(): one clear line per mistake ---------------------------------------------

def test_check_passes_for_a_good_bucket(store: S3Store) -> None:
    store.check()


def test_check_missing_bucket(seaweed: SeaweedServer, aws_env: dict) -> None:
    with pytest.raises(UsageError, match=r"^bucket no-such-bucket does not exist at http://127\.0\.0\.1:\d+$"):
        S3Store("no-such-bucket", "", endpoint_url=seaweed.endpoint_url).check()


@pytest.mark.parametrize("variable,value", [
    ("AWS_SECRET_ACCESS_KEY", "not-the-secret"),  # SignatureDoesNotMatch / 403
    ("AWS_ACCESS_KEY_ID", "nobody"),              # InvalidAccessKeyId / 403
])
def test_check_bad_credentials(seaweed: SeaweedServer, aws_env: dict, monkeypatch: pytest.MonkeyPatch,
                               variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(UsageError) as info:
        S3Store(BUCKET, "", endpoint_url=seaweed.endpoint_url).check()
    assert str(info.value) == f"access denied to bucket {BUCKET}: check credentials"
    assert "not-the-secret" not in str(info.value)


def test_bad_credentials_on_requests_are_permanent(seaweed: SeaweedServer, aws_env: dict,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreError) as info:
        S3Store(BUCKET, "", endpoint_url=seaweed.endpoint_url).get("ab" * 32)
    assert info.value.temporary is False
    assert not isinstance(info.value, ChunkMissing)


def test_check_closed_port_fails_fast(aws_env: dict) -> None:
    started = time.monotonic()
    with pytest.raises(UsageError, match=rf"^cannot reach object store at http://127\.0\.0\.1:{CLOSED_PORT}: .*refused"):
        S3Store(BUCKET, "", endpoint_url=f"http://127.0.0.1:{CLOSED_PORT}").check()
    assert time.monotonic() - started < 10


def test_check_without_credentials(aws_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UsageError, match=r"^no S3 credentials found"):
        S3Store(BUCKET, "", endpoint_url=f"http://127.0.0.1:{CLOSED_PORT}").check()


# ---- error classification (Stubber / hand-made errors: error paths only) -----------

@pytest.fixture
def stubbed(aws_env: dict) -> Iterator[tuple[S3Store, Stubber]]:
    s3 = S3Store("bkt", "p", endpoint_url=f"http://127.0.0.1:{CLOSED_PORT}")
    with Stubber(s3._client) as stubber:
        yield s3, stubber


@pytest.mark.parametrize("code,status,temporary", [
    ("SlowDown", 503, True),
    ("ServiceUnavailable", 503, True),
    ("InternalError", 500, True),
    ("RequestTimeout", 400, True),
    ("TooManyRequests", 429, True),
    ("AccessDenied", 403, False),
    ("InvalidAccessKeyId", 403, False),
    ("InvalidRequest", 400, False),
    ("NoSuchBucket", 404, False),
])
def test_client_errors_are_classified(stubbed: tuple[S3Store, Stubber], code: str, status: int, temporary: bool) -> None:
    s3, stubber = stubbed
    stubber.add_client_error("get_object", service_error_code=code, http_status_code=status)
    with pytest.raises(StoreError) as info:
        s3.get("ab" * 32)
    assert not isinstance(info.value, ChunkMissing)
    assert info.value.temporary is temporary
    assert code in str(info.value)


def test_no_such_key_is_chunk_missing(stubbed: tuple[S3Store, Stubber]) -> None:
    s3, stubber = stubbed
    stubber.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    with pytest.raises(ChunkMissing):
        s3.get("ab" * 32)


def test_head_404_means_absent_but_head_503_raises(stubbed: tuple[S3Store, Stubber]) -> None:
    s3, stubber = stubbed
    stubber.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stubber.add_client_error("head_object", service_error_code="503", http_status_code=503)
    assert s3.exists("ab" * 32) is False
    with pytest.raises(StoreError) as info:
        s3.exists("ab" * 32)
    assert info.value.temporary is True


def test_throttled_put_is_temporary(stubbed: tuple[S3Store, Stubber], tmp_path: Path) -> None:
    s3, stubber = stubbed
    stubber.add_client_error("put_object", service_error_code="SlowDown", http_status_code=503)
    chunk_id, path = _chunk_file(tmp_path, b"x")
    with pytest.raises(StoreError) as info:
        s3.put_file(chunk_id, path)
    assert info.value.temporary is True


@pytest.mark.parametrize("exc,temporary", [
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ReadTimeoutError(endpoint_url="http://x"), True),
    (ConnectionClosedError(endpoint_url="http://x"), True),
    (IncompleteReadError(actual_bytes=1, expected_bytes=2), True),
    (NoCredentialsError(), False),
    (ParamValidationError(report="bad"), False),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v))
def test_transport_errors_are_classified(exc: Exception, temporary: bool) -> None:
    error = classify_error(exc, "GET k", chunk_id="ab" * 32)
    assert type(error) is StoreError
    assert error.temporary is temporary


# ---- the launcher itself --------------------------------------------------------------

def test_weed_binary_is_found() -> None:
    assert os.access(weed_binary(), os.X_OK)


def test_seaweed_stop_is_idempotent(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "weed", base_port=LAUNCHER_TEST_BASE_PORT)
    server.stop()  # before start: nothing to do
    server.start()
    pid = server.pid
    assert server.running and pid_alive(pid)
    server.stop(grace_seconds=1)
    assert not server.running and not pid_alive(pid)
    assert not _leftover_sockets(LAUNCHER_TEST_BASE_PORT)
    server.stop()
    server.stop(grace_seconds=0)


class _Sent(Exception):
    """Raised instead of sending: the request as it would have gone out."""


@pytest.mark.parametrize("endpoint, signed", [("https://s3.example.invalid", False), ("http://127.0.0.1:9", True)])
def test_put_bodies_are_signed_only_without_tls(endpoint: str, signed: bool, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Over TLS a PUT's body goes unsigned (TLS protects it; hashing 4 MiB
    costs milliseconds of CPU per chunk); over plain HTTP its SHA-256 is in
    the signature."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "K")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S")
    store = S3Store("bucket", "prefix", endpoint_url=endpoint, region="us-east-1")
    sent = []

    def header(request) -> str:
        value = request.headers["x-amz-content-sha256"]
        return value.decode() if isinstance(value, bytes) else value

    def send_direct(request):  # the plain signed request, tried first: it fails, so the client sends
        sent.append(("direct", header(request)))
        raise OSError("not sent")

    def capture(request, **kwargs):
        sent.append(("client", header(request)))
        raise _Sent()

    monkeypatch.setattr(store._http, "send", send_direct)
    store._client.meta.events.register("before-send.s3.PutObject", capture)
    data = os.urandom(1 << 20)
    path = tmp_path / "chunk"
    path.write_bytes(data)
    with pytest.raises(_Sent):
        store.put_file(blake3.blake3(data).hexdigest(), path)
    expected = hashlib.sha256(data).hexdigest() if signed else "UNSIGNED-PAYLOAD"
    assert sent == [("direct", expected), ("client", expected)]
