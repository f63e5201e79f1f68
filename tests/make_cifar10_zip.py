"""Write CIFAR-10 as the zip of JPEGs the data tests read, from torchvision's copy.

    python tests/make_cifar10_zip.py .data/cifar10-jpeg.zip

Layout: ``train/<class>/NNNN.jpg`` (5,000 per class) and ``test/<class>/NNNN.jpg`` (1,000 per
class), quality-75 JPEGs, members stored uncompressed (readable in place). torchvision
downloads CIFAR-10 into ``FASTSWAV_DATA_CACHE`` (see fastswav.data.sources) on first use.
`make test` runs this when no such zip is beside the repository.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile

from PIL import Image

JPEG_QUALITY = 75


def write_cifar10_zip(out: str, root: str) -> int:
    """Write the zip to ``out`` (through a temporary file); returns the number of images."""
    from torchvision.datasets import CIFAR10

    tmp = out + ".tmp"
    written = 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for split in ("train", "test"):
            dataset = CIFAR10(root, train=split == "train", download=True)
            counts = [0] * len(dataset.classes)
            for pixels, label in zip(dataset.data, dataset.targets):
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
                name = f"{split}/{dataset.classes[label]}/{counts[label]:04d}.jpg"
                archive.writestr(name, buffer.getvalue())
                counts[label] += 1
                written += 1
    os.replace(tmp, out)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the zip to write, e.g. .data/cifar10-jpeg.zip")
    args = parser.parse_args(argv)
    from fastswav.data.sources import download_cache_dir

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    root = os.path.join(download_cache_dir(), "cifar10")
    try:
        count = write_cifar10_zip(args.out, root)
    except (OSError, RuntimeError) as err:
        print(f"error: cannot write {args.out} from torchvision's CIFAR-10 in {root}: {err}",
              file=sys.stderr)
        return 2
    print(f"wrote {count} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
