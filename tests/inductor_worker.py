"""One worker process for the Inductor cache tests and for measuring cold starts.

    python tests/inductor_worker.py compile --key tiny/v1 [--format dir|mega]
    python tests/inductor_worker.py synthetic --key k --tag w1 [--files 20] [--start-at UNIX_TIME]

`compile` builds a tiny MLP with torch.compile inside `synchronized_inductor_cache`
and warms it up over two input shapes, as an app's setup() would; `synthetic`
writes fake cache entries instead of compiling (fast, for the concurrency
tests). Either prints one JSON line: timings, torch's cache counters, outputs.
Configure it like an app: DATAFS_DATA_DIR, DATAFS_INDUCTOR_LOCAL_DIR, TMPDIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datafs.inductor import (  # noqa: E402
    archive_path,
    get_gpu_type,
    load_inductor_cache,
    local_cache_dir,
    scan_local,
    sync_inductor_cache,
    synchronized_inductor_cache,
)

SHAPES = (4, 8)


def _stamp(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_mtime_ns]


def run_compile(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    import torch
    from torch._dynamo.utils import counters

    import_seconds = time.perf_counter() - started
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    inputs = [torch.linspace(-1, 1, batch * 16).reshape(batch, 16) for batch in SHAPES]
    marks: dict[str, float] = {}
    files_after_load: set[str] = set()
    entered = time.perf_counter()
    with synchronized_inductor_cache(args.key, format=args.format):
        marks["loaded"] = time.perf_counter()
        files_after_load = set(scan_local(local_cache_dir()))
        compiled = torch.compile(model, dynamic=False)
        with torch.no_grad():
            outputs = [compiled(x).tolist() for x in inputs]
        marks["compiled"] = time.perf_counter()
        new_files = sorted(set(scan_local(local_cache_dir())) - files_after_load)
    synced = time.perf_counter()
    return {
        "gpu_type": get_gpu_type(),
        "torch": torch.__version__,
        "has_mega_cache": hasattr(torch.compiler, "save_cache_artifacts"),
        "import_seconds": round(import_seconds, 3),
        "load_seconds": round(marks["loaded"] - entered, 3),
        "compile_warmup_seconds": round(marks["compiled"] - marks["loaded"], 3),
        "sync_seconds": round(synced - marks["compiled"], 3),
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "files_loaded": len(files_after_load),
        "files_compiled": len(new_files),
        "cpp_kernels_compiled": sum(1 for f in new_files if f.endswith(".so")),
        "outputs": outputs,
        "archive": str(archive_path(args.key)),
        "archive_stamp": _stamp(archive_path(args.key)),
    }


def run_synthetic(args: argparse.Namespace) -> dict:
    dir_hash = load_inductor_cache(args.key)
    local = local_cache_dir()
    loaded = sorted(scan_local(local))
    written = []
    for i in range(args.files):
        rel = f"fxgraph/{args.tag[:2]}/{args.tag}-{i:03d}/entry"
        path = local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(args.size))
        written.append(rel)
    common = local / "common" / "same-everywhere.so"
    common.parent.mkdir(parents=True, exist_ok=True)
    common.write_bytes(b"identical in every worker\n" * 1000)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("compile", "synthetic"))
    parser.add_argument("--key", required=True)
    parser.add_argument("--format", choices=("dir", "mega"), default=None)
    parser.add_argument("--tag", default="w0", help="synthetic: names this worker's entries")
    parser.add_argument("--files", type=int, default=20, help="synthetic: entries to write")
    parser.add_argument("--size", type=int, default=64 << 10, help="synthetic: bytes per entry")
    parser.add_argument("--start-at", type=float, default=0.0, help="synthetic: wall-clock time to start syncing")
    args = parser.parse_args()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("datafs").addHandler(handler)
    logging.getLogger("datafs").setLevel(logging.INFO)
    result = run_compile(args) if args.mode == "compile" else run_synthetic(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
