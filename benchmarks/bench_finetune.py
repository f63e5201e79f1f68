"""Fine-tuning with a share of the labels from a pretrained checkpoint against the same run
from a randomly initialised trunk of the same architecture.

    python -m fastswav.train --output-dir runs/demo            # the demo's checkpoint
    python benchmarks/bench_finetune.py --checkpoint runs/demo \\
        --data cifar10-jpeg.zip --labels-percent 10 --epochs 3

Both runs share every setting (subset, seed, recipe, test images); only the trunk's starting
weights differ: the checkpoint's, or the fresh initialisation ``fastswav.model.build_model``
gives the checkpoint's config (seeded). Rows go to benchmarks/results/bench_finetune.csv:
best top-1 and top-5 of each run, and the pretrained run's top-1 gain in points.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultWriter, shape_key  # noqa: E402

from fastswav.checkpoint import save_checkpoint  # noqa: E402
from fastswav.embed import resolve_checkpoint  # noqa: E402
from fastswav.eval.finetune import finetune  # noqa: E402
from fastswav.model import build_model  # noqa: E402
from fastswav.official import read_pretrained  # noqa: E402


def random_trunk_checkpoint(pretrained_path: Path, folder: Path, seed: int) -> Path:
    """A fastswav checkpoint of the same config as ``pretrained_path``, freshly initialised."""
    cfg = read_pretrained(pretrained_path).config
    torch.manual_seed(seed)
    model = build_model(cfg)
    return save_checkpoint({"epoch": 0, "model": model.state_dict(), "optimizer": {},
                            "config": cfg.to_dict()}, folder / "checkpoint_epoch0000.pt")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="pretrained checkpoint or run folder")
    parser.add_argument("--data", required=True, help="labelled data (as fastswav.eval.finetune)")
    parser.add_argument("--labels-percent", type=float, default=10.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--decay-epochs", default="2", help="comma-separated (default: 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--output-dir", default=None,
                        help="where the two runs' folders go (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    decay = tuple(int(e) for e in args.decay_epochs.split(",") if e)
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="bench_finetune_"))
    out.mkdir(parents=True, exist_ok=True)
    arch = read_pretrained(checkpoint).config
    shape = shape_key(data=Path(args.data).name, labels=f"{args.labels_percent:g}%",
                      epochs=args.epochs, batch=args.batch_size, test=args.max_test,
                      arch=f"{arch.arch}w{arch.trunk_width or 64}", seed=args.seed,
                      threads=torch.get_num_threads())
    writer = ResultWriter("bench_finetune", torch.device("cpu"))
    starts = {"pretrained": checkpoint,
              "random_trunk": random_trunk_checkpoint(checkpoint, out, args.seed)}
    best = {}
    for variant, start in starts.items():
        tick = time.time()
        result = finetune(start, args.data, args.labels_percent, output_dir=str(out / variant),
                          epochs=args.epochs, decay_epochs=decay, batch_size=args.batch_size,
                          max_test=args.max_test, seed=args.seed, workers=args.workers,
                          device="cpu", resume=False)
        best[variant] = result["best_top1"]
        writer.add(variant, shape, "best_top1", result["best_top1"], "%")
        writer.add(variant, shape, "best_top5", result["best_top5"], "%")
        writer.add(variant, shape, "run_seconds", time.time() - tick, "s")
        print(f"{variant:13s} best top-1 {result['best_top1']:.2f}%  top-5 "
              f"{result['best_top5']:.2f}%  ({time.time() - tick:.0f} s; {start})", flush=True)
    gain = best["pretrained"] - best["random_trunk"]
    writer.add("pretrained", shape, "top1_gain_vs_random_trunk", gain, "points")
    print(f"pretrained - random trunk: {gain:+.2f} points of top-1")
    if not args.no_write:
        print(f"rows appended to {writer.write()}")


if __name__ == "__main__":
    main()
