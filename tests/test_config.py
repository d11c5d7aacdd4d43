"""The settings model and the command line built on it.

Each option is one field of `Settings`: read from its DATAFS_* names, overridden
by its flag, validated once; mistakes are one line and exit 2 whatever their
source. The README's options table is checked against the model, so a new
option cannot go undocumented.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import pytest

from datafs import config
from datafs.errors import UsageError

from .conftest import REPO, Mount, run_cli

GiB = 1 << 30


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set DATAFS_* variables for one test, with none inherited."""
    for key in list(os.environ):
        if key.startswith("DATAFS_"):
            monkeypatch.delenv(key)

    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def test_sizes_follow_the_documented_units(env):
    # One-letter units are binary, as dd and truncate read them; xB decimal; xiB binary.
    for text, expected in [("50G", 50 * GiB), ("50GiB", 50 * GiB), ("50GB", 50 * 10**9), ("64M", 64 << 20),
                           ("1.5T", int(1.5 * 2**40)), ("512MiB", 512 << 20), ("4096", 4096), ("2k", 2048)]:
        assert config.load(cache_size_bytes=text).cache_size_bytes == expected, text
    for text in ("-5G", "abc", "0", "5X"):
        with pytest.raises(UsageError, match=r"^invalid --cache-size '.*': "):
            config.load(cache_size_bytes=text)


def test_environment_short_and_long_names_and_flags_win(env):
    env(DATAFS_CACHE_SIZE="64M", DATAFS_PEER_TIMEOUT="2.5", DATAFS_PEER_INFLIGHT="8M", DATAFS_GC_GRACE="7",
        DATAFS_UPLOAD_CONCURRENCY="3", DATAFS_FSYNC_WAITS_UPLOAD="yes", DATAFS_STORE="", DATAFS_STATE_DIR="~/st")
    s = config.load()
    assert (s.cache_size_bytes, s.peer_timeout_seconds, s.peer_inflight_bytes) == (64 << 20, 2.5, 8 << 20)
    assert (s.gc_grace_seconds, s.upload_concurrency, s.fsync_waits_upload) == (7.0, 3, True)
    assert s.state_dir == Path.home() / "st" and s.store_url == f"file://{Path.home() / 'st' / 'store'}"  # empty = default
    assert config.load(cache_size_bytes="1G", state_dir="rel").cache_size_bytes == GiB  # the flag wins
    assert config.load(state_dir="rel").state_dir == Path.cwd() / "rel"
    env(DATAFS_CACHE_SIZE_BYTES="2G")  # the field's own name is accepted too
    os.environ.pop("DATAFS_CACHE_SIZE")
    assert config.load().cache_size_bytes == 2 * GiB


def test_mistakes_name_their_source(env):
    env(DATAFS_PEER_TIMEOUT="-1")
    with pytest.raises(UsageError, match=r"^invalid DATAFS_PEER_TIMEOUT '-1': .*greater than or equal to 0"):
        config.load()
    os.environ.pop("DATAFS_PEER_TIMEOUT")
    cases = [({"volume": "../x"}, "invalid --volume '../x'"), ({"log_level": "loud"}, "invalid --log-level 'loud'"),
             ({"meta": "mysql://db"}, "unsupported metadata engine"), ({"state_dir": "/a,b"}, "must not contain a comma"),
             ({"peer_listen": "10.0.0.5:9400"}, "--peer-listen needs a shared metadata engine"),
             ({"peer_listen": "nohost", "meta": "postgresql://db"}, "expected HOST:PORT")]
    for flags, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)):
            config.load(**flags)


def test_secrets_never_reach_the_settings_line(env):
    env(DATAFS_PEER_SECRET="fleet-secret-0123456789", DATAFS_META_PASSWORD="db-password-42")
    s = config.load(meta="postgresql://datafs:url-password@db/datafs", peer_listen="10.0.0.5:9400")
    assert s.fleet_secret() == b"fleet-secret-0123456789" and s.database_password() == "db-password-42"
    line = json.dumps(s.public())
    for secret in ("fleet-secret", "db-password", "url-password"):
        assert secret not in line
    assert s.public()["meta"] == "postgresql://datafs:***@db/datafs"


def test_every_option_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| flag | env | default | meaning |"):]
    table = table[:table.index("\n\n")]
    internal = {"mountpoint", "foreground", "log_format", "read_ahead_kb", "write_buffer_bytes"}
    for name, field in config.Settings.model_fields.items():
        if name in internal:
            continue
        declared = field.json_schema_extra or {}
        assert f"`{declared['env'][0]}`" in table, f"README options table lacks {declared['env'][0]}"
        if declared.get("flag"):
            assert f"`{declared['flag']}" in table, f"README options table lacks {declared['flag']}"


# ---- the command line --------------------------------------------------------------------------
def test_cli_mistakes_are_one_line_and_exit_2(tmp_path: Path, env, capsys: pytest.CaptureFixture):
    from datafs.cli import main

    cases = [
        (("mount", str(tmp_path), "--cache-size", "-5G"), "invalid --cache-size '-5G'", {}),
        (("mount", str(tmp_path)), "invalid DATAFS_CACHE_SIZE 'lots'", {"DATAFS_CACHE_SIZE": "lots"}),
        (("mount", str(tmp_path), "--no-such-flag"), "No such option", {}),
        (("mount",), "Missing argument", {}),
        (("sync", str(tmp_path), "--timeout", "soon"), "'soon' is not a valid float", {}),
        (("status", str(tmp_path / "missing")), "is not mounted: it does not exist", {}),
    ]
    for args, message, variables in cases:
        for key in variables:
            os.environ[key] = variables[key]
        status = main(list(args))
        for key in variables:
            del os.environ[key]
        out, err = capsys.readouterr()
        assert status == 2, (args, out, err)
        assert err.startswith("datafs: ") and message in err, (args, err)
        assert len(err.splitlines()) == 1 and not out, (args, err)
    assert main(["mount", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--cache-size SIZE" in help_text and "DATAFS_CACHE_SIZE" in help_text
    # The installed entry point behaves the same.
    result = run_cli("mount", str(tmp_path), "--cache-size", "-5G", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "invalid --cache-size" in result.stderr
    assert run_cli("--version").stdout.strip().startswith("datafs ")


@pytest.mark.mount
def test_a_mount_logs_its_settings_and_refuses_a_missing_store(mount_factory: Callable[..., Mount], tmp_path: Path):
    m = mount_factory("settings", extra_args=["--cache-size", "64M"],
                      env={"DATAFS_UPLOAD_CONCURRENCY": "3", "DATAFS_META_PASSWORD": "never-logged-0451"})
    log = m.log
    line = next(json.loads(x) for x in log.splitlines() if '"effective settings"' in x)
    assert line["settings"]["cache_size_bytes"] == 64 << 20 and line["settings"]["upload_concurrency"] == 3
    assert line["settings"]["state_dir"] == str(m.state_dir) and "never-logged" not in log

    inside = run_cli("status", str(m.path / "sub" / "dir"), check=False)
    assert inside.returncode == 2 and f"inside the datafs mount {m.path}" in inside.stderr, inside.stderr

    missing = tmp_path / "no-such-disk" / "store"
    (tmp_path / "other-mnt").mkdir()
    result = run_cli("mount", str(tmp_path / "other-mnt"), "--state-dir", str(tmp_path / "other-state"),
                     "--store", f"file://{missing}", check=False)
    assert result.returncode == 2 and f"store directory {missing} does not exist" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and not missing.exists()
    daemon_log = (tmp_path / "other-state" / "datafs.log").read_text()
    assert "does not exist" in daemon_log and "Traceback" not in daemon_log
