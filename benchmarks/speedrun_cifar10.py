"""CIFAR-10 speedrun: the ``cifar10_speedrun`` preset with the fused and the reference loss.

    python benchmarks/speedrun_cifar10.py                        # both paths, same seed
    python benchmarks/speedrun_cifar10.py --variants fused --epochs 5
    python benchmarks/speedrun_cifar10.py --cpu-smoke            # tiny CPU run, no CSV rows

Each variant trains the preset from scratch (same seed, same data) with
``FASTSWAV_BACKEND`` forcing its loss path, then measures kNN top-1 on the whole CIFAR-10
test set. Rows go to benchmarks/results/speedrun_cifar10.csv: variants ``fused`` and
``reference``; metrics ``knn_top1`` (%), ``knn_init`` (%), ``train_seconds`` (training
alone: data, steps, checkpoints; no evaluation) and ``first_step_seconds`` (includes
torch.compile's compilation).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    # The fused loss runs on the CPU only under Triton's interpreter, which must be chosen
    # before Triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, ResultWriter, shape_key

from fastswav.config import preset
from fastswav.data.sources import CIFAR10_DOWNLOAD
from fastswav.train import run

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data", default=CIFAR10_DOWNLOAD,
                        help="CIFAR-10: a zip of JPEGs, an image folder, or the default "
                             f"{CIFAR10_DOWNLOAD} (torchvision's copy, downloaded once)")
    parser.add_argument("--variants", default="fused,reference", help="comma-separated: fused, reference")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--out-dir", help="run folders (default: a temporary folder)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a few CPU steps of a tiny model to check the script; no CSV rows")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= {"fused", "reference"}:
        parser.error(f"--variants: expected fused and/or reference, got {args.variants}")
    if not os.path.exists(args.data):
        parser.error(f"data not found: {args.data}")

    cfg = preset("cifar10_speedrun").replace(data=args.data, seed=args.seed)
    if args.epochs:
        cfg = cfg.replace(epochs=args.epochs, warmup_epochs=min(cfg.warmup_epochs, args.epochs))
    if args.cpu_smoke:
        cfg = cfg.replace(device="cpu", epochs=1, steps_per_epoch=3, batch_size=16, trunk_width=8,
                          hidden_dim=32, out_dim=16, n_prototypes=20, warmup_epochs=0,
                          freeze_prototypes_niters=1, compile="none", knn_max_train=500,
                          knn_max_test=100, log_every=1)
    elif not torch.cuda.is_available():
        parser.error("the speedrun needs a CUDA device (use --cpu-smoke to check the script)")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    writer = ResultWriter("speedrun_cifar10", device)
    shape = shape_key(arch=cfg.arch, B=cfg.batch_size, epochs=cfg.epochs, crops="2x32+4x16",
                      K=cfg.n_prototypes, seed=cfg.seed)
    out_root = Path(args.out_dir or tempfile.mkdtemp(prefix="speedrun_"))
    results = {}
    for variant in variants:
        os.environ["FASTSWAV_BACKEND"] = variant
        summary = run(cfg.replace(output_dir=str(out_root / variant)), "cifar10_speedrun", resume=False)
        results[variant] = summary
        for metric, unit in (("knn_top1", "%"), ("knn_init", "%"), ("train_seconds", "s"),
                             ("first_step_seconds", "s")):
            key = "knn_trained" if metric == "knn_top1" else metric
            if summary.get(key) is not None:
                writer.add(variant, shape, metric, summary[key], unit)
    print(f"\n{'variant':<10} {'kNN init':>9} {'kNN trained':>12} {'train s':>9}")
    for variant, s in results.items():
        print(f"{variant:<10} {s['knn_init'] or float('nan'):>8.2f}% {s['knn_trained'] or float('nan'):>11.2f}% "
              f"{s['train_seconds']:>9.1f}")
    if len(results) == 2:
        gap = results["fused"]["knn_trained"] - results["reference"]["knn_trained"]
        print(f"fused - reference: {gap:+.2f} kNN points")
        writer.add("fused", shape, "knn_gap_vs_reference", gap, "points")
    if args.cpu_smoke:
        print("(cpu smoke run: no rows written)")
    else:
        writer.write(RESULTS_DIR / "speedrun_cifar10.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
