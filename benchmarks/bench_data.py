"""Multi-crop data path: the reference PIL recipe vs FFCV per-view crops vs decode once.

    python benchmarks/bench_data.py --zip JPEGS.zip          # CUDA if present, else the CPU
    python benchmarks/bench_data.py --zip JPEGS.zip --quick  # small CPU smoke run (still writes rows)
    python benchmarks/bench_data.py --zip JPEGS.zip --device cpu --dry-run
    python benchmarks/bench_data.py --zip JPEGS.zip --grid benchmarks/results/crop_grid.png

Real full-resolution JPEGs read from a zip (no unpacking); full multi-crop sets (2x224 +
6x96, the official recipe) per second, with one worker (``sets_per_s_per_core``: per CPU
second of the benchmark process, so other processes on the machine lower it little) and with
``--cores`` workers (``sets_per_s_all_cores``: per wall-clock second):

- ``reference_pil``: decode each JPEG with PIL, then :class:`MultiCropTransform` (8 crops,
  flips, colour, blur on PIL images), as the official loader does in its workers
  (processes for the all-core figure).
- ``ffcv_per_view``: the ``--images`` JPEGs written to a .beton (``--max-resolution``,
  quality 90) and read by FFCV with one RandomResizedCrop decoder per crop (8 pipelines on
  one field: every crop decodes the image again), as multi-view FFCV forks do; crops only,
  no colour or blur; over half of the images (at least 50), as it is the slow one.
- ``decode_once``: the same .beton through :class:`FFCVMultiCropLoader`'s CPU stage: each
  JPEG decoded once into a uint8 canvas (``--canvas``, default the largest stored side);
  the crops are cut on the device. ``speedup_vs_reference_pil`` rows give the per-core ratios.
- ``decode_once_torchvision``: the same .beton through the same loader's CPU stage without
  FFCV (:class:`TorchvisionMultiCropLoader`: ``torchvision.io.decode_jpeg`` on threads),
  what training runs where ``ffcv`` does not import; ``speedup_vs_decode_once`` compares it
  with the FFCV stage of the same run.
- ``decode_once_pil``: a CPU stage with PIL alone (JPEG draft mode, resize to fit a
  ``--pil-canvas`` square), for comparison.
- ``train_loader``: the training loader exactly as ``python -m fastswav.train`` builds it
  (:func:`fastswav.train.build_data` on the .beton with ``--loader-preset``'s crops and its
  dtype on the device: decode, transfer, batched augmentation), ``--loader-batches`` batches
  of ``--batch`` after one untimed: ``images_per_s_per_process`` (wall clock) and
  ``images_per_s_per_core`` (per CPU second of the process). On a GPU also
  ``decode_gpu_torchvision``: the stored JPEGs decoded in batches by
  ``torchvision.io.decode_jpeg(..., device="cuda")`` (``images_per_s``, CUDA-synchronised).
- Batched augmentation of ``--batch`` canvases into 2x224 + 6x96: variant
  ``decode_once_gpu_augment``, metric ``gpu_augment_ms`` (CUDA events) on a GPU;
  ``decode_once_cpu_augment``, ``cpu_augment_ms`` (perf_counter, ``--threads`` threads) on
  the CPU. And the CPU demo's case: 128 CIFAR-sized images into 2x32 + 4x16, ``augment_ms``.

The .beton is written by FFCV's writer where ``ffcv`` imports, else without it. FFCV
variants are left out, with a note, where FFCV is not installed. ``--grid PNG`` draws
reference crops beside decode-once crops of the same images. Rows go to
benchmarks/results/bench_data.csv (not with ``--dry-run``).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultWriter, shape_key

from fastswav.data.batched_multicrop import BatchedMultiCrop
from fastswav.data.multicrop import (CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD,
                                     MultiCropTransform)

RECIPE = dict(size_crops=(224, 96), n_crops=(2, 6), min_scale=(0.14, 0.05),
              max_scale=(1.0, 0.14))
CROPS = "2x224+6x96"
# FFCV loaders live until exit: numba's finalizer of their compiled ctypes wrappers raises
# (and prints "Exception ignored ... KeyError") when one is collected mid-run.
_KEEP_ALIVE = []


def clock(workers: int):
    """The timer of a figure: CPU seconds of this process (all its threads) for one worker,
    so that a per-core figure means sets per second of one core even where other processes
    share the cores; wall-clock seconds for several workers."""
    return time.process_time if workers == 1 else time.perf_counter


def read_jpegs(path: Path, count: int) -> list:
    """The first ``count`` members of the zip (sorted by name), as bytes."""
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))[:count]
        return [archive.read(name) for name in names]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --- reference PIL ------------------------------------------------------------------------

_TRANSFORM = None


def _reference_worker_init():
    global _TRANSFORM
    torch.set_num_threads(1)
    _TRANSFORM = MultiCropTransform(**RECIPE, blur_prob=0.5)


def _reference_sets(files: list) -> int:
    for data in files:
        _TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB"))
    return len(files)


def reference_sets_per_s(files: list, repeats: int, workers: int = 1) -> float:
    """Sets/s of PIL decode + MultiCropTransform: in this process for one worker, else in
    ``workers`` processes (as DataLoader workers), each taking an equal share."""
    torch.manual_seed(0)
    if workers == 1:
        _reference_worker_init()
        rates, timer = [], clock(1)
        for _ in range(repeats):
            start = timer()
            _reference_sets(files)
            rates.append(len(files) / (timer() - start))
        return statistics.median(rates)
    shares = [files[w::workers] for w in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers, _reference_worker_init) as pool:
        pool.map(_reference_sets, [share[:2] for share in shares])  # warm the workers
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            done = sum(pool.map(_reference_sets, shares))
            rates.append(done / (time.perf_counter() - start))
    return statistics.median(rates)


# --- decode once without FFCV (PIL draft mode) --------------------------------------------

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


def decode_once_pil_sets_per_s(files: list, canvas: int, repeats: int):
    rates, decoded, timer = [], None, clock(1)
    for _ in range(repeats):
        start = timer()
        decoded = [decode_to_canvas(data, canvas) for data in files]
        rates.append(len(files) / (timer() - start))
    return statistics.median(rates), decoded


def pack(decoded: list, batch: int, canvas: int):
    """The first ``batch`` PIL-decoded images (cycled) as (canvases, valid, original)."""
    images = torch.zeros(batch, 3, canvas, canvas, dtype=torch.uint8)
    valid = torch.zeros(batch, 2, dtype=torch.long)
    original = torch.zeros(batch, 2, dtype=torch.long)
    for k in range(batch):
        image, size = decoded[k % len(decoded)]
        images[k, :, :image.shape[1], :image.shape[2]] = image
        valid[k] = torch.tensor(image.shape[1:])
        original[k] = torch.tensor(size)
    return images, valid, original


# --- FFCV -----------------------------------------------------------------------------------

def write_sample_beton(zip_path: Path, count: int, out: str, max_resolution: int,
                       use_ffcv: bool) -> None:
    from fastswav.data.sources import open_source
    from fastswav.data.write import write_beton

    source = open_source(str(zip_path))
    write_beton(source, out, max_resolution=max_resolution, jpeg_quality=90,
                workers=available_cores(), indices=range(min(count, len(source))),
                use_ffcv=use_ffcv)


def _epochs_per_s(run_epoch, images: int, repeats: int, timer, warm: bool = True) -> float:
    """Median sets/s over ``repeats`` epochs, after one untimed epoch when ``warm`` (numba
    compiles the pipeline on its first batch)."""
    if warm:
        run_epoch()
    rates = []
    for _ in range(repeats):
        start = timer()
        done = run_epoch()
        rates.append(done / (timer() - start))
    assert done == images, (done, images)
    return statistics.median(rates)


def _ffcv_rates(ffcv_loader, run_epoch, images: int, cores: int, repeats: int) -> dict:
    """{workers: sets/s} for 1 and ``cores`` decode threads of one FFCV loader built with
    ``cores`` workers (numba compiles a pipeline once, in ~10 s: the thread count is set
    per epoch, so the same compiled code serves both)."""
    rates = {}
    for workers in sorted({1, cores}):
        ffcv_loader.num_workers = workers  # FFCV sets numba's threads from it every epoch
        rates[workers] = _epochs_per_s(run_epoch, images, repeats, clock(workers),
                                       warm=not rates)
    return rates


def per_view_rates(beton: str, images: int, cores: int, repeats: int) -> dict:
    """FFCV, one RandomResizedCrop decoder per crop (each decodes the JPEG again), over the
    first ``images`` of the file."""
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToTensor

    from fastswav.data.beton import FIELDS, IMAGE

    pipelines = {name: None for name in FIELDS}
    view = 0
    for size, count, low, high in zip(*RECIPE.values()):
        for _ in range(count):
            decoder = RandomResizedCropRGBImageDecoder((size, size), scale=(low, high))
            pipelines[f"view{view}"] = PipelineSpec(IMAGE, decoder=decoder,
                                                    transforms=[ToTensor()])
            view += 1
    threads = torch.get_num_threads()
    loader = Loader(beton, batch_size=50, num_workers=cores, order=OrderOption.RANDOM,
                    pipelines=pipelines, drop_last=False, seed=0,
                    indices=np.arange(images, dtype=np.uint64))
    _KEEP_ALIVE.append(loader)

    def run_epoch():
        done = sum(views[0].shape[0] for views in loader)
        torch.set_num_threads(threads)  # FFCV sets torch's thread count to its workers'
        return done

    return _ffcv_rates(loader, run_epoch, images, cores, repeats)


def decode_once_loader(beton: str, workers: int, canvas, batch: int = 50):
    from fastswav.data.ffcv_loader import FFCVMultiCropLoader

    augment = BatchedMultiCrop(**RECIPE)  # not used by canvases()
    loader = FFCVMultiCropLoader(beton, augment, batch_size=batch, canvas=canvas,
                                 num_workers=workers, drop_last=False)
    _KEEP_ALIVE.append(loader)
    return loader


def decode_once_rates(loader, images: int, cores: int, repeats: int) -> dict:
    """The CPU stage of decode once (FFCVMultiCropLoader.canvases), 1 and ``cores`` threads."""
    def run_epoch():
        return sum(batch.shape[0] for batch, *_ in loader.canvases())

    return _ffcv_rates(loader._loader, run_epoch, images, cores, repeats)


def torchvision_rates(beton: str, images: int, cores: int, repeats: int, canvas) -> tuple:
    """The CPU stage of decode once without FFCV, 1 and ``cores`` decode threads:
    ({workers: sets/s}, canvas side)."""
    from fastswav.data.decode_once import TorchvisionMultiCropLoader

    rates = {}
    for workers in sorted({1, cores}):
        loader = TorchvisionMultiCropLoader(beton, BatchedMultiCrop(**RECIPE), batch_size=50,
                                            canvas=canvas, num_workers=workers,
                                            drop_last=False)

        def run_epoch():
            return sum(batch.shape[0] for batch, *_ in loader.canvases())

        rates[workers] = _epochs_per_s(run_epoch, images, repeats, clock(workers))
        loader.close()
    return rates, loader.canvas


def train_loader_rates(beton: str, preset_name: str, batch: int, batches: int,
                       device: torch.device) -> dict:
    """The training loader as the trainer builds it: images/s per process (wall clock) and
    per CPU second of this process, over ``batches`` batches after one untimed."""
    from fastswav.config import preset
    from fastswav.distributed import DistInfo
    from fastswav.train import build_data

    cfg = preset(preset_name).replace(data=beton, batch_size=batch, grad_accum=1)
    _, loader = build_data(cfg, DistInfo(), device)
    _KEEP_ALIVE.append(loader)
    loader.set_epoch(0)
    if len(loader) < batches + 1:
        raise SystemExit(f"error: --loader-batches {batches} + 1 batches of {batch} need "
                         f"{(batches + 1) * batch} images, the sample has {len(loader) * batch}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    iterator = iter(loader)
    crops, _ = next(iterator)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        crops, _ = next(iterator)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    iterator.close()
    return {"per_process": batches * batch / wall, "per_core": batches * batch / cpu,
            "stage": type(loader).__name__, "dtype": str(crops[0].dtype).replace("torch.", ""),
            "workers": loader.num_workers}


def gpu_decode_rate(beton: str, batch: int, repeats: int) -> float:
    """Images/s of torchvision's batched GPU JPEG decode of the stored JPEGs."""
    from torchvision.io import decode_jpeg

    from fastswav.data.beton import BetonSource

    source = BetonSource(beton)
    data = [torch.frombuffer(bytearray(source._read_bytes(i)), dtype=torch.uint8)
            for i in range(len(source))]
    data = [data[k % len(data)] for k in range(batch)]
    decode_jpeg(data, device="cuda")  # warm-up: nvjpeg's handles
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode_jpeg(data, device="cuda")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def ffcv_canvases(loader):
    """Every image of the loader's .beton as decode-once canvases, in file order:
    (uint8 [n, 3, C, C], valid sizes [n, 2], original sizes [n, 2])."""
    images, valid, original, order = [], [], [], []
    for batch, batch_valid, batch_original, index in loader.canvases():
        images.append(batch.clone())  # FFCV reuses its buffers
        valid.append(batch_valid)
        original.append(batch_original)
        order.append(index)
    rank = torch.cat(order).argsort()
    return torch.cat(images)[rank], torch.cat(valid)[rank], torch.cat(original)[rank]


def cycle(tensors, batch: int):
    """The first ``batch`` rows of each tensor, cycling when there are fewer."""
    repeat = -(-batch // tensors[0].shape[0])
    return [t.repeat(repeat, *[1] * (t.dim() - 1))[:batch] for t in tensors]


# --- timing ---------------------------------------------------------------------------------

def time_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds per call (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
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


# --- crop grid ------------------------------------------------------------------------------

def crop_grid(path: Path, files: list, canvases, count: int = 4) -> Path:
    """PNG: for each of the first ``count`` images, its reference crops (PIL) on one row and
    its decode-once crops (``canvases``: uint8 [n, 3, C, C], valid and original sizes of the
    same images, and what made them) on the next."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, valid, original, how = canvases
    count = min(count, len(files), images.shape[0])
    torch.manual_seed(1)
    reference = MultiCropTransform(**RECIPE, blur_prob=0.5)
    augment = BatchedMultiCrop(**RECIPE, blur_prob=0.5)
    crops = augment(images[:count], torch.Generator().manual_seed(1),
                    valid_sizes=valid[:count], original_sizes=original[:count])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def show(axis, tensor):
        axis.imshow((tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        axis.set_xticks([])
        axis.set_yticks([])

    n_crops = len(crops)
    fig, axes = plt.subplots(2 * count, n_crops + 1, figsize=(1.6 * (n_crops + 1), 3.4 * count),
                             gridspec_kw={"width_ratios": [1.6] + [1] * n_crops})
    for k in range(count):
        original_image = Image.open(io.BytesIO(files[k])).convert("RGB")
        vh, vw = valid[k].tolist()
        canvas = images[k, :, :vh, :vw].permute(1, 2, 0).numpy()
        for row, picture, label in (
                (2 * k, original_image, "reference (PIL)\nthe JPEG"),
                (2 * k + 1, canvas, f"decode once\n{how}\nits canvas")):
            axes[row, 0].imshow(picture)
            axes[row, 0].set_xticks([])
            axes[row, 0].set_yticks([])
            axes[row, 0].set_ylabel(label, fontsize=7)
        axes[2 * k, 0].set_title(f"{original_image.height}x{original_image.width}", fontsize=8)
        axes[2 * k + 1, 0].set_title(f"{vh}x{vw} of {images.shape[-1]}", fontsize=8)
        for c, crop in enumerate(reference(original_image)):
            show(axes[2 * k, c + 1], crop)
        for c in range(n_crops):
            show(axes[2 * k + 1, c + 1], crops[c][k])
    for c, size in enumerate(augment.crop_sizes):
        axes[0, c + 1].set_title(f"crop {c}: {size}", fontsize=8)
    fig.suptitle("SwAV multi-crop, 2x224 + 6x96: reference PIL crops (odd rows) vs "
                 "decode-once batched crops (even rows); random boxes, same recipe", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=64)
    plt.close(fig)
    return path


# --- main -----------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, required=True,
                        help="zip of full-resolution JPEGs (e.g. an ImageNet sample)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the CPU augmentation (default: --cores)")
    parser.add_argument("--cores", type=int, default=available_cores(),
                        help="workers for the all-core figures (default: all cores)")
    parser.add_argument("--images", type=int, default=200, help="JPEGs for the CPU figures")
    parser.add_argument("--batch", type=int, default=None,
                        help="canvases per augmented batch (default 256 on CUDA, 16 on the CPU)")
    parser.add_argument("--canvas", type=int, default=None,
                        help="decode-once canvas side (default: the largest stored side)")
    parser.add_argument("--pil-canvas", type=int, default=320,
                        help="canvas side of the PIL decode-once stage")
    parser.add_argument("--max-resolution", type=int, default=512,
                        help="longer-side cap of the .beton written for the FFCV variants")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loader-preset", default="100ep_fast",
                        help="preset whose crops and dtype the train_loader rows use")
    parser.add_argument("--loader-batches", type=int, default=None,
                        help="timed batches of the train_loader rows (default 8 on CUDA, 2 "
                             "on the CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="small run for the CPU: 24 JPEGs, batch 16, 2 repeats")
    parser.add_argument("--dry-run", action="store_true", help="print, write no CSV rows")
    parser.add_argument("--grid", type=Path, default=None, metavar="PNG",
                        help="also draw reference vs decode-once crops of 4 images to PNG")
    args = parser.parse_args(argv)
    if not args.zip.is_file():
        parser.error(f"zip of JPEGs not found: {args.zip} (pass --zip PATH)")
    device = torch.device(args.device)
    if args.batch is None:
        args.batch = 256 if device.type == "cuda" else 16
    if args.quick:
        args.images, args.batch, args.repeats = min(args.images, 24), min(args.batch, 16), 2
    threads = args.threads or args.cores
    torch.set_num_threads(threads)
    writer = ResultWriter("bench_data", device)
    cpu_writer = writer if device.type == "cpu" else ResultWriter("bench_data",
                                                                  torch.device("cpu"))
    repeats = max(1, args.repeats // 2)
    files = read_jpegs(args.zip, args.images)
    n = len(files)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{n} JPEGs from {args.zip.name}, {args.cores} cores for the all-core figures, "
          f"load average {load:.2f} at start")

    def add_rates(variant, shape, rates):
        cpu_writer.add(variant, shape(1), "sets_per_s_per_core", rates[1], "sets/s")
        if args.cores > 1:
            cpu_writer.add(variant, shape(args.cores), "sets_per_s_all_cores",
                           rates[args.cores], "sets/s")
        return rates[1]

    ref_rate = add_rates(
        "reference_pil", lambda w: shape_key(images=n, crops=CROPS, workers=w),
        # All cores: one timed pass (plus the workers' warm-up), the slowest figure here.
        {w: reference_sets_per_s(files, repeats if w == 1 else 1, w)
         for w in sorted({1, args.cores})})

    pil_rate, decoded = decode_once_pil_sets_per_s(files, args.pil_canvas, repeats)
    pil_shape = shape_key(images=n, canvas=args.pil_canvas, stage="decode+canvas", workers=1)
    cpu_writer.add("decode_once_pil", pil_shape, "sets_per_s_per_core", pil_rate, "sets/s")
    cpu_writer.add("decode_once_pil", pil_shape, "speedup_vs_reference_pil",
                   pil_rate / ref_rate, "x")

    try:
        from fastswav.data.beton import import_ffcv

        import_ffcv()
        have_ffcv = True
    except ImportError as err:
        print(f"note: FFCV variants left out: {err}")
        have_ffcv = False

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        beton = os.path.join(tmp, "sample.beton")
        write_sample_beton(args.zip, n, beton, args.max_resolution, have_ffcv)
        res = f"max_res={args.max_resolution}"
        tv_rates, tv_side = torchvision_rates(beton, n, args.cores, repeats, args.canvas)
        tv_shape = lambda w: shape_key(images=n, canvas=tv_side, stage="decode+canvas",  # noqa: E731
                                       source=res, workers=w)
        tv_rate = add_rates("decode_once_torchvision", tv_shape, tv_rates)
        cpu_writer.add("decode_once_torchvision", tv_shape(1), "speedup_vs_reference_pil",
                       tv_rate / ref_rate, "x")
        if have_ffcv:
            # Per view is ~8x slower: half the images (at least 50) keep its run short.
            n_view = min(n, max(50, n // 2))
            view_shape = lambda w: shape_key(images=n_view, crops=CROPS,  # noqa: E731
                                             stage="decode+crop", source=res, workers=w)
            view_rate = add_rates("ffcv_per_view", view_shape,
                                  per_view_rates(beton, n_view, args.cores, repeats))
            cpu_writer.add("ffcv_per_view", view_shape(1), "speedup_vs_reference_pil",
                           view_rate / ref_rate, "x")
            loader = decode_once_loader(beton, args.cores, args.canvas)
            side = loader.canvas
            once_shape = lambda w: shape_key(images=n, canvas=side, stage="decode+canvas",
                                             source=res, workers=w)  # noqa: E731
            once_rate = add_rates("decode_once", once_shape,
                                  decode_once_rates(loader, n, args.cores, repeats))
            cpu_writer.add("decode_once", once_shape(1), "speedup_vs_reference_pil",
                           once_rate / ref_rate, "x")
            cpu_writer.add("decode_once_torchvision", tv_shape(1), "speedup_vs_decode_once",
                           tv_rate / once_rate, "x")
            all_canvases = ffcv_canvases(loader)
            stage = "ffcv"
        else:
            all_canvases = pack(decoded, len(decoded), args.pil_canvas)
            side, stage = args.pil_canvas, "pil"
        cuda = device.type == "cuda"
        loader_batches = args.loader_batches or (8 if cuda else 2)
        loader_batch = min(args.batch, n // (loader_batches + 1))  # the sample may be small
        real = train_loader_rates(beton, args.loader_preset, loader_batch, loader_batches,
                                  device)
        real_shape = shape_key(preset=args.loader_preset, B=loader_batch, stage=real["stage"],
                               dtype=real["dtype"], workers=real["workers"], source=res)
        writer.add("train_loader", real_shape, "images_per_s_per_process", real["per_process"],
                   "images/s")
        writer.add("train_loader", real_shape, "images_per_s_per_core", real["per_core"],
                   "images/s")
        if cuda:
            writer.add("decode_gpu_torchvision", shape_key(B=args.batch, source=res),
                       "images_per_s", gpu_decode_rate(beton, args.batch, args.repeats),
                       "images/s")
    canvases = (*all_canvases, f"({stage.upper()} {side})")
    images, valid, original = cycle(all_canvases, args.batch)

    # The batched augmentation of one batch of canvases, on the device.
    images, valid, original = images.to(device), valid.to(device), original.to(device)
    augment = BatchedMultiCrop(**RECIPE, blur_prob=0.5,
                               out_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                               channels_last=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    augment_ms = time_ms(lambda: augment(images, generator, valid_sizes=valid,
                                         original_sizes=original), device,
                         args.repeats if cuda else min(args.repeats, 2), warmup=2 if cuda else 1)
    augment_shape = shape_key(B=args.batch, canvas=side, decode=stage, crops=CROPS,
                              **({} if cuda else {"threads": threads}))
    if cuda:
        writer.add("decode_once_gpu_augment", augment_shape, "gpu_augment_ms", augment_ms, "ms")
    else:
        writer.add("decode_once_cpu_augment", augment_shape, "cpu_augment_ms", augment_ms, "ms")

    cifar = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)).to(device)
    cifar_augment = BatchedMultiCrop((32, 16), (2, 4), (0.14, 0.05), (1.0, 0.14), blur_prob=0,
                                     jitter_strength=0.5, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    cifar_ms = time_ms(lambda: cifar_augment(cifar, generator), device, max(args.repeats, 5))
    writer.add("decode_once", shape_key(B=128, image=32, crops="2x32+4x16", blur=0, jitter=0.5,
                                        threads=threads), "augment_ms", cifar_ms, "ms")

    if args.grid is not None:
        print("wrote", crop_grid(args.grid, files, canvases))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{'variant':<24} {'metric':<26} {'value':>10}  shape")
    for row in cpu_writer.rows + (writer.rows if writer is not cpu_writer else []):
        print(f"{row['variant']:<24} {row['metric']:<26} {row['value']:>10}  {row['shape']}"
              f"  [{row['device']}]")
    print(f"load average {load:.2f} at the end")
    if not args.dry_run:
        print("wrote", cpu_writer.write())
        if writer is not cpu_writer:
            writer.write()


if __name__ == "__main__":
    main()
