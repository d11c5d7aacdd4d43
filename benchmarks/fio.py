"""fio, the standard tool for sequential and random I/O, as a function.

Every job runs with `--direct=0` (FUSE filesystems and the page cache are
what users get), `--invalidate=0` (the harness decides what is cached, by
dropping the page cache itself, not fio behind its back), `--fallocate=none`
(not every filesystem under test implements fallocate, and preallocation would
favour the ones that do), `--refill_buffers` (fresh random bytes for every
block: fio's default reuses one buffer, so a deduplicating filesystem like
datafs would store a 1 GiB file as one chunk and win by cheating) and
`--randrepeat=0` (a seed of its own for every job: with fio's fixed default
seed, every file written holds the same bytes as the last one, block for
block, so the model tree's two large files and the sequential file were one
set of chunks to datafs).

Throughput comes from fio's own runtime, which includes the `end_fsync`, so a
write is measured until its data is durable.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

from .errors import BenchError


@dataclasses.dataclass(frozen=True)
class FioResult:
    bytes_per_second: float
    iops: float
    io_bytes: int
    runtime_seconds: float
    clat_p50_seconds: float | None
    clat_p99_seconds: float | None

    @property
    def mib_per_second(self) -> float:
        return self.bytes_per_second / (1 << 20)


def parse_fio_json(text: str, direction: str) -> FioResult:
    """The `read` or `write` side of fio's JSON output, summed over its jobs.

    fio may print warnings before the JSON document, so parsing starts at the
    first brace. With `--group_reporting` there is one job entry; without it
    the entries are added up (latency percentiles then come from the first).
    """
    start = text.find("{")
    if start < 0:
        raise BenchError(f"fio printed no JSON: {text.strip()[:200]!r}")
    try:
        document = json.loads(text[start:])
    except ValueError as exc:
        raise BenchError(f"fio printed invalid JSON ({exc})") from None
    jobs = document.get("jobs") or []
    if not jobs:
        raise BenchError("fio reported no jobs")
    failed = [job for job in jobs if job.get("error")]
    if failed:
        raise BenchError(f"fio job {failed[0].get('jobname')} failed with error {failed[0]['error']}")
    sides = [job[direction] for job in jobs]
    io_bytes = sum(int(side["io_bytes"]) for side in sides)
    if io_bytes <= 0:
        raise BenchError(f"fio did no {direction} I/O")
    runtime_ms = max(int(side["runtime"]) for side in sides)
    percentiles = sides[0].get("clat_ns", {}).get("percentile", {})

    def percentile(p: str) -> float | None:
        value = percentiles.get(p)
        return value / 1e9 if value else None

    return FioResult(
        bytes_per_second=float(sum(float(side["bw_bytes"]) for side in sides)),
        iops=float(sum(float(side["iops"]) for side in sides)),
        io_bytes=io_bytes,
        runtime_seconds=runtime_ms / 1000,
        clat_p50_seconds=percentile("50.000000"),
        clat_p99_seconds=percentile("99.000000"),
    )


def run_fio(
    filename: Path, rw: str, *, block_bytes: int, size_bytes: int, jobs: int = 1,
    runtime_seconds: float | None = None, end_fsync: bool = False, timeout_seconds: float = 600,
) -> FioResult:
    """One fio job (or `jobs` identical ones, reported as a group) on one file."""
    binary = shutil.which("fio")
    if binary is None:
        raise BenchError("fio is not installed: apt-get install fio")
    command = [
        binary, "--output-format=json", f"--name={rw}", f"--filename={filename}", f"--rw={rw}",
        f"--bs={block_bytes}", f"--size={size_bytes}", "--ioengine=psync", "--direct=0",
        "--invalidate=0", "--fallocate=none", "--refill_buffers=1", "--randrepeat=0",
    ]
    if end_fsync:
        command.append("--end_fsync=1")
    if jobs > 1:
        command += [f"--numjobs={jobs}", "--group_reporting=1"]
    if runtime_seconds is not None:
        command += ["--time_based=1", f"--runtime={runtime_seconds:g}s", "--norandommap=1"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {rw} on {filename} did not finish within {timeout_seconds:.0f} s") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise BenchError(f"fio {rw} on {filename} failed: {detail[-1] if detail else result.returncode}")
    return parse_fio_json(result.stdout, "write" if "write" in rw else "read")
