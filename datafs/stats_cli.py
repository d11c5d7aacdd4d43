"""`datafs stats MOUNTPOINT`: what the mount is doing, one line a second.

Like `vmstat` or `juicefs stats`: the command asks the daemon's control
endpoint (`GET /stats`) for its counters every interval and prints the rates
between two answers: FUSE requests, bytes read by the tier that served them
(local cache, a peer, the object store), bytes written and uploaded, the cache
hit ratio of reads, the upload queue (chunks, bytes, age of the oldest), and
metadata transactions with their mean latency. `--once` prints one line
(over one interval) for scripts. The counters are the same ones the
Prometheus endpoint exports, so the two always agree.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import click

MIB = 1 << 20
#: Rows between repeated headers, so a long run stays readable.
HEADER_EVERY_ROWS = 20

HEADER = (
    "  fuse  -------read MiB/s------  --write MiB/s--  cache  ------pending uploads------  ---metadata---",
    " ops/s    cache    peer   store    fuse   upload   hit%  chunks      MiB    oldest s   txn/s  mean ms",
)


@click.command("stats", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("mountpoint")
@click.option("--once", is_flag=True, help="print one line (the rates over one interval) and exit")
@click.option("--interval", type=float, default=1.0, show_default=True, help="seconds between lines")
def stats_command(mountpoint: str, once: bool, interval: float) -> int:
    """Show what a mount is doing, one line a second."""
    return cmd_stats(SimpleNamespace(mountpoint=mountpoint, once=once, interval=interval))


def cmd_stats(args: SimpleNamespace) -> int:
    from .cli import _control, _datafs_mount
    from .errors import UsageError

    if not 0.1 <= args.interval <= 3600:
        raise UsageError(f"--interval must be between 0.1 and 3600 seconds, not {args.interval:g}")
    info = _datafs_mount(args.mountpoint)
    previous = _control(info, "GET", "/stats")
    rows = 0
    while True:
        time.sleep(args.interval)
        current = _control(info, "GET", "/stats")
        if rows % HEADER_EVERY_ROWS == 0:
            print("\n".join(HEADER))
        print(render_row(previous, current), flush=True)
        rows += 1
        if args.once:
            return 0
        previous = current


def rates(previous: dict, current: dict) -> dict:
    """Per-second rates (and the current gauges) between two /stats answers."""
    seconds = max(current["time"] - previous["time"], 1e-6)

    def per_second(key: str, sub: str | None = None) -> float:
        now, before = current[key], previous[key]
        if sub is not None:  # a counter by label, e.g. read bytes by tier
            now, before = now.get(sub, 0), before.get(sub, 0)
        return max(0.0, now - before) / seconds  # never negative, even across a daemon restart

    hits = current["cache_hits"] - previous["cache_hits"]
    misses = current["cache_misses"] - previous["cache_misses"]
    txns = current["meta_transactions"] - previous["meta_transactions"]
    txn_seconds = current["meta_transaction_seconds"] - previous["meta_transaction_seconds"]
    return {
        "fuse_ops": per_second("fuse_ops"),
        "read_cache": per_second("read_bytes", "cache") / MIB,
        "read_peer": per_second("read_bytes", "peer") / MIB,
        "read_store": per_second("read_bytes", "store") / MIB,
        "write": per_second("write_bytes") / MIB,
        "upload": per_second("upload_bytes") / MIB,
        "hit_ratio": hits / (hits + misses) if hits + misses > 0 else None,
        "pending_chunks": current["pending_chunks"],
        "pending_mib": current["pending_bytes"] / MIB,
        "pending_oldest_seconds": current["pending_oldest_seconds"],
        "meta_txns": txns / seconds,
        "meta_mean_ms": txn_seconds / txns * 1000 if txns > 0 else None,
    }


def render_row(previous: dict, current: dict) -> str:
    r = rates(previous, current)
    hit = "-" if r["hit_ratio"] is None else f"{r['hit_ratio'] * 100:.1f}"
    mean = "-" if r["meta_mean_ms"] is None else f"{r['meta_mean_ms']:.3f}"
    return (
        f"{r['fuse_ops']:6.0f} {r['read_cache']:8.1f} {r['read_peer']:7.1f} {r['read_store']:7.1f}"
        f" {r['write']:7.1f} {r['upload']:8.1f} {hit:>6} {r['pending_chunks']:7d} {r['pending_mib']:8.1f}"
        f" {r['pending_oldest_seconds']:11.1f} {r['meta_txns']:7.0f} {mean:>8}"
    )
