"""Pictures of a training run from its ``log.jsonl``.

``python -m fastswav.plot RUN_DIR`` writes, into RUN_DIR (or ``--output``):

- ``loss.png``: the loss of each logged step, and each epoch's mean at the epoch's end;
- ``lr.png``: the learning rate of each logged step;
- ``img_per_s.png``: training throughput (images per second, all processes together);
- ``knn.png``: kNN top-1 against the epoch it was measured after (0: at initialisation).

Step figures are drawn against wall-clock minutes since the run's first record
(``--x time``) or against the global iteration (``--x iteration``). A figure whose records
are absent from the log (no kNN evaluation, say) is not written. The log is the JSON-lines
file :mod:`fastswav.train` writes: ``{"event": "step", "epoch", "iteration", "loss", "lr",
"img_per_s", "time"}``, ``{"event": "epoch", "epoch", "loss", "time"}``,
``{"event": "knn", "epoch", "knn_top1", "time"}``; lines that are not JSON (a run killed
mid-write) are skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger("fastswav")

LOG_NAME = "log.jsonl"


class PlotError(Exception):
    """A missing dependency or log; the message is one line for the command line."""


def read_log(path) -> List[dict]:
    """The records of a JSON-lines log, skipping blank and unparsable lines."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: not JSON, skipped", path, number)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: Sequence[dict], event: str, key: str, x_key: str, t0: float):
    xs, ys = [], []
    for record in records:
        if record.get("event") != event or record.get(key) is None:
            continue
        if x_key == "time":
            if record.get("time") is None:
                continue
            x = (record["time"] - t0) / 60.0
        else:
            if record.get(x_key) is None:
                continue
            x = record[x_key]
        xs.append(x)
        ys.append(record[key])
    return xs, ys


def plot_run(run_dir, output_dir=None, x_axis: str = "time") -> Dict[str, Path]:
    """Write the run's PNGs; returns {figure name: path} of those written.

    Raises :class:`PlotError` when matplotlib is missing, the log is missing, or it holds
    nothing to plot.
    """
    if x_axis not in ("time", "iteration"):
        raise PlotError(f"x axis must be 'time' or 'iteration', got {x_axis!r}")
    run_dir = Path(run_dir)
    log_path = run_dir / LOG_NAME if run_dir.is_dir() else run_dir
    if not log_path.is_file():
        raise PlotError(f"no {LOG_NAME} in {run_dir} (is it a fastswav run folder?)")
    records = read_log(log_path)
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    if not records:
        raise PlotError(f"{log_path} holds no records")
    plt = _pyplot()
    output_dir = Path(output_dir) if output_dir else log_path.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    t0 = min(times) if times else 0.0
    x_label = "minutes since start" if x_axis == "time" else "iteration"
    written: Dict[str, Path] = {}

    def save(fig, name: str) -> None:
        path = output_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[name] = path

    step_x = "time" if x_axis == "time" else "iteration"
    for name, key, y_label in (("loss", "loss", "SwAV loss"), ("lr", "lr", "learning rate"),
                               ("img_per_s", "img_per_s", "images / s")):
        xs, ys = _series(records, "step", key, step_x, t0)
        epoch_xs, epoch_ys = [], []
        if name == "loss" and x_axis == "time":  # epoch records carry no iteration
            epoch_xs, epoch_ys = _series(records, "epoch", "loss", "time", t0)
        if not xs and not epoch_xs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        if xs:
            ax.plot(xs, ys, linewidth=1, label="logged step")
        if epoch_xs:
            ax.plot(epoch_xs, epoch_ys, "o-", markersize=4, label="epoch mean")
            ax.legend()
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.set_title(f"{y_label}: {run_dir.name}")
        save(fig, name)

    knn_epochs, knn_top1 = _series(records, "knn", "knn_top1", "epoch", t0)
    if knn_epochs:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(knn_epochs, knn_top1, "o-")
        for x, y in zip(knn_epochs, knn_top1):
            ax.annotate(f"{y:.1f}%", (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_xlabel("epoch (0: at initialisation)")
        ax.set_ylabel("kNN top-1 (%)")
        ax.grid(alpha=0.3)
        ax.set_title(f"kNN top-1: {run_dir.name}")
        save(fig, "knn")
    if not written:
        raise PlotError(f"{log_path} holds no step, epoch or kNN records to plot")
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastswav.plot",
        description=(
            "Draw a training run's log.jsonl as PNGs: loss.png (logged steps and epoch means), "
            "lr.png, img_per_s.png and knn.png (kNN top-1 per evaluated epoch). Figures "
            "without data in the log are skipped. Needs matplotlib."),
        epilog="Example: python -m fastswav.plot runs/demo --x iteration",
    )
    parser.add_argument("run_dir", help="run folder holding log.jsonl (or the log file itself)")
    parser.add_argument("--output", default=None,
                        help="folder for the PNGs (default: the run folder)")
    parser.add_argument("--x", dest="x_axis", default="time", choices=("time", "iteration"),
                        help="x axis of the step figures: wall-clock minutes (default) or "
                             "global iteration")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = plot_run(args.run_dir, args.output, args.x_axis)
    except (PlotError, OSError) as err:
        sys.exit(f"error: {err}")
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
