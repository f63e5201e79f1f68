"""The CPU demo as `make demo` runs it, measured: kNN top-1 before and after, and its time.

    python benchmarks/bench_demo.py --data cifar10-jpeg.zip      # or download:cifar10
    python benchmarks/bench_demo.py --data cifar10-jpeg.zip --arch timm/regnetx_002:output_stride=8
    python benchmarks/bench_demo.py --data cifar10-jpeg.zip --set epsilon=0.05 --set zero_init_residual=false

Runs ``fastswav.train`` with the demo preset (the README's figure) in a fresh output folder
and appends rows to ``benchmarks/results/demo.csv``: ``knn_init_top1`` and
``knn_trained_top1`` (%), ``train_seconds`` (the run's own clock, first step to the last
checkpoint), ``wall_seconds`` (the whole call: data, kNN before and after, the picture),
``trunk_parameters``, the mean loss of the first and of the last epoch (``loss_first_epoch``,
``loss_last_epoch``) and the 1-minute load average before and after the run, which says how
busy the machine was. ``--set FIELD=VALUE`` (repeatable) changes a field of the recipe, as
``python -m fastswav.train --FIELD=VALUE`` would; the variant column names the changes
(docs/demo.md's recipe study).
Record from a clean commit (the commit column says ``+dirty`` otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultWriter, shape_key  # noqa: E402


def _epoch_losses(log_path: Path) -> list[float]:
    """The epoch-mean losses the run logged, in order."""
    losses = []
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "epoch":
            losses.append(float(record["loss"]))
    if not losses:
        raise SystemExit(f"error: no epoch record in {log_path}")
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="download:cifar10",
                        help="CIFAR-10 as `make demo` reads it (default download:cifar10)")
    parser.add_argument("--arch", default=None,
                        help="another trunk in the demo's recipe (docs/own_data.md's table)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of the demo recipe (repeatable), e.g. epsilon=0.05")
    parser.add_argument("--output", default=None, help="CSV (default benchmarks/results/demo.csv)")
    args = parser.parse_args()

    import fastswav
    from fastswav.config import parse_value, preset
    from fastswav.model import load_trunk_from_checkpoint

    changes = {}
    for item in args.set:
        name, eq, text = item.partition("=")
        if not eq:
            parser.error(f"--set {item!r}: give FIELD=VALUE")
        name = name.replace("-", "_")
        try:
            changes[name] = parse_value(name, text)
        except ValueError as exc:
            parser.error(f"--set {item!r}: {exc}")
    try:
        cfg = preset("demo").replace(**changes)
    except (TypeError, ValueError) as exc:
        parser.error(f"--set: {exc}")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        fields = dict(changes, arch=args.arch) if args.arch else dict(changes)
        summary = fastswav.train(data=args.data, preset="demo", output_dir=out, resume=False,
                                 **fields)
        wall = time.perf_counter() - start
        run_dir = Path(summary["run_dir"])
        epoch_losses = _epoch_losses(run_dir / "log.jsonl")
        last_checkpoint = sorted(run_dir.glob("checkpoint_epoch[0-9][0-9][0-9][0-9].pt"))[-1]
        trunk, _ = load_trunk_from_checkpoint(last_checkpoint)
        trunk_parameters = sum(p.numel() for p in trunk.parameters())
    load_after = os.getloadavg()[0]
    shape = shape_key(steps=cfg.epochs * cfg.steps_per_epoch, seed=cfg.seed,
                      knn_test=cfg.knn_max_test, data=Path(args.data).name,
                      threads=torch.get_num_threads())
    variant = " ".join([args.arch or "demo"] + args.set)
    writer = ResultWriter("demo", torch.device("cpu"))
    writer.add(variant, shape, "knn_init_top1", summary["knn_init"], "%")
    writer.add(variant, shape, "knn_trained_top1", summary["knn_trained"], "%")
    writer.add(variant, shape, "train_seconds", summary["train_seconds"], "s")
    writer.add(variant, shape, "wall_seconds", wall, "s")
    writer.add(variant, shape, "trunk_parameters", trunk_parameters, "")
    writer.add(variant, shape, "loss_first_epoch", epoch_losses[0], "")
    writer.add(variant, shape, "loss_last_epoch", epoch_losses[-1], "")
    writer.add(variant, shape, "load_avg_1min_before", load_before, "")
    writer.add(variant, shape, "load_avg_1min_after", load_after, "")
    path = writer.write(Path(args.output) if args.output else None)
    print(f"kNN top-1 {summary['knn_init']:.2f}% -> {summary['knn_trained']:.2f}% in "
          f"{wall:.0f} s (train {summary['train_seconds']:.0f} s; load {load_before:.1f} -> "
          f"{load_after:.1f}); rows in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
