"""`datafs inductor ls | stats | rm`: look after the shared compile caches.

Works on any machine that has the mount, without torch: archives are found by
path and described from their manifests. Mistakes are `UsageError`s (one line,
exit 2).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import click

from . import inductor
from .errors import UsageError


_CONTEXT = {"help_option_names": ["-h", "--help"]}
_DATA_DIR_HELP = "the datafs mount holding the caches (default: $DATAFS_DATA_DIR or /data)"


@click.group("inductor", context_settings=_CONTEXT)
@click.option("--data-dir", metavar="DIR", help=_DATA_DIR_HELP)
@click.pass_context
def inductor_group(ctx: click.Context, data_dir: str | None) -> None:
    """List, inspect and remove shared torch.compile caches."""
    ctx.obj = data_dir


def _action(name: str, run, *, key: bool, gpu_help: str):
    """An action taking --data-dir before or after its name (after wins)."""

    @click.pass_context
    def callback(ctx: click.Context, data_dir: str | None, gpu: str | None, key: str | None = None) -> int:
        return run(SimpleNamespace(data_dir=data_dir or ctx.obj, gpu=gpu, key=key))

    params = [click.Option(["--data-dir"], metavar="DIR", help=_DATA_DIR_HELP),
              click.Option(["--gpu"], help=gpu_help)]
    if key:
        params.insert(0, click.Argument(["key"]))
    command = click.Command(name, callback=callback, params=params, help=run.__doc__, context_settings=_CONTEXT)
    inductor_group.add_command(command)


# Mega-cache artifact kinds (torch.compiler._cache) as `stats` names them.
_ARTIFACT_LABELS = {"inductor": "fx graphs", "aot_autograd": "aot autograd", "autotune": "autotune", "pgo": "pgo profiles",
                    "precompile": "precompiled"}


def _setup(args: SimpleNamespace) -> Path:
    if args.data_dir:
        os.environ["DATAFS_DATA_DIR"] = os.path.abspath(args.data_dir)
    root = inductor.data_dir()
    if not root.is_dir():
        raise UsageError(f"data dir {root} does not exist: mount datafs there, or pass --data-dir / set DATAFS_DATA_DIR")
    if args.gpu:
        try:
            inductor.validate_gpu_type(args.gpu)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if getattr(args, "key", None) is not None:
        try:
            inductor.validate_cache_key(args.key)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return inductor.caches_root()


def _age(mtime: float) -> str:
    seconds = max(0.0, time.time() - mtime)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _bytes(n: float) -> str:
    from .cli import _format_bytes

    return _format_bytes(n)


def cmd_ls(args: SimpleNamespace) -> int:
    """List cache keys with their sizes and ages."""
    root = _setup(args)
    caches = inductor.list_caches(args.gpu)
    if not caches:
        print(f"no inductor caches in {root}" + (f"/{args.gpu}" if args.gpu else ""))
        return 0
    rows = [(c.gpu_type, c.key, _bytes(c.size_bytes), _age(c.mtime)) for c in caches]
    widths = [max(len(r[i]) for r in rows + [("GPU", "KEY", "SIZE", "AGE")]) for i in range(4)]
    for row in [("GPU", "KEY", "SIZE", "AGE")] + rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}")
    return 0


def _found(args: SimpleNamespace, root: Path) -> list[inductor.CacheListing]:
    caches = inductor.find_caches(args.key, args.gpu)
    if not caches:
        where = f"{root}/{args.gpu}" if args.gpu else str(root)
        raise UsageError(f"no inductor cache {args.key!r} in {where}; see 'datafs inductor ls'")
    return caches


def cmd_stats(args: SimpleNamespace) -> int:
    """Show versions, integrity, file and kernel counts of a cache (key e.g. my-model/v1)."""
    root = _setup(args)
    status = 0
    for n, cache in enumerate(_found(args, root)):
        try:
            info = inductor.describe_archive(cache.path)
        except FileNotFoundError:
            continue  # removed while we looked
        if n:
            print()
        print(cache.path)
        for label, value in _stats_rows(cache, info):
            print(f"  {label + ':':<14} {value}")
        if info["problem"] is not None:
            status = 1
    return status


def _stats_rows(cache: inductor.CacheListing, info: dict) -> list[tuple[str, object]]:
    gpu = cache.gpu_type
    if info["gpu_type"] not in (None, gpu):
        gpu += f" (manifest says {info['gpu_type']})"
    written = f"written {_age(info['mtime'])} ago" + (f" by {info['host']}" if info.get("host") else "")
    rows: list[tuple[str, object]] = [
        ("gpu type", gpu),
        ("format", info["format"] + (" (no manifest: written by fal's toolkit or an older tool)" if info["legacy"] else "")),
        ("size", f"{_bytes(info['size_bytes'])}, {_bytes(info.get('uncompressed_bytes', 0))} unpacked, {written}"),
    ]
    if not info["legacy"]:
        rows.append(("torch", f"{info['torch'] or 'none'}, triton {info['triton'] or 'none'}"))
    rows.append(("integrity", "ok" if info["problem"] is None else info["problem"]))
    if info["format"] == "mega":
        rows.append(("blobs", info["blobs"]))
        rows += [(_ARTIFACT_LABELS.get(kind, kind.replace("_", " ")), count) for kind, count in info["artifacts"].items()]
    else:
        rows += [("files", info["files"]), ("fx graphs", info["fx_graphs"]), ("aot autograd", info["aot_autograd"]),
                 ("kernels", f"{info['kernels']} (C++ {info['cpp_kernels']}, Triton {info['triton_kernels']})")]
    return rows


def cmd_rm(args: SimpleNamespace) -> int:
    """Remove a cache (key e.g. my-model/v1), for every GPU type unless --gpu is given."""
    root = _setup(args)
    _found(args, root)
    for path in inductor.remove_cache(args.key, args.gpu):
        print(f"removed {path}")
    return 0


_action("ls", cmd_ls, key=False, gpu_help="only this GPU type (e.g. H100, CPU); default: all")
_action("stats", cmd_stats, key=True, gpu_help="only this GPU type; default: all that have the key")
_action("rm", cmd_rm, key=True, gpu_help="only this GPU type; default: all")
