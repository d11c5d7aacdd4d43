"""`python -m benchmarks coldstart`: how soon a new worker is ready when
another worker already compiled its model, and what four workers starting
together on an empty cache cost.

One SeaweedFS S3 server and one datafs mount, set up as `run` does, then
fresh worker processes (`devtools/inductor_worker.py`), each with an
empty local Inductor cache and an empty $TMPDIR, as a new machine has:

1. worker A compiles and warms up the model inside `synchronized_inductor_cache`
   and publishes its archive;
2. worker B (run `--repeat` times, the median reported) loads that archive;
   once more with DATAFS_INDUCTOR_PRECOMPILE=0, to show what precompile saves;
3. `--workers` workers start at once on an empty key, with the compile lease,
   then as many on another empty key without it (DATAFS_INDUCTOR_WAIT_SECONDS=0):
   how many compiled, their CPU time in total (compilers included), and the
   wall time from their start to the last one's exit.

"Ready" is what a worker waits for: from entering the context to a warm
model (loading the archive, compiling or loading the graphs, the warm-up
runs); importing torch comes before it and is the same for every worker.
The table goes to stdout; `coldstart.json` (every worker's report, with
torch's breakdown of where the time went) to `--out`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import BenchError, UsageError
from .targets import REPO, DatafsTarget, child_env

WORKER_TIMEOUT_SECONDS = 1200
MODELS = ("cnn", "tiny")


@dataclasses.dataclass
class Options:
    model: str = "cnn"
    workers: int = 4
    repeat: int = 3
    out_dir: Path = Path("bench-results")
    base_port: int = 19100
    work_parent: Path = Path("/var/tmp")
    keep: bool = False


def preflight(options: Options) -> None:
    from devtools.seaweed import SeaweedError, weed_binary

    if options.model not in MODELS:
        raise UsageError(f"unknown model {options.model!r}: use {' or '.join(MODELS)}")
    if not 1 <= options.workers <= 16 or not 1 <= options.repeat <= 10:
        raise UsageError("--workers must be 1..16 and --repeat 1..10")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("torch is not installed: pip install torch==2.13.0") from None
    try:
        weed_binary()
    except SeaweedError as exc:
        raise UsageError(str(exc)) from None
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        raise UsageError(f"cannot open /dev/fuse ({exc.strerror}): datafs needs FUSE; run as root") from None
    if not options.work_parent.is_dir():
        raise UsageError(f"work dir parent {options.work_parent} does not exist")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Workers:
    """Starts fresh worker processes against one mount, each in a directory of its own."""

    def __init__(self, mountpoint: Path, workdir: Path, model: str):
        self.mountpoint, self.workdir, self.model = mountpoint, workdir, model
        self.count = 0

    def start(self, key: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        self.count += 1
        home = self.workdir / f"worker-{self.count:02d}"
        (home / "tmp").mkdir(parents=True)
        command = [sys.executable, "-m", "devtools.inductor_worker", "compile", "--key", key, "--model", self.model]
        environment = child_env({"DATAFS_DATA_DIR": str(self.mountpoint), "DATAFS_INDUCTOR_LOCAL_DIR": str(home / "local"),
                                 "TMPDIR": str(home / "tmp"), "PYTHONPATH": str(REPO), **(env or {})})
        with open(home / "worker.log", "w") as log:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                    env=environment, stdin=subprocess.DEVNULL)
        return proc, home

    def finish(self, proc: subprocess.Popen, home: Path) -> dict[str, Any]:
        try:
            out, _ = proc.communicate(timeout=WORKER_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=30)
            raise BenchError(f"a worker did not finish within {WORKER_TIMEOUT_SECONDS} s; log: {home / 'worker.log'}") from None
        if proc.returncode != 0:
            tail = (home / "worker.log").read_text().strip().splitlines()[-5:]
            raise BenchError(f"a worker failed (status {proc.returncode}): {' / '.join(tail)}")
        report = json.loads(out.strip().splitlines()[-1])
        report.pop("outputs", None)
        return report

    def run(self, key: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        return self.finish(*self.start(key, env))

    def together(self, key: str, count: int, env: dict[str, str] | None = None) -> dict[str, Any]:
        cpu_before, started = _children_cpu_seconds(), time.perf_counter()
        started_workers = [self.start(key, env) for _ in range(count)]
        reports = [self.finish(proc, home) for proc, home in started_workers]
        return {
            "workers": count,
            "compiled": sum(1 for r in reports if r["fxgraph_cache_miss"] > 0),
            "wall_seconds": round(time.perf_counter() - started, 3),
            "cpu_seconds": round(_children_cpu_seconds() - cpu_before, 3),
            "reports": reports,
        }


def measure(workers: Workers, options: Options, progress) -> dict[str, Any]:
    progress(f"worker A: compiles the {options.model} model and publishes it")
    a = workers.run("coldstart/a")
    progress(f"  ready in {a['ready_seconds']:.2f} s ({a['ready_cpu_seconds']:.2f} s CPU)")
    bs = []
    for n in range(options.repeat):
        progress(f"worker B{n + 1}: loads A's archive")
        bs.append(workers.run("coldstart/a"))
        progress(f"  ready in {bs[-1]['ready_seconds']:.2f} s ({bs[-1]['ready_cpu_seconds']:.2f} s CPU)")
    progress("worker B, precompile off: loads A's archive and traces")
    b_traced = workers.run("coldstart/a", {"DATAFS_INDUCTOR_PRECOMPILE": "0"})
    progress(f"  ready in {b_traced['ready_seconds']:.2f} s")
    progress(f"{options.workers} workers at once on an empty key, with the compile lease")
    leased = workers.together("coldstart/together", options.workers)
    progress(f"  {leased['compiled']} compiled; {leased['wall_seconds']:.1f} s wall, {leased['cpu_seconds']:.1f} s CPU")
    progress(f"{options.workers} workers at once on an empty key, each on its own (no lease)")
    alone = workers.together("coldstart/alone", options.workers, {"DATAFS_INDUCTOR_WAIT_SECONDS": "0"})
    progress(f"  {alone['compiled']} compiled; {alone['wall_seconds']:.1f} s wall, {alone['cpu_seconds']:.1f} s CPU")
    b = sorted(bs, key=lambda r: r["ready_seconds"])[len(bs) // 2]  # the median run
    return {"a": a, "b": b, "b_runs": bs, "b_traced": b_traced, "leased": leased, "alone": alone,
            "ratio": round(b["ready_seconds"] / a["ready_seconds"], 4),
            "b_ready_seconds_all": [r["ready_seconds"] for r in bs]}


def _what(report: dict[str, Any]) -> str:
    if report["fxgraph_cache_miss"]:
        return f"traced {report['graphs_traced']} graphs, compiled {report['cpp_kernels_compiled']} C++ kernels"
    traced = f"traced {report['graphs_traced']} graphs" if report["graphs_traced"] else "no trace (precompiled entry)"
    return f"{traced}, {report['fxgraph_cache_miss']} FX-graph misses, {report['cpp_kernels_compiled']} kernels built"


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    a, b, traced = result["a"], result["b"], result["b_traced"]
    rows = [
        ("A: compiles, publishes", a),
        (f"B: loads A's archive (median of {len(result['b_runs'])})", b),
        ("B with DATAFS_INDUCTOR_PRECOMPILE=0", traced),
    ]
    lines = [
        f"# datafs cold start: {meta['model']} model",
        "",
        f"{meta['started_at']}; {meta['cpus']} CPUs; torch {a['torch']}; every worker a fresh process with an "
        "empty local cache and an empty $TMPDIR, on one datafs mount (LMDB metadata, SeaweedFS S3).",
        "",
        "| Worker | Ready | CPU | vs A | What it did |",
        "|---|---:|---:|---:|---|",
    ]
    for label, report in rows:
        lines.append(f"| {label} | {report['ready_seconds']:.2f} s | {report['ready_cpu_seconds']:.2f} s | "
                     f"{report['ready_seconds'] / a['ready_seconds']:.3f}x | {_what(report)} |")
    lines += ["", f"B's runs: {', '.join(f'{s:.2f} s' for s in result['b_ready_seconds_all'])}.", "",
              "Where the time went, in seconds: *archive* is datafs reading, checking and unpacking the archive; "
              "*ISA probe* and *compiler imports* run side by side during the load (torch would do both in the "
              "first compile); the rest are torch's own timers (`dynamo_timed`), *rest* being the compile and "
              "warm-up time outside Dynamo:", "",
              "| | " + " | ".join(_BREAKDOWN) + " |", "|---|" + "---:|" * len(_BREAKDOWN)]
    for label, report in (("A", a), ("B", b), ("B, precompile off", traced)):
        load = report.get("load_breakdown", {})
        cells = [f"{report['import_seconds']:.2f}"] + [f"{load.get(key, 0.0):.2f}" for key in _LOAD_KEYS]
        cells += [f"{report['breakdown'][key]:.2f}" for key in _BREAKDOWN_KEYS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| Workers starting together on an empty key | Compiled | Wall, start to the last exit | CPU in total |",
              "|---|---:|---:|---:|"]
    for label, batch in (("with the compile lease", result["leased"]), ("each on its own (no lease)", result["alone"])):
        lines.append(f"| {batch['workers']} {label} | {batch['compiled']} | {batch['wall_seconds']:.1f} s | "
                     f"{batch['cpu_seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


_LOAD_KEYS = ("archive_seconds", "cpu_isa_probe_seconds", "compiler_imports_seconds")
_BREAKDOWN = ("import torch", "archive", "ISA probe", "compiler imports", "Dynamo trace", "AOTAutograd + Inductor", "graph load", "precompiled load",
              "guards", "rest (first calls)")
_BREAKDOWN_KEYS = ("dynamo_tracing", "aot_autograd_and_inductor", "graph_module_load", "precompile_load",
                   "guards", "outside_dynamo")


def run(options: Options, progress_stream=None) -> tuple[dict[str, Any], dict[str, Any]]:
    from devtools.seaweed import SeaweedError, SeaweedServer

    from .harness import _shielded, _sigterm_as_interrupt

    preflight(options)
    stream = progress_stream or sys.stderr

    def progress(text: str) -> None:
        print(text, file=stream, flush=True)

    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    started_at = datetime.datetime.now(datetime.timezone.utc)
    with _sigterm_as_interrupt():
        workdir = Path(tempfile.mkdtemp(prefix="datafs-coldstart-", dir=options.work_parent))
        server = SeaweedServer(workdir / "weed", options.base_port)
        target = None
        try:
            progress(f"datafs cold start, {options.model} model; work dir {workdir}")
            try:
                server.start()
            except SeaweedError as exc:
                raise BenchError(str(exc)) from None
            target = DatafsTarget(workdir, server, server.client())
            target.start()
            result = measure(Workers(target.mountpoint, workdir / "workers", options.model), options, progress)
        finally:
            with _shielded():
                if target is not None:
                    target.stop()
                server.stop()
                if options.keep:
                    progress(f"work dir kept: {workdir}")
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
    meta = {"model": options.model, "started_at": started_at.strftime("%Y-%m-%d %H:%M UTC"), "cpus": os.cpu_count(),
            "median_of": options.repeat}
    return result, meta


def write(out_dir: Path, result: dict[str, Any], meta: dict[str, Any]) -> Path:
    path = out_dir / "coldstart.json"
    path.write_text(json.dumps({"meta": meta, **result}, indent=1, sort_keys=True))
    return path


def main(args) -> int:
    """Run and report; errors are the caller's (`__main__`) to print."""
    options = Options(model=args.model, workers=args.workers, repeat=args.repeat, out_dir=args.out,
                      base_port=args.base_port, work_parent=args.work_dir.resolve(), keep=args.keep)
    try:
        options.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {options.out_dir}: {exc.strerror}") from None
    result, meta = run(options)
    print(f"wrote {write(options.out_dir, result, meta)}", file=sys.stderr)
    print(markdown(result, meta), end="")
    return 0
