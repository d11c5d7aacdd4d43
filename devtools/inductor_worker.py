"""One worker process for the Inductor cache tests and the cold-start benchmark.

    python -m devtools.inductor_worker compile --key tiny/v1 [--model tiny|cnn] [--batches 4,8]
    python -m devtools.inductor_worker synthetic --key k --tag w1 [--files 20] [--start-at UNIX_TIME]

`compile` builds a model with torch.compile inside `synchronized_inductor_cache`
and warms it up over a few batch sizes (eval, no_grad, static shapes), as an
app's setup() would: `tiny` is a small MLP (cheap, for tests), `cnn` three
convolutions with BatchNorm/GroupNorm, ReLU/SiLU/GELU, pooling and a linear
head (real compile cost, for the benchmark). `synthetic` writes fake cache
entries instead of compiling (fast, for the concurrency tests); with
`--compile-seconds` it plays a compile of that length, but only when the shared
cache gave it nothing. Either prints one JSON line: timings, CPU time, torch's
cache counters, where the time went, outputs.
Configure it like an app: DATAFS_DATA_DIR, DATAFS_INDUCTOR_LOCAL_DIR, TMPDIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

from datafs import inductor
from datafs.inductor import torch_settings
from datafs.inductor import (
    archive_path,
    get_gpu_type,
    load_inductor_cache,
    local_cache_dir,
    scan_local,
    sync_inductor_cache,
    synchronized_inductor_cache,
)

DEFAULT_BATCHES = (4, 8)

#: Where a compile's time goes, as torch's own timers (`dynamo_timed`) name it.
#: They nest: tracing and the compiler call are inside `compile_inner`.
BREAKDOWN_TIMERS = {
    "dynamo_total": "_compile.compile_inner",
    "dynamo_tracing": "bytecode_tracing",
    "aot_autograd_and_inductor": "OutputGraph.call_user_compiler",
    "inductor_compile": "compile_fx_inner",
    "graph_module_load": "PyCodeCache.load_by_key_path",
    "kernel_build": "compile_file",
    "precompile_load": "after_deserialization",
    "guards": "build_guards",
    "precompile_guards": "precompile_build_guards",
}


def _stamp(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_mtime_ns]


def _cpu_seconds() -> float:
    """This process and the compilers and probes it waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_compile(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    import torch
    import torch._dynamo  # noqa: F401  (imported by every torch.compile user: part of import, not of compile)
    from torch._dynamo.utils import compilation_time_metrics, counters

    from devtools.inductor_models import build_model

    import_seconds = time.perf_counter() - started
    model, make_input = build_model(args.model)
    inputs = [make_input(batch) for batch in args.batches]
    marks: dict[str, float] = {}
    cpu: dict[str, float] = {}
    files_after_load: set[str] = set()
    cpu["entered"] = _cpu_seconds()
    entered = time.perf_counter()
    with synchronized_inductor_cache(args.key, format=args.format):
        marks["loaded"] = time.perf_counter()
        files_after_load = set(scan_local(local_cache_dir()))
        marks["scanned"] = time.perf_counter()
        compiled = torch.compile(model, dynamic=False)
        with torch.no_grad():
            outputs = [compiled(x).tolist() for x in inputs]
        marks["compiled"] = time.perf_counter()
        cpu["compiled"] = _cpu_seconds()
        new_files = sorted(set(scan_local(local_cache_dir())) - files_after_load)
    synced = time.perf_counter()
    load_seconds = marks["loaded"] - entered
    compile_seconds = marks["compiled"] - marks["scanned"]
    breakdown = {name: round(sum(compilation_time_metrics.get(timer, ())), 3) for name, timer in BREAKDOWN_TIMERS.items()}
    breakdown["outside_dynamo"] = round(compile_seconds - breakdown["dynamo_total"], 3)
    return {
        "gpu_type": get_gpu_type(),
        "torch": torch.__version__,
        "model": args.model,
        "has_mega_cache": hasattr(torch.compiler, "save_cache_artifacts"),
        "import_seconds": round(import_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "compile_warmup_seconds": round(compile_seconds, 3),
        # From entering the context to a warm model: what a new worker waits for.
        "ready_seconds": round(load_seconds + compile_seconds, 3),
        "ready_cpu_seconds": round(cpu["compiled"] - cpu["entered"], 3),
        "sync_seconds": round(synced - marks["compiled"], 3),
        "breakdown": breakdown,
        "load_breakdown": {**inductor.load_timings, **torch_settings.prepare_timings},
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "dynamo_cache_hit": counters["dynamo_cache"]["dynamo_cache_hit"],
        "dynamo_cache_miss": counters["dynamo_cache"]["dynamo_cache_miss"],
        "dynamo_cache_error": counters["dynamo_cache"]["dynamo_cache_error"],
        "graphs_traced": counters["stats"]["unique_graphs"],
        "files_loaded": len(files_after_load),
        "files_compiled": len(new_files),
        "cpp_kernels_compiled": sum(1 for f in new_files if f.endswith(".so")),
        "outputs": outputs,
        "archive": str(archive_path(args.key)),
        "archive_stamp": _stamp(archive_path(args.key)),
    }


def _write_fake_entries(local: Path, tag: str, files: int, size: int) -> list[str]:
    written = []
    for i in range(files):
        rel = f"fxgraph/{tag[:2]}/{tag}-{i:03d}/entry"
        path = local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        written.append(rel)
    common = local / "common" / "same-everywhere.so"
    common.parent.mkdir(parents=True, exist_ok=True)
    common.write_bytes(b"identical in every worker\n" * 1000)
    return written


def run_synthetic(args: argparse.Namespace) -> dict:
    local = local_cache_dir()
    if args.compile_seconds:
        # Plays an app: compile only what the shared cache did not bring.
        entered = time.perf_counter()
        written: list[str] = []
        with synchronized_inductor_cache(args.key):
            loaded = sorted(scan_local(local))
            ready = time.perf_counter()
            if not loaded:
                time.sleep(args.compile_seconds)
                written = _write_fake_entries(local, args.tag, args.files, args.size)
                ready = time.perf_counter()
        return {"loaded": loaded, "written": written, "compiled": bool(written),
                "ready_seconds": round(ready - entered, 3), "archive_stamp": _stamp(archive_path(args.key))}
    dir_hash = load_inductor_cache(args.key)
    loaded = sorted(scan_local(local))
    written = _write_fake_entries(local, args.tag, args.files, args.size)
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    started = time.perf_counter()
    sync_inductor_cache(args.key, dir_hash)
    return {
        "loaded": loaded,
        "written": written,
        "sync_seconds": round(time.perf_counter() - started, 3),
        "archive_stamp": _stamp(archive_path(args.key)),
    }


def _batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 4,8, not {text!r}") from None
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 4,8, not {text!r}")
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("compile", "synthetic"))
    parser.add_argument("--key", required=True)
    parser.add_argument("--format", choices=("dir", "mega"), default=None)
    parser.add_argument("--model", choices=("tiny", "cnn"), default="tiny", help="compile: which model")
    parser.add_argument("--batches", type=_batches, default=DEFAULT_BATCHES, help="compile: batch sizes to warm up")
    parser.add_argument("--tag", default="w0", help="synthetic: names this worker's entries")
    parser.add_argument("--files", type=int, default=20, help="synthetic: entries to write")
    parser.add_argument("--size", type=int, default=64 << 10, help="synthetic: bytes per entry")
    parser.add_argument("--start-at", type=float, default=0.0, help="synthetic: wall-clock time to start syncing")
    parser.add_argument("--compile-seconds", type=float, default=0.0,
                        help="synthetic: play an app whose compile takes this long, inside the context")
    args = parser.parse_args()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("datafs").addHandler(handler)
    logging.getLogger("datafs").setLevel(logging.INFO)
    result = run_compile(args) if args.mode == "compile" else run_synthetic(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
