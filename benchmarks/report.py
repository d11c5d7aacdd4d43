"""The output a user reads: results.json, results.md and PNG charts.

The JSON holds every row with its ratios and the run's sizes, versions and
machine, so a later tool can redraw anything; the Markdown is the table to
paste into an issue; the charts are drawn with matplotlib's Agg backend (no
display needed) on log scales, because a warm read and a cold one differ by
orders of magnitude and both must stay readable.
"""

from __future__ import annotations

import json
from pathlib import Path

from .results import BY_ID, DATAFS, DISK, IOPS, JUICEFS, MIB, MIB_S, PYFUSE3, S3_CEILING, SECONDS, WORKLOADS, Row
from .sizes import Sizes

TARGET_ORDER = (DISK, PYFUSE3, DATAFS, JUICEFS, S3_CEILING)
COLORS = {DISK: "#7f7f7f", PYFUSE3: "#9467bd", DATAFS: "#1f77b4", JUICEFS: "#ff7f0e", S3_CEILING: "#2ca02c"}


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def format_figure(row: Row) -> str:
    if row.unit == MIB_S:
        text = f"{row.figure:,.0f} MiB/s" if row.figure >= 10 else f"{row.figure:.1f} MiB/s"
        if "seconds" in row.extra:
            text += f" ({format_seconds(row.extra['seconds'])})"
        return text
    if row.unit == IOPS:
        text = f"{row.figure:,.0f} IOPS"
        p50, p99 = row.extra.get("p50_seconds"), row.extra.get("p99_seconds")
        if p50 and p99:
            text += f" (p50 {format_seconds(p50)}, p99 {format_seconds(p99)})"
        return text
    if row.unit == SECONDS:
        text = format_seconds(row.figure)
        if "write_seconds" in row.extra:
            text += f" after close (the write took {format_seconds(row.extra['write_seconds'])})"
        return text
    if row.unit == MIB:
        return f"{row.figure:,.0f} MiB"
    return f"{row.figure:g} {row.unit}"


def _ratio(value: float | None) -> str:
    if value is None:
        return ""
    if value < 0.1:
        return f"{value:.2g}x"  # 0.0049x, not a misleading 0.00x
    return f"{value:.2f}x" if value < 100 else f"{value:,.0f}x"


def ordered(rows: list[Row]) -> list[Row]:
    position = {w.id: i for i, w in enumerate(WORKLOADS)}
    return sorted(rows, key=lambda r: (position[r.workload], TARGET_ORDER.index(r.target)))


def engine_title(meta: dict) -> str:
    """`full mode`, or `full mode, PostgreSQL metadata`: for titles."""
    return f"{meta['mode']} mode" + (", PostgreSQL metadata" if meta.get("meta_engine") == "postgres" else "")


def engine_text(meta: dict) -> str:
    """Where each target keeps its metadata (results.json from before `--meta` has no engine: the embedded ones)."""
    if meta.get("meta_engine") == "postgres":
        return ("Metadata engine: **PostgreSQL**, one server on 127.0.0.1 with its durable defaults (fsync, "
                "synchronous commit, full-page writes), a database each: datafs `--meta postgresql://...`, "
                "JuiceFS `postgres://...`; every metadata operation is a round trip to it.")
    return "Metadata engine: **embedded**: datafs's LMDB in its state dir; JuiceFS's SQLite file in its dir."


def markdown(rows: list[Row], meta: dict) -> str:
    sizes = Sizes(**meta["sizes"])
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    machine = meta["machine"]
    lines = [
        f"# datafs benchmarks: {engine_title(meta)}",
        "",
        f"{meta['started_at']}; {machine['cpus']} CPUs, {machine['memory_gib']:.1f} GiB RAM, {machine['kernel']}; "
        f"{versions}; the run took {meta['duration_seconds'] / 60:.1f} min.",
        "",
        f"Sizes: {sizes.describe()}.",
        "",
        engine_text(meta),
        "",
        "Targets: **disk** is a plain directory on the same filesystem as the caches (the physical limit of this "
        "machine); **pyfuse3** is a minimal passthrough filesystem on pyfuse3 and trio over a directory on that "
        "disk, with datafs's mount options and kernel tuning (the limit of any Python FUSE daemon: a datafs row "
        "close to it has little left to gain on pyfuse3; for the cold read it is a pyfuse3 daemon that only GETs "
        "the file's objects from the bucket and hands them over from memory); **datafs** and **juicefs** (`--writeback`, local cache "
        "dir) store their data in the same SeaweedFS S3 server on 127.0.0.1; **s3-ceiling** is boto3 against that "
        "server with nothing in between.",
        "",
        "Ratios are speeds next to a reference: 2.00x is twice as fast (twice the MiB/s or IOPS, half the seconds), "
        "0.50x half as fast. *vs disk* compares with the same job on the disk (cold reads: with the disk's read "
        "after dropping the page cache); *vs pyfuse3 ceiling* is datafs next to the same job on the pyfuse3 "
        "passthrough (1.00x: as fast as a Python FUSE daemon can be here); *vs S3 ceiling* with boto3's PUT (uploads) or GET (cold reads) throughput; "
        "*vs JuiceFS* is datafs next to JuiceFS. For the upload lag, *vs S3 ceiling* is the time boto3 needs to PUT "
        "that much data divided by the lag: above 1.00x means the upload had started before close(). For the peak "
        "RSS, *vs JuiceFS* is JuiceFS's peak divided by datafs's (above 1.00x, datafs used less memory), and "
        "*vs pyfuse3 ceiling* the passthrough's peak divided by datafs's.",
        "",
        "| # | Workload | Target | Result | vs disk | vs pyfuse3 ceiling | vs S3 ceiling | vs JuiceFS | Note |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    previous = None
    for row in ordered(rows):
        workload = BY_ID[row.workload]
        first = row.workload != previous
        previous = row.workload
        lines.append("| " + " | ".join([
            workload.number if first else "",
            workload.title_for(sizes).replace("|", "\\|") if first else "",
            row.target, format_figure(row), _ratio(row.ratio_disk), _ratio(row.ratio_pyfuse3),
            _ratio(row.ratio_s3), _ratio(row.ratio_juicefs), row.note.replace("|", "\\|"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row], meta: dict) -> str:
    import dataclasses

    return json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in ordered(rows)]}, indent=2) + "\n"


# ---- charts -------------------------------------------------------------------------------
def _grouped_bars(ax, rows: list[Row], unit: str, value_format) -> None:
    """Horizontal bars, one group per workload in catalogue order, one bar per
    target that ran it, centred on the group's tick."""
    groups = [w for w in WORKLOADS if w.unit == unit and any(r.workload == w.id for r in rows)]
    index = {(r.workload, r.target): r for r in rows if r.figure > 0}
    height = 0.8 / max((sum((w.id, t) in index for t in TARGET_ORDER) for w in groups), default=1)
    placed: dict[str, tuple[list[float], list[float]]] = {t: ([], []) for t in TARGET_ORDER}
    for i, workload in enumerate(groups):
        present = [t for t in TARGET_ORDER if (workload.id, t) in index]
        for j, target in enumerate(present):
            placed[target][0].append(i + (j - (len(present) - 1) / 2) * height)
            placed[target][1].append(index[(workload.id, target)].figure)
    for target, (ys, values) in placed.items():
        if values:
            bars = ax.barh(ys, values, height=height, color=COLORS[target], label=target)
            ax.bar_label(bars, labels=[value_format(v) for v in values], padding=2, fontsize=7)
    ax.set_yticks(range(len(groups)), [f"{w.number} {w.id}" for w in groups])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.margins(x=0.12)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def charts(out_dir: Path, rows: list[Row], meta: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"datafs benchmarks ({engine_title(meta)})"
    paths = []

    bar_charts = (
        ("throughput.png", MIB_S, lambda v: f"{v:,.0f}", "MiB/s (log scale, higher is better)",
         "throughput per workload and target"),
        ("times.png", SECONDS, format_seconds, "seconds (log scale, lower is better)",
         "metadata, small files and upload lag"),
    )
    for name, unit, fmt, xlabel, subject in bar_charts:
        fig, ax = plt.subplots(figsize=(10, 6))
        _grouped_bars(ax, rows, unit, fmt)
        ax.set_xlabel(xlabel)
        ax.set_title(f"{title}: {subject}")
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    random_rows = [r for r in ordered(rows) if r.workload == "rand-read-4k"]
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.38
    for k, (key, label, alpha) in enumerate((("p50_seconds", "p50", 1.0), ("p99_seconds", "p99", 0.55))):
        xs = [i + (k - 0.5) * width for i in range(len(random_rows))]
        values = [(r.extra.get(key) or 0) * 1e6 for r in random_rows]
        bars = ax.bar(xs, values, width=width, color=[COLORS[r.target] for r in random_rows], alpha=alpha,
                      edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, labels=[f"{label}\n{v:,.0f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(random_rows)), [f"{r.target}\n{r.figure:,.0f} IOPS" for r in random_rows])
    ax.set_yscale("log")
    ax.set_ylabel("completion latency, µs (log scale, lower is better)")
    ax.set_title(f"{title}: random 4 KiB reads, latency percentiles")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(out_dir: Path, rows: list[Row], meta: dict) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    written["json"].write_text(to_json(rows, meta))
    written["markdown"].write_text(markdown(rows, meta))
    for path in charts(out_dir, rows, meta):
        written[path.stem] = path
    return written
