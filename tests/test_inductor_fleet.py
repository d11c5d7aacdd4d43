"""The compile cache across nodes: two daemons of one volume, sharing a real
PostgreSQL (conftest's `pg_url`) and a real S3 server (SeaweedFS on 127.0.0.1,
ports 18950-18957), each with its own mountpoint, state dir and chunk cache,
as two GPU nodes would be.

What a fleet relies on: a worker on one node loads, without compiling or
tracing, what a worker on another node published; and the compile lease is
one lease for the whole volume, so workers on two nodes compile once.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from .conftest import Mount, seaweed_fixture
from .test_inductor import _assert_valid_archive, _finish, _start_synthetic, run_worker

pytestmark = pytest.mark.mount

BASE_PORT = 18950

s3 = seaweed_fixture(BASE_PORT)


@pytest.fixture
def two_nodes(pg_url, s3, mount_factory) -> tuple[Mount, Mount]:
    bucket = s3.create_bucket(f"ind-{uuid.uuid4().hex[:12]}")
    env = {**s3.aws_env(), **pg_url.env}
    first = mount_factory("node-a", extra_args=["--meta", pg_url.url, "--store", f"s3://{bucket}/fleet",
                                                "--s3-endpoint", s3.endpoint_url], env=env)
    second = mount_factory("node-b", extra_args=["--meta", pg_url.url], env=env)
    return first, second


def test_a_worker_on_another_node_loads_what_was_published(two_nodes: tuple[Mount, Mount], tmp_path: Path) -> None:
    node_a, node_b = two_nodes
    a = run_worker("compile", "fleet/v1", data_dir=node_a.path, local_dir=tmp_path / "local-a", tmpdir=tmp_path)
    assert a["fxgraph_cache_miss"] == 2 and a["cpp_kernels_compiled"] > 0, a
    archive_b = node_b.path / "inductor-caches" / "CPU" / "fleet" / "v1.zip"
    _assert_valid_archive(archive_b)  # read through the second daemon: metadata from PostgreSQL, chunks from S3
    stamp = os.stat(archive_b).st_mtime_ns

    b = run_worker("compile", "fleet/v1", data_dir=node_b.path, local_dir=tmp_path / "local-b", tmpdir=tmp_path)
    assert "loaded the shared inductor cache" in b["stderr"]
    assert b["dynamo_cache_hit"] == 1 and b["graphs_traced"] == 0, b
    assert b["fxgraph_cache_miss"] == 0 and b["cpp_kernels_compiled"] == 0 and b["files_compiled"] == 0, b
    assert b["outputs"] == a["outputs"]
    assert os.stat(archive_b).st_mtime_ns == stamp  # nothing new: nothing written


def test_one_lease_for_the_whole_volume(two_nodes: tuple[Mount, Mount], tmp_path: Path) -> None:
    """Workers on two nodes start together on an empty key: one compiles, the
    other waits for its archive through the other daemon and loads it."""
    node_a, node_b = two_nodes
    procs = [_start_synthetic(node.path, tmp_path, "fleet-lease/v1", f"{name}{n}", compile_seconds=3)
             for n in range(2) for name, node in (("a", node_a), ("b", node_b))]
    results = [_finish(proc) for proc in procs]
    compilers = [r for r in results if r["compiled"]]
    assert len(compilers) == 1, [r["stderr"] for r in results]
    published = set(compilers[0]["written"]) | {"common/same-everywhere.so"}
    assert all(set(r["loaded"]) == published for r in results if not r["compiled"])
    for node in (node_a, node_b):
        assert set(_assert_valid_archive(node.path / "inductor-caches" / "CPU" / "fleet-lease" / "v1.zip")["files"]) == published
