"""Embeddings of a folder of images by a trained trunk.

``python -m fastswav.embed --checkpoint CKPT|RUN_DIR --data PATH --out FILE`` runs the trunk of
a fastswav checkpoint (a run folder means its latest checkpoint) over every image of ``PATH``
(an image folder, nested or flat, labelled or not; a zip of images; a ``.beton``) and writes
one feature vector per image:

- ``FILE.pt`` (the default): ``{"names": [str], "embeddings": float32 [N, D], "skipped":
  [str]}``, which ``torch.load(FILE, weights_only=True)`` reads;
- ``NAME.npy``: the ``[N, D]`` float32 array, with the names one per line in
  ``NAME.names.txt`` (``--out e.npy`` writes ``e.npy`` and ``e.names.txt``);
- ``FILE.csv``: a header ``name,f0,...`` and one row per image.

Names are the images' paths inside ``PATH``. The features are the trunk's pooled output,
not normalised (L2-normalise them for cosine similarity), computed with the deterministic
evaluation transform at the image size the run trained on (its largest crops; see
``--image-size``). An unreadable image is skipped and listed, never fatal. Files are written
through a temporary file and a rename, so an interrupted run leaves no half-written output.

From Python: ``fastswav.embed(checkpoint, data, out=None, ...)`` returns the same dict (and
writes ``out`` when given).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ._callable import make_callable
from .cli import UsageParser, fail, load_error_detail

log = logging.getLogger("fastswav")

FORMATS = (".pt", ".npy", ".csv")


def resolve_checkpoint(path) -> Path:
    """``path`` itself when it is a file, else the latest checkpoint of the run folder."""
    from .checkpoint import latest_checkpoint

    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path} (is it a fastswav run folder?)")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_trunk(checkpoint):
    """(trunk, the image size it trained on) of a checkpoint file or run folder (its latest
    checkpoint), on the CPU. FileNotFoundError or ValueError with one line for a missing,
    junk, truncated or foreign file."""
    from .model import load_trunk_from_checkpoint

    path = resolve_checkpoint(checkpoint)
    try:
        return load_trunk_from_checkpoint(str(path), map_location="cpu")
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # not a checkpoint, or one cut short
        raise ValueError(f"{path} could not be read as a fastswav checkpoint "
                         f"({load_error_detail(err)})") from err


def open_images(data, kind: str = "auto", split: str = "train"):
    """The image source at ``data`` (``download:cifar10`` is torchvision's copy in the
    download cache, as in training). Raises FileNotFoundError / ValueError with a one-line
    message."""
    from .data.sources import open_source, resolve_download

    data, kind = resolve_download(os.fspath(data), kind)
    return open_source(data, split=split, kind=kind)


class _Images(Dataset):
    """(transformed image or None, position, error text) for every image of a source."""

    def __init__(self, source, transform: Callable):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        from .data.sources import UnreadableImageError

        try:
            image, _ = self.source.load(i)
        except UnreadableImageError as err:
            return None, i, str(err)
        return self.transform(image), i, ""


def _collate(batch):
    kept = [(x, i) for x, i, _ in batch if x is not None]
    failed = [(i, err) for x, i, err in batch if x is None]
    images = torch.stack([x for x, _ in kept]) if kept else None
    return images, [i for _, i in kept], failed


@torch.no_grad()
def embed_source(trunk: torch.nn.Module, source, image_size: int, batch_size: int = 256,
                 workers: int = 0, device=None, bf16: bool = False,
                 progress: bool = True) -> Dict[str, object]:
    """Trunk features of every image of ``source``: ``{"names", "embeddings" (float32 [N, D]
    on the CPU, in source order), "skipped" (names of unreadable images)}``."""
    from tqdm import tqdm

    from .data.multicrop import eval_transform

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loader = DataLoader(_Images(source, eval_transform(image_size)), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    trunk = trunk.to(device).eval()
    features: List[torch.Tensor] = []
    positions: List[int] = []
    skipped: List[str] = []
    bar = tqdm(total=len(source), unit="img", desc="embed", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()
    for images, batch_positions, failed in loader:
        for i, err in failed:
            log.warning("embed: skipping unreadable image %s", err)
            skipped.append(source.name(i))
        if images is not None:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
            with autocast:
                output = trunk(images.to(device, non_blocking=True))
            if output.dim() == 4:  # a trunk that stops before global pooling
                output = output.mean(dim=(2, 3))
            features.append(output.flatten(1).float().cpu())
            positions.extend(batch_positions)
        bar.update(len(batch_positions) + len(failed))
        bar.set_postfix(img_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    if not features:
        raise ValueError(f"no readable image in {source.path}")
    return {"names": [source.name(i) for i in positions], "embeddings": torch.cat(features),
            "skipped": skipped}


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary path)`` in ``path``'s folder, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private: give it a new file's mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def names_path(out) -> Path:
    """The names file written beside a ``.npy`` output."""
    return Path(out).with_suffix(".names.txt")


def write_embeddings(result: Dict[str, object], out) -> List[Path]:
    """Write :func:`embed_source`'s result to ``out`` (format from the suffix: .pt, .npy
    with a names file, .csv); returns the paths written."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--out {out}: expected a name ending in {', '.join(FORMATS)}")
    embeddings = result["embeddings"]
    names = list(result["names"])
    if suffix == ".pt":
        state = {"names": names, "embeddings": embeddings, "skipped": list(result["skipped"])}
        _atomic_write(out, lambda tmp: torch.save(state, tmp))
        return [out]
    if suffix == ".npy":
        def save_array(tmp):
            with open(tmp, "wb") as f:  # np.save on a name would append .npy to it
                np.save(f, embeddings.numpy())

        def save_names(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(name + "\n" for name in names)

        _atomic_write(names_path(out), save_names)
        _atomic_write(out, save_array)
        return [out, names_path(out)]

    def save_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["name"] + [f"f{j}" for j in range(embeddings.shape[1])])
            for name, row in zip(names, embeddings.tolist()):
                writer.writerow([name] + [f"{v:.7g}" for v in row])

    _atomic_write(out, save_csv)
    return [out]


def embed(checkpoint, data, out=None, *, kind: str = "auto", split: str = "train",
          batch_size: int = 256, workers: int = 0, device: Optional[str] = None,
          bf16: bool = False, image_size: Optional[int] = None,
          progress: bool = True) -> Dict[str, object]:
    """Embeddings of the images at ``data`` by the trunk of ``checkpoint`` (a checkpoint file
    or a run folder: its latest checkpoint); see the module docstring.

    Returns ``{"names": [str], "embeddings": float32 [N, D], "skipped": [str]}`` and writes it
    to ``out`` when given (``.pt``, ``.npy`` + names file, ``.csv``). ``split``: which split
    of a folder or zip holding train/ and test/ (or val/) folders. Raises
    FileNotFoundError or ValueError with a one-line message for bad input.
    """
    if batch_size < 1 or workers < 0:
        raise ValueError("batch_size must be >= 1 and workers >= 0")
    if out is not None and Path(out).suffix.lower() not in FORMATS:
        raise ValueError(f"--out {out}: expected a name ending in {', '.join(FORMATS)}")
    path = resolve_checkpoint(checkpoint)  # a missing checkpoint is said before any data work
    source = open_images(data, kind, split)
    trunk, trained_size = load_trunk(path)
    result = embed_source(trunk, source, image_size or trained_size, batch_size, workers,
                          device, bf16, progress)
    if out is not None:
        write_embeddings(result, out)
    return result


def _parser() -> argparse.ArgumentParser:
    from .data.sources import KINDS, SPLITS

    parser = UsageParser(
        prog="python -m fastswav.embed",
        description=(
            "Write the trunk features of every image of a folder, zip or .beton: .pt (a dict "
            "of names and a float32 tensor; torch.load(FILE, weights_only=True)), .npy (plus "
            "the names, one per line: --out e.npy writes e.npy and e.names.txt) or .csv. "
            "Unreadable images are skipped and listed."),
        epilog="Example: python -m fastswav.embed --checkpoint runs/demo --data my_images/ "
               "--out my_images.pt",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint written by fastswav.train, or its run folder (the "
                             "latest checkpoint)")
    parser.add_argument("--data", required=True,
                        help="image folder (nested or flat, labels not needed), zip of images "
                             "or FFCV .beton")
    parser.add_argument("--out", required=True, help="output file: .pt, .npy or .csv")
    parser.add_argument("--kind", default="auto", choices=KINDS,
                        help="how to read --data (default: auto, from the path)")
    parser.add_argument("--split", default="train", choices=SPLITS,
                        help="where --data holds train/ and test/ (or val/) folders: which one "
                             "(default: train)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes for decoding (default 0)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--bf16", action="store_true",
                        help="run the trunk under bfloat16 autocast (features are stored as "
                             "float32)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="center-crop size (default: the run's largest crop size)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.image_size is not None and args.image_size < 1:
        fail(f"--image-size must be >= 1, got {args.image_size}")
    try:
        result = embed(args.checkpoint, args.data, args.out, kind=args.kind, split=args.split,
                       batch_size=args.batch_size, workers=args.workers, device=args.device,
                       bf16=args.bf16, image_size=args.image_size)
    except (FileNotFoundError, ValueError) as err:
        fail(err)
    embeddings = result["embeddings"]
    print(f"wrote {embeddings.shape[0]} embeddings of {embeddings.shape[1]} values to {args.out}")
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable image(s): "
              + ", ".join(result["skipped"]))
    return 0


make_callable(__name__)  # fastswav.embed(...) runs embed() above

if __name__ == "__main__":
    sys.exit(main())
