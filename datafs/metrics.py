"""Every Prometheus metric datafs exports, in one place.

Names carry the `datafs_` prefix and base units; label sets are small and fixed
(`tier`, `op`, `result`). The daemon serves them on --metrics-address.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FUSE_OPS = Counter("datafs_fuse_ops_total", "FUSE requests handled", ["op", "result"])
FUSE_OP_SECONDS = Histogram(
    "datafs_fuse_op_seconds", "FUSE request latency", ["op"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
READ_BYTES = Counter("datafs_read_bytes_total", "Bytes returned to readers, by the tier that served them", ["tier"])
WRITE_BYTES = Counter("datafs_write_bytes_total", "Bytes accepted from writers")
CHUNK_FETCHES = Counter("datafs_chunk_fetches_total", "Chunks fetched into the local cache", ["tier", "result"])
CHUNK_FETCH_SECONDS = Histogram("datafs_chunk_fetch_seconds", "Time to fetch one chunk", ["tier"])
PREFETCHED_CHUNKS = Counter("datafs_prefetched_chunks_total", "Chunks fetched ahead of a sequential reader")
WRITE_STALLS = Counter("datafs_write_stalls_total", "Times a writer waited for uploads to free cache space")
CHUNKS_SEALED = Counter("datafs_chunks_sealed_total", "Chunks hashed and written to the local cache")
COMMITS = Counter("datafs_commits_total", "File content commits to the metadata store")
CACHE_BYTES = Gauge("datafs_cache_bytes", "Bytes of chunks in the local cache")
CACHE_EVICTIONS = Counter("datafs_cache_evictions_total", "Chunks evicted from the local cache")
CACHE_CORRUPT = Counter("datafs_cache_corrupt_total", "Cache files that failed verification and were dropped")
UPLOADS = Counter("datafs_uploads_total", "Chunk uploads to the object store", ["result"])
UPLOAD_BYTES = Counter("datafs_upload_bytes_total", "Bytes uploaded to the object store")
UPLOADS_PENDING = Gauge("datafs_uploads_pending", "Committed chunks not yet in the object store (status: pending uploads)")
UPLOADS_PENDING_BYTES = Gauge("datafs_uploads_pending_bytes", "Bytes of committed chunks not yet in the object store")
UPLOADS_FAILING = Gauge(
    "datafs_uploads_failing", "Chunks whose last upload attempt failed, by whether their file is committed yet",
    ["state"],  # committed (counted in pending) or open (a file still being written)
)
WRITES_DROPPED = Counter(
    "datafs_writes_dropped_total", "Files whose uncommitted writes were dropped after a write or commit failed", ["errno"],
)
UPLOAD_SECONDS = Histogram("datafs_upload_seconds", "Time to upload one chunk")
GC_CHUNKS = Counter("datafs_gc_chunks_total", "Unreferenced chunks deleted")
META_TXNS = Counter("datafs_meta_transactions_total", "Metadata transactions", ["op", "result"])
META_TXN_SECONDS = Histogram(
    "datafs_meta_transaction_seconds", "Metadata transaction latency, retries included", ["op"],
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
META_TXN_RESTARTS = Counter("datafs_meta_transaction_restarts_total", "Metadata transactions run again after a conflict")
SESSIONS_LIVE = Gauge("datafs_sessions_live", "Nodes with a live session in the shared metadata engine")
PEER_REQUESTS_SERVED = Counter("datafs_peer_requests_served_total", "Requests from other nodes, by method and result", ["method", "result"])
PEER_SERVED_BYTES = Counter("datafs_peer_served_bytes_total", "Chunk bytes sent to other nodes")
PEER_SHARES = Counter("datafs_peer_shares_total", "Chunks pushed to their owner after a commit", ["result"])
PEER_SHARES_PENDING = Gauge("datafs_peer_shares_pending", "Committed chunks being pushed to their owner")
PEER_MEMBERS = Gauge("datafs_peer_members", "Live nodes serving chunks to each other")
