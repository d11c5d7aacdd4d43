"""The S3 object store (AWS, MinIO, SeaweedFS, Ceph ...) on boto3.

One object per chunk at `object_key(chunk_id, prefix)`; a chunk is at most
4 MiB, so every upload is a single PutObject: no multipart state to clean up,
and the upload is atomic (an object is either absent or whole).

Invariants:
- One boto3 client for the life of the store, shared by every worker thread
  (clients are thread-safe, sessions are not, so the session is used only in
  `__init__`). Its connection pool is sized for the callers' thread limiters.
- boto3 retries at most once on its own: the callers back off and retry every
  `StoreError(temporary=True)`, and two retry loops stacked would multiply.
- Every boto failure becomes a `StoreError` in exactly one place,
  `classify_error`, which decides `temporary`; `check()` is the one exception,
  turning failures at mount time into a one-line `UsageError` for people.
- Credentials are boto3's business (env, ~/.aws, instance profile); nothing
  here reads, stores or logs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import boto3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)

from .. import metrics
from ..chunks import direct_io
from ..errors import ChunkMissing, StoreError, UsageError
from .store import ObjectStore, StoredChunk, is_chunk_id, object_key

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"

#: Enough pooled connections that ~32 worker threads (fetches + uploads) never
#: wait for one or open throwaway connections ("Connection pool is full").
MAX_POOL_CONNECTIONS = 64

CONNECT_TIMEOUT_SECONDS = 5.0
#: Per socket read, not per request: how long a stalled connection may stay
#: silent before the request fails (temporary) and is retried by the caller.
READ_TIMEOUT_SECONDS = 60.0

#: `check()` must fail within a few seconds on a wrong endpoint, not after
#: minutes of boto retries against a closed port or a black hole.
CHECK_CONNECT_TIMEOUT_SECONDS = 2.0
CHECK_READ_TIMEOUT_SECONDS = 5.0

#: Error codes that mean "the service is busy or hiccuped: the same request may
#: succeed later". Anything else with a 4xx status is a mistake a retry repeats.
_TEMPORARY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "RequestTimeoutException", "PriorRequestNotComplete",
    # boto3 refreshes instance-profile credentials shortly before they expire;
    # a request signed just before the refresh succeeds when retried.
    "ExpiredToken", "ExpiredTokenException",
})
_TEMPORARY_STATUSES = frozenset({408, 429})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
_DENIED_CODES = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"})


def _code_and_status(exc: ClientError) -> tuple[str, int]:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def classify_error(exc: Exception, action: str, chunk_id: str | None = None) -> StoreError:
    """The one place that decides what a boto failure means for the callers.

    `action` names the request for the message ("GET chunks/ab/cd/..").
    With `chunk_id`, an absent object (NoSuchKey, a bare 404 from HEAD) is
    `ChunkMissing`; a missing *bucket* never is: it is a configuration error.
    """
    if isinstance(exc, ClientError):
        code, status = _code_and_status(exc)
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if chunk_id is not None and code in _MISSING_CODES:
            return ChunkMissing(chunk_id)
        temporary = code in _TEMPORARY_CODES or status in _TEMPORARY_STATUSES or status >= 500
        return StoreError(f"{action} failed: {code or 'error'} (HTTP {status}): {message}", temporary=temporary)
    if isinstance(exc, SSLError) and "certificate verify failed" in str(exc).lower():
        # A certificate or CA-bundle problem: retrying will not fix it.
        return StoreError(f"{action} failed: {exc}", temporary=False)
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, CredentialRetrievalError)):
        # Refused/reset connections, connect and read timeouts, a body cut
        # short, an instance-metadata hiccup: all may pass.
        return StoreError(f"{action} failed: {exc}", temporary=True)
    return StoreError(f"{action} failed: {type(exc).__name__}: {exc}", temporary=False)


def _reason(exc: BotoCoreError) -> str:
    """The useful tail of a connection error ("[Errno 111] Connection refused"),
    without urllib3's connection-object prefix."""
    error = getattr(exc, "kwargs", {}).get("error")
    text = str(error) if error is not None else str(exc)
    if text.startswith(("AWSHTTPConnection(", "AWSHTTPSConnection(")) and "): " in text:
        return text.split("): ", 1)[1]
    return text


def _config(*, connect_timeout: float, read_timeout: float, max_attempts: int, region: str, tls: bool) -> Config:
    return Config(
        region_name=region,
        signature_version="s3v4",
        s3={
            # Path-style works with every S3 clone and with bucket names that
            # are not valid DNS labels; virtual-host style needs wildcard DNS.
            "addressing_style": "path",
            # Without a checksum header (off, below) botocore signs a PUT's
            # body with SHA-256 even over TLS: 2.3 ms of CPU per 4 MiB chunk
            # here. Over TLS the body cannot change on the way (TLS
            # authenticates every record), the cache file is checked against
            # its BLAKE3 name before it leaves (upload.py) and every read
            # verifies it again; over plain HTTP the signature is the body's
            # only check on the way, so it stays.
            "payload_signing_enabled": not tls,
        },
        max_pool_connections=MAX_POOL_CONNECTIONS,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        tcp_keepalive=True,
        # Every chunk is verified end to end against its BLAKE3 name, so
        # botocore's own CRC32 over each 4 MiB body is pure CPU cost (measured:
        # 5% of the daemon during a cold read). Only where the API requires it.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


@contextlib.contextmanager
def _chunk_file_bytes(path: Path) -> Iterator[bytes | memoryview]:
    """A chunk file's bytes, inside the block: a whole chunk read around the
    page cache, as the cache wrote it (direct_io.py)."""
    with contextlib.ExitStack() as stack:
        try:
            size = os.stat(path).st_size
            data = None
            if direct_io.usable(str(path.parent), size):
                data = stack.enter_context(direct_io.read_whole(str(path), size))
            if data is None:
                data = path.read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"chunk file {path} vanished before upload: {exc}", temporary=False) from None
        except OSError as exc:
            raise StoreError(f"reading chunk file {path} for upload: {exc}", temporary=True) from None
        yield data


class S3Store(ObjectStore):
    tier = "store"

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None, *,
        connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS, read_timeout_seconds: float = READ_TIMEOUT_SECONDS,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        session = boto3.session.Session()
        self.region = region or session.region_name or DEFAULT_REGION
        tls = endpoint_url is None or endpoint_url.lower().startswith("https://")  # AWS's own endpoints are https
        self._client = session.client(
            "s3", endpoint_url=endpoint_url,
            config=_config(connect_timeout=connect_timeout_seconds, read_timeout=read_timeout_seconds,
                           max_attempts=2, region=self.region, tls=tls),
        )
        # A separate client for `check()` only: short timeouts and no retries,
        # so a wrong endpoint is reported in seconds. Built here, not in
        # check(), so the (non-thread-safe) session is touched in one place.
        self._check_client = session.client(
            "s3", endpoint_url=endpoint_url,
            config=_config(connect_timeout=CHECK_CONNECT_TIMEOUT_SECONDS, read_timeout=CHECK_READ_TIMEOUT_SECONDS,
                           max_attempts=1, region=self.region, tls=tls),
        )
        self.endpoint_url = self._client.meta.endpoint_url
        # The direct GET (see `get`) borrows the client's connection pool (its
        # TLS verification, proxies and timeouts) and credentials; without
        # them every GET goes through the client.
        self._http = getattr(getattr(self._client, "_endpoint", None), "http_session", None)
        self._credentials = session.get_credentials()

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"{where} at {self.endpoint_url}"

    def _key(self, chunk_id: str) -> str:
        return object_key(chunk_id, self.prefix)

    def check(self) -> None:
        """HEAD the bucket, and say in one line what is wrong if that fails.

        Only HEAD: it needs no write permission and leaves nothing behind.
        """
        url, bucket = self.endpoint_url, self.bucket
        try:
            self._check_client.head_bucket(Bucket=bucket)
        except (NoCredentialsError, PartialCredentialsError):
            raise UsageError(
                "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or configure ~/.aws/credentials, AWS_PROFILE or an instance profile"
            ) from None
        except ReadTimeoutError:
            raise UsageError(
                f"object store at {url} accepted a connection but did not answer within "
                f"{CHECK_READ_TIMEOUT_SECONDS:g} s: is that an S3 endpoint?"
            ) from None
        except (BotoConnectionError, HTTPClientError) as exc:
            # Refused, DNS failure, connect timeout, TLS failure, connection reset.
            raise UsageError(f"cannot reach object store at {url}: {_reason(exc)}") from None
        except ClientError as exc:
            code, status = _code_and_status(exc)
            if status == 404 or code in _NO_BUCKET_CODES:
                raise UsageError(f"bucket {bucket} does not exist at {url}") from None
            if status == 403 or code in _DENIED_CODES:
                raise UsageError(f"access denied to bucket {bucket}: check credentials") from None
            if status == 301 or code == "PermanentRedirect":
                actual = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
                hint = f" (it is in {actual}: pass that region)" if actual else ""
                raise UsageError(f"bucket {bucket} is not in region {self.region}{hint}") from None
            raise UsageError(f"object store at {url} refused HEAD of bucket {bucket}: {code} (HTTP {status})") from None
        except BotoCoreError as exc:
            raise UsageError(f"cannot use object store at {url}: {exc}") from None

    def put_file(self, chunk_id: str, path: Path) -> None:
        """One PutObject of the whole chunk file.

        No HEAD first: keys are content hashes, so overwriting an existing
        object rewrites the same bytes (the uploader asks first only where
        the volume says the store may have it). The file is read whole (one
        chunk, 4 MiB at most, per upload in flight) and sent as one signed
        PUT on the client's pool, without botocore's request pipeline:
        measured against SeaweedFS, 4.5 ms of CPU per 4 MiB chunk instead of
        6.8 ms, both signing the body. Anything but a 200 is sent again
        through the client, which retries once and whose error
        `classify_error` judges (a PUT of the same bytes twice is harmless).
        """
        key = self._key(chunk_id)
        with _chunk_file_bytes(path) as data, metrics.store_request("PUT"):
            if self._direct("PUT", key, data) is not None:
                return
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))
            except (ClientError, BotoCoreError) as exc:
                raise classify_error(exc, f"PUT {key}") from None

    def get(self, chunk_id: str) -> bytes:
        """The whole object; the caller verifies the BLAKE3 hash.

        First as one signed GET on the client's pool, without botocore's
        request pipeline (measured against SeaweedFS: 0.53 ms of CPU per
        16 KiB GET instead of 1.75 ms; with the GIL that CPU bounded a cold
        read of 2,000 small files at 3.5 s). Anything but a whole 200 answer
        (absent, throttled, refused, cut short) is asked again through the
        client, which retries once and whose error `classify_error` judges:
        failures keep one meaning, at the cost of one more request."""
        key = self._key(chunk_id)
        with metrics.store_request("GET"):
            data = self._direct("GET", key)
            if data is not None:
                return data
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=key)
                body = response["Body"]
                try:
                    return body.read()
                finally:
                    body.close()
            except (ClientError, BotoCoreError) as exc:
                raise classify_error(exc, f"GET {key}", chunk_id=chunk_id) from None

    def _direct(self, method: str, key: str, body: bytes | memoryview | None = None) -> bytes | None:
        """One plain signed request on the client's pool: the answer's body
        if it is a whole 200, else None (the caller then asks the client)."""
        if self._http is None or self._credentials is None:
            return None
        url = f"{self.endpoint_url.rstrip('/')}/{quote(self.bucket, safe='')}/{quote(key, safe='/~')}"
        try:
            request = AWSRequest(method=method, url=url, data=body)
            # The client's config says whether the body is signed (see `_config`).
            request.context["client_config"] = self._client.meta.config
            S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
            prepared = request.prepare()
            # Not botocore's read of the body (64 KiB pieces, joined: twice
            # the CPU of the client's GET for a 4 MiB chunk) but one read.
            prepared.stream_output = True
            response = self._http.send(prepared)
            try:
                data = response.raw.read()  # whole, error bodies too: the connection goes back clean
            finally:
                response.raw.release_conn()
            expected = response.headers.get("content-length")
        except Exception as exc:  # the client's attempt reports it
            log.debug("direct request failed; asking the client", extra={"method": method, "key": key, "error": repr(exc)})
            return None
        if response.status_code != 200 or expected is None or int(expected) != len(data):
            return None
        return data

    def exists(self, chunk_id: str) -> bool:
        key = self._key(chunk_id)
        with metrics.store_request("HEAD"):  # an absent object is an answer, not an error
            try:
                self._client.head_object(Bucket=self.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                error = classify_error(exc, f"HEAD {key}", chunk_id=chunk_id)
                if isinstance(error, ChunkMissing):
                    return False
                raise error from None
        return True

    def delete(self, chunk_id: str) -> None:
        """S3 DELETE succeeds for an absent key, so this is idempotent."""
        key = self._key(chunk_id)
        with metrics.store_request("DELETE"):
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                raise classify_error(exc, f"DELETE {key}") from None

    def list_chunks(self) -> Iterator[StoredChunk]:
        """ListObjectsV2 under PREFIX/chunks/, 1000 keys a page, in key order
        (which is id order: the fan-out directories are the id's first digits)."""
        base = f"{self.prefix}/chunks/" if self.prefix else "chunks/"
        pages = iter(self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base))
        while True:
            # Each page is one request, timed alone: the caller's work between
            # pages is not the store's latency.
            started = time.monotonic()
            try:
                page = next(pages, None)
            except (ClientError, BotoCoreError) as exc:
                metrics.observe_store_request("LIST", "error", started)
                raise classify_error(exc, f"LIST {base}") from None
            if page is None:
                return  # the paginator knew the last page was the last: no request
            metrics.observe_store_request("LIST", "ok", started)
            for obj in page.get("Contents", []):
                chunk = obj["Key"].rpartition("/")[2]
                if is_chunk_id(chunk) and obj["Key"] == self._key(chunk):
                    yield StoredChunk(chunk, int(obj["Size"]), obj["LastModified"].timestamp())
