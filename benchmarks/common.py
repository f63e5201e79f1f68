"""Shared helpers for benchmark scripts: environment facts and the results CSV schema.

Every benchmark appends rows to ``benchmarks/results/<benchmark>.csv`` with the columns of
``COLUMNS`` (one measured figure a row; see DESIGN.md, "Checks").
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ["date", "commit", "device", "torch", "triton", "benchmark", "variant", "shape",
           "metric", "value", "unit"]


def git_commit() -> str:
    """Short commit of the checkout, with ``+dirty`` when it has uncommitted changes.

    ``benchmarks/results/`` does not count: every run appends to it, so a series of runs
    from one clean commit would otherwise mark all rows but the first as dirty.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# The checkout as the benchmark started: the code that ran. Read at import, so an edit made
# while a long run goes on does not mark its rows dirty (nor a dirty start clean).
COMMIT_AT_START = git_commit()


def device_name(device: torch.device) -> str:
    """The card as torch names it, or ``cpu:<model> x<cores>``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{model} x{os.cpu_count()}"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


def shape_key(**dims) -> str:
    """A short key=value list, e.g. ``B=256 K=3000``."""
    return " ".join(f"{k}={v}" for k, v in dims.items())


class ResultWriter:
    """Collects rows for one benchmark and appends them to its CSV."""

    def __init__(self, benchmark: str, device: torch.device):
        self.benchmark = benchmark
        self.common = {
            "date": _dt.date.today().isoformat(),
            "commit": COMMIT_AT_START,
            "device": device_name(device),
            "torch": torch.__version__,
            "triton": triton_version(),
            "benchmark": benchmark,
        }
        self.rows = []

    def add(self, variant: str, shape: str, metric: str, value: float, unit: str) -> None:
        self.rows.append({**self.common, "variant": variant, "shape": shape, "metric": metric,
                          "value": f"{value:.6g}", "unit": unit})

    def write(self, path: Path | None = None) -> Path:
        path = path or RESULTS_DIR / f"{self.benchmark}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(self.rows)
        return path


def run_then_exit(main) -> None:
    """Run ``main`` (returning an exit code or None), then leave at once with ``os._exit``:
    rows are written (each CSV append closes its file), output is flushed, and interpreter
    shutdown, where torch 2.11 could wait minutes for inductor's compile workers, is skipped.
    argparse's SystemExit passes through (nothing was compiled yet)."""
    import sys
    import traceback

    try:
        exit_code = main() or 0
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - reported, then the same quick exit
        traceback.print_exc()
        exit_code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
