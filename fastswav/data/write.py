"""Write an image folder or a zip of images to an FFCV .beton for the decode-once loader.

    python -m fastswav.data.write /data/imagenet /data/imagenet_train.beton --split train
    python -m fastswav.data.write imagenet-sample-jpeg.zip sample.beton

SRC is anything :func:`fastswav.data.sources.open_source` reads: an ImageNet-style folder
(``class/xxx.JPEG``, optionally under ``train/`` and ``val/``), or a zip of the same layouts
(or a flat zip named ``<class>_<name>.JPEG``). Each readable image is decoded (grayscale,
CMYK, palette and alpha images come out as RGB; PNG and the other formats PIL reads too),
its longer side capped at ``--max-resolution``, re-encoded as a JPEG of ``--jpeg-quality``,
and stored with its label and its size before the cap (see :mod:`fastswav.data.beton` for
the fields). Unreadable images are skipped and named in one log line. The work is spread
over ``--workers`` processes, with a progress bar; the file appears at OUT only when
complete, and not at all when the first images show it would not fit on the disk.

FFCV's writer (OpenCV's area resize and JPEG encoder) runs where ``ffcv`` imports; elsewhere
the file is written in the same format without it (Pillow's box filter and its
libjpeg-turbo encoder, the same quality): FFCV and both decode-once host stages read either.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from ..cli import UsageParser
from .beton import (FIELDS, IMAGE, INSTALL_HINT, LABEL, ORIG_HEIGHT, ORIG_WIDTH, BetonFile,
                    BetonWriter, FFCVUnavailableError, drop_rows, import_ffcv)
from .sources import KINDS, SPLITS, ImageSource, open_source

log = logging.getLogger("fastswav")

DEFAULT_MAX_RESOLUTION = 512
DEFAULT_JPEG_QUALITY = 90
# cv2's JPEG encoder refuses sides over 65500 (and FFCV stores sizes as uint16).
LARGEST_SIDE = 65500
NAMES_LOGGED = 50  # unreadable images named in the log line (then "and N more")
SIZE_PROBE_IMAGES = 32  # images encoded up front to estimate the file's size


@dataclass
class WriteResult:
    """What :func:`write_beton` wrote: ``written`` images at ``path``, and the names of the
    source images it skipped as unreadable."""

    path: str
    written: int
    skipped: List[str] = field(default_factory=list)


def page_size_for(max_resolution: int) -> int:
    """FFCV page size (a power of two) that holds any one capped image: its writer cannot
    split a sample over pages. A JPEG stays under 4 bytes a pixel even on noise."""
    side = max_resolution or 5792  # uncapped: room for ~33 megapixels (128 MiB pages)
    need = 4 * side * side
    size = 8 << 20
    while size < need:
        size <<= 1
    return size


def capped_size(height: int, width: int, max_resolution: int):
    """(h, w) after FFCV's cap (longer side to ``max_resolution``, sizes truncated)."""
    ratio = max_resolution / max(height, width) if max_resolution else 1.0
    if ratio >= 1:
        return height, width
    return int(ratio * height), int(ratio * width)


class _Samples:
    """``samples[i] -> (RGB uint8 (H, W, 3), label, original height, original width)``, what
    FFCV's writer workers encode. An image that cannot be read becomes a 1x1 placeholder with
    original size 0 x 0 (a worker that raised would stall FFCV's writer), which
    :func:`write_beton` finds and removes afterwards."""

    def __init__(self, source: ImageSource, max_resolution: int, page_size: int):
        self.source = source
        self.max_resolution = max_resolution
        self.page_size = page_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        i = int(i)
        try:
            image = self.source.decode(i)
            height, width = image.shape[:2]
            stored = capped_size(height, width, self.max_resolution)
            if max(stored) > LARGEST_SIDE or 4 * stored[0] * stored[1] > self.page_size:
                raise ValueError(f"{height}x{width} is too large to store uncapped; "
                                 f"pass --max-resolution")
            return image, int(self.source.labels[i]), height, width
        except Exception as err:  # anything: a raising worker would hang FFCV's writer
            # The reason, at debug level: write_beton reports all skipped images in one line.
            log.debug("skipping unreadable image %s (%s: %s)", self.source.name(i),
                      type(err).__name__, err)
            return np.zeros((1, 1, 3), dtype=np.uint8), -1, 0, 0


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class NotEnoughSpaceError(ValueError):
    """The .beton would not fit in the free space of its folder."""


def encode_jpeg(image: np.ndarray, max_resolution: int, quality: int) -> bytes:
    """RGB uint8 (H, W, 3) -> JPEG bytes, the longer side capped as FFCV's writer caps it
    (:func:`capped_size`, area filter)."""
    from PIL import Image

    picture = Image.fromarray(image)
    height, width = capped_size(image.shape[0], image.shape[1], max_resolution)
    if (height, width) != image.shape[:2]:
        picture = picture.resize((width, height), Image.BOX)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _encoded(samples: "_Samples", quality: int, i: int):
    """(JPEG bytes, stored h, w, label, original h, w) of image i; bytes None if unreadable."""
    image, label, height, width = samples[i]
    if height == 0:
        return None, 0, 0, label, 0, 0
    stored = capped_size(height, width, samples.max_resolution)
    return encode_jpeg(image, samples.max_resolution, quality), *stored, label, height, width


_WORKER_JOB = None  # (samples, quality) of the writer processes (inherited by fork)


def _encode_in_worker(i: int):
    return _encoded(*_WORKER_JOB, i)


def check_room(samples: "_Samples", order: np.ndarray, out: str, quality: int) -> None:
    """Raise :class:`NotEnoughSpaceError` when ``len(order)`` images, at the mean encoded
    size of the first readable ones, would not fit in the free space of ``out``'s folder
    (with one writer page per process of slack)."""
    sizes = []
    for i in order[:SIZE_PROBE_IMAGES]:
        jpeg = _encoded(samples, quality, int(i))[0]
        if jpeg is not None:
            sizes.append(len(jpeg))
    if not sizes:
        return  # nothing readable yet: the write itself says so
    per_image = sum(sizes) / len(sizes)
    need = int(per_image * len(order) * 1.02) + samples.page_size * (_default_workers() + 1)
    folder = os.path.dirname(os.path.abspath(out))
    free = shutil.disk_usage(folder).free
    if need > free:
        raise NotEnoughSpaceError(
            f"{out} needs about {need / 1e9:.2f} GB ({len(order)} images x "
            f"{per_image / 1e3:.1f} KB, measured on the first {len(sizes)}) and {folder} has "
            f"{free / 1e9:.2f} GB free; free space, write elsewhere, or lower "
            f"--max-resolution / --jpeg-quality")


def _write_without_ffcv(samples: "_Samples", order: np.ndarray, path: str, quality: int,
                        workers: int, chunk_size: int) -> np.ndarray:
    """Encode ``order`` on ``workers`` processes and write them with :class:`BetonWriter`,
    in order; returns the bool mask of the unreadable images (left out of the file)."""
    from tqdm import tqdm

    global _WORKER_JOB
    bad = np.zeros(len(order), dtype=bool)
    writer = BetonWriter(path, len(order), samples.page_size)
    _WORKER_JOB = (samples, quality)
    try:
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(_encode_in_worker, order.tolist(), chunksize=max(1, chunk_size // 4))
        else:
            pool, results = None, map(_encode_in_worker, order.tolist())
        try:
            for k, (jpeg, height, width, label, orig_h, orig_w) in enumerate(
                    tqdm(results, total=len(order), unit="image", file=sys.stderr)):
                if jpeg is None:
                    bad[k] = True
                else:
                    writer.add(jpeg, height, width, label, orig_h, orig_w)
        finally:
            if pool is not None:
                pool.terminate()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        _WORKER_JOB = None
    return bad


def ffcv_writer_available() -> bool:
    """Whether FFCV's writer will be used (else the file is written without FFCV)."""
    try:
        import_ffcv()
        return True
    except FFCVUnavailableError:
        return False


def write_beton(source: ImageSource, out: str, max_resolution: int = DEFAULT_MAX_RESOLUTION,
                jpeg_quality: int = DEFAULT_JPEG_QUALITY, workers: Optional[int] = None,
                chunk_size: int = 100, indices: Optional[Sequence[int]] = None,
                use_ffcv: Optional[bool] = None) -> WriteResult:
    """Write the images of ``source`` (or those at ``indices``) to the .beton ``out``.

    max_resolution: cap on the longer side (0: no cap); jpeg_quality: 1..100; workers:
    writer processes (default: every core this process may use); use_ffcv: FFCV's writer
    (default: where ffcv imports), else the file is written without FFCV. Raises
    NotEnoughSpaceError (a ValueError) before writing when the first images show the file
    would not fit, ValueError for bad options or when no image is readable. Returns a
    :class:`WriteResult`; the skipped images are also logged, in one line.
    """
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if max_resolution < 0:
        raise ValueError(f"--max-resolution must be >= 0 (0: no cap), got {max_resolution}")
    workers = workers or _default_workers()
    if workers < 1 or chunk_size < 1:
        raise ValueError(f"workers and chunk size must be >= 1, got {workers}, {chunk_size}")
    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"output folder does not exist: {folder}")
    if use_ffcv is None:
        use_ffcv = ffcv_writer_available()
    order = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    if order.size == 0:
        raise ValueError("no images to write")
    page_size = page_size_for(max_resolution)
    samples = _Samples(source, max_resolution, page_size)
    check_room(samples, order, out, jpeg_quality)
    partial = out + ".partial"
    try:
        if use_ffcv:
            _write_with_ffcv(samples, order, partial, max_resolution, jpeg_quality, workers,
                             chunk_size)
            # Rows follow ``order``; placeholders (original size 0) mark unreadable images.
            bad = BetonFile(partial).column(ORIG_HEIGHT) == 0
        else:
            bad = _write_without_ffcv(samples, order, partial, jpeg_quality, workers,
                                      chunk_size)
        skipped = [source.name(int(i)) for i in order[bad]]
        if bad.all():
            raise ValueError(f"no readable image in {source.path}")
        if bad.any():
            shown = ", ".join(skipped[:NAMES_LOGGED])
            more = (f" and {len(skipped) - NAMES_LOGGED} more"
                    if len(skipped) > NAMES_LOGGED else "")
            log.warning("skipped %d unreadable image(s) of %d: %s%s", len(skipped), len(order),
                        shown, more)
            if use_ffcv:
                drop_rows(partial, ~bad)
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return WriteResult(out, int(len(order) - len(skipped)), skipped)


def _write_with_ffcv(samples: "_Samples", order: np.ndarray, path: str, max_resolution: int,
                     jpeg_quality: int, workers: int, chunk_size: int) -> None:
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    cap = min(max_resolution or LARGEST_SIDE, LARGEST_SIDE)
    fields = {
        IMAGE: RGBImageField(write_mode="jpg", max_resolution=cap, jpeg_quality=jpeg_quality),
        LABEL: IntField(),
        ORIG_HEIGHT: IntField(),
        ORIG_WIDTH: IntField(),
    }
    assert tuple(fields) == FIELDS
    writer = DatasetWriter(path, fields, page_size=samples.page_size, num_workers=workers)
    writer.from_indexed_dataset(samples, indices=order, chunksize=chunk_size)


def _parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python -m fastswav.data.write",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write an image folder or a zip of images to a .beton (FFCV's format) for the\n"
            "decode-once multi-crop loader (python -m fastswav.train --data OUT.beton).\n\n"
            "Each readable image is stored as a JPEG, its longer side capped at\n"
            "--max-resolution, with its label and its original size (the loader draws crop\n"
            "boxes in the original image's coordinates). Grayscale, CMYK, palette, alpha and\n"
            "PNG images are converted to RGB; unreadable images are skipped and named in one\n"
            "log line. The file appears at OUT only when complete.\n\n"
            "examples:\n"
            "  python -m fastswav.data.write /data/imagenet /data/train.beton --split train\n"
            "  python -m fastswav.data.write images.zip sample.beton --max-resolution 384"),
        epilog=(
            "SRC layouts: class/xxx.JPEG (ImageNet); train/ and val/ (or test/) split folders\n"
            "holding class folders; the same inside a zip; a flat zip of <class>_<name>.JPEG.\n\n"
            "FFCV's writer runs where ffcv imports; elsewhere the same format is written\n"
            "without it. The first images are encoded first: when the file would not fit\n"
            "in OUT's folder, nothing is written (error, exit status 2).\n"
            f"optional FFCV: {INSTALL_HINT}"),
    )
    parser.add_argument("src", metavar="SRC", help="image folder or zip of images")
    parser.add_argument("out", metavar="OUT.beton", help="the .beton file to write")
    parser.add_argument("--split", default="train", choices=SPLITS,
                        help="split folder to read when SRC has split folders (default train; "
                             "test and val stand in for each other)")
    parser.add_argument("--kind", default="auto", choices=KINDS,
                        help="how to read SRC (default: auto, from the path)")
    parser.add_argument("--max-resolution", type=int, default=DEFAULT_MAX_RESOLUTION,
                        metavar="PIXELS",
                        help=f"cap on the longer side of stored images (default "
                             f"{DEFAULT_MAX_RESOLUTION}; 0: no cap, at 128 MiB per writer page)")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, metavar="Q",
                        help=f"JPEG quality 1..100 of the stored images (default "
                             f"{DEFAULT_JPEG_QUALITY})")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="writer processes (default: all cores)")
    parser.add_argument("--chunk-size", type=int, default=100, metavar="N",
                        help="images per work item of a writer process (default 100)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    if not os.path.exists(args.src):
        parser.error(f"SRC not found: {args.src}")
    if os.path.abspath(args.src) == os.path.abspath(args.out):
        parser.error("OUT must differ from SRC")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        parser.error(f"output folder does not exist: {folder}")
    # Packages first: a missing one is reported before a long walk of SRC.
    missing = [name for name in ("PIL", "tqdm") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"missing package(s): {', '.join(missing)} (pip install pillow tqdm)")
    use_ffcv = ffcv_writer_available()
    log.info("writing with %s", "FFCV's writer" if use_ffcv
             else "fastswav's .beton writer (ffcv is not importable; the file is the same format)")
    try:
        source = open_source(args.src, split=args.split, kind=args.kind)
        result = write_beton(source, args.out, max_resolution=args.max_resolution,
                             jpeg_quality=args.jpeg_quality, workers=args.workers,
                             chunk_size=args.chunk_size, use_ffcv=use_ffcv)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    log.info("wrote %s: %d images (%d skipped)", result.path, result.written, len(result.skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
