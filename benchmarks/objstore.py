"""The object store's own ceiling: what boto3 gets from the same SeaweedFS
server with nothing in between.

PUT, then GET, of N distinct 4 MiB objects (the chunk size of datafs and the
block size of JuiceFS) from a pool of threads. On 2 cores SeaweedFS is
CPU-bound, so this ceiling is measured in the same run as everything compared
with it, never taken from an earlier run.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

from .sizes import BLOCK_BYTES

CEILING_BUCKET = "ceiling-bench"


def prepare_bucket(server, client, bucket: str) -> str:
    """Create `bucket` and make it ready for full-speed writes.

    SeaweedFS maps a bucket to a collection and grows its first volumes on
    the first write to it, which takes seconds; whoever wrote first would pay
    for that inside a timed step. One untimed PUT here pays it instead.
    """
    server.create_bucket(bucket)
    client.put_object(Bucket=bucket, Key="warm-up", Body=os.urandom(BLOCK_BYTES))
    client.delete_object(Bucket=bucket, Key="warm-up")
    return bucket


def measure_ceiling(server, client, objects: int, threads: int) -> tuple[float, float]:
    """(PUT, GET) throughput in bytes per second. The objects are deleted
    afterwards, outside the timed part."""
    prepare_bucket(server, client, CEILING_BUCKET)
    # One random body per thread is enough: keys differ, and the server does not deduplicate.
    bodies = [os.urandom(BLOCK_BYTES) for _ in range(min(objects, threads))]
    keys = [f"ceiling/{i:06d}" for i in range(objects)]

    def put(i: int) -> None:
        client.put_object(Bucket=CEILING_BUCKET, Key=keys[i], Body=bodies[i % len(bodies)])

    def get(i: int) -> int:
        return len(client.get_object(Bucket=CEILING_BUCKET, Key=keys[i])["Body"].read())

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        started = time.perf_counter()
        list(pool.map(put, range(objects)))
        put_seconds = time.perf_counter() - started
        started = time.perf_counter()
        got = sum(pool.map(get, range(objects)))
        get_seconds = time.perf_counter() - started
    assert got == objects * BLOCK_BYTES, f"GET returned {got} bytes, expected {objects * BLOCK_BYTES}"
    delete_keys(client, CEILING_BUCKET, keys)
    total = objects * BLOCK_BYTES
    return total / put_seconds, total / get_seconds


def delete_keys(client, bucket: str, keys: list[str]) -> None:
    """Delete these objects, 1,000 (the most one DeleteObjects takes) at a time."""
    for first in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": key} for key in keys[first:first + 1000]], "Quiet": True})
