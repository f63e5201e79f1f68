"""Image sources: decoded RGB images and their labels, by index.

A source is the bottom of the reference data path. It knows where the images are and how to
decode one; it knows nothing about augmentation or batching. Every source has

- ``len(source)``, ``source.classes`` (class names, index = label) and ``source.labels``
  (one int per image, read from the layout without decoding anything);
- ``source.load(i) -> (PIL.Image in RGB mode, label)``, which raises
  :class:`UnreadableImageError` (naming the image) when the image cannot be read or decoded:
  the dataset layer skips such images, so one bad file never stops training;
- ``source.name(i)`` (the image's path inside the source, for log lines) and ``source.path``
  (where the source lives, for error messages).

Kinds, all opened through :func:`open_source`:

- ``folder``: ImageNet layout ``root/<class>/<image>``. When ``root`` holds only split
  folders (``train/``, ``val/``, ``test/``), ``split`` picks one; otherwise ``root`` itself is
  the data for every split.
- ``zip``: the same layouts inside a zip file (``train/<class>/NNNN.jpg`` as in a CIFAR-10
  zip of JPEGs). Flat zips, with the images at the zip's root (an ImageNet sample),
  are labelled by the part of the file name before the first ``_`` when every name has one
  (``n01440764_tench.JPEG`` -> class ``n01440764``); otherwise they are unlabelled
  (label -1, no classes), which is fine for pretraining and refused by kNN. The zip is opened
  lazily, once per process, so a source can be handed to DataLoader worker processes.
- ``torchvision-cifar10``: ``torchvision.datasets.CIFAR10`` under ``path`` (downloaded there
  when missing and the machine is online).
- ``beton``: an FFCV file written by ``python -m fastswav.data.write`` (read with numpy, see
  :mod:`fastswav.data.beton`). A .beton holds one split: for the split named in the file
  name (``imagenet_train.beton``) it is the file itself, for another split the file whose
  name has that split instead (``imagenet_val.beton``); a file naming no split serves only
  ``train``.

``preload=True`` decodes every image once into memory as uint8 (the CIFAR-10 training set is
150 MB that way, decoded in about 10 s on one core): on small images the per-image cost of
reading and decoding a JPEG is a large share of the whole data path.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import re
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

try:  # deprecated in torchvision 0.29 (for TorchCodec); PIL alone serves where it is gone
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover
    decode_image = None

log = logging.getLogger("fastswav")

KINDS = ("auto", "folder", "zip", "torchvision-cifar10", "beton")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".gif",
)
# Where a requested split is missing, its usual synonym is used instead.
_SPLIT_FALLBACK = {"test": "val", "val": "test"}


class UnreadableImageError(OSError):
    """An image that cannot be read or decoded; the message names it."""


class ImageSource:
    """Base class: subclasses fill ``path``, ``split``, ``classes``, ``labels`` and implement
    ``_read_bytes(i)`` (the encoded file) and ``name(i)``."""

    path: str
    split: Optional[str]  # the split folder used, or None when the source has no splits
    classes: list
    labels: np.ndarray

    def __init__(self) -> None:
        self._preloaded: Optional[Sequence] = None

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        raise NotImplementedError

    def _read_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def load(self, i: int):
        """Image ``i`` as an RGB PIL image, and its label (-1 when unlabelled)."""
        if self._preloaded is not None:
            array = self._preloaded[i]
            if array is None:
                raise UnreadableImageError(f"{self.name(i)}: could not be decoded (at preload)")
        else:
            array = self.decode(i)
        return Image.fromarray(array), int(self.labels[i])

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` decoded to uint8 (H, W, 3), or UnreadableImageError."""
        try:
            data = self._read_bytes(i)
        except Exception as err:
            raise UnreadableImageError(f"{self.name(i)}: {type(err).__name__}: {err}") from err
        return decode_rgb(data, self.name(i))

    def preload(self, num_threads: Optional[int] = None) -> "ImageSource":
        """Decode every image once and keep it in memory as uint8 (H, W, 3).

        Unreadable images are kept as a marker, so ``load`` still raises for them. Images of
        one common size are stored as one array (no per-image Python objects, and forked
        DataLoader workers share it without copying).
        """
        if self._preloaded is not None:
            return self

        def decode_or_none(i):
            try:
                return self.decode(i)
            except UnreadableImageError:
                return None

        # One thread by default: on small images decoding is bound by the GIL and threads
        # made it slower here (1.9 s vs 2.8 s for 10,000 CIFAR JPEGs); large images gain.
        threads = num_threads or 1
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                arrays = list(pool.map(decode_or_none, range(len(self)), chunksize=256))
        else:
            arrays = [decode_or_none(i) for i in range(len(self))]
        shapes = {a.shape for a in arrays if a is not None}
        if len(shapes) == 1 and all(a is not None for a in arrays):
            self._preloaded = np.stack(arrays)
        else:
            self._preloaded = arrays
        return self

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return (f"{type(self).__name__}({self.path!r}{split}, {len(self)} images, "
                f"{len(self.classes)} classes)")


def decode_rgb(data: bytes, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB; UnreadableImageError naming ``name``.

    torchvision's decoder first (JPEG, PNG, GIF, WebP; about 3x faster than PIL on 32x32
    JPEGs, where PIL's header parsing dominates, and the same pixels on CIFAR-10 and ImageNet JPEGs),
    then PIL for everything else, and to give the verdict on files torchvision rejects.
    Grayscale, CMYK, palette and alpha images come out as RGB.
    """
    if decode_image is not None:
        try:
            tensor = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                  mode=ImageReadMode.RGB)
            if tensor.dtype == torch.uint8:  # 16-bit PNGs come back as uint16: PIL does those
                return tensor.permute(1, 2, 0).contiguous().numpy()
        except RuntimeError:
            pass
    try:
        with Image.open(io.BytesIO(data)) as image:
            # convert() forces the full decode, so a truncated file fails here, not later.
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise UnreadableImageError(f"{name}: {type(err).__name__}: {err}") from err


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _pick_split(top_dirs: set, split: str, path: str) -> Optional[str]:
    """The split folder to use, or None when the layout has no split folders."""
    if not top_dirs or not top_dirs <= set(SPLITS):
        return None
    for candidate in (split, _SPLIT_FALLBACK.get(split)):
        if candidate in top_dirs:
            return candidate
    raise ValueError(f"{path} has no '{split}' split (it has: {', '.join(sorted(top_dirs))})")


def _label_members(members: list, path: str):
    """Classes and labels of relative image paths (posix, already under the split folder).

    ``<class>/.../<image>`` -> class folder; when no image is in a folder, flat naming rules
    apply (see the module docstring). Images at the top of a class layout are ignored.
    """
    nested = [m for m in members if "/" in m]
    if nested:
        if len(nested) < len(members):
            log.warning("%s: ignoring %d images outside class folders",
                        path, len(members) - len(nested))
        members = sorted(nested)
        class_of = [m.split("/", 1)[0] for m in members]
    else:
        members = sorted(members)
        if all("_" in m for m in members):
            class_of = [m.split("_", 1)[0] for m in members]
        else:
            return members, [], np.full(len(members), -1, dtype=np.int64)
    classes = sorted(set(class_of))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c in class_of], dtype=np.int64)
    return members, classes, labels


class FolderSource(ImageSource):
    """Images in a folder tree: ``root/<class>/<image>``, optionally under split folders."""

    def __init__(self, root: str, split: str = "train"):
        super().__init__()
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.path = root
        top_dirs = {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")}
        self.split = _pick_split(top_dirs, split, root)
        self.root = os.path.join(root, self.split) if self.split else root
        members = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            members.extend(prefix + f for f in filenames if _is_image_name(f))
        self.members, self.classes, self.labels = _label_members(members, root)
        if not self.members:
            where = f"{root} (split '{self.split}')" if self.split else root
            raise ValueError(f"no images found in {where}")

    def name(self, i: int) -> str:
        return (f"{self.split}/" if self.split else "") + self.members[i]

    def _read_bytes(self, i: int) -> bytes:
        with open(os.path.join(self.root, self.members[i]), "rb") as f:
            return f.read()


@functools.lru_cache(maxsize=8)
def _zip_listing(path: str, mtime_ns: int, size: int):
    """Image members of a zip: {name: (header offset, stored size, size, method, crc)}.

    Cached per process (keyed by path, mtime and size) because parsing the central directory
    of a 60,000-member zip takes a second or more, and the train and test sources share it.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a readable zip file: {err}") from None
    return {
        i.filename: (i.header_offset, i.compress_size, i.file_size, i.compress_type, i.CRC)
        for i in infos
        if not i.is_dir() and _is_image_name(i.filename) and not i.filename.startswith("__MACOSX/")
    }


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes


class ProcessLocalFile:
    """A read-only file descriptor for ``pread``, opened lazily in each process.

    A source is pickled into DataLoader workers and may be forked: a descriptor inherited
    from another process is not ours to use or close, so each process opens its own.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None

    def pread(self, size: int, offset: int) -> bytes:
        if self._pid != os.getpid():
            self._fd, self._pid = None, os.getpid()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, size, offset)

    def __getstate__(self):
        return {"path": self.path, "_fd": None, "_pid": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


class ZipSource(ImageSource):
    """Images inside a zip file; see the module docstring for the layouts understood.

    Members stored uncompressed (as ``zip -0`` writes them) are read straight from the file with
    ``os.pread`` at their recorded offset: no per-process parse of the central directory and no
    shared read position. Compressed members go through a ZipFile. Either handle is opened on
    first use in each process and dropped when the source is pickled, so a source can be handed
    to DataLoader worker processes.
    """

    def __init__(self, path: str, split: str = "train"):
        super().__init__()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"zip file not found: {path}")
        self.path = path
        stat = os.stat(path)
        listing = _zip_listing(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
        names = list(listing)
        top_dirs = {n.split("/", 1)[0] for n in names if "/" in n}
        self.split = _pick_split(top_dirs, split, path)
        if self.split:
            prefix = self.split + "/"
            names = [n[len(prefix):] for n in names if n.startswith(prefix)]
        self.members, self.classes, self.labels = _label_members(names, path)
        if not self.members:
            where = f"{path} (split '{self.split}')" if self.split else path
            raise ValueError(f"no images found in {where}")
        self._entries = [listing[self.name(i)] for i in range(len(self.members))]
        self._file = ProcessLocalFile(path)
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid: Optional[int] = None

    def name(self, i: int) -> str:
        return (f"{self.split}/" if self.split else "") + self.members[i]

    def _read_bytes(self, i: int) -> bytes:
        offset, stored_size, size, method, crc = self._entries[i]
        if method != zipfile.ZIP_STORED or not hasattr(os, "pread"):
            if self._zip is None or self._zip_pid != os.getpid():  # not one from another process
                self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
            return self._zip.read(self.name(i))
        header = self._file.pread(_LOCAL_HEADER.size, offset)
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != b"PK\x03\x04":
            raise OSError("bad zip local header")
        start = offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]  # + name + extra
        data = self._file.pread(size, start)
        if len(data) != size or zlib.crc32(data) != crc:
            raise OSError("zip member fails its CRC check")
        return data

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_zip=None, _zip_pid=None)
        return state


class TorchvisionCIFAR10Source(ImageSource):
    """CIFAR-10 through ``torchvision.datasets.CIFAR10`` (its python pickles, in memory)."""

    def __init__(self, root: str, split: str = "train", download: bool = True):
        super().__init__()
        from torchvision.datasets import CIFAR10

        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        self.path = root
        self.split = "train" if split == "train" else "test"
        try:
            dataset = CIFAR10(root, train=self.split == "train", download=download)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            hint = "" if download else " (pass download=True to fetch it)"
            raise FileNotFoundError(f"CIFAR-10 not found under {root}{hint}: {err}") from None
        except OSError as err:  # URLError and socket errors when offline
            raise FileNotFoundError(
                f"CIFAR-10 is not under {root} and downloading it failed (offline?): "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
            ) from None
        self.classes = list(dataset.classes)
        self.labels = np.asarray(dataset.targets, dtype=np.int64)
        self._preloaded = dataset.data  # already decoded: uint8 (N, 32, 32, 3)

    def name(self, i: int) -> str:
        return f"cifar10-{self.split}[{i}]"

    def decode(self, i: int) -> np.ndarray:
        return self._preloaded[i]

    def preload(self, num_threads: Optional[int] = None) -> "ImageSource":
        return self


# The CIFAR-10 presets' default data: not a path but torchvision's CIFAR-10 in the download
# cache (fetched on first use), so a fresh clone has its demo data wherever it runs.
CIFAR10_DOWNLOAD = "download:cifar10"
DATA_CACHE_ENV = "FASTSWAV_DATA_CACHE"


def download_cache_dir() -> str:
    """Where data sets that fastswav downloads go: ``$FASTSWAV_DATA_CACHE``, else
    ``$XDG_CACHE_HOME/fastswav/data``, else ``~/.cache/fastswav/data``."""
    if os.environ.get(DATA_CACHE_ENV):
        return os.path.expanduser(os.environ[DATA_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastswav", "data")


def resolve_download(path: str, kind: str = "auto"):
    """``(path, kind)`` to read: :data:`CIFAR10_DOWNLOAD` becomes torchvision's CIFAR-10 in
    :func:`download_cache_dir` (downloaded there on first use, when the machine is online);
    any other path is returned as it is."""
    if path != CIFAR10_DOWNLOAD:
        return path, kind
    return os.path.join(download_cache_dir(), "cifar10"), "torchvision-cifar10"


def _looks_like_torchvision_cifar10(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "cifar-10-batches-py"))


def beton_split_path(path: str, split: str) -> str:
    """The .beton file of ``split`` next to ``path`` (see the module docstring)."""
    folder, name = os.path.split(path)
    named = [s for s in SPLITS if re.search(rf"(^|[^a-z]){s}([^a-z]|$)", name)]
    if split in named:
        return path
    if named:
        other = re.sub(rf"(^|[^a-z]){named[0]}([^a-z]|$)", rf"\g<1>{split}\g<2>", name, count=1)
        candidate = os.path.join(folder, other)
        if os.path.exists(candidate):
            return candidate
        raise FileNotFoundError(f"no {split} split for {path}: expected {candidate}")
    if split == "train":
        return path
    raise FileNotFoundError(f"{path} names no split, so it serves only 'train'; for "
                            f"{split!r} write a file named like {name[:-6]}_{split}.beton")


def open_source(path: str, split: str = "train", kind: str = "auto", preload: bool = False,
                download: bool = True) -> ImageSource:
    """Open the images at ``path`` for ``split`` ('train', 'val' or 'test').

    kind: 'auto' (a ``.beton`` file -> beton, a folder holding ``cifar-10-batches-py`` ->
    torchvision-cifar10, other folders -> folder, a zip file -> zip), 'folder', 'zip',
    'torchvision-cifar10' or 'beton'.
    preload: decode every image into memory once (see the module docstring).
    download: for torchvision-cifar10, fetch the data when it is missing.
    Raises FileNotFoundError for a missing path and ValueError for an unknown kind or split,
    a file that is not a zip, or a source without images; each message names the path.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}: expected one of {', '.join(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    path, kind = resolve_download(os.fspath(path), kind)
    if kind == "torchvision-cifar10":
        source = TorchvisionCIFAR10Source(path, split, download=download)
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"data path not found: {path}")
        if kind == "auto":
            if path.endswith(".beton"):
                kind = "beton"
            elif os.path.isdir(path):
                kind = "torchvision-cifar10" if _looks_like_torchvision_cifar10(path) else "folder"
            elif zipfile.is_zipfile(path):
                kind = "zip"
            else:
                raise ValueError(f"{path} is neither a folder nor a zip file")
        if kind == "torchvision-cifar10":
            source = TorchvisionCIFAR10Source(path, split, download=False)
        elif kind == "beton":
            from .beton import BetonSource

            source = BetonSource(beton_split_path(path, split))
        elif kind == "folder":
            if not os.path.isdir(path):
                raise ValueError(f"{path} is not a folder (kind 'folder')")
            source = FolderSource(path, split)
        else:
            source = ZipSource(path, split)
    if preload:
        source.preload()
    return source
