"""`datafs env [MOUNTPOINT]`: the environment that points model caches at the mount.

Hugging Face downloads are large, immutable and the same on every node, so
they belong on the shared mount: a model is downloaded once for the fleet and
read from the local cache (or a peer) everywhere else. `eval "$(datafs env)"`
in a job's start-up, or the lines in a Dockerfile or a pod spec, set them.

Compiler caches (Inductor, Triton) are the opposite: many small files, written
and locked concurrently by every worker, and specific to a GPU type. They stay
on a local disk, and `datafs.inductor` shares them through the mount as one
archive per GPU type; the output says so in comments rather than pointing them
at the mount.
"""

from __future__ import annotations

import os
import shlex

import click

DEFAULT_MOUNTPOINT = "/data"


@click.command("env", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("mountpoint", default=DEFAULT_MOUNTPOINT)
def env_command(mountpoint: str) -> int:
    """Print the export lines that put Hugging Face and torch caches on the
    mount (default /data)."""
    return cmd_env(mountpoint)


def variables(mountpoint: str) -> list[tuple[str, str]]:
    """(name, value) for each variable, in the order they are printed."""
    root = os.path.abspath(mountpoint)
    hf = f"{root}/.cache/huggingface"
    return [
        ("HF_HOME", hf),
        ("HF_HUB_CACHE", f"{hf}/hub"),  # HF_HOME implies it; set, so an inherited value cannot win
        ("HF_DATASETS_CACHE", f"{hf}/datasets"),
        ("TORCH_HOME", f"{root}/.cache/torch"),  # torch.hub checkpoints
        ("DATAFS_DATA_DIR", root),  # where datafs.inductor keeps the shared compile caches
    ]


def cmd_env(mountpoint: str) -> int:
    for name, value in variables(mountpoint):
        print(f"export {name}={shlex.quote(value)}")
    print("# TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR: keep them on a local disk; share compiled")
    print("# kernels with datafs.inductor (synchronized_inductor_cache), which publishes them to the mount.")
    return 0
