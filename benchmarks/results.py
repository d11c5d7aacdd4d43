"""What is measured and how results compare: the workload catalogue and the
result row.

One table says, for every workload, which targets run it, its unit, whether
higher or lower is better, and what it is compared with. The runner, the
report and the CI test all read it, so a workload added here is measured,
reported and checked without touching the others.

Ratios are always *speeds relative to a reference*: 0.50 means half as fast
(half the MiB/s, or twice the seconds) and 2.00 twice as fast, whatever the
unit, so a column of ratios reads the same way top to bottom.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .sizes import BLOCK_BYTES, Sizes, human_bytes

DISK, PYFUSE3, DATAFS, JUICEFS, S3_CEILING = "disk", "pyfuse3", "datafs", "juicefs", "s3-ceiling"
#: Filesystem targets in the order they run (pyfuse3 and JuiceFS only with --peers).
FS_TARGETS = (DISK, PYFUSE3, DATAFS, JUICEFS)
#: With an object store behind them.
REMOTE = (DATAFS, JUICEFS)
#: Served by a daemon of their own (the disk is the kernel's).
DAEMONS = (PYFUSE3, DATAFS, JUICEFS)
MIB_S, IOPS, SECONDS, MIB = "MiB/s", "IOPS", "s", "MiB"


@dataclasses.dataclass(frozen=True)
class Workload:
    id: str
    number: str  # the numbering, so the table maps back to it
    title: str  # str.format()ted with the mode's sizes (see `title_for`)
    unit: str
    targets: tuple[str, ...]
    disk_ref: str | None = None  # whose disk row is "the physical limit" for this one
    s3_ref: str | None = None  # the object-store ceiling it is bounded by

    @property
    def higher_is_better(self) -> bool:
        return self.unit not in (SECONDS, MIB)

    def title_for(self, sizes: Sizes) -> str:
        return self.title.format(
            seq=human_bytes(sizes.seq_file_bytes), block=human_bytes(BLOCK_BYTES),
            jobs=sizes.random_read_jobs, seconds=f"{sizes.random_read_seconds:g}",
            small=sizes.small_files, small_size=human_bytes(sizes.small_file_bytes),
            upload=human_bytes(sizes.upload_file_bytes), tree=human_bytes(sizes.tree_bytes),
            objects=sizes.ceiling_objects, threads=sizes.ceiling_threads,
            listing=sizes.listing_entries,
        )


WORKLOADS: tuple[Workload, ...] = (
    Workload("s3-put", "0", "Object store ceiling: boto3 PUT {objects} x {block}, {threads} threads", MIB_S,
             (S3_CEILING,), disk_ref="seq-write"),
    Workload("s3-get", "0", "Object store ceiling: boto3 GET {objects} x {block}, {threads} threads", MIB_S,
             (S3_CEILING,), disk_ref="seq-read-cache"),
    Workload("seq-write", "1", "Sequential write {seq}, {block} blocks, fsync at end", MIB_S,
             FS_TARGETS, disk_ref="seq-write"),
    Workload("seq-read-warm", "2a", "Sequential read {seq}, warm (page cache)", MIB_S,
             FS_TARGETS, disk_ref="seq-read-warm"),
    Workload("seq-read-cache", "2b", "Sequential read {seq}, page cache dropped (local cache)", MIB_S,
             FS_TARGETS, disk_ref="seq-read-cache"),
    # pyfuse3's row is `s3read.py`: a daemon that only GETs (with --peers pyfuse3).
    Workload("seq-read-cold", "2c", "Sequential read {seq}, cold (local cache emptied, daemon restarted)", MIB_S,
             (PYFUSE3,) + REMOTE, disk_ref="seq-read-cache", s3_ref="s3-get"),
    Workload("rand-read-4k", "3", "Random 4 KiB reads over {seq}, {jobs} jobs, {seconds} s (local cache)", IOPS,
             FS_TARGETS, disk_ref="rand-read-4k"),
    Workload("small-create", "4", "Small files: create {small} x {small_size} in nested dirs", SECONDS,
             FS_TARGETS, disk_ref="small-create"),
    Workload("small-stat", "4", "Small files: stat all (page cache dropped)", SECONDS,
             FS_TARGETS, disk_ref="small-stat"),
    Workload("small-read", "4", "Small files: read all, find | xargs -P 32 cat", SECONDS,
             FS_TARGETS, disk_ref="small-read"),
    Workload("small-delete", "4", "Small files: delete all", SECONDS,
             FS_TARGETS, disk_ref="small-delete"),
    Workload("rename-file", "5", "Rename a {seq} file", SECONDS,
             FS_TARGETS, disk_ref="rename-file"),
    Workload("rename-dir", "5", "Rename a directory of {small} files", SECONDS,
             FS_TARGETS, disk_ref="rename-dir"),
    Workload("upload-lag", "6", "Upload lag: close() of a new {upload} file until all of it is in the bucket", SECONDS,
             REMOTE, s3_ref="s3-put"),
    Workload("warmup-cold", "7", "Cold pre-read of a {tree} model tree: `datafs warmup`, JuiceFS `juicefs warmup`", MIB_S,
             FS_TARGETS, disk_ref="warmup-cold", s3_ref="s3-get"),
    Workload("list-dir", "8", "List a directory of {listing} entries, os.scandir (page cache dropped)", SECONDS,
             FS_TARGETS, disk_ref="list-dir"),
    Workload("peak-rss", "9", "Peak RSS of the filesystem's daemon over the whole run (VmHWM)", MIB, DAEMONS),
)
BY_ID = {w.id: w for w in WORKLOADS}


@dataclasses.dataclass
class Row:
    """One measurement of one workload on one target."""

    workload: str
    target: str
    figure: float
    unit: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    ratio_disk: float | None = None
    ratio_s3: float | None = None
    ratio_juicefs: float | None = None
    ratio_pyfuse3: float | None = None

    def throughput_bytes_per_second(self) -> float | None:
        """MiB/s rows as they are; a timed transfer of `extra['bytes']` as bytes/seconds."""
        if self.unit == MIB_S:
            return self.figure * (1 << 20)
        if self.unit == SECONDS and self.extra.get("bytes") and self.figure > 0:
            return self.extra["bytes"] / self.figure
        return None


def expected_pairs(targets: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """Every (workload, target) row a complete run with these targets has."""
    return [(w.id, t) for w in WORKLOADS for t in w.targets if t in targets]


def speed_ratio(row: Row, reference: Row | None) -> float | None:
    """How fast `row` is next to `reference`: >1 faster, <1 slower."""
    if reference is None or reference.figure <= 0 or row.figure <= 0 or row.unit != reference.unit:
        return None
    workload = BY_ID[row.workload]
    return row.figure / reference.figure if workload.higher_is_better else reference.figure / row.figure


def fill_ratios(rows: list[Row]) -> None:
    """Set each row's ratios to the disk, the object-store ceiling, JuiceFS
    and (datafs's rows) the pyfuse3 ceiling: the same job on a passthrough
    filesystem in Python on the same disk."""
    index = {(r.workload, r.target): r for r in rows}
    for row in rows:
        workload = BY_ID[row.workload]
        if workload.disk_ref:
            row.ratio_disk = _cross_ratio(row, index.get((workload.disk_ref, DISK)))
        if workload.s3_ref and (row.target in REMOTE or row.extra.get("from_store")):
            ceiling = index.get((workload.s3_ref, S3_CEILING))
            mine = row.throughput_bytes_per_second()
            if ceiling is not None and mine and ceiling.figure > 0:
                row.ratio_s3 = mine / (ceiling.figure * (1 << 20))
                if row.workload == "upload-lag":
                    _note_lag_floor(row, ceiling)
        if row.target == DATAFS:
            row.ratio_juicefs = speed_ratio(row, index.get((row.workload, JUICEFS)))
            row.ratio_pyfuse3 = speed_ratio(row, index.get((row.workload, PYFUSE3)))


def _note_lag_floor(row: Row, put_ceiling: Row) -> None:
    """The shortest lag the store allows this target: even PUTting at the
    ceiling from the moment its write began, the last byte lands `bytes /
    ceiling` later; what the write took of that is not lag. So a target that
    writes faster starts closer to the ceiling's time, and its floor is higher."""
    written = row.extra.get("write_seconds")
    if written is None or not row.extra.get("bytes") or "lag_floor_seconds" in row.extra:
        return
    floor = max(0.0, row.extra["bytes"] / (put_ceiling.figure * (1 << 20)) - written)
    row.extra["lag_floor_seconds"] = floor
    note = f"floor at the PUT ceiling after its {written:.2f} s write: {floor:.2f} s"
    row.note = f"{row.note}; {note}" if row.note else note


def _cross_ratio(row: Row, reference: Row | None) -> float | None:
    """A ratio to another workload's row (s3-put next to the disk's sequential
    write): both are throughputs, so compare them as such."""
    if reference is None:
        return None
    if reference.workload == row.workload:
        return speed_ratio(row, reference)
    mine, theirs = row.throughput_bytes_per_second(), reference.throughput_bytes_per_second()
    if mine and theirs:
        return mine / theirs
    return None
