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
over ``--workers`` processes (FFCV's writer, with its progress bar); the file appears at
OUT only when complete.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from ..cli import UsageParser
from .beton import (FIELDS, IMAGE, INSTALL_HINT, LABEL, ORIG_HEIGHT, ORIG_WIDTH, BetonFile,
                    FFCVUnavailableError, drop_rows, import_ffcv)
from .sources import KINDS, SPLITS, ImageSource, open_source

log = logging.getLogger("fastswav")

DEFAULT_MAX_RESOLUTION = 512
DEFAULT_JPEG_QUALITY = 90
# cv2's JPEG encoder refuses sides over 65500 (and FFCV stores sizes as uint16).
LARGEST_SIDE = 65500
NAMES_LOGGED = 50  # unreadable images named in the log line (then "and N more")


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


def write_beton(source: ImageSource, out: str, max_resolution: int = DEFAULT_MAX_RESOLUTION,
                jpeg_quality: int = DEFAULT_JPEG_QUALITY, workers: Optional[int] = None,
                chunk_size: int = 100, indices: Optional[Sequence[int]] = None) -> WriteResult:
    """Write the images of ``source`` (or those at ``indices``) to the .beton ``out``.

    max_resolution: cap on the longer side (0: no cap); jpeg_quality: 1..100; workers:
    writer processes (default: every core this process may use). Raises
    FFCVUnavailableError without FFCV, ValueError for bad options or when no image is
    readable. Returns a :class:`WriteResult`; the skipped images are also logged, in one line.
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
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    cap = min(max_resolution or LARGEST_SIDE, LARGEST_SIDE)
    page_size = page_size_for(max_resolution)
    fields = {
        IMAGE: RGBImageField(write_mode="jpg", max_resolution=cap, jpeg_quality=jpeg_quality),
        LABEL: IntField(),
        ORIG_HEIGHT: IntField(),
        ORIG_WIDTH: IntField(),
    }
    assert tuple(fields) == FIELDS
    order = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    if order.size == 0:
        raise ValueError("no images to write")
    partial = out + ".partial"
    samples = _Samples(source, max_resolution, page_size)
    try:
        writer = DatasetWriter(partial, fields, page_size=page_size, num_workers=workers)
        writer.from_indexed_dataset(samples, indices=order, chunksize=chunk_size)
        # Rows follow ``order``; placeholders (original size 0) mark unreadable images.
        bad = BetonFile(partial).column(ORIG_HEIGHT) == 0
        skipped = [source.name(int(i)) for i in order[bad]]
        if bad.all():
            raise ValueError(f"no readable image in {source.path}")
        if bad.any():
            shown = ", ".join(skipped[:NAMES_LOGGED])
            more = (f" and {len(skipped) - NAMES_LOGGED} more"
                    if len(skipped) > NAMES_LOGGED else "")
            log.warning("skipped %d unreadable image(s) of %d: %s%s", len(skipped), len(order),
                        shown, more)
            drop_rows(partial, ~bad)
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return WriteResult(out, int(len(order) - len(skipped)), skipped)


def _parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python -m fastswav.data.write",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write an image folder or a zip of images to an FFCV .beton for the decode-once\n"
            "multi-crop loader (fastswav.data.ffcv_loader.build_ffcv_multicrop_loader).\n\n"
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
            f"needs FFCV: {INSTALL_HINT}"),
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
    try:
        source = open_source(args.src, split=args.split, kind=args.kind)
        result = write_beton(source, args.out, max_resolution=args.max_resolution,
                             jpeg_quality=args.jpeg_quality, workers=args.workers,
                             chunk_size=args.chunk_size)
    except FFCVUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    log.info("wrote %s: %d images (%d skipped)", result.path, result.written, len(result.skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
