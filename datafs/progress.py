"""Progress bars for byte counts, in MiB and MiB/s like every summary line.

tqdm's own byte scaling prints decimal-looking units ("MB/s") even with a
1024 divisor; these bars count in MiB instead, so a bar and the line printed
after it use the same unit.
"""

from __future__ import annotations

from tqdm import tqdm

MIB = 1 << 20
_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MiB [{elapsed}<{remaining}, {rate_noinv_fmt}]"


class ByteProgress(tqdm):
    """A tqdm bar fed with bytes and shown in MiB."""

    def __init__(self, total_bytes: float, **kwargs):
        super().__init__(total=total_bytes / MIB, unit="MiB", bar_format=_BAR, **kwargs)

    def add_bytes(self, count: int) -> None:
        self.update(count / MIB)

    def show_done_bytes(self, done: float) -> None:
        self.n = done / MIB
        self.refresh()
