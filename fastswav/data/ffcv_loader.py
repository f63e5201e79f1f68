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

Where FFCV cannot be imported (it needs Debian's libturbojpeg and OpenCV, and FFCV 1.0.2
does not import on Python 3.12+), the builder returns the same decode-once loader with
torchvision's libjpeg-turbo decoder as its host stage
(:class:`~fastswav.data.decode_once.TorchvisionMultiCropLoader`), and logs which one runs.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .batched_multicrop import BatchedMultiCrop
from .beton import IMAGE, FFCVUnavailableError, import_ffcv, is_beton
from .decode_once import (DCT_DENOMINATOR, DecodeOnceLoader, TorchvisionMultiCropLoader,
                          canvas_layout, default_workers)  # noqa: F401 (the last two re-exported)
from .multicrop import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("fastswav")

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


class _Threads:
    """Keeps the caller's torch intra-op thread count: FFCV sets it to its worker count
    whenever it sets numba's (its Compiler.set_num_threads). FFCV's background thread still
    does so once per epoch, for that thread."""

    def __enter__(self):
        self.count = torch.get_num_threads()

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.count:
            torch.set_num_threads(self.count)


class FFCVMultiCropLoader(DecodeOnceLoader):
    """:class:`~fastswav.data.decode_once.DecodeOnceLoader` whose host stage is FFCV's
    compiled pipeline: :func:`_canvas_decoder_class` on ``num_workers`` numba threads,
    ``batches_ahead`` batches ahead (each holds B canvases and B scratch buffers). FFCV's
    pipeline stops at host memory: the loader makes the device copy itself (see
    :meth:`DecodeOnceLoader.canvases` for why).
    """

    host_stage = "FFCV (libjpeg-turbo)"

    def __init__(self, path: str, augment: BatchedMultiCrop, batch_size: int,
                 os_cache: bool = True, **kwargs):
        import_ffcv()
        from ffcv.loader import Loader
        from ffcv.transforms import ToTensor
        from ffcv.traversal_order.base import TraversalOrder

        super().__init__(path, augment, batch_size, **kwargs)
        owner = self

        class _ShardOrder(TraversalOrder):
            """This rank's batches of the epoch set by set_epoch (FFCV's own epoch counter is
            ignored). FFCV calls the order object with the loader, hence __call__."""

            def __init__(self):
                pass

            def __call__(self, loader):
                return self

            def sample_order(self, epoch: int):
                return owner._epoch_order().astype(np.uint64)

        decoder = _canvas_decoder_class()((self.canvas, self.canvas))
        pipelines = {name: None for name in self.beton.fields if name != IMAGE}
        pipelines[IMAGE] = [decoder, ToTensor()]
        with _Threads():
            self._loader = Loader(self.path, batch_size=batch_size,
                                  num_workers=self.num_workers, os_cache=os_cache,
                                  order=_ShardOrder(), pipelines=pipelines,
                                  drop_last=self.drop_last, batches_ahead=self.batches_ahead)

    def _host_batches(self, order: np.ndarray) -> Iterator:
        # FFCV follows _ShardOrder, i.e. the same epoch order, cut into consecutive batches.
        # Its contract matches the base class's: a batch's buffer is refilled only after the
        # next batch is taken (batches_ahead + 2 slots).
        with _Threads():
            batches = iter(self._loader)
        try:
            for (images,) in batches:
                yield images
        finally:
            batches.close()


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
    ``world_size``: batches ``(list of sum(n_crops) tensors [B, 3, s, s] in out_dtype on
    device, 0)``, crop-major (all crops of ``size_crops[0]`` first). Call
    ``set_epoch(epoch, start_batch=0)`` every epoch.

    The host stage is FFCV (:class:`FFCVMultiCropLoader`) where ``ffcv`` imports, else
    torchvision's decoder (:class:`~fastswav.data.decode_once.TorchvisionMultiCropLoader`):
    the same canvases, crops and batch format; one log line says which runs and why.
    ``num_workers``: decode threads (default: the cores per process of this machine).
    Raises FileNotFoundError for a missing file, ValueError for a file that is not a .beton
    or bad arguments.
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
    augment = BatchedMultiCrop(**crop_args, out_dtype=out_dtype, channels_last=channels_last)
    loader_args = dict(seed=seed, rank=rank, world_size=world_size, device=device,
                       canvas=canvas, num_workers=num_workers, drop_last=drop_last)
    try:
        import_ffcv()
    except FFCVUnavailableError as err:
        reason = str(err).split(";")[0]
        loader = TorchvisionMultiCropLoader(path, augment, batch_size, **loader_args)
    else:
        reason = "ffcv is importable"
        loader = FFCVMultiCropLoader(path, augment, batch_size, **loader_args)
    log.info("decode-once loader: %s decodes %s (%s), %d decode threads, canvas %d, "
             "crops on %s", loader.host_stage, path, reason, loader.num_workers, loader.canvas,
             loader.device)
    return loader
