"""The errors the harness shows to people.

Both are printed as one line (`benchmarks: ...`) with a non-zero exit, never
as a traceback: a missing fio, a busy port or a daemon that would not mount
are things to fix, not bugs to debug. A `UsageError` is found before anything
starts (exit 2); a `BenchError` stops a run part way (exit 1), after the
cleanup has run.
"""


class BenchError(RuntimeError):
    """Something the person running the benchmarks can act on."""

    exit_status = 1


class UsageError(BenchError):
    """Found before the run started: a missing tool, a bad option."""

    exit_status = 2
