"""Every Prometheus metric datafs exports, in one place.

Names carry the `datafs_` prefix and base units (`_seconds`, `_bytes`),
counters end in `_total`, and label sets are small and fixed: `op` (a FUSE
handler, a metadata call or read/write), `tier` (cache, peer, store),
`method` (GET, PUT, HEAD, DELETE, LIST), `result` (ok, an errno name, or a
short word such as error or conflict), `state`, `errno`.

The metrics are created unregistered: `register(registry)` adds them to the
registry the caller injects (the daemon builds one per process with
`new_registry()` and serves it on --metrics-address), so nothing depends on
prometheus_client's global registry and a test can read a fresh one.

Hot paths pay at most a counter increment or a histogram observation per
request. Values that would cost work to keep current (cache entries, pinned
bytes, the age of the oldest pending upload) are computed when scraped,
through `Gauge.set_function`, by the component that owns them.

`snapshot()` reads the counters `datafs stats` needs, for the control endpoint.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.process_collector import ProcessCollector

_ALL: list[MetricWrapperBase] = []


def _add(metric: MetricWrapperBase) -> MetricWrapperBase:
    _ALL.append(metric)
    return metric


def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
    return _add(Counter(name, documentation, labels, registry=None))


def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
    return _add(Gauge(name, documentation, labels, registry=None))


def histogram(name: str, documentation: str, labels: tuple[str, ...] = (), buckets=Histogram.DEFAULT_BUCKETS) -> Histogram:
    return _add(Histogram(name, documentation, labels, buckets=buckets, registry=None))


#: Latency buckets for requests served from memory or a local disk.
_FAST_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
#: Latency buckets for network requests (object store, chunk fetches).
_NETWORK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# ---- FUSE ---------------------------------------------------------------------------------
FUSE_OPS = counter("datafs_fuse_ops_total", "FUSE requests handled, by handler and result (ok or an errno name)", ("op", "result"))
FUSE_OP_SECONDS = histogram(
    "datafs_fuse_op_seconds", "FUSE request latency", ("op",),
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
READ_BYTES = counter("datafs_read_bytes_total", "Bytes returned to readers, by the tier that served them (cache, peer, store)", ("tier",))
WRITE_BYTES = counter("datafs_write_bytes_total", "Bytes accepted from writers")
WRITES_DROPPED = counter(
    "datafs_writes_dropped_total", "Files whose uncommitted writes were dropped after a write or commit failed", ("errno",),
)
COMMITS = counter("datafs_commits_total", "File content commits to the metadata store")

# ---- local chunk cache ----------------------------------------------------------------------
CACHE_HITS = counter("datafs_cache_hits_total", "Reads served from the local cache")
CACHE_MISSES = counter("datafs_cache_misses_total", "Reads whose chunk had to come from a peer or the object store")
CACHE_HIT_BYTES = counter("datafs_cache_hit_bytes_total", "Bytes of reads served from the local cache")
CACHE_MISS_BYTES = counter("datafs_cache_miss_bytes_total", "Bytes of reads whose chunk had to come from a peer or the object store")
CACHE_EVICTIONS = counter("datafs_cache_evictions_total", "Chunks evicted from the local cache")
CACHE_CORRUPT = counter("datafs_cache_corrupt_total", "Cache files that failed verification and were dropped")
CACHE_CHUNKS = gauge("datafs_cache_chunks", "Chunks (entries) in the local cache")
CACHE_BYTES = gauge("datafs_cache_bytes", "Bytes of chunks in the local cache")
CACHE_LIMIT_BYTES = gauge("datafs_cache_limit_bytes", "The local cache's byte limit (--cache-size)")
CACHE_PINNED_BYTES = gauge("datafs_cache_pinned_bytes", "Bytes of cached chunks that cannot be evicted: not committed or not uploaded yet")

# ---- durability (datafs/durability.py) ------------------------------------------------------
CHUNKS_NOT_DURABLE = gauge(
    "datafs_chunks_not_durable", "Chunks written to the local cache without fsync, not yet durable against power loss",
)
CHUNKS_NOT_DURABLE_BYTES = gauge("datafs_chunks_not_durable_bytes", "Bytes of chunks not yet durable against power loss")
FLUSH_SECONDS = histogram(
    "datafs_flush_seconds", "Time to make written chunks and the metadata durable, by what asked: flush (the "
    "background interval, and unmount) or fsync", ("op",), buckets=_FAST_BUCKETS,
)
FLUSHES = counter("datafs_flushes_total", "Flushes and fsyncs, by what asked (flush, fsync) and result (ok, error)", ("op", "result"))
DAMAGED_FILES = counter(
    "datafs_recovery_damaged_files_total",
    "Files cut short at start because chunks they referenced were lost (written within the flush interval before a power loss)",
)

# ---- chunk fetches and writes -----------------------------------------------------------------
CHUNK_FETCHES = counter("datafs_chunk_fetches_total", "Chunks fetched into the local cache", ("tier", "result"))
CHUNK_FETCH_SECONDS = histogram(
    "datafs_chunk_fetch_seconds", "Time to fetch and verify one chunk", ("tier",), buckets=_NETWORK_BUCKETS,
)
PREFETCHED_CHUNKS = counter("datafs_prefetched_chunks_total", "Chunks fetched ahead of a sequential reader")
KERNEL_PUSHED_BYTES = counter(
    "datafs_kernel_pushed_bytes_total", "Bytes of whole chunks put in the kernel's page cache for random readers",
)
WRITE_STALLS = counter("datafs_write_stalls_total", "Times a writer waited for uploads to free cache space")
CHUNKS_SEALED = counter("datafs_chunks_sealed_total", "Chunks hashed and written to the local cache")

# ---- object store ------------------------------------------------------------------------------
STORE_REQUESTS = counter(
    "datafs_object_store_requests_total",
    "Object-store requests, by method (GET, PUT, HEAD, DELETE, LIST) and result (ok, missing, error)",
    ("method", "result"),
)
STORE_REQUEST_SECONDS = histogram(
    "datafs_object_store_request_seconds",
    "Object-store request latency, the request alone (no hashing or verification)", ("method",),
    buckets=_NETWORK_BUCKETS,
)

# ---- uploads and garbage ---------------------------------------------------------------------
UPLOADS = counter("datafs_uploads_total", "Chunk uploads to the object store", ("result",))
UPLOAD_BYTES = counter("datafs_upload_bytes_total", "Bytes uploaded to the object store")
UPLOAD_SECONDS = histogram("datafs_upload_seconds", "Time to upload one chunk, verification included", buckets=_NETWORK_BUCKETS)
UPLOADS_PENDING = gauge("datafs_uploads_pending", "Committed chunks not yet in the object store (status: pending uploads)")
UPLOADS_PENDING_BYTES = gauge("datafs_uploads_pending_bytes", "Bytes of committed chunks not yet in the object store")
UPLOADS_PENDING_OLDEST_SECONDS = gauge(
    "datafs_uploads_pending_oldest_seconds", "How long the oldest committed chunk not in the object store has waited",
)
UPLOADS_FAILING = gauge(
    "datafs_uploads_failing", "Chunks whose last upload attempt failed, by whether their file is committed yet",
    ("state",),  # committed (counted in pending) or open (a file still being written)
)
GC_CHUNKS = counter("datafs_gc_chunks_total", "Unreferenced chunks deleted")

# ---- metadata ----------------------------------------------------------------------------------
META_TXNS = counter(
    "datafs_meta_transactions_total",
    "Metadata transactions by kind (read, write) and result: aborted, conflict, unavailable (and ok on PostgreSQL)",
    ("op", "result"),
)
META_TXN_SECONDS = histogram(
    "datafs_meta_transaction_seconds",
    "Latency of committed metadata transactions, retries included (its _count counts them, in every engine)",
    ("op",), buckets=_FAST_BUCKETS,
)
META_TXN_RESTARTS = counter("datafs_meta_transaction_restarts_total", "Metadata transactions run again after a conflict")
META_OP_SECONDS = histogram(
    "datafs_meta_operation_seconds",
    "Metadata calls from the event loop, by operation (lookup, create, commit_content...), thread hop included",
    ("op",), buckets=_FAST_BUCKETS,
)
SESSIONS_LIVE = gauge("datafs_sessions_live", "Nodes with a live session in the shared metadata engine")

# ---- peer tier ----------------------------------------------------------------------------------
PEER_REQUESTS_SERVED = counter("datafs_peer_requests_served_total", "Requests from other nodes, by method and result", ("method", "result"))
PEER_SERVED_BYTES = counter("datafs_peer_served_bytes_total", "Chunk bytes sent to other nodes")
PEER_SHARES = counter("datafs_peer_shares_total", "Chunks pushed to their owner after a commit", ("result",))
PEER_SHARES_PENDING = gauge("datafs_peer_shares_pending", "Committed chunks being pushed to their owner")
PEER_MEMBERS = gauge("datafs_peer_members", "Live nodes serving chunks to each other")


def register(registry: CollectorRegistry) -> CollectorRegistry:
    """Adds every datafs metric to `registry`; returns it."""
    for metric in _ALL:
        registry.register(metric)
    return registry


def new_registry() -> CollectorRegistry:
    """The registry a daemon serves: the datafs metrics and the process's own
    (CPU seconds, resident memory, open descriptors)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return register(registry)


@contextlib.contextmanager
def store_request(method: str) -> Iterator[None]:
    """Counts and times one object-store request. Wrap the request only, not
    the hashing around it; `ChunkMissing` (an absent object) counts as
    `missing`, anything else raised as `error`."""
    from .errors import ChunkMissing

    started = time.monotonic()
    result = "error"
    try:
        yield
        result = "ok"
    except ChunkMissing:
        result = "missing"
        raise
    finally:
        observe_store_request(method, result, started)


def observe_store_request(method: str, result: str, started: float) -> None:
    """One object-store request that began at `started` (time.monotonic())."""
    STORE_REQUESTS.labels(method, result).inc()
    STORE_REQUEST_SECONDS.labels(method).observe(time.monotonic() - started)


def _total(metric: MetricWrapperBase, suffix: str = "_total", **match: str) -> float:
    """The sum of a metric's samples named name+suffix whose labels match."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix) and all(sample.labels.get(k) == v for k, v in match.items()):
                total += sample.value
    return total


def _by_label(metric: MetricWrapperBase, label: str, suffix: str = "_total") -> dict[str, float]:
    out: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix) and label in sample.labels:
                out[sample.labels[label]] = out.get(sample.labels[label], 0.0) + sample.value
    return out


def snapshot() -> dict:
    """Monotonic counters for `datafs stats` (it shows their rates between two
    snapshots) and the current value of a few gauges."""
    return {
        "fuse_ops": _total(FUSE_OPS),
        "fuse_ops_by_op": _by_label(FUSE_OPS, "op"),
        "read_bytes": _by_label(READ_BYTES, "tier"),
        "write_bytes": _total(WRITE_BYTES),
        "commits": _total(COMMITS),
        "upload_bytes": _total(UPLOAD_BYTES),
        "cache_hits": _total(CACHE_HITS),
        "cache_misses": _total(CACHE_MISSES),
        "cache_hit_bytes": _total(CACHE_HIT_BYTES),
        "cache_miss_bytes": _total(CACHE_MISS_BYTES),
        "store_requests": _by_label(STORE_REQUESTS, "method"),
        "store_errors": _total(STORE_REQUESTS, result="error"),
        "meta_transactions": _total(META_TXN_SECONDS, "_count"),
        "meta_transaction_seconds": _total(META_TXN_SECONDS, "_sum"),
        "meta_restarts": _total(META_TXN_RESTARTS),
    }
