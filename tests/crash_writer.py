"""A write-heavy workload for test_faults.py's SIGKILL rounds: forever, pick a
file and write its next version, half in place (write, cut to size, close),
half as a new file renamed over the old one. Every step is logged (line
buffered, outside the mount) before and after, so the test knows which
versions a file may hold after a crash: the last one done, or the one in
progress. Run as: python crash_writer.py ROOT LOG SEED."""

from __future__ import annotations

import hashlib
import os
import random
import sys

FILES = 6


def content(name: str, version: int) -> bytes:
    """Version `version` of `name`: 1.4 to 4.3 MiB, so it spans one or two chunks."""
    seed = hashlib.sha256(f"{name}:{version}".encode()).digest()
    size = 1_500_000 + int.from_bytes(seed[:4], "big") % 3_000_000
    block = seed * 64
    return (block * (size // len(block) + 1))[:size]


def known_versions(log_path: str) -> dict[str, int]:
    versions: dict[str, int] = {}
    with open(log_path) as log:
        for line in log:
            _, name, version = line.split()
            versions[name] = max(versions.get(name, 0), int(version))
    return versions


def main(root: str, log_path: str, seed: int) -> None:
    rng = random.Random(seed)
    versions = known_versions(log_path)
    with open(log_path, "a", buffering=1) as log:
        while True:
            name = f"f{rng.randrange(FILES)}"
            version = versions[name] = versions.get(name, 0) + 1
            data = content(name, version)
            log.write(f"start {name} {version}\n")
            path = os.path.join(root, name)
            if int(name[1:]) % 2:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
                os.close(fd)
            else:
                tmp = os.path.join(root, f".{name}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.rename(tmp, path)
            log.write(f"done {name} {version}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
