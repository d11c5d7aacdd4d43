"""A failure-injecting object store, for tests (mountpoint-s3's `failure_client`
is the model): it wraps the real store and makes its calls fail, slow down or
return damaged bodies, as a real S3 endpoint does on a bad day.

It exists in a daemon only when the environment variable `DATAFS_FAULTS`
names a JSON spec file (the production path never imports this module). The
wrapper re-reads the file whenever it changes, so a test switches faults in a
running daemon by rewriting it; a missing or empty file means no faults.

The failures are made the way real ones arrive, as botocore exceptions passed
through `s3_store.classify_error`, so they are classified (temporary or not,
missing or not) by the same code as a real endpoint's.

Spec keys (all optional):
  ops            calls the faults apply to: any of "get", "put", "exists",
                 "delete" (default: all four)
  down           true: every call fails as if the endpoint refused connections
  delay_seconds  every call sleeps this long first (a slow store)
  fail_every     N: every Nth call fails, with the HTTP statuses in `errors`
                 in turn (500 is InternalError, 503 SlowDown); default [500, 503]
  get_body       "truncate" (half the bytes) or "corrupt" (one byte changed):
                 what a GET returns, every `body_every`th GET (default every one)
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, EndpointConnectionError

from .s3_store import classify_error
from .store import ObjectStore

log = logging.getLogger(__name__)

ENV = "DATAFS_FAULTS"
OPS = ("get", "put", "exists", "delete")
_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def wrap_if_enabled(store: ObjectStore) -> ObjectStore:
    """The store wrapped in `FaultyStore` if `DATAFS_FAULTS` is set, else itself."""
    spec = os.environ.get(ENV)
    if not spec:
        return store
    log.warning("object store faults are injected from a spec file (tests only)", extra={"spec": spec})
    return FaultyStore(store, Path(spec))


def write_spec(path: Path, **spec: Any) -> None:
    """Switch a running daemon's faults (atomically: the daemon never reads half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(spec))
    os.replace(tmp, path)


class FaultyStore(ObjectStore):
    def __init__(self, inner: ObjectStore, spec_path: Path):
        self.inner = inner
        self.tier = inner.tier
        self.spec_path = Path(spec_path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._spec: dict[str, Any] = {}
        self._calls = itertools.count(1)
        self._gets = itertools.count(1)

    def __getattr__(self, name: str) -> Any:  # anything else the real store offers (listing, ...)
        return getattr(self.inner, name)

    def describe(self) -> str:
        return self.inner.describe()

    def check(self) -> None:
        self.inner.check()

    # ---- the spec -------------------------------------------------------------------
    def _current(self) -> dict[str, Any]:
        try:
            st = os.stat(self.spec_path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._spec = json.loads(self.spec_path.read_text() or "{}") if stamp else {}
                except (OSError, ValueError) as exc:
                    log.warning("unreadable fault spec: no faults", extra={"error": str(exc)})
                    self._spec = {}
                # A new spec starts its own count, so "every Nth" is predictable.
                self._calls = itertools.count(1)
                self._gets = itertools.count(1)
                log.warning("fault spec loaded", extra={"spec": json.dumps(self._spec)})
            return self._spec

    def _before(self, op: str, action: str, chunk_id: str | None) -> dict[str, Any]:
        spec = self._current()
        if op not in spec.get("ops", OPS):
            return {}
        if spec.get("delay_seconds"):
            time.sleep(float(spec["delay_seconds"]))
        if spec.get("down"):
            raise classify_error(EndpointConnectionError(endpoint_url=f"{self.describe()} (fault injected)"), action, chunk_id)
        every = int(spec.get("fail_every") or 0)
        if every:
            with self._lock:
                n = next(self._calls)
            if n % every == 0:
                statuses = spec.get("errors") or [500, 503]
                status = int(statuses[(n // every - 1) % len(statuses)])
                code, message = _ERRORS.get(status, ("InternalError", "injected"))
                error = {"Error": {"Code": code, "Message": f"{message} (fault injected)"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}
                raise classify_error(ClientError(error, action), action, chunk_id)
        return spec

    # ---- the store --------------------------------------------------------------------
    def put_file(self, chunk_id: str, path: Path) -> None:
        self._before("put", f"PUT {chunk_id}", None)
        self.inner.put_file(chunk_id, path)

    def get(self, chunk_id: str) -> bytes:
        spec = self._before("get", f"GET {chunk_id}", chunk_id)
        data = self.inner.get(chunk_id)
        damage = spec.get("get_body")
        if damage and data:
            with self._lock:
                n = next(self._gets)
            if n % int(spec.get("body_every") or 1) == 0:
                if damage == "truncate":
                    return data[: len(data) // 2]
                return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def exists(self, chunk_id: str) -> bool:
        self._before("exists", f"HEAD {chunk_id}", chunk_id)
        return self.inner.exists(chunk_id)

    def delete(self, chunk_id: str) -> None:
        self._before("delete", f"DELETE {chunk_id}", None)
        self.inner.delete(chunk_id)
