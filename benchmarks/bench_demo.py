"""The CPU demo as `make demo` runs it, measured: kNN top-1 before and after, and its time.

    python benchmarks/bench_demo.py --data cifar10-jpeg.zip      # or download:cifar10
    python benchmarks/bench_demo.py --data cifar10-jpeg.zip --arch timm/regnetx_002:output_stride=8

Runs ``fastswav.train`` with the demo preset (the README's figure) in a fresh output folder
and appends rows to ``benchmarks/results/demo.csv``: ``knn_init_top1`` and
``knn_trained_top1`` (%), ``train_seconds`` (the run's own clock, first step to the last
checkpoint), ``wall_seconds`` (the whole call: data, kNN before and after, the picture) and
the 1-minute load average before and after the run, which says how busy the machine was.
Record from a clean commit (the commit column says ``+dirty`` otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultWriter, shape_key  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="download:cifar10",
                        help="CIFAR-10 as `make demo` reads it (default download:cifar10)")
    parser.add_argument("--arch", default=None,
                        help="another trunk in the demo's recipe (docs/own_data.md's table)")
    parser.add_argument("--output", default=None, help="CSV (default benchmarks/results/demo.csv)")
    args = parser.parse_args()

    import fastswav
    from fastswav.config import preset

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        fields = {"arch": args.arch} if args.arch else {}
        summary = fastswav.train(data=args.data, preset="demo", output_dir=out, resume=False,
                                 **fields)
        wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    cfg = preset("demo")
    shape = shape_key(steps=cfg.epochs * cfg.steps_per_epoch, seed=cfg.seed,
                      knn_test=cfg.knn_max_test, data=Path(args.data).name,
                      threads=torch.get_num_threads())
    variant = args.arch or "demo"
    writer = ResultWriter("demo", torch.device("cpu"))
    writer.add(variant, shape, "knn_init_top1", summary["knn_init"], "%")
    writer.add(variant, shape, "knn_trained_top1", summary["knn_trained"], "%")
    writer.add(variant, shape, "train_seconds", summary["train_seconds"], "s")
    writer.add(variant, shape, "wall_seconds", wall, "s")
    writer.add(variant, shape, "load_avg_1min_before", load_before, "")
    writer.add(variant, shape, "load_avg_1min_after", load_after, "")
    path = writer.write(Path(args.output) if args.output else None)
    print(f"kNN top-1 {summary['knn_init']:.2f}% -> {summary['knn_trained']:.2f}% in "
          f"{wall:.0f} s (train {summary['train_seconds']:.0f} s; load {load_before:.1f} -> "
          f"{load_after:.1f}); rows in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
