"""How big each run is: the three modes and their sizes.

Full mode is what the issues ask for (1 GiB files, 2,000 small files, a
directory of 10,000 entries, a model tree of a few GiB) and finishes in well under 30 minutes on 2 cores;
quick mode keeps every workload but shrinks it to a few minutes; tiny mode
exists so CI can run the whole harness in seconds and keep it from rotting.
Every size is printed in the report, so a table is never read without them.
"""

from __future__ import annotations

import dataclasses

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: fio and the object-store ceiling move data in 4 MiB blocks: datafs's chunk size.
BLOCK_BYTES = 4 * MiB


@dataclasses.dataclass(frozen=True)
class Sizes:
    mode: str
    seq_file_bytes: int  # workloads 1-3 and the 1 GiB rename
    random_read_seconds: float  # workload 3, per target
    random_read_jobs: int
    small_files: int  # workloads 4 and the directory rename
    small_file_bytes: int
    upload_file_bytes: int  # workload 6
    tree_big_files: int  # workload 7: the model tree
    tree_big_file_bytes: int
    tree_small_files: int
    tree_small_file_bytes: int
    ceiling_objects: int  # object-store ceiling: PUT then GET of this many 4 MiB objects
    ceiling_threads: int
    rename_repeats: int  # renames are microseconds: report the median of several
    listing_entries: int = 10_000  # workload 8: one directory this large, listed (a default for older results.json)

    @property
    def tree_bytes(self) -> int:
        return self.tree_big_files * self.tree_big_file_bytes + self.tree_small_files * self.tree_small_file_bytes

    def disk_bytes_needed(self) -> int:
        """A generous bound on the work dir's peak use: the data on the plain
        disk, in each filesystem's cache and in the object store behind it."""
        data = self.seq_file_bytes + self.upload_file_bytes + self.tree_bytes + self.small_files * self.small_file_bytes
        return 5 * data + self.ceiling_objects * BLOCK_BYTES + 2 * GiB

    def describe(self) -> str:
        return (
            f"sequential file {human_bytes(self.seq_file_bytes)} in {human_bytes(BLOCK_BYTES)} blocks; "
            f"random 4 KiB reads: {self.random_read_jobs} jobs for {self.random_read_seconds:g} s; "
            f"small files: {self.small_files} x {human_bytes(self.small_file_bytes)}; "
            f"a directory of {self.listing_entries} entries; "
            f"upload file {human_bytes(self.upload_file_bytes)}; "
            f"model tree {self.tree_big_files} x {human_bytes(self.tree_big_file_bytes)} + "
            f"{self.tree_small_files} x {human_bytes(self.tree_small_file_bytes)}; "
            f"object-store ceiling {self.ceiling_objects} x {human_bytes(BLOCK_BYTES)} objects, "
            f"{self.ceiling_threads} threads"
        )


MODES: dict[str, Sizes] = {
    "full": Sizes(
        mode="full", seq_file_bytes=1 * GiB, random_read_seconds=30, random_read_jobs=4,
        small_files=2000, small_file_bytes=16 * KiB, upload_file_bytes=256 * MiB,
        tree_big_files=2, tree_big_file_bytes=2 * GiB, tree_small_files=400, tree_small_file_bytes=64 * KiB,
        ceiling_objects=256, ceiling_threads=16, rename_repeats=5, listing_entries=10_000,
    ),
    "quick": Sizes(
        mode="quick", seq_file_bytes=256 * MiB, random_read_seconds=10, random_read_jobs=4,
        small_files=500, small_file_bytes=16 * KiB, upload_file_bytes=64 * MiB,
        tree_big_files=2, tree_big_file_bytes=256 * MiB, tree_small_files=100, tree_small_file_bytes=64 * KiB,
        ceiling_objects=64, ceiling_threads=16, rename_repeats=5, listing_entries=2_000,
    ),
    "tiny": Sizes(
        mode="tiny", seq_file_bytes=16 * MiB, random_read_seconds=1, random_read_jobs=4,
        small_files=50, small_file_bytes=16 * KiB, upload_file_bytes=8 * MiB,
        tree_big_files=2, tree_big_file_bytes=8 * MiB, tree_small_files=20, tree_small_file_bytes=16 * KiB,
        ceiling_objects=8, ceiling_threads=16, rename_repeats=3, listing_entries=100,
    ),
}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if float(n).is_integer() else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
