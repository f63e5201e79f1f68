"""Decode once, crop many: the multi-crop loader over an FFCV .beton.

Per image, the CPU does one thing: FFCV's reader hands the stored JPEG to libjpeg-turbo, which
decodes it once into the top-left corner of a fixed ``C x C`` uint8 canvas, at full stored
size or, where that does not fit, at 1/2, 1/4 or 1/8 scale in the DCT domain (the scales
with fast inverse DCTs; no resize pass). That runs in FFCV's compiled pipeline on
``num_workers`` threads while earlier batches train. The canvases, uint8 [B, 3, C, C], go to
the device with each image's size on its canvas and its ORIGINAL size (before the writer's
cap, stored in the .beton), and :class:`~fastswav.data.batched_multicrop.BatchedMultiCrop`
cuts every crop there (2x224 + 6x96 by default): boxes are drawn in the original image's
coordinates and mapped onto the canvas, so crop area fractions and aspect ratios follow the
official RandomResizedCrop recipe on the original image; flips, colour jitter, grayscale,
blur and normalisation follow as batched work.

Entry point::

    loader = build_ffcv_multicrop_loader(
        "train.beton", batch_size=64, size_crops=cfg.size_crops, n_crops=cfg.n_crops,
        min_scale=cfg.min_scale_crops, max_scale=cfg.max_scale_crops,
        blur_prob=cfg.blur_prob, jitter_strength=cfg.jitter_strength,
        rank=rank, world_size=world_size, seed=cfg.seed, device=device)
    for epoch in range(epochs):
        loader.set_epoch(epoch)            # or set_epoch(epoch, start_batch=k) to resume
        for crops, n_skipped in loader:    # crops: list of [B, 3, s, s] on ``device``
            ...

Order: the sharded shuffle of :class:`~fastswav.data.loader.ShardedShuffleSampler`
(``seed + epoch``, padded to a multiple of ``world_size``, rank r takes every
world_size-th index): each rank a distinct shard, together the whole file once per epoch,
the same for a given seed whatever the worker count. Crops draw from one generator per
(seed, epoch, rank, batch) on ``device``, so a resumed epoch draws the same crops.

Where FFCV cannot be imported (it needs Debian's libturbojpeg and OpenCV), the builder logs
one line and returns the reference path instead: the .beton read with numpy
(:class:`~fastswav.data.beton.BetonSource`) through the PIL multi-crop loader.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .batched_multicrop import BatchedMultiCrop
from .beton import (IMAGE, JPEG_MODE, ORIG_HEIGHT, ORIG_WIDTH, BetonFile, BetonSource,
                    FFCVUnavailableError, import_ffcv, is_beton)
from .loader import ShardedShuffleSampler
from .multicrop import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("fastswav")

MAX_DEFAULT_CANVAS = 1024
DCT_DENOMINATOR = 8
# libjpeg-turbo decodes at k/8 of the stored size for k = 1..8, but only k = 8, 4, 2, 1 have
# fast (SIMD or trivial) inverse DCTs: measured here, per core, on the ImageNet sample capped
# at 512: k=8 ~1000 images/s, 7 ~500, 6 ~640, 5 ~740, 4 ~1100, 2 ~1250, 1 ~1450.
DCT_SCALES = (8, 4, 2, 1)


def canvas_layout(heights, widths, raw, canvas: Sequence[int]):
    """Where each stored image goes on a (C_h, C_w) canvas: ``(k, decoded [N, 2], valid
    [N, 2])``, int64 numpy arrays.

    heights, widths: [N] stored sizes; raw: [N] bool, images stored as pixels (no DCT scale).
    A JPEG decodes at k/8 of its size (ceil, as TurboJPEG), k the largest of 8, 4, 2, 1 whose
    decoded image fits the canvas (1 if none does); raw images at k = 8. A decoded image that
    fits is copied to the canvas's top-left corner as is (valid = decoded); one that does not
    is resized (area filter) to the largest size of its aspect ratio that fits, in integer
    arithmetic. The decoder (:func:`_canvas_decoder_class`) follows these same rules.
    """
    ch, cw = int(canvas[0]), int(canvas[1])
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    k = np.full(h.shape, DCT_SCALES[-1], dtype=np.int64)
    for scale in DCT_SCALES[::-1][1:]:  # 2, 4, 8: the largest that fits wins
        fits = (-(-h * scale // DCT_DENOMINATOR) <= ch) & (-(-w * scale // DCT_DENOMINATOR) <= cw)
        k = np.where(fits, scale, k)
    k = np.where(np.asarray(raw, dtype=bool), DCT_DENOMINATOR, k)
    dh = -(-h * k // DCT_DENOMINATOR)
    dw = -(-w * k // DCT_DENOMINATOR)
    fits = (dh <= ch) & (dw <= cw)
    height_bound = dh * cw >= dw * ch
    vh = np.where(fits, dh, np.where(height_bound, ch, np.maximum(1, dh * cw // dw)))
    vw = np.where(fits, dw, np.where(height_bound, np.maximum(1, dw * ch // dh), cw))
    return k, np.stack([dh, dw], axis=1), np.stack([vh, vw], axis=1)


@functools.lru_cache(maxsize=1)
def _canvas_decoder_class():
    """:class:`CanvasDecoder`, built on first use: it subclasses an FFCV class, and FFCV is
    optional (imported here, not at module import)."""
    import_ffcv()
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class CanvasDecoder(SimpleRGBImageDecoder):
        """FFCV decoder: each stored image decoded once into the top-left corner of a uint8
        (C_h, C_w, 3) canvas, by the rules of :func:`canvas_layout`.

        JPEGs decode into a per-sample scratch buffer (FFCV's imdecode writes rows of the
        decoded width), then rows are copied into the canvas; an image too large for the
        canvas even at 1/8 is resized (OpenCV, area filter) to fit. Pixels of the canvas
        outside the image are left as they were (the crops never read them).
        """

        def __init__(self, canvas: Sequence[int]):
            super().__init__()
            self.canvas = (int(canvas[0]), int(canvas[1]))

        def declare_state_and_memory(self, previous_state):
            meta = self.metadata
            raw = meta["mode"] != IMAGE_MODES["jpg"]
            _, decoded, valid = canvas_layout(meta["height"], meta["width"], raw, self.canvas)
            fits = (decoded <= valid).all(axis=1)
            # Scratch: the decoded JPEG, then (where it does not fit) its resized copy.
            need = np.where(raw, 0, decoded.prod(axis=1)) + np.where(fits, 0, valid.prod(axis=1))
            scratch = max(1, int(need.max()) * 3)
            shape = (*self.canvas, 3)
            dtype = np.dtype("<u1")
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                    (AllocationQuery(shape, dtype), AllocationQuery((scratch,), dtype)))

        def generate_code(self):
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_c = Compiler.compile(resize_crop)
            jpg = IMAGE_MODES["jpg"]
            ch, cw = self.canvas
            den = DCT_DENOMINATOR

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, scratch = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    data = mem_read(field["data_ptr"], storage_state)
                    h = np.int64(field["height"])
                    w = np.int64(field["width"])
                    used = 0
                    if field["mode"] == jpg:
                        k = 8  # the largest of 8, 4, 2, 1 that fits (canvas_layout)
                        while k > 1 and ((h * k + den - 1) // den > ch
                                         or (w * k + den - 1) // den > cw):
                            k //= 2
                        dh = (h * k + den - 1) // den
                        dw = (w * k + den - 1) // den
                        used = dh * dw * 3
                        image = scratch[dst_ix][:used].reshape(dh, dw, 3)
                        imdecode_c(data, image, np.uint32(h), np.uint32(w), np.uint32(h),
                                   np.uint32(w), 0, 0, k, den, False, False)
                    else:
                        dh, dw = h, w
                        image = data.reshape(dh, dw, 3)
                    if dh <= ch and dw <= cw:
                        # Row by row, as flat byte runs (a 3-D slice copy is much slower).
                        rows = destination[dst_ix].reshape(ch, cw * 3)
                        pixels = image.reshape(dh, dw * 3)
                        for row in range(dh):
                            rows[row, :dw * 3] = pixels[row]
                    else:
                        if dh * cw >= dw * ch:
                            vh, vw = ch, max(1, dw * ch // dh)
                        else:
                            vh, vw = max(1, dh * cw // dw), cw
                        fitted = scratch[dst_ix][used:used + vh * vw * 3].reshape(vh, vw, 3)
                        resize_c(image, 0, dh, 0, dw, fitted)
                        destination[dst_ix][:vh, :vw] = fitted
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return CanvasDecoder


def _seed_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from ``key`` (mixed, so that neighbouring keys do not
    give related streams)."""
    mixed = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(mixed[0]) << 31 | int(mixed[1]) >> 1)
    return generator


def default_workers() -> int:
    """Decode threads per process: the cores this process may use, shared among the
    processes of this machine (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(local, 1))


class _Threads:
    """Keeps the caller's torch intra-op thread count: FFCV sets it to its worker count
    whenever it sets numba's (its Compiler.set_num_threads). FFCV's background thread still
    does so once per epoch, for that thread."""

    def __enter__(self):
        self.count = torch.get_num_threads()

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.count:
            torch.set_num_threads(self.count)


class FFCVMultiCropLoader:
    """Batches ``(list of sum(n_crops) crop tensors [B, 3, s, s] on device, 0)`` from a .beton.

    path: a .beton written by :mod:`fastswav.data.write` (or any FFCV file with an RGB
        ``image`` field; without ``orig_height``/``orig_width`` the stored size stands for
        the original).
    augment: a :class:`BatchedMultiCrop` (it cuts the crops on ``device``).
    canvas: side C of the square uint8 canvas each image is decoded into (default: the
        file's largest stored side, at most 1024, so that every image decodes at full
        stored size; a smaller canvas decodes the larger images at 1/2, 1/4 or 1/8).
    num_workers: decode threads (FFCV's numba threads; default :func:`default_workers`).
    batches_ahead: batches FFCV decodes ahead (each holds B canvases and B scratch buffers,
        pinned where CUDA is present).
    The second element of each batch, the count of unreadable images skipped, is always 0:
    the writer left unreadable images out.
    """

    def __init__(self, path: str, augment: BatchedMultiCrop, batch_size: int, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1,
                 device: Union[str, torch.device] = "cpu", canvas: Optional[int] = None,
                 num_workers: Optional[int] = None, drop_last: bool = True,
                 batches_ahead: int = 2, os_cache: bool = True):
        import_ffcv()
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor
        from ffcv.traversal_order.base import TraversalOrder

        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if canvas is not None and canvas < 8:
            raise ValueError(f"canvas must be >= 8 pixels, got {canvas}")
        beton = BetonFile(os.fspath(path))
        if beton.fields.get(IMAGE) != 2:
            raise ValueError(f"{path} has no RGB image field named {IMAGE!r}")
        n = beton.num_samples
        needed = batch_size * world_size if drop_last else world_size
        if n < needed:
            processes = "process" if world_size == 1 else "processes"
            raise ValueError(f"batch size {batch_size} x {world_size} {processes} needs at least "
                             f"{needed} images, {path} has {n}")
        self.path = os.fspath(path)
        self.augment = augment
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.num_workers = min(num_workers or default_workers(), os.cpu_count() or 1)
        self.sampler = ShardedShuffleSampler(n, rank=rank, world_size=world_size, seed=seed,
                                             epoch=epoch, augmentation_seeds=False)
        self._start_batch = 0
        meta = beton.metadata
        stored = meta[IMAGE]
        self.canvas = int(canvas or min(int(max(stored["height"].max(), stored["width"].max())),
                                        MAX_DEFAULT_CANVAS))
        _, _, valid = canvas_layout(stored["height"], stored["width"],
                                    stored["mode"] != JPEG_MODE, (self.canvas, self.canvas))
        self.valid_sizes = torch.from_numpy(valid)  # [N, 2] (h, w) of each image on its canvas
        if ORIG_HEIGHT in beton.fields and ORIG_WIDTH in beton.fields:
            sizes = np.stack([meta[ORIG_HEIGHT], meta[ORIG_WIDTH]], axis=1)
        else:
            sizes = np.stack([stored["height"], stored["width"]], axis=1)
        self.original_sizes = torch.from_numpy(sizes.astype(np.int64))  # [N, 2] (h, w)

        owner = self

        class _ShardOrder(TraversalOrder):
            """This rank's batches of the epoch set by set_epoch (FFCV's own epoch counter is
            ignored). FFCV calls the order object with the loader, hence __call__."""

            def __init__(self):
                pass

            def __call__(self, loader):
                return self

            def sample_order(self, epoch: int):
                return owner._epoch_order()

        decoder = _canvas_decoder_class()((self.canvas, self.canvas))
        image_pipeline = [decoder, ToTensor()]
        if self.device.type == "cuda":
            image_pipeline.append(ToDevice(self.device, non_blocking=True))
        pipelines = {name: None for name in beton.fields if name != IMAGE}
        pipelines[IMAGE] = image_pipeline
        with _Threads():
            self._loader = Loader(self.path, batch_size=batch_size,
                                  num_workers=self.num_workers, os_cache=os_cache,
                                  order=_ShardOrder(), pipelines=pipelines, drop_last=drop_last,
                                  batches_ahead=batches_ahead)

    def _epoch_order(self) -> np.ndarray:
        """This rank's indices for the current epoch, from the start batch to the last batch
        (a whole number of batches with drop_last)."""
        shard = np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.sampler))
        return shard[self._start_batch * self.batch_size:len(self) * self.batch_size].astype(
            np.uint64)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Shuffle for ``epoch``, starting at batch ``start_batch`` (to resume mid-epoch: the
        batches after it are exactly those of an uninterrupted epoch)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.sampler.set_epoch(epoch)
        self._start_batch = start_batch

    def __len__(self) -> int:
        shard = len(self.sampler)
        return shard // self.batch_size if self.drop_last else math.ceil(shard / self.batch_size)

    def canvases(self) -> Iterator:
        """The decoded batches before augmentation: ``(canvases uint8 [B, 3, C, C], valid
        sizes int64 [B, 2], original sizes int64 [B, 2], indices int64 [B])``, all on
        ``device`` but the indices (CPU). Image i fills the top-left valid[i] (h, w) of its
        canvas. The canvases may be FFCV's own buffers, reused a few batches later: use them
        before taking more.

        The sizes come from the file's metadata, in the batch order FFCV follows: the
        epoch's order cut into consecutive batches.
        """
        order = torch.from_numpy(self._epoch_order().astype(np.int64))
        with _Threads():
            batches = iter(self._loader)
        try:
            start = 0
            for (images,) in batches:
                index = order[start:start + images.shape[0]]
                start += images.shape[0]
                valid = self.valid_sizes.index_select(0, index).to(self.device, non_blocking=True)
                original = self.original_sizes.index_select(0, index).to(self.device,
                                                                         non_blocking=True)
                yield images.permute(0, 3, 1, 2), valid, original, index
        finally:
            batches.close()

    def __iter__(self) -> Iterator:
        first = self._start_batch
        for b, (images, valid, original, _) in enumerate(self.canvases(), start=first):
            generator = _seed_generator(self.device, self.sampler.seed, self.sampler.epoch,
                                        self.sampler.rank, b)
            yield self.augment(images, generator=generator, valid_sizes=valid,
                               original_sizes=original), 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, {self.sampler.n} images, batch "
                f"{self.batch_size}, canvas {self.canvas}, {self.num_workers} workers, "
                f"rank {self.sampler.rank}/{self.sampler.world_size}, {self.device})")


def build_ffcv_multicrop_loader(
    path: str,
    batch_size: int,
    *,
    size_crops: Sequence[int] = (224, 96),
    n_crops: Sequence[int] = (2, 6),
    min_scale: Sequence[float] = (0.14, 0.05),
    max_scale: Sequence[float] = (1.0, 0.14),
    blur_prob: float = 0.5,
    jitter_strength: float = 1.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    out_dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    canvas: Optional[int] = None,
    num_workers: Optional[int] = None,
    drop_last: bool = True,
):
    """The decode-once multi-crop loader over the .beton ``path`` for rank ``rank`` of
    ``world_size``: an :class:`FFCVMultiCropLoader` whose batches are ``(list of
    sum(n_crops) tensors [B, 3, s, s] in out_dtype on device, 0)``, crop-major (all crops of
    ``size_crops[0]`` first). Call ``set_epoch(epoch, start_batch=0)`` every epoch.

    Where FFCV cannot be imported, logs ONE warning and returns the reference path instead:
    a :func:`~fastswav.data.loader.build_pretrain_loader` over the .beton read with numpy and
    :class:`~fastswav.data.multicrop.MultiCropTransform` (same crop arguments; its batches are
    on the CPU, with ``num_workers`` loader processes, default 0), with the same
    ``set_epoch`` and batch format. Raises FileNotFoundError for a missing file, ValueError
    for a file that is not a .beton or bad arguments.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f".beton file not found: {path}")
    if not is_beton(path):
        raise ValueError(f"{path} is not an FFCV .beton file; write one with "
                         f"python -m fastswav.data.write SRC OUT.beton")
    crop_args = dict(size_crops=size_crops, n_crops=n_crops, min_scale=min_scale,
                     max_scale=max_scale, blur_prob=blur_prob, jitter_strength=jitter_strength,
                     mean=mean, std=std)
    try:
        import_ffcv()
    except FFCVUnavailableError as err:
        log.warning("decode-once loader unavailable, using the reference PIL multi-crop path "
                    "on %s instead (slower): %s", path, err)
        from .loader import MultiCropDataset, build_pretrain_loader
        from .multicrop import MultiCropTransform

        dataset = MultiCropDataset(BetonSource(path), MultiCropTransform(**crop_args))
        return build_pretrain_loader(dataset, batch_size=batch_size,
                                     num_workers=num_workers or 0, seed=seed, rank=rank,
                                     world_size=world_size, drop_last=drop_last,
                                     pin_memory=torch.device(device).type == "cuda")
    augment = BatchedMultiCrop(**crop_args, out_dtype=out_dtype, channels_last=channels_last)
    return FFCVMultiCropLoader(path, augment, batch_size, seed=seed, rank=rank,
                               world_size=world_size, device=device, canvas=canvas,
                               num_workers=num_workers, drop_last=drop_last)
