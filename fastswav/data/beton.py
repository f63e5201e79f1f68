"""The .beton files of the decode-once path: their fields, and reading them without FFCV.

``python -m fastswav.data.write`` stores one row per readable image with the fields

- ``image``: :class:`ffcv.fields.RGBImageField`, the image as a JPEG (re-encoded, longer side
  capped at ``--max-resolution``); its stored height and width are in the row's metadata;
- ``label``: int, the class index (-1 for unlabelled images);
- ``orig_height``, ``orig_width``: ints, the image's size as decoded from the source, before
  the cap. The loader draws crop boxes in these coordinates, so the crops' scale and aspect
  ratio follow the official recipe on the original image whatever cap the file was written
  with. Files without them (FFCV's own ImageNet files: ``image`` and ``label`` only) use the
  stored size instead.

FFCV itself is optional: :func:`import_ffcv` gives one clear error where it is missing, and
:class:`BetonSource` reads such files with numpy alone (FFCV's file format, version 2: a
header, one descriptor per field, one fixed-size metadata row per sample, data pages, and a
table of the allocations in those pages), so the reference PIL path can still train from a
.beton where FFCV cannot be installed.
"""
from __future__ import annotations

import os

import numpy as np

from .sources import ImageSource, ProcessLocalFile, UnreadableImageError, decode_rgb

IMAGE, LABEL, ORIG_HEIGHT, ORIG_WIDTH = "image", "label", "orig_height", "orig_width"
FIELDS = (IMAGE, LABEL, ORIG_HEIGHT, ORIG_WIDTH)

DEBIAN_PACKAGES = "pkg-config libturbojpeg0-dev libopencv-dev"
INSTALL_HINT = (f"install it with: apt-get install -y {DEBIAN_PACKAGES} && "
                f"pip install --no-build-isolation ffcv==1.0.2  (or: make ffcv)")


class FFCVUnavailableError(ImportError):
    """FFCV cannot be imported; the message says why and how to install it."""


def import_ffcv():
    """The ``ffcv`` module, or FFCVUnavailableError with a one-line install hint.

    Any import failure counts (not installed, or installed without its shared libraries:
    libturbojpeg and OpenCV are loaded at import).
    """
    import torch

    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
        import ffcv.fields  # loads the compiled libffcv and its libraries
        import ffcv.loader  # noqa: F401
    except Exception as err:  # ImportError, OSError from a missing .so, numba errors
        raise FFCVUnavailableError(
            f"ffcv is not importable ({type(err).__name__}: {err}); {INSTALL_HINT}") from err
    finally:
        # Importing ffcv sets torch's intra-op threads to 1 (its Compiler.set_num_threads(1)):
        # put the caller's count back, or every CPU op of the process runs on one thread.
        torch.set_num_threads(threads)
    return ffcv


# --- FFCV's file format, version 2 (ffcv/types.py), for reading without FFCV --------------

_VERSION = 2
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                    ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)),
                        ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
# Per-field metadata by type id: 0 float, 1 int, 2 RGB image (not aligned inside: packed).
_IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"),
                        ("data_ptr", "<u8")])
_FIELD_META = {0: np.dtype("<f8"), 1: np.dtype("<i8"), 2: _IMAGE_META}
_TYPE_NAMES = {0: "float", 1: "int", 2: "rgb image", 3: "bytes", 4: "ndarray", 5: "json",
               6: "torch tensor"}
JPEG_MODE, RAW_MODE = 0, 1


class BetonFile:
    """The tables of a .beton file: ``header``, ``fields`` (name -> type id), ``metadata``
    (one row per sample; ``column(name)`` gives a field's column) and ``alloc_table``.

    Raises ValueError (naming the file) for a file that is not a version-2 .beton, or one
    with field types other than int, float and RGB image.
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f".beton file not found: {path}")
        self.path = path
        size = os.path.getsize(path)
        if size < _HEADER.itemsize:
            raise ValueError(f"{path} is not a .beton file (too short)")
        self.header = np.fromfile(path, dtype=_HEADER, count=1)[0]
        if int(self.header["version"]) != _VERSION or not 0 < self.header["num_fields"] < 64:
            raise ValueError(f"{path} is not a version-{_VERSION} FFCV .beton file")
        n_fields = int(self.header["num_fields"])
        descriptors = np.fromfile(path, dtype=_FIELD_DESC, count=n_fields,
                                  offset=_HEADER.itemsize)
        self.fields = {}
        for desc in descriptors:
            name = desc["name"].tobytes().split(b"\x00")[0].decode("ascii")
            type_id = int(desc["type_id"])
            if type_id not in _FIELD_META:
                raise ValueError(f"{path}: field {name!r} is of type "
                                 f"{_TYPE_NAMES.get(type_id, type_id)}, which this reader "
                                 f"does not read (int, float and RGB image fields only)")
            self.fields[name] = type_id
        self.metadata_type = np.dtype([(name, _FIELD_META[t]) for name, t in self.fields.items()],
                                      align=True)
        self.metadata_offset = _HEADER.itemsize + descriptors.nbytes
        self.num_samples = int(self.header["num_samples"])
        self.metadata = np.fromfile(path, dtype=self.metadata_type, count=self.num_samples,
                                    offset=self.metadata_offset)
        if len(self.metadata) != self.num_samples:
            raise ValueError(f"{path} is truncated (metadata of {len(self.metadata)} of "
                             f"{self.num_samples} samples)")
        self.alloc_table = np.fromfile(path, dtype=_ALLOC,
                                       offset=int(self.header["alloc_table_ptr"]))

    def column(self, name: str) -> np.ndarray:
        return self.metadata[name]


def drop_rows(path: str, keep: np.ndarray) -> int:
    """Remove the samples where ``keep`` (bool [num_samples]) is False from a .beton, in
    place; returns the number kept.

    The metadata rows of the kept samples move up (the rows after them stay as unread bytes),
    the header's sample count shrinks, and the allocation table loses the dropped samples'
    entries and renumbers the rest; the dropped samples' data stays in the file, unreferenced.
    """
    beton = BetonFile(path)
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (beton.num_samples,):
        raise ValueError(f"keep needs {beton.num_samples} entries, got {keep.shape}")
    new_id = np.cumsum(keep) - 1
    alloc = beton.alloc_table
    alloc = alloc[keep[alloc["sample_id"].astype(np.int64)]].copy()
    alloc["sample_id"] = new_id[alloc["sample_id"].astype(np.int64)]
    header = beton.header.copy()
    header["num_samples"] = int(keep.sum())
    table_at = int(header["alloc_table_ptr"])
    with open(path, "r+b") as f:
        f.seek(beton.metadata_offset)
        f.write(beton.metadata[keep].tobytes())
        f.seek(table_at)
        f.write(alloc.tobytes())
        f.truncate()
        f.seek(0)
        f.write(header.tobytes())
    return int(keep.sum())


class BetonSource(ImageSource):
    """The images of a .beton file as an :class:`ImageSource` (numpy and PIL only).

    ``labels`` from the ``label`` field (-1 where there is none), ``classes`` the label values
    as strings (a .beton stores no class names), ``original_sizes`` int64 [N, 2] (h, w) from
    ``orig_height``/``orig_width`` (the stored size where the file lacks them) and
    ``stored_sizes`` int64 [N, 2]. ``decode(i)`` gives the stored image, uint8 (H, W, 3).
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = os.fspath(path)
        self.split = None
        self._beton = BetonFile(self.path)
        if self._beton.fields.get(IMAGE) != 2:
            raise ValueError(f"{self.path} has no RGB image field named {IMAGE!r}")
        meta = self._beton.metadata
        n = self._beton.num_samples
        self.labels = (meta[LABEL].astype(np.int64) if LABEL in self._beton.fields
                       else np.full(n, -1, dtype=np.int64))
        known = self.labels[self.labels >= 0]
        self.classes = [str(c) for c in range(int(known.max()) + 1)] if known.size else []
        image = meta[IMAGE]
        self.stored_sizes = np.stack([image["height"], image["width"]], axis=1).astype(np.int64)
        if ORIG_HEIGHT in self._beton.fields and ORIG_WIDTH in self._beton.fields:
            self.original_sizes = np.stack([meta[ORIG_HEIGHT], meta[ORIG_WIDTH]],
                                           axis=1).astype(np.int64)
        else:
            self.original_sizes = self.stored_sizes.copy()
        # Data sizes by address: the allocation table, sorted by pointer.
        alloc = self._beton.alloc_table
        order = np.argsort(alloc["ptr"])
        self._ptrs, self._sizes = alloc["ptr"][order], alloc["size"][order]
        self._file = ProcessLocalFile(self.path)

    def name(self, i: int) -> str:
        return f"{os.path.basename(self.path)}[{i}]"

    def _read_bytes(self, i: int) -> bytes:
        ptr = self._beton.metadata[IMAGE][i]["data_ptr"]
        at = int(np.searchsorted(self._ptrs, ptr))
        if at >= len(self._ptrs) or self._ptrs[at] != ptr:
            raise OSError(f"no allocation at {int(ptr)}")
        return self._file.pread(int(self._sizes[at]), int(ptr))

    def decode(self, i: int) -> np.ndarray:
        meta = self._beton.metadata[IMAGE][i]
        try:
            data = self._read_bytes(i)
        except Exception as err:
            raise UnreadableImageError(f"{self.name(i)}: {type(err).__name__}: {err}") from err
        if meta["mode"] == RAW_MODE:
            return np.frombuffer(data, dtype=np.uint8).reshape(int(meta["height"]),
                                                               int(meta["width"]), 3)
        return decode_rgb(data, self.name(i))



class BetonWriter:
    """Writes a .beton with the fields of :data:`FIELDS` in FFCV's format (version 2)
    without FFCV, as FFCV's own writer lays it out: header, field descriptors (no
    arguments), one metadata row per sample, data pages of ``page_size`` bytes from the first
    page boundary after the metadata (no sample crosses a page), then the allocation table.

    ``capacity`` rows of metadata are reserved; :meth:`close` records the rows added.
    """

    def __init__(self, path: str, capacity: int, page_size: int):
        if capacity < 1:
            raise ValueError("no images to write")
        self.path, self.capacity, self.page_size = path, capacity, page_size
        self.fields = {IMAGE: 2, LABEL: 1, ORIG_HEIGHT: 1, ORIG_WIDTH: 1}
        self.metadata_type = np.dtype([(name, _FIELD_META[t]) for name, t in self.fields.items()],
                                      align=True)
        self.metadata = np.zeros(capacity, dtype=self.metadata_type)
        descriptors = np.zeros(len(self.fields), dtype=_FIELD_DESC)
        for desc, (name, type_id) in zip(descriptors, self.fields.items()):
            desc["type_id"] = type_id
            encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")
            desc["name"][:len(encoded)] = encoded
        self._descriptors = descriptors
        self.metadata_offset = _HEADER.itemsize + descriptors.nbytes
        end = self.metadata_offset + self.metadata.nbytes
        self.data_offset = -(-end // page_size) * page_size
        self._page = bytearray()
        self._pages = 0
        self._alloc = []
        self.count = 0
        self._file = open(path, "wb")
        self._file.seek(self.data_offset)

    def add(self, jpeg: bytes, height: int, width: int, label: int, orig_height: int,
            orig_width: int) -> None:
        if len(jpeg) > self.page_size:
            raise ValueError(f"an encoded image of {len(jpeg)} bytes exceeds the page size")
        if len(self._page) + len(jpeg) > self.page_size:
            self._flush_page()
        ptr = self.data_offset + self._pages * self.page_size + len(self._page)
        self._page += jpeg
        row = self.metadata[self.count]
        row[IMAGE] = (JPEG_MODE, width, height, ptr)
        row[LABEL], row[ORIG_HEIGHT], row[ORIG_WIDTH] = label, orig_height, orig_width
        self._alloc.append((self.count, ptr, len(jpeg)))
        self.count += 1

    def _flush_page(self) -> None:
        if self._page:  # every page whole, as FFCV writes them
            self._file.write(bytes(self._page) + bytes(self.page_size - len(self._page)))
            self._pages += 1
            self._page = bytearray()

    def close(self) -> int:
        """Finish the file; returns the number of images written."""
        try:
            self._flush_page()
            table_at = self._file.tell()
            self._file.write(np.array(self._alloc, dtype=_ALLOC).tobytes())
            header = np.zeros(1, dtype=_HEADER)[0]
            header["version"], header["num_fields"] = _VERSION, len(self.fields)
            header["page_size"], header["num_samples"] = self.page_size, self.count
            header["alloc_table_ptr"] = table_at
            self._file.seek(0)
            self._file.write(header.tobytes())
            self._file.write(self._descriptors.tobytes())
            self._file.write(self.metadata[:self.count].tobytes())
        finally:
            self._file.close()
        return self.count

    def abort(self) -> None:
        self._file.close()


def is_beton(path) -> bool:
    """True for an existing file named *.beton or starting with a version-2 FFCV header."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if path.endswith(".beton"):
        return True
    try:
        header = np.fromfile(path, dtype=_HEADER, count=1)
    except (OSError, ValueError):
        return False
    return len(header) == 1 and int(header[0]["version"]) == _VERSION and (
        0 < int(header[0]["num_fields"]) < 64) and not _looks_like_zip(path)


def _looks_like_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def describe(path: str) -> dict:
    """Summary of a .beton for log lines and tests: count, fields, labels, size ranges."""
    source = BetonSource(path)
    sizes = source.original_sizes
    return {"path": path, "images": len(source), "fields": dict(source._beton.fields),
            "classes": len(source.classes),
            "original_sizes": (sizes.min(0).tolist(), sizes.max(0).tolist()) if len(source)
            else None}


__all__ = ["FIELDS", "IMAGE", "LABEL", "ORIG_HEIGHT", "ORIG_WIDTH", "INSTALL_HINT",
           "JPEG_MODE", "RAW_MODE", "FFCVUnavailableError", "import_ffcv", "BetonFile",
           "BetonWriter",
           "BetonSource", "drop_rows", "is_beton", "describe"]
