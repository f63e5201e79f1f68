"""Multi-crop data path: the reference PIL recipe vs decode once, crop many.

    python benchmarks/bench_data.py                  # CUDA if present, else the CPU
    python benchmarks/bench_data.py --quick          # small CPU smoke run (still writes rows)
    python benchmarks/bench_data.py --zip PATH --device cpu --dry-run

Measured on real full-resolution JPEGs read from a zip (no unpacking), one CPU thread:
- ``reference_pil``: decode + :class:`MultiCropTransform` (2x224 + 6x96, the official
  recipe), full multi-crop sets per second per core.
- ``decode_once``: the CPU stage of decode once, crop many: decode each JPEG once (PIL's
  JPEG draft mode decodes at a reduced DCT scale when the canvas is small enough), resize to
  fit a ``--canvas`` square canvas, keep the original size. Sets per second per core of that
  stage (the crops are cut on the device); ``speedup_vs_reference_pil`` its ratio.
- The batched augmentation of ``--batch`` canvases into 2x224 + 6x96 on the device:
  ``gpu_augment_ms`` (CUDA events) on a GPU, ``cpu_augment_ms`` (perf_counter, the set
  thread count) on the CPU; and the CPU demo's case, 128 CIFAR-sized 32x32 images into
  2x32 + 4x16 (blur off, jitter strength 0.5), ``augment_ms``.
Rows go to benchmarks/results/bench_data.csv.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultWriter, shape_key

from fastswav.data.batched_multicrop import BatchedMultiCrop
from fastswav.data.multicrop import CIFAR10_MEAN, CIFAR10_STD, MultiCropTransform

DEFAULT_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-jpeg.zip"
RECIPE = dict(size_crops=(224, 96), n_crops=(2, 6), min_scale=(0.14, 0.05),
              max_scale=(1.0, 0.14))


def read_jpegs(path: Path, count: int) -> list:
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))[:count]
        return [archive.read(name) for name in names]


def reference_sets_per_s(files: list, repeats: int) -> float:
    transform = MultiCropTransform(**RECIPE, blur_prob=0.5)
    torch.manual_seed(0)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in files:
            transform(Image.open(io.BytesIO(data)).convert("RGB"))
        rates.append(len(files) / (time.perf_counter() - start))
    return statistics.median(rates)


def decode_to_canvas(data: bytes, canvas: int):
    """JPEG bytes -> (uint8 [3, h, w] fitting in canvas x canvas, (original h, w))."""
    image = Image.open(io.BytesIO(data))
    original = (image.height, image.width)
    image.draft("RGB", (canvas, canvas))  # DCT-domain downscale: decode only what is needed
    image = image.convert("RGB")
    scale = canvas / max(image.width, image.height)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1), original


def decode_once_sets_per_s(files: list, canvas: int, repeats: int):
    rates, decoded = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        decoded = [decode_to_canvas(data, canvas) for data in files]
        rates.append(len(files) / (time.perf_counter() - start))
    return statistics.median(rates), decoded


def pack(decoded: list, batch: int, canvas: int, device: torch.device):
    """The first ``batch`` decoded images (cycled) as a canvas batch, valid and original sizes."""
    images = torch.zeros(batch, 3, canvas, canvas, dtype=torch.uint8)
    valid = torch.zeros(batch, 2, dtype=torch.long)
    original = torch.zeros(batch, 2, dtype=torch.long)
    for k in range(batch):
        image, size = decoded[k % len(decoded)]
        images[k, :, :image.shape[1], :image.shape[2]] = image
        valid[k] = torch.tensor(image.shape[1:])
        original[k] = torch.tensor(size)
    return images.to(device), valid.to(device), original.to(device)


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds per call (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help="zip of JPEGs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: per core)")
    parser.add_argument("--images", type=int, default=200, help="JPEGs for the CPU figures")
    parser.add_argument("--batch", type=int, default=256, help="canvases per augmented batch")
    parser.add_argument("--canvas", type=int, default=320, help="decode-once canvas side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="small run for the CPU: 24 JPEGs, batch 16, 2 repeats")
    parser.add_argument("--dry-run", action="store_true", help="print, write no CSV rows")
    args = parser.parse_args(argv)
    if not args.zip.is_file():
        parser.error(f"zip of JPEGs not found: {args.zip} (pass --zip PATH)")
    if args.quick:
        args.images, args.batch, args.repeats = min(args.images, 24), min(args.batch, 16), 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    writer = ResultWriter("bench_data", device)
    cpu_writer = writer if device.type == "cpu" else ResultWriter("bench_data",
                                                                  torch.device("cpu"))

    files = read_jpegs(args.zip, args.images)
    jpeg_shape = shape_key(images=len(files), crops="2x224+6x96", threads=args.threads)
    ref_rate = reference_sets_per_s(files, max(1, args.repeats // 2))
    cpu_writer.add("reference_pil", jpeg_shape, "sets_per_s_per_core", ref_rate / args.threads,
                   "sets/s")
    once_rate, decoded = decode_once_sets_per_s(files, args.canvas, max(1, args.repeats // 2))
    once_shape = shape_key(images=len(files), canvas=args.canvas, stage="decode+canvas",
                           threads=args.threads)
    cpu_writer.add("decode_once", once_shape, "sets_per_s_per_core", once_rate / args.threads,
                   "sets/s")
    cpu_writer.add("decode_once", once_shape, "speedup_vs_reference_pil", once_rate / ref_rate,
                   "x")

    images, valid, original = pack(decoded, args.batch, args.canvas, device)
    augment = BatchedMultiCrop(**RECIPE, blur_prob=0.5,
                               out_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                               channels_last=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    augment_ms = time_ms(lambda: augment(images, generator, valid_sizes=valid,
                                         original_sizes=original), device, args.repeats)
    metric = "gpu_augment_ms" if device.type == "cuda" else "cpu_augment_ms"
    writer.add("decode_once", shape_key(B=args.batch, canvas=args.canvas, crops="2x224+6x96"),
               metric, augment_ms, "ms")

    cifar = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)).to(device)
    cifar_augment = BatchedMultiCrop((32, 16), (2, 4), (0.14, 0.05), (1.0, 0.14), blur_prob=0,
                                     jitter_strength=0.5, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    cifar_ms = time_ms(lambda: cifar_augment(cifar, generator), device, max(args.repeats, 5))
    writer.add("decode_once", shape_key(B=128, image=32, crops="2x32+4x16", blur=0, jitter=0.5,
                                        threads=args.threads), "augment_ms", cifar_ms, "ms")

    print(f"{'variant':<14} {'metric':<26} {'value':>10}  shape")
    for row in cpu_writer.rows + (writer.rows if writer is not cpu_writer else []):
        print(f"{row['variant']:<14} {row['metric']:<26} {row['value']:>10}  {row['shape']}"
              f"  [{row['device']}]")
    if not args.dry_run:
        print("wrote", cpu_writer.write())
        if writer is not cpu_writer:
            writer.write()


if __name__ == "__main__":
    main()
