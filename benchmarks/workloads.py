"""The workloads of issue 5 (and the directory listing of the metadata-engine
work), as steps run the same way on every target.

Each step does its setup untimed, times exactly the operation the issue
names, and returns result rows. They run in a fixed order per target (write
first, so the reads have a file; cold reads after the cached ones; the model
tree last, as it is the largest), and every target gets the same calls with
the same sizes: the plain disk differs only in having no object store, so the
cold-read and upload-lag steps are left out for it.

Background uploads of one step are waited for (untimed) before the next
step that reads, so reads from the local cache are not measured against the
object store's CPU use on the same cores.

Sequential and random I/O is fio's (see `fio.py`); the rest is Python or the
shell commands a user would type, timed by wall clock with `perf_counter`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Self

from .errors import BenchError
from .fio import FioResult, run_fio
from .results import IOPS, MIB, MIB_S, SECONDS, Row
from .sizes import BLOCK_BYTES, MiB, Sizes, human_bytes
from .system import cpu_seconds, drop_page_cache, unsynced_bytes
from .targets import REPO, Target, child_env, wait_for

#: Readers for `find | xargs -P 32 cat` and `datafs warmup --parallel 32`.
PARALLEL_READERS = 32
#: Longest wait for a target's background uploads to finish between workloads.
UPLOAD_WAIT_SECONDS = 1200
#: Files per `cat`: xargs would otherwise hand every name to one cat and nothing would run in parallel.
FILES_PER_CAT = 16


@dataclasses.dataclass
class Step:
    target: str
    label: str
    run: Callable[[], list[Row]]


def io_timeout(size_bytes: int) -> float:
    """Generous: a stuck mount must end the run, a slow machine must not."""
    return 300 + size_bytes / (2 * MiB)


def _fio_extra(result: FioResult) -> dict:
    return {"bytes": result.io_bytes, "fio_runtime_seconds": result.runtime_seconds}


def _notes(*notes: str | None) -> str:
    return "; ".join(n for n in notes if n)


_ROLE_NAMES = {"daemon": "daemon", "store": "S3 server"}


class CpuUse:
    """CPU seconds the target's daemon and its S3 server used while a block
    ran: the timed part of a row, on a machine whose cores they share."""

    def __init__(self, target: Target):
        self.target = target
        self.seconds: dict[str, float] = {}

    def _now(self) -> dict[str, dict[int, float]]:
        now: dict[str, dict[int, float]] = {}
        for role, pids in self.target.cpu_pids().items():
            now[role] = {pid: t for pid in pids if (t := cpu_seconds(pid)) is not None}
        return now

    def __enter__(self) -> Self:
        self._before = self._now()
        return self

    def __exit__(self, *exc_info) -> None:
        # A process started inside the block (none should) counts from zero.
        self.seconds = {role: sum(t - self._before.get(role, {}).get(pid, 0.0) for pid, t in times.items())
                        for role, times in self._now().items() if times}

    def extra(self) -> dict:
        return {f"{role}_cpu_seconds": round(seconds, 3) for role, seconds in self.seconds.items()}

    def note(self) -> str | None:
        if not self.seconds:
            return None
        return "CPU: " + ", ".join(f"{_ROLE_NAMES[role]} {seconds:.2f} s" for role, seconds in self.seconds.items())


class Workloads:
    """The steps for one target; paths under `target.root` carry state from one step to the next."""

    def __init__(self, target: Target, sizes: Sizes):
        self.t, self.s = target, sizes

    @property
    def seq_path(self) -> Path:
        return self.t.root / "seq.bin"

    @property
    def small_dir(self) -> Path:
        return self.t.root / "small"

    @property
    def listing_dir(self) -> Path:
        return self.t.root / "listing"

    @property
    def tree_dir(self) -> Path:
        return self.t.root / "tree"

    def _row(self, workload: str, figure: float, unit: str, extra: dict | None = None, note: str = "",
             cpu: CpuUse | None = None) -> Row:
        """A row; `cpu`, what the timed part used, goes into its extra and its note."""
        if cpu is not None:
            extra, note = {**(extra or {}), **cpu.extra()}, _notes(note, cpu.note())
        return Row(workload, self.t.name, figure, unit, extra or {}, note)

    def steps(self) -> list[Step]:
        s, name = self.s, self.t.name
        steps = [
            Step(name, f"sequential write {human_bytes(s.seq_file_bytes)}", self.seq_write),
            Step(name, "sequential read, warm", self.seq_read_warm),
            Step(name, "sequential read, page cache dropped", self.seq_read_cache),
            Step(name, f"random 4k read, {s.random_read_jobs} jobs, {s.random_read_seconds:g} s", self.random_read),
            Step(name, f"rename a {human_bytes(s.seq_file_bytes)} file", self.rename_file),
        ]
        if self.t.remote:
            steps += [
                Step(name, "sequential read, cold from the object store", self.seq_read_cold),
                Step(name, f"upload lag of a {human_bytes(s.upload_file_bytes)} file", self.upload_lag),
            ]
        elif self.t.reads_store:
            steps.append(Step(name, "sequential read, cold from the object store, by a daemon that only GETs",
                              self.seq_read_cold_ceiling))
        steps += [
            Step(name, f"small files: create {s.small_files}", self.small_create),
            Step(name, "small files: stat all", self.small_stat),
            Step(name, "small files: read all in parallel", self.small_read),
            Step(name, f"rename a directory of {s.small_files} files", self.rename_dir),
            Step(name, "small files: delete all", self.small_delete),
            Step(name, f"list a directory of {s.listing_entries} entries", self.list_dir),
            Step(name, f"datafs warmup of a {human_bytes(s.tree_bytes)} model tree, cold", self.warmup_cold),
        ]
        if self.t.daemon:
            steps.append(Step(name, "daemon peak RSS over the run", self.peak_rss))
        return steps

    def peak_rss(self) -> list[Row]:
        peak = self.t.peak_rss_bytes()
        if peak is None:
            raise BenchError(f"{self.t.name}: no daemon to read the peak RSS of")
        return [self._row("peak-rss", peak / MiB, MIB, {"peak_bytes": peak})]

    # ---- 1-3: fio ---------------------------------------------------------------------
    def _fio_read(self, path: Path | None = None) -> FioResult:
        return run_fio(path or self.seq_path, "read", block_bytes=BLOCK_BYTES, size_bytes=self.s.seq_file_bytes,
                       timeout_seconds=io_timeout(self.s.seq_file_bytes))

    def seq_write(self) -> list[Row]:
        # Earlier steps' writes (the S3 ceiling's objects, another target's
        # files) must not be written back during this one's fsync.
        os.sync()
        with CpuUse(self.t) as cpu:
            result = run_fio(self.seq_path, "write", block_bytes=BLOCK_BYTES, size_bytes=self.s.seq_file_bytes,
                             end_fsync=True, timeout_seconds=io_timeout(self.s.seq_file_bytes))
        # fsync is the durability point: what the target's own files still
        # hold only in memory now is data it called durable and is not.
        unsynced = unsynced_bytes(self.t.dir)
        if unsynced is None:
            note = "bytes left unsynced at fsync not measured (kernel without cachestat)"
        else:
            # Logs and the like count too: below a MiB it is not the file's data.
            note = f"{unsynced / MiB:,.0f} MiB not on disk when fsync returned" if unsynced >= MiB else None
        return [self._row("seq-write", result.mib_per_second, MIB_S,
                          {**_fio_extra(result), "unsynced_bytes_at_fsync": unsynced}, _notes(note), cpu)]

    def seq_read_warm(self) -> list[Row]:
        self.t.quiesce(UPLOAD_WAIT_SECONDS)  # the write's uploads must not compete with the reads
        self._fio_read()  # fills the page cache, whatever the write left there
        result = self._fio_read()
        return [self._row("seq-read-warm", result.mib_per_second, MIB_S, _fio_extra(result))]

    def seq_read_cache(self) -> list[Row]:
        note = drop_page_cache()
        result = self._fio_read()
        return [self._row("seq-read-cache", result.mib_per_second, MIB_S, _fio_extra(result), _notes(note))]

    def seq_read_cold(self) -> list[Row]:
        notes = self.t.cold_restart()
        with CpuUse(self.t) as cpu:
            result = self._fio_read()
        return [self._row("seq-read-cold", result.mib_per_second, MIB_S, _fio_extra(result), _notes(*notes), cpu)]

    def seq_read_cold_ceiling(self) -> list[Row]:
        """The cold read's pyfuse3 ceiling: the same fio job on a file of the
        same size that `s3read.py` serves straight from the bucket."""
        with self.t.cold_file(self.s.seq_file_bytes) as path:
            note = drop_page_cache()
            result = self._fio_read(path)
        return [self._row("seq-read-cold", result.mib_per_second, MIB_S, {**_fio_extra(result), "from_store": True},
                          _notes(note))]

    def random_read(self) -> list[Row]:
        note = drop_page_cache()
        result = run_fio(self.seq_path, "randread", block_bytes=4096, size_bytes=self.s.seq_file_bytes,
                         jobs=self.s.random_read_jobs, runtime_seconds=self.s.random_read_seconds,
                         timeout_seconds=self.s.random_read_seconds + 300)
        extra = {
            "bytes": result.io_bytes, "mib_per_second": result.mib_per_second,
            "p50_seconds": result.clat_p50_seconds, "p99_seconds": result.clat_p99_seconds,
        }
        return [self._row("rand-read-4k", result.iops, IOPS, extra, _notes(note))]

    # ---- 5: renames -------------------------------------------------------------------
    def _rename_back_and_forth(self, path: Path) -> dict:
        """Median of several renames (each one is a single metadata operation,
        too short to time once); the path ends where it started."""
        other = path.with_name(path.name + "-renamed")
        seconds = []
        for i in range(self.s.rename_repeats):
            src, dst = (path, other) if i % 2 == 0 else (other, path)
            started = time.perf_counter()
            os.rename(src, dst)
            seconds.append(time.perf_counter() - started)
        if other.exists():
            os.rename(other, path)
        return {"median": statistics.median(seconds), "all_seconds": seconds}

    def rename_file(self) -> list[Row]:
        timing = self._rename_back_and_forth(self.seq_path)
        return [self._row("rename-file", timing["median"], SECONDS, {"all_seconds": timing["all_seconds"]})]

    def rename_dir(self) -> list[Row]:
        timing = self._rename_back_and_forth(self.small_dir)
        return [self._row("rename-dir", timing["median"], SECONDS, {"all_seconds": timing["all_seconds"]})]

    # ---- 6: upload lag ----------------------------------------------------------------
    def upload_lag(self) -> list[Row]:
        from datafs.chunks import chunk_id

        size = self.s.upload_file_bytes
        self.t.quiesce(UPLOAD_WAIT_SECONDS)  # earlier uploads must not be counted, nor slow this one down
        data = os.urandom(size)
        view = memoryview(data)
        chunks = [chunk_id(view[i:i + BLOCK_BYTES]) for i in range(0, size, BLOCK_BYTES)]
        probe = self.t.upload_probe(chunks, size)
        with CpuUse(self.t) as cpu:
            started = time.perf_counter()
            with open(self.t.root / "upload.bin", "wb") as f:
                f.write(data)
            closed = time.perf_counter()
            wait_for(probe, io_timeout(size), f"{self.t.name}: the {human_bytes(size)} upload")
            lag = time.perf_counter() - closed
        return [self._row("upload-lag", lag, SECONDS, {"bytes": size, "write_seconds": closed - started}, cpu=cpu)]

    # ---- 4: small files ---------------------------------------------------------------
    def _small_paths(self) -> list[Path]:
        """Nested like a model repository: 10 top directories of 10 subdirectories each."""
        return [self.small_dir / f"d{i % 10:02d}" / f"s{(i // 10) % 10:02d}" / f"file-{i:05d}.bin"
                for i in range(self.s.small_files)]

    def small_create(self) -> list[Row]:
        paths = self._small_paths()
        size = self.s.small_file_bytes
        data = os.urandom(size * len(paths))  # distinct content per file: no deduplication
        with CpuUse(self.t) as cpu:
            started = time.perf_counter()
            for directory in sorted({p.parent for p in paths}):
                os.makedirs(directory, exist_ok=True)
            for i, path in enumerate(paths):
                with open(path, "wb") as f:
                    f.write(data[i * size:(i + 1) * size])
            seconds = time.perf_counter() - started
        return [self._row("small-create", seconds, SECONDS, {"files": len(paths), "bytes": len(data)}, cpu=cpu)]

    def small_stat(self) -> list[Row]:
        self.t.quiesce(UPLOAD_WAIT_SECONDS)
        note = drop_page_cache()
        started = time.perf_counter()
        count = 0
        for directory, _, names in os.walk(self.small_dir):
            for name in names:
                os.stat(os.path.join(directory, name))
                count += 1
        seconds = time.perf_counter() - started
        if count != self.s.small_files:
            raise BenchError(f"{self.t.name}: stat found {count} small files, expected {self.s.small_files}")
        return [self._row("small-stat", seconds, SECONDS, {"files": count}, _notes(note))]

    def small_read(self) -> list[Row]:
        # Data pages were dropped before the stat step, which reads no data.
        command = (f"set -o pipefail; find {shlex.quote(str(self.small_dir))} -type f -print0 | "
                   f"xargs -0 -P {PARALLEL_READERS} -n {FILES_PER_CAT} cat > /dev/null")
        with CpuUse(self.t) as cpu:
            started = time.perf_counter()
            result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600)
            seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise BenchError(f"{self.t.name}: parallel read of the small files failed: {result.stderr.strip()[-200:]}")
        return [self._row("small-read", seconds, SECONDS,
                          {"files": self.s.small_files, "bytes": self.s.small_files * self.s.small_file_bytes}, cpu=cpu)]

    def small_delete(self) -> list[Row]:
        started = time.perf_counter()
        shutil.rmtree(self.small_dir)
        seconds = time.perf_counter() - started
        return [self._row("small-delete", seconds, SECONDS, {"files": self.s.small_files})]

    # ---- 7: warmup of a model tree ------------------------------------------------------
    def _write_tree(self) -> None:
        s = self.s
        self.tree_dir.mkdir(parents=True, exist_ok=True)
        for i in range(s.tree_big_files):
            run_fio(self.tree_dir / f"model-{i + 1:05d}-of-{s.tree_big_files:05d}.safetensors", "write",
                    block_bytes=BLOCK_BYTES, size_bytes=s.tree_big_file_bytes,
                    timeout_seconds=io_timeout(s.tree_big_file_bytes))
        data = os.urandom(s.tree_small_files * s.tree_small_file_bytes)
        for i in range(s.tree_small_files):
            path = self.tree_dir / f"extra-{i % 8}" / f"part-{i:05d}.json"
            path.parent.mkdir(exist_ok=True)
            with open(path, "wb") as f:
                f.write(data[i * s.tree_small_file_bytes:(i + 1) * s.tree_small_file_bytes])

    def warmup_cold(self) -> list[Row]:
        self._write_tree()
        notes = self.t.cold_restart()
        command = self.t.warmup_command(self.tree_dir, PARALLEL_READERS)
        timeout = io_timeout(self.s.tree_bytes)
        with CpuUse(self.t) as cpu:
            started = time.perf_counter()
            try:
                result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=child_env(),
                                        timeout=timeout, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{self.t.name}: {Path(command[0]).name} warmup did not finish within {timeout:.0f} s") from None
            seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise BenchError(f"{self.t.name}: warmup ({' '.join(command[:4])}...) failed: {result.stderr.strip()[-300:]}")
        size = self.s.tree_bytes
        extra = {"bytes": size, "seconds": seconds, "files": self.s.tree_big_files + self.s.tree_small_files,
                 "warmup_output": result.stdout.strip()}
        return [self._row("warmup-cold", size / seconds / MiB, MIB_S, extra, _notes(*notes), cpu)]

    # ---- 8: a large directory ------------------------------------------------------------
    def list_dir(self) -> list[Row]:
        """`ls -f` of one flat directory: every entry from the metadata engine,
        no stat, no data. The entries are empty files, made untimed."""
        entries = self.s.listing_entries
        self.listing_dir.mkdir()
        started = time.perf_counter()
        for i in range(entries):
            os.close(os.open(self.listing_dir / f"entry-{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        create_seconds = time.perf_counter() - started
        self.t.quiesce(UPLOAD_WAIT_SECONDS)
        note = drop_page_cache()  # also the kernel's dentries: the listing must reach the filesystem
        started = time.perf_counter()
        with os.scandir(self.listing_dir) as listing:
            count = sum(1 for _ in listing)
        seconds = time.perf_counter() - started
        if count != entries:
            raise BenchError(f"{self.t.name}: listing found {count} entries, expected {entries}")
        return [self._row("list-dir", seconds, SECONDS, {"entries": count, "create_seconds": create_seconds},
                          _notes(note))]
