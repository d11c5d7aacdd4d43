"""`datafs fsck`: on a mount, the check runs in its daemon (the one owner of
the volume on this node) and the command shows its progress; on an unmounted
LMDB state dir (`--state-dir`), it runs here, holding the state dir's lock so
that no daemon starts meanwhile.

Exit status: 0 when clean (after --repair: when everything found was
repaired), 1 when problems remain, 2 for mistakes (one line, no traceback).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from . import config
from .errors import UsageError

PROGRESS_POLL_SECONDS = 0.5


@click.command("fsck", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("mountpoint", required=False)
@click.option("--state-dir", metavar="DIR", help="check an unmounted LMDB state dir instead of a mount")
@click.option("--cache-dir", metavar="DIR", help="with --state-dir: its cache directory, if not STATE_DIR/cache")
@click.option("--verify", is_flag=True, help="also read every chunk and check its BLAKE3 hash")
@click.option("--repair", is_flag=True, help="fix what can be proven safe to fix")
def fsck_command(**options: Any) -> int:
    """Check the metadata, the object store and the cache of a mount (in its
    daemon) or of an unmounted state dir; read-only unless --repair. Exit 0
    clean, 1 problems."""
    return cmd_fsck(SimpleNamespace(**options))


def cmd_fsck(args: SimpleNamespace) -> int:
    from .fsck import render

    if bool(args.mountpoint) == bool(args.state_dir):
        raise UsageError("give either a mountpoint (a mounted volume) or --state-dir DIR (an unmounted one)")
    if args.cache_dir and not args.state_dir:
        raise UsageError("--cache-dir goes with --state-dir (a mount knows its own cache)")
    report = _check_unmounted(args) if args.state_dir else _check_mounted(args)
    lines, summary, clean = render(report)
    for line in lines:
        print(line)
    print(summary)
    return 0 if clean else 1


# ---- a mount: ask its daemon ---------------------------------------------------------------------
def _check_mounted(args: SimpleNamespace) -> dict[str, Any]:
    from .cli import _control, _datafs_mount

    info = _datafs_mount(args.mountpoint)
    body = {"verify": args.verify, "repair": args.repair}
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["report"] = _control(info, "POST", "/fsck", body, timeout=None)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    asking = threading.Thread(target=ask, name="fsck", daemon=True)
    asking.start()
    with _Progress() as progress:
        while asking.is_alive():
            asking.join(PROGRESS_POLL_SECONDS)
            if asking.is_alive() and progress.enabled:
                try:
                    progress.show(_control(info, "GET", "/fsck"))
                except UsageError:
                    pass  # the answer to the check itself says what went wrong
    if "error" in outcome:
        raise outcome["error"]
    return outcome["report"]


class _Progress:
    """A tqdm bar per phase on a terminal; nothing otherwise (the summary
    line says it all)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._bar = None
        self._phase = None

    def show(self, state: dict[str, Any]) -> None:
        if not state.get("running") or "phase" not in state:
            return
        from tqdm import tqdm

        from .progress import ByteProgress

        verifying = state["phase"] == "verifying"  # bytes read and hashed; the other phases count keys
        if state["phase"] != self._phase:
            self.close()
            self._phase = state["phase"]
            desc = f"fsck: {self._phase}"
            self._bar = (ByteProgress(state.get("total") or 0, desc=desc, file=sys.stderr, leave=False) if verifying
                         else tqdm(total=state.get("total"), desc=desc, file=sys.stderr, leave=False, unit=" keys"))
        if verifying:
            self._bar.show_done_bytes(state.get("done", 0))
        else:
            self._bar.n = state.get("done", 0)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- an unmounted state dir: check it here ----------------------------------------------------
def _check_unmounted(args: SimpleNamespace) -> dict[str, Any]:
    import trio

    from .chunks.cache import ChunkCache
    from .state_files import lock_path, node_path, read_daemon_pid
    from .fsck import Fsck, FsckError
    from .meta.calls import MetaCalls
    from .meta.lmdb_kv import LmdbKV
    from .meta.store import MetaStore
    from .tiers.store import open_store

    settings = config.load(state_dir=args.state_dir, cache_dir=args.cache_dir)
    state_dir = settings.state_dir
    if not state_dir.is_dir():
        raise UsageError(f"state dir {state_dir} does not exist")
    lock_fd = _lock(lock_path(state_dir), read_daemon_pid(state_dir))
    try:
        node = _read_json(node_path(state_dir))
        if node.get("meta"):
            raise UsageError(f"state dir {state_dir} is a node of the shared volume at {node['meta']}: "
                             "mount it and run 'datafs fsck MOUNTPOINT'")
        if not (settings.lmdb_dir / "data.mdb").exists():
            raise UsageError(f"state dir {state_dir} holds no datafs metadata ({settings.lmdb_dir} is missing)")
        logging.getLogger("datafs").addHandler(logging.NullHandler())  # findings are printed, not logged
        kv = LmdbKV(str(settings.lmdb_dir), readonly=not args.repair)
        try:
            meta = MetaStore(kv)
            record = meta.volume()
            if record is None:
                raise UsageError(f"state dir {state_dir} holds no volume (was it ever mounted?)")
            store = open_store(record.get("store") or settings.store_url, s3_endpoint=record.get("s3_endpoint") or "",
                               s3_region=record.get("s3_region") or "")
            store.check()
            cache = ChunkCache(settings.effective_cache_dir, settings.cache_size_bytes, settings.cache_min_free_bytes)
            if (settings.effective_cache_dir / "chunks").is_dir():
                cache.open()
            fsck = Fsck(meta, store, cache, MetaCalls(), grace_seconds=settings.gc_grace_seconds,
                        verify=args.verify, repair=args.repair)
            try:
                return trio.run(_run_with_progress, fsck)
            except FsckError as exc:
                raise UsageError(f"fsck could not finish: {exc}") from None
        finally:
            kv.close()
    finally:
        os.close(lock_fd)


async def _run_with_progress(fsck) -> dict[str, Any]:
    import trio

    async with trio.open_nursery() as nursery:
        async def show() -> None:
            with _Progress() as progress:
                while progress.enabled:
                    progress.show({"running": True, **fsck.progress})
                    await trio.sleep(PROGRESS_POLL_SECONDS)

        nursery.start_soon(show)
        report = await fsck.run()
        nursery.cancel_scope.cancel()
    return report


def _lock(path: Path, pid: int | None) -> int:
    """The daemon's own lock on the state dir, so that none starts while the
    check runs; refused in one line while a daemon holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot use state dir {path.parent}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UsageError(f"state dir {path.parent} is in use by a running datafs daemon" + (f" (pid {pid})" if pid else "")
                             + ": run 'datafs fsck MOUNTPOINT' on its mount instead") from None
        raise
    return fd


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
