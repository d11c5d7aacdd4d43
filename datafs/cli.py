"""The command line, on click: mount, umount, status, sync, warmup here;
fsck, stats, env and the inductor cache tools in their own modules.

`datafs mount`'s flags are generated from the settings model
(`config.Settings`), where each option is declared once with its environment
names. User mistakes are `UsageError`s (or click's own usage errors): one line
on stderr, exit status 2, never a traceback or a usage dump. `mount` checks
everything it can before it forks, so the common mistakes (missing mountpoint,
already mounted, no /dev/fuse, state dir in use, bad sizes) fail in the
foreground; the daemon then reports its own start-up over a pipe, and `mount`
returns only once the filesystem is mounted."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import click

from . import __version__, config, logs, mounts
from .errors import UsageError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_UMOUNT_TIMEOUT_SECONDS = 120.0
#: After ending stuck reads, how long umount retries while the mount is busy.
UMOUNT_RETRY_SECONDS = 3.0


# ---- mount ----------------------------------------------------------------------------
def _check_fuse_device() -> None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except FileNotFoundError:
        raise UsageError("/dev/fuse is missing: load the fuse kernel module (or run the container with --device /dev/fuse)") from None
    except PermissionError:
        raise UsageError("no permission to open /dev/fuse: run as root or add this user to the group that owns it") from None
    os.close(fd)


def _check_mountpoint(mountpoint: Path, state_dir: Path) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        _clear_dead_mount(mountpoint)
        return
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    info = mounts.find_mount(mountpoint)
    if info is not None and info.fstype.startswith("fuse"):
        from .state_files import daemon_running

        if info.is_datafs and info.state_dir and not daemon_running(info.state_dir):
            # Its daemon is gone (the kernel may still answer stat from its
            # attribute cache): a dead mount to clear, not a live one.
            _clear_dead_mount(mountpoint)
            return
        where = f" (state dir {info.state_dir})" if info.state_dir else ""
        raise UsageError(f"{mountpoint} is already mounted{where}: run 'datafs umount {mountpoint}' first")


def _clear_dead_mount(mountpoint: Path) -> None:
    """A daemon that died (e.g. SIGKILL) leaves its mount answering ENOTCONN;
    detach it so the filesystem can be mounted again."""
    info = mounts.find_mount(mountpoint)
    if info is None or not info.is_datafs:
        raise UsageError(f"mountpoint {mountpoint} is a disconnected mount of another filesystem")
    _fusermount(mountpoint, lazy=True)


def _fusermount(mountpoint: Path, lazy: bool = False) -> subprocess.CompletedProcess:
    for tool in (["fusermount3", "-u"], ["fusermount", "-u"]):
        try:
            return subprocess.run(tool + (["-z"] if lazy else []) + [str(mountpoint)], capture_output=True, text=True)
        except FileNotFoundError:
            continue
    return subprocess.run(["umount"] + (["-l"] if lazy else []) + [str(mountpoint)], capture_output=True, text=True)


def cmd_mount(mountpoint: str, flags: dict) -> int:
    settings = config.load(mountpoint=mountpoint, **flags)
    assert settings.mountpoint is not None
    _check_mountpoint(settings.mountpoint, settings.state_dir)
    _check_fuse_device()

    from .daemon import Daemon  # heavy imports only once the arguments are good

    daemon = Daemon(settings)
    daemon.acquire_lock()
    if settings.foreground:
        logs.setup(settings.log_level, settings.log_format)
        logs.effective_settings(settings.public())
        return _run_daemon(daemon)
    return _spawn_daemon(daemon)


def _run_daemon(daemon) -> int:
    try:
        daemon.prepare()
        daemon.mount()
        _serve_metrics(daemon.settings.metrics_address)
        _run_loop(daemon)
    finally:
        daemon.close()
    return 1 if (daemon.exit_report or {}).get("lost") else 0  # writes lost at shutdown


def _run_loop(daemon) -> None:
    """The daemon's event loop; a mistake found inside it (e.g. a peer address
    in use) leaves as the `UsageError` itself, not wrapped in a group."""
    import trio

    try:
        trio.run(daemon.run)
    except BaseExceptionGroup as group:
        mistakes = group.subgroup(lambda exc: isinstance(exc, UsageError))
        while isinstance(mistakes, BaseExceptionGroup):
            mistakes = mistakes.exceptions[0]
        if mistakes is None:
            raise
        raise mistakes from None


def _serve_metrics(address: str) -> None:
    if not address:
        return
    from prometheus_client import start_http_server

    from . import metrics

    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=metrics.new_registry())


def _spawn_daemon(daemon) -> int:
    settings = daemon.settings
    log_path = settings.state_dir / "datafs.log"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os.setsid()
        daemon.record_pid()
        null = os.open(os.devnull, os.O_RDONLY)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        logs.setup(settings.log_level, settings.log_format)
        logs.effective_settings(settings.public())
        status = 0
        try:
            try:
                daemon.prepare()
                daemon.mount()
                _serve_metrics(settings.metrics_address)
            except UsageError as exc:
                os.write(write_end, f"error:{exc}".encode())
                raise
            except Exception as exc:
                os.write(write_end, f"error:the daemon failed to start ({exc}); see {log_path}".encode())
                raise
            os.write(write_end, b"ok")
            os.close(write_end)
            _run_loop(daemon)
            status = 1 if (daemon.exit_report or {}).get("lost") else 0
        except UsageError as exc:  # a mistake, told to `datafs mount` too: one line, no traceback
            import logging

            logging.getLogger("datafs").error("could not mount: %s", exc)
            status = 1
        except BaseException:
            import logging

            logging.getLogger("datafs").exception("daemon stopped with an error")
            status = 1
        finally:
            daemon.close()
            os._exit(status)
    os.close(write_end)
    chunks = []
    while True:
        data = os.read(read_end, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(read_end)
    message = b"".join(chunks).decode(errors="replace")
    if message == "ok":
        return 0
    if message.startswith("error:"):
        raise UsageError(message[len("error:"):])
    raise UsageError(f"the daemon exited during start-up; see {log_path}")


# ---- umount ----------------------------------------------------------------------------
def _datafs_mount(mountpoint: str) -> mounts.MountInfo:
    path = Path(os.path.abspath(mountpoint))
    info = mounts.find_mount(path)
    if info is None:
        enclosing = mounts.mount_containing(path)
        if enclosing is not None and enclosing.is_datafs:
            raise UsageError(f"{path} is not mounted: it is a path inside the datafs mount {enclosing.mountpoint}; "
                             f"give that mount point")
        if not os.path.lexists(path):
            raise UsageError(f"{path} is not mounted: it does not exist")
        raise UsageError(f"{path} is not mounted")
    if not info.is_datafs:
        raise UsageError(f"{path} is not a datafs mount (it is {info.fstype})")
    return info


def cmd_umount(args: SimpleNamespace) -> int:
    """Unmount, wait for the daemon to exit, and say what it could not keep:
    exit 1 if writes were lost (the daemon had died, or could not commit
    something at shutdown), with one line per file; committed chunks not yet
    in the object store are a note (they upload at the next mount)."""
    from .state_files import read_daemon_pid

    info = _datafs_mount(args.mountpoint)
    pid = read_daemon_pid(info.state_dir) if info.state_dir else None
    alive = pid is not None and mounts.pid_alive(pid)
    result = _fusermount(Path(info.mountpoint))
    if result.returncode != 0 and alive and _busy(result) and _interrupt_stuck_readers(info):
        # Readers stuck on chunks the store cannot give got EIO now: they
        # may close their files in a moment.
        until = time.monotonic() + UMOUNT_RETRY_SECONDS
        while result.returncode != 0 and _busy(result) and time.monotonic() < until:
            time.sleep(0.1)
            result = _fusermount(Path(info.mountpoint))
    if result.returncode != 0:
        if _busy(result):
            raise UsageError(f"{info.mountpoint} is busy: close the files and shells using it, then try again")
        raise UsageError(f"cannot unmount {info.mountpoint}: {_reason(result)}")
    if pid is None:
        return 0
    if not alive:
        print(f"datafs: the daemon of {info.mountpoint} had died (pid {pid}): writes to files that were not "
              f"closed before it died are lost; mount again to resume its uploads", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    shown = False
    while mounts.pid_alive(pid):
        if time.monotonic() > deadline:
            raise UsageError(f"unmounted, but the daemon (pid {pid}) is still finishing after {args.timeout:.0f} s")
        if not shown and sys.stderr.isatty() and time.monotonic() > deadline - args.timeout + 1:
            print("waiting for the daemon to commit and exit...", file=sys.stderr)
            shown = True
        time.sleep(0.05)
    return _report_exit(info, pid)


def _reason(result: subprocess.CompletedProcess) -> str:
    detail = (result.stderr or result.stdout).strip().splitlines()
    return detail[-1] if detail else f"exit status {result.returncode}"


def _busy(result: subprocess.CompletedProcess) -> bool:
    return "busy" in _reason(result).lower()


def _interrupt_stuck_readers(info: mounts.MountInfo) -> bool:
    """Ask the daemon to end reads waiting for chunks; whether there were any."""
    try:
        return bool(_control(info, "POST", "/interrupt").get("ended"))
    except UsageError:
        return False


def _report_exit(info: mounts.MountInfo, pid: int) -> int:
    from .state_files import read_exit_report

    assert info.state_dir is not None
    report = read_exit_report(info.state_dir, pid)
    if report is None:
        print(f"datafs: the daemon (pid {pid}) stopped with an error before finishing; "
              f"see {info.state_dir / 'datafs.log'}", file=sys.stderr)
        return 1
    for item in report.get("lost", []):
        print(f"datafs: inode {item['ino']} ({_format_bytes(item.get('size_bytes', 0))} written): "
              f"not committed: {item['error']}", file=sys.stderr)
    if report.get("pending_chunks"):
        failing = report.get("failing_chunks", 0)
        sample = next(iter(report.get("failing_sample", {}).values()), "")
        print(f"datafs: {report['pending_chunks']} committed chunks ({_format_bytes(report.get('pending_bytes', 0))}) "
              f"are not in the object store yet" + (f" ({failing} failing: {sample})" if failing else "")
              + f"; they upload when {info.state_dir} is mounted again", file=sys.stderr)
    if report.get("lost"):
        print(f"datafs: {len(report['lost'])} file(s) could not be committed at unmount: their writes since "
              f"their last close or fsync are lost ('find {info.mountpoint} -inum N' after the next mount)", file=sys.stderr)
        return 1
    return 0


# ---- status and sync ---------------------------------------------------------------------
def _control(info: mounts.MountInfo, method: str, url: str, body: dict | None = None, timeout: float | None = 10.0) -> dict:
    """Ask the mount's daemon through its control socket; one clear line if it is gone."""
    from .control import ControlError, ControlUnavailable, request
    from .state_files import control_path

    assert info.state_dir is not None
    try:
        return request(control_path(info.state_dir), method, url, body, timeout=timeout)
    except ControlUnavailable:
        raise UsageError(f"the datafs daemon of {info.mountpoint} is not running (state dir {info.state_dir}); "
                         f"unmount with 'datafs umount {info.mountpoint}' and mount again") from None
    except ControlError as exc:
        raise UsageError(f"the daemon refused {url}: {exc}") from None


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_status(args: SimpleNamespace) -> int:
    """Exit 0 when healthy, 1 when uploads are failing, 2 when the daemon is
    not running (or another error)."""
    info = _datafs_mount(args.mountpoint)
    st = _control(info, "GET", "/status")
    print(f"mountpoint:       {info.mountpoint}")
    print(f"state dir:        {info.state_dir}")
    print(f"daemon:           running (pid {st['pid']})")
    print(f"metadata:         {st['meta']}" + (f", volume {st['volume']}, node {st['node']}" if st.get("shared") else ""))
    print(f"object store:     {st['store']}")
    print(f"inodes:           {st['inodes'] if st.get('inodes') is not None else 'unknown (the metadata engine does not answer)'}")
    print(f"pending uploads:  {st['pending_chunks']} chunks, {_format_bytes(st['pending_bytes'])}, oldest {st['pending_oldest_seconds']:.1f} s")
    print(f"upload rate:      {_format_bytes(st['upload_bytes_per_second'])}/s")
    print(f"failing uploads:  {st['failing_chunks']}" + (" (of the pending chunks)" if st["failing_chunks"] else ""))
    for chunk, error in st.get("failing_sample", {}).items():
        print(f"  {chunk[:16]}...: {error}")
    if st.get("open_files_unsaved") or st.get("open_failing_chunks"):
        print(f"open files:       {st.get('open_files_unsaved', 0)} with writes not committed yet"
              + (f", {st['open_failing_chunks']} of their chunks failing to upload" if st.get("open_failing_chunks") else ""))
    cache = f"{_format_bytes(st['cache_bytes'])}"
    if st.get("cache_limit_bytes"):
        cache += f" of {_format_bytes(st['cache_limit_bytes'])}"
    if st.get("cache_pinned_bytes"):
        cache += f", {_format_bytes(st['cache_pinned_bytes'])} only here (not in the object store yet)"
    print(f"local cache:      {cache}")
    if "not_durable_chunks" in st and not st.get("shared"):  # a shared engine's close() is durable
        print(f"not durable yet:  {st['not_durable_chunks']} chunks, {_format_bytes(st['not_durable_bytes'])}"
              " (flushed within the flush interval, or at fsync)")
    if st.get("damaged_at_start"):
        print(f"damaged at start: {st['damaged_at_start']} files cut short after a power loss "
              f"(one warning each, with its inode, in {info.state_dir / 'datafs.log'})")
    if st.get("shared"):
        nodes = ", ".join(f"{n} ({host})" if host else n for n, host in st["live_nodes"].items())
        print(f"live nodes:       {nodes or 'none'}")
        if st.get("peer_listen"):
            peers = ", ".join(f"{n} ({a})" for n, a in st.get("peer_members", {}).items())
            print(f"peer tier:        serving on {st['peer_listen']}; members {peers or 'none'}; {st.get('shares_pending', 0)} chunks being shared")
        print(f"chunks at risk:   {st['chunks_at_risk']}" + (" (committed, not uploaded, on nodes that are gone)" if st["chunks_at_risk"] else ""))
        for item in st.get("at_risk_sample", []):
            print(f"  {item['chunk'][:16]}... only on node {item['node']}")
    failing = st["failing_chunks"] + st.get("open_failing_chunks", 0)
    if failing:
        print(f"datafs: uploads are failing ({failing} chunks); they are retried until they succeed "
              f"(see the errors above and {info.state_dir / 'datafs.log'})", file=sys.stderr)
        return 1
    return 0


def cmd_sync(args: SimpleNamespace) -> int:
    """Wait until the named files (or everything this node wrote) are in the object store."""
    from .progress import ByteProgress

    info = _datafs_mount(args.mountpoint)
    body: dict = {"inodes": None}
    if args.paths:
        inodes = []
        mount_dev = os.stat(info.mountpoint).st_dev
        for path in args.paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise UsageError(f"{path}: {exc.strerror}") from None
            try:
                st = os.fstat(fd)
                if st.st_dev != mount_dev:
                    raise UsageError(f"{path} is not on the datafs mount {info.mountpoint}")
                os.fsync(fd)  # commit anything still buffered for this file
            finally:
                os.close(fd)
            inodes.append(st.st_ino)
        body = {"inodes": inodes}
    started = time.monotonic()
    deadline = started + args.timeout
    interactive = sys.stderr.isatty()
    progress = None
    first: dict | None = None
    next_kick = next_line = 0.0
    while True:
        now = time.monotonic()
        if now >= next_kick:
            # Ask the daemon to retry failing uploads now rather than after its backoff.
            _control(info, "POST", "/retry")
            next_kick = now + 5.0
        pending = _control(info, "POST", "/pending", body)
        left = pending["bytes"]
        if first is None:
            first = pending
            if pending.get("open_files_unsaved"):
                print(f"sync: {pending['open_files_unsaved']} file(s) open for writing have writes not committed yet; "
                      f"sync covers what is committed (close or fsync them first)", file=sys.stderr)
            if interactive:
                progress = ByteProgress(left, desc="sync", file=sys.stderr)
        failing = pending.get("failing", 0)
        sample = next(iter(pending.get("failing_sample", {}).values()), "")
        if progress is not None:
            progress.set_postfix_str(f"{failing} failing" if failing else "", refresh=False)
            progress.show_done_bytes(first["bytes"] - left)
        elif pending["chunks"] and now >= next_line:
            print(f"sync: {pending['chunks']} chunks ({_format_bytes(left)}) left"
                  + (f", {failing} failing: {sample}" if failing else ""), file=sys.stderr, flush=True)
            next_line = now + 5.0
        # With the peer tier, also wait until new chunks reach their owners.
        sharing = pending.get("sharing", 0)
        if not pending["chunks"] and not sharing:
            if progress is not None:
                progress.close()
            print(f"sync: {first['chunks']} chunks ({_format_bytes(first['bytes'])}) uploaded in "
                  f"{time.monotonic() - started:.1f} s; nothing committed is waiting for the object store"
                  + (" or for its peers" if "sharing" in first else ""))
            return 0
        if now > deadline:
            if progress is not None:
                progress.close()
            if not pending["chunks"]:
                raise UsageError(f"{sharing} chunks still being shared with their owners after {args.timeout:.0f} s"
                                 f"; see 'datafs status {info.mountpoint}'")
            raise UsageError(f"{pending['chunks']} chunks ({_format_bytes(left)}) still pending after {args.timeout:.0f} s"
                             + (f" ({failing} failing: {sample})" if failing else "")
                             + f"; see 'datafs status {info.mountpoint}'")
        time.sleep(0.2)


def cmd_warmup(args: SimpleNamespace) -> int:
    from .warmup import warmup

    paths = [Path(p) for p in args.paths]
    for path in paths:
        if not path.exists():
            raise UsageError(f"{path} does not exist")
    result = warmup(paths, parallel=args.parallel)
    print(f"warmed {result['files']} files, {_format_bytes(result['bytes'])} in {result['seconds']:.1f} s "
          f"({_format_bytes(result['bytes_per_second'])}/s)")
    for error in result["errors"]:
        print(f"datafs: {error}", file=sys.stderr)
    return 1 if result["errors"] else 0


# ---- entry point ----------------------------------------------------------------------------
@click.group(context_settings=CONTEXT, no_args_is_help=True)
@click.version_option(__version__, "--version", prog_name="datafs", message="%(prog)s %(version)s")
def cli() -> None:
    """Shared model-storage filesystem for GPU fleets."""


def _mount_flags(command):
    """One flag per setting that declares one (datafs/config.py): the flag,
    its help and its environment names are written there, once."""
    for name, decl in reversed(config.fields_with_flags()):
        env = ", ".join(decl["env"])
        default = decl["default_text"] or ("off" if decl["bool"] else decl["default"])
        help_text = f"{decl['help']} [env {env}" + (f"; default {default}]" if default is not None else "]")
        if decl["bool"]:
            command = click.option(decl["flag"], name, is_flag=True, default=False, help=help_text)(command)
        else:
            command = click.option(decl["flag"], name, metavar=decl["metavar"], help=help_text)(command)
    return command


@cli.command("mount", context_settings=CONTEXT)
@click.argument("mountpoint")
@_mount_flags
def mount_command(mountpoint: str, **flags) -> int:
    """Mount datafs on MOUNTPOINT (an existing empty directory, e.g. /data);
    returns once the mount is ready. Every flag is also a DATAFS_* variable;
    flags win."""
    return cmd_mount(mountpoint, {name: (value or None) if isinstance(value, bool) else value
                                  for name, value in flags.items()})


@cli.command("umount", context_settings=CONTEXT)
@click.argument("mountpoint")
@click.option("--timeout", type=float, default=DEFAULT_UMOUNT_TIMEOUT_SECONDS, show_default=True,
              help="seconds to wait for the daemon")
def umount_command(mountpoint: str, timeout: float) -> int:
    """Commit open files, unmount, and wait for the daemon to exit."""
    return cmd_umount(SimpleNamespace(mountpoint=mountpoint, timeout=timeout))


@cli.command("status", context_settings=CONTEXT)
@click.argument("mountpoint")
def status_command(mountpoint: str) -> int:
    """Show the daemon, pending and failing uploads, the cache (exit 0 healthy,
    1 uploads failing, 2 not mounted or the daemon not running)."""
    return cmd_status(SimpleNamespace(mountpoint=mountpoint))


@cli.command("sync", context_settings=CONTEXT)
@click.argument("mountpoint")
@click.argument("paths", nargs=-1)
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="seconds to wait")
def sync_command(mountpoint: str, paths: tuple[str, ...], timeout: float) -> int:
    """Wait until files on the mount (default: everything) are in the object store."""
    return cmd_sync(SimpleNamespace(mountpoint=mountpoint, paths=list(paths), timeout=timeout))


@cli.command("warmup", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True)
@click.option("--parallel", type=click.IntRange(min=1), default=32, show_default=True, help="concurrent readers")
def warmup_command(paths: tuple[str, ...], parallel: int) -> int:
    """Pre-read files or directory trees into the local cache, in parallel."""
    return cmd_warmup(SimpleNamespace(paths=list(paths), parallel=parallel))


def _add_commands() -> None:
    from .env_cli import env_command
    from .fsck_cli import fsck_command
    from .stats_cli import stats_command

    for command in (fsck_command, stats_command, env_command):
        cli.add_command(command)
    try:
        from .inductor_cli import inductor_group
    except ImportError:
        pass
    else:
        cli.add_command(inductor_group)


_add_commands()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; every mistake is one line on stderr and a
    non-zero exit (2), never a traceback or a usage dump."""
    try:
        status = cli.main(args=argv, prog_name="datafs", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        return 2
    except click.ClickException as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None and ctx.command_path != "datafs":
            hint = f" (see '{ctx.command_path} --help')"
        print(f"datafs: {exc.format_message()}{hint}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.Abort:
        return 130
    except UsageError as exc:
        print(f"datafs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
