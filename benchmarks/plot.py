"""Draw the benchmark result CSVs: one PNG per benchmark.

    python benchmarks/plot.py                      # every benchmarks/results/*.csv
    python benchmarks/plot.py results/bench_loss.csv --output /tmp/plots

Each CSV has the columns of ``common.COLUMNS`` (one measured figure a row). For each
benchmark, the PNG holds one panel per metric: grouped bars, one group per shape and one bar
per variant, labelled with the value and unit (a log scale where a panel's values
span more than two decades). Where a (device, variant, shape, metric) was
measured several times, the last row (the newest, as rows are appended) is drawn; where the
CSV holds several devices, each variant's label names its device, since figures from
different cards are not comparable bar to bar.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COLUMNS, RESULTS_DIR  # noqa: E402

DEFAULT_OUTPUT = RESULTS_DIR / "plots"


def read_results(paths: Sequence[Path]) -> Dict[str, List[dict]]:
    """Rows of the CSVs grouped by their ``benchmark`` column, in file order. Rows with a
    value that is not a number are skipped; a file without the schema's columns raises."""
    by_benchmark: Dict[str, List[dict]] = OrderedDict()
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("benchmark", "variant", "shape", "metric", "value", "unit")
                       if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: not a benchmark results CSV (missing columns "
                                 f"{', '.join(missing)}; expected {','.join(COLUMNS)})")
            for row in reader:
                try:
                    row["value"] = float(row["value"])
                except (TypeError, ValueError):
                    continue
                by_benchmark.setdefault(row["benchmark"] or path.stem, []).append(row)
    return by_benchmark


def _latest(rows: List[dict]) -> "OrderedDict[tuple, dict]":
    """The last row for each (device, variant, shape, metric); keys keep first-seen order
    (re-assigning a dict key keeps its position)."""
    latest: "OrderedDict[tuple, dict]" = OrderedDict()
    for row in rows:
        key = (row.get("device", ""), row["variant"], row["shape"], row["metric"])
        latest[key] = row
    return latest


def plot_benchmark(name: str, rows: List[dict], output_dir: Path) -> Path:
    """One PNG for one benchmark's rows; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = _latest(rows)
    devices = list(OrderedDict.fromkeys(k[0] for k in latest))
    metrics = list(OrderedDict.fromkeys(k[3] for k in latest))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 3.2 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        entries = [(k, r) for k, r in latest.items() if k[3] == metric]
        shapes = list(OrderedDict.fromkeys(k[2] for k, _ in entries))
        series = list(OrderedDict.fromkeys((k[0], k[1]) for k, _ in entries))
        width = 0.8 / len(series)
        unit = entries[0][1].get("unit", "")
        for i, (device, variant) in enumerate(series):
            label = variant if len(devices) == 1 else f"{variant} @ {device}"
            xs, heights = [], []
            for j, shape in enumerate(shapes):
                row = latest.get((device, variant, shape, metric))
                if row is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    heights.append(row["value"])
            bars = ax.bar(xs, heights, width=width, label=label)
            ax.bar_label(bars, labels=[f"{h:.3g}" for h in heights], fontsize=7)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=7, rotation=10)
        ax.set_ylabel(f"{metric} ({unit})" if unit and unit != metric else metric)
        values = [r["value"] for _, r in entries]
        if min(values) > 0 and max(values) / min(values) > 100:  # bars spanning decades
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}" + (f" on {devices[0]}" if len(devices) == 1 else ""))
    fig.tight_layout()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/plot.py",
        description=("Draw benchmark result CSVs (columns " + ",".join(COLUMNS) + ") as one PNG "
                     "per benchmark: a panel per metric, bars per variant grouped by shape, "
                     "the newest measurement of each. Needs matplotlib."))
    parser.add_argument("csv", nargs="*", type=Path,
                        help=f"result files (default: every {RESULTS_DIR}/*.csv)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"folder for the PNGs (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("error: matplotlib is not installed (pip install matplotlib)")
    paths = args.csv or sorted(RESULTS_DIR.glob("*.csv"))
    if not paths:
        sys.exit(f"error: no result CSVs in {RESULTS_DIR}")
    try:
        by_benchmark = read_results(paths)
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    if not by_benchmark:
        sys.exit("error: the result CSVs hold no rows")
    for name, rows in by_benchmark.items():
        print(f"wrote {plot_benchmark(name, rows, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
