"""Decode once, crop many: the multi-crop loader over a .beton, with or without FFCV.

Per image, the CPU does one thing: the stored JPEG is decoded once by libjpeg-turbo into the
top-left corner of a fixed ``C x C`` uint8 canvas (:func:`canvas_layout` says where and at
which size). The canvases go to the device, and
:class:`~fastswav.data.batched_multicrop.BatchedMultiCrop` cuts every crop there.

Two host stages fill the canvases; everything else is shared (:class:`DecodeOnceLoader`):

- FFCV's compiled pipeline (:class:`~fastswav.data.ffcv_loader.FFCVMultiCropLoader`), where
  the ``ffcv`` package imports;
- :class:`TorchvisionMultiCropLoader`: ``torchvision.io.decode_jpeg`` (libjpeg-turbo) on
  ``num_workers`` threads, reading the .beton through a memory map. It needs nothing beyond
  torch and torchvision, so it runs on any Python (FFCV 1.0.2 does not import on 3.12+).

Both give the same canvases for the same file (the same decoder library at full size); an
image too large for the canvas even at full stored size is scaled by libjpeg-turbo's DCT
under FFCV and decoded at full size then area-resized by torchvision (the same valid sizes,
slightly different pixels; the default canvas, the file's largest side up to 1024, never
needs it).

The host-to-device transfer is the loader's own, on a side CUDA stream: the training stream
waits for it on the device, and the host waits for it (an event) before it lets the host
stage refill the pinned buffer it was copied from (see :meth:`DecodeOnceLoader.canvases`).
"""
from __future__ import annotations

import collections
import math
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Union

import numpy as np
import torch

from .beton import IMAGE, JPEG_MODE, ORIG_HEIGHT, ORIG_WIDTH, BetonFile
from .loader import ShardedShuffleSampler

MAX_DEFAULT_CANVAS = 1024
DCT_DENOMINATOR = 8
# libjpeg-turbo decodes at k/8 of the stored size for k = 1..8, but only k = 8, 4, 2, 1 have
# fast (SIMD or trivial) inverse DCTs: measured here, per core, on the ImageNet sample capped
# at 512: k=8 ~1000 images/s, 7 ~500, 6 ~640, 5 ~740, 4 ~1100, 2 ~1250, 1 ~1450.
DCT_SCALES = (8, 4, 2, 1)


def canvas_layout(heights, widths, raw, canvas):
    """Where each stored image goes on a (C_h, C_w) canvas: ``(k, decoded [N, 2], valid
    [N, 2])``, int64 numpy arrays.

    heights, widths: [N] stored sizes; raw: [N] bool, images stored as pixels (no DCT scale).
    A JPEG decodes at k/8 of its size (ceil, as TurboJPEG), k the largest of 8, 4, 2, 1 whose
    decoded image fits the canvas (1 if none does); raw images at k = 8. A decoded image that
    fits is copied to the canvas's top-left corner as is (valid = decoded); one that does not
    is resized (area filter) to the largest size of its aspect ratio that fits, in integer
    arithmetic. Both host stages follow these rules.
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


def default_workers() -> int:
    """Decode threads per process: the cores this process may use, shared among the
    processes of this machine (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(local, 1))


def seed_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator on ``device`` seeded from ``key`` (mixed, so that neighbouring keys do not
    give related streams)."""
    mixed = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(mixed[0]) << 31 | int(mixed[1]) >> 1)
    return generator


class DecodeOnceLoader:
    """Batches ``(list of sum(n_crops) crop tensors [B, 3, s, s] on device, 0)`` from a .beton;
    a host stage (a subclass's ``_host_batches``) fills the canvases.

    path: a .beton written by :mod:`fastswav.data.write` (or any FFCV file with an RGB
        ``image`` field; without ``orig_height``/``orig_width`` the stored size stands for
        the original).
    augment: a :class:`~fastswav.data.batched_multicrop.BatchedMultiCrop` (it cuts the crops
        on ``device``).
    canvas: side C of the square uint8 canvas each image is decoded into (default: the
        file's largest stored side, at most 1024, so that every image decodes at full
        stored size; a smaller canvas decodes the larger images smaller).
    num_workers: decode threads (default :func:`default_workers`).
    batches_ahead: batches decoded ahead of the one being used.

    Order: the sharded shuffle of :class:`~fastswav.data.loader.ShardedShuffleSampler`
    (``seed + epoch``, padded to a multiple of ``world_size``, rank r takes every
    world_size-th index), the same for a given seed whatever the worker count. Crops draw
    from one generator per (seed, epoch, rank, batch) on ``device``, so a resumed epoch draws
    the same crops. The second element of each batch, the count of unreadable images
    skipped, is always 0: the writer left unreadable images out.
    """

    host_stage = "?"  # what decodes, for log lines

    def __init__(self, path: str, augment, batch_size: int, seed: int = 0, epoch: int = 0,
                 rank: int = 0, world_size: int = 1, device: Union[str, torch.device] = "cpu",
                 canvas: Optional[int] = None, num_workers: Optional[int] = None,
                 drop_last: bool = True, batches_ahead: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if canvas is not None and canvas < 8:
            raise ValueError(f"canvas must be >= 8 pixels, got {canvas}")
        if batches_ahead < 1:
            raise ValueError(f"batches_ahead must be >= 1, got {batches_ahead}")
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
        self.beton = beton
        self.augment = augment
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.batches_ahead = batches_ahead
        self.device = torch.device(device)
        self.num_workers = min(num_workers or default_workers(), os.cpu_count() or 1)
        self.sampler = ShardedShuffleSampler(n, rank=rank, world_size=world_size, seed=seed,
                                             epoch=epoch, augmentation_seeds=False)
        self._start_batch = 0
        meta = beton.metadata
        stored = meta[IMAGE]
        self.canvas = int(canvas or min(int(max(stored["height"].max(), stored["width"].max())),
                                        MAX_DEFAULT_CANVAS))
        _, _, self._valid = canvas_layout(
            stored["height"], stored["width"], stored["mode"] != JPEG_MODE,
            (self.canvas, self.canvas))
        if ORIG_HEIGHT in beton.fields and ORIG_WIDTH in beton.fields:
            sizes = np.stack([meta[ORIG_HEIGHT], meta[ORIG_WIDTH]], axis=1)
        else:
            sizes = np.stack([stored["height"], stored["width"]], axis=1)
        # Both size tables live on the device (16 bytes an image each), so a step only
        # gathers from them there: no per-batch host-to-device copy.
        self.valid_sizes = torch.from_numpy(self._valid).to(self.device)  # [N, 2] (h, w)
        self.original_sizes = torch.from_numpy(sizes.astype(np.int64)).to(self.device)
        self._copy_stream = (torch.cuda.Stream(self.device) if self.device.type == "cuda"
                             else None)

    # --- order ----------------------------------------------------------------------------

    def _epoch_order(self) -> np.ndarray:
        """This rank's indices for the current epoch, from the start batch to the last batch
        (a whole number of batches with drop_last)."""
        shard = np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.sampler))
        return shard[self._start_batch * self.batch_size:len(self) * self.batch_size]

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

    # --- host stage and transfer ----------------------------------------------------------

    def _host_batches(self, order: np.ndarray) -> Iterator[torch.Tensor]:
        """uint8 [b, C, C, 3] host canvases of ``order`` cut into consecutive batches. A
        yielded buffer may be refilled as soon as the next batch is asked for."""
        raise NotImplementedError

    def _to_device(self, host: torch.Tensor):
        """-> (the canvases on the device, the transfer's CUDA event or None).

        On CUDA the copy runs on a side stream (the copy engine, not behind the training
        kernels); the current stream waits for it on the device, and the copy's memory is
        marked as used by the current stream so the allocator keeps it until the
        augmentation has read it."""
        if self._copy_stream is None:
            return host.to(self.device), None
        current = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            images = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        current.wait_event(event)
        images.record_stream(current)
        return images, event

    def canvases(self) -> Iterator:
        """The decoded batches before augmentation: ``(canvases uint8 [B, 3, C, C], valid
        sizes int64 [B, 2], original sizes int64 [B, 2], indices int64 [B])``, all on
        ``device`` but the indices (CPU). Image i fills the top-left valid[i] (h, w) of its
        canvas. On the CPU the canvases are the host stage's own buffers, refilled a few
        batches later: use them before taking more.
        """
        order = self._epoch_order()
        index_host = torch.from_numpy(order)
        index = index_host.to(self.device)  # once per epoch; batches slice it on the device
        start = 0
        for host in self._host_batches(order):
            count = host.shape[0]
            images, event = self._to_device(host)
            rows = index[start:start + count]
            yield (images.permute(0, 3, 1, 2), self.valid_sizes.index_select(0, rows),
                   self.original_sizes.index_select(0, rows), index_host[start:start + count])
            start += count
            # Asking the host stage for the next batch lets it refill a pinned buffer that an
            # asynchronous copy may still be reading (FFCV's own events only order the GPU's
            # streams, never its host threads). So the host waits here for this batch's copy,
            # which ran on the copy stream since it was queued and is normally long done.
            if event is not None:
                event.synchronize()

    def __iter__(self) -> Iterator:
        first = self._start_batch
        for b, (images, valid, original, _) in enumerate(self.canvases(), start=first):
            generator = seed_generator(self.device, self.sampler.seed, self.sampler.epoch,
                                       self.sampler.rank, b)
            yield self.augment(images, generator=generator, valid_sizes=valid,
                               original_sizes=original), 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, {self.sampler.n} images, batch "
                f"{self.batch_size}, canvas {self.canvas}, {self.num_workers} workers, "
                f"rank {self.sampler.rank}/{self.sampler.world_size}, {self.device})")


class TorchvisionMultiCropLoader(DecodeOnceLoader):
    """:class:`DecodeOnceLoader` whose host stage is ``torchvision.io.decode_jpeg``
    (libjpeg-turbo) on ``num_workers`` threads; no FFCV needed.

    The file is memory-mapped (copy-on-write, never written): each JPEG is handed to the
    decoder as a view of the map, without a copy. ``batches_ahead + 1`` canvas buffers
    (pinned where the device is CUDA) are filled in turn; each batch is split among the
    threads, which decode and copy rows straight into the buffer (the decoder and numpy's
    copy both release the GIL).
    """

    host_stage = "torchvision.io.decode_jpeg (libjpeg-turbo), no FFCV"

    def __init__(self, path: str, augment, batch_size: int, **kwargs):
        super().__init__(path, augment, batch_size, **kwargs)
        from torchvision.io import ImageReadMode

        self._rgb = ImageReadMode.RGB
        beton = self.beton
        image = beton.metadata[IMAGE]
        alloc = beton.alloc_table
        by_ptr = np.argsort(alloc["ptr"])
        ptrs, sizes = alloc["ptr"][by_ptr], alloc["size"][by_ptr]
        at = np.searchsorted(ptrs, image["data_ptr"])
        if (at >= len(ptrs)).any() or (ptrs[np.minimum(at, len(ptrs) - 1)]
                                       != image["data_ptr"]).any():
            raise ValueError(f"{self.path}: an image's data has no allocation (damaged file)")
        self._ptr = image["data_ptr"].astype(np.int64)
        self._size = sizes[at].astype(np.int64)
        self._jpeg = image["mode"] == JPEG_MODE
        self._stored = np.stack([image["height"], image["width"]], axis=1).astype(np.int64)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        pin = self.device.type == "cuda"
        self._slots = [torch.empty(batch_size, self.canvas, self.canvas, 3, dtype=torch.uint8,
                                   pin_memory=pin) for _ in range(self.batches_ahead + 1)]
        self._pool = None
        self._pool_lock = threading.Lock()

    def _threads(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers,
                                                thread_name_prefix="fastswav-decode")
            return self._pool

    def _decode_rows(self, slot: np.ndarray, indices: np.ndarray, first: int) -> None:
        """Decode images ``indices`` into rows ``first, first + 1, ...`` of ``slot``."""
        from torchvision.io import decode_jpeg

        ptrs, sizes = self._ptr[indices].tolist(), self._size[indices].tolist()
        valid = self._valid[indices].tolist()
        stored = self._stored[indices].tolist()
        jpeg = self._jpeg[indices].tolist()
        for row, (ptr, size, (vh, vw), (h, w), is_jpeg) in enumerate(
                zip(ptrs, sizes, valid, stored, jpeg), start=first):
            data = self._bytes[ptr:ptr + size]
            if is_jpeg:
                image = decode_jpeg(data, mode=self._rgb)  # [3, h, w], a view of HWC pixels
                pixels = image.permute(1, 2, 0)
            else:
                pixels = data.view(h, w, 3)
            if pixels.shape[0] != vh or pixels.shape[1] != vw:
                pixels = _area_resize(pixels, vh, vw)
            slot[row, :vh, :vw] = pixels.numpy()

    def _host_batches(self, order: np.ndarray) -> Iterator[torch.Tensor]:
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pool = self._threads()
        pending = collections.deque()

        def submit(j: int):
            slot = self._slots[j % len(self._slots)]
            indices = batches[j]
            rows = slot.numpy()
            step = -(-len(indices) // self.num_workers)
            futures = [pool.submit(self._decode_rows, rows, indices[lo:lo + step], lo)
                       for lo in range(0, len(indices), step)]
            pending.append((slot[:len(indices)], futures))

        for j in range(min(self.batches_ahead, len(batches))):
            submit(j)
        try:
            for j in range(len(batches)):
                if j + self.batches_ahead < len(batches):
                    # Its slot is that of batch j - 1, which the consumer is done with: it
                    # asked for batch j (and waited for j - 1's transfer, see canvases()).
                    submit(j + self.batches_ahead)
                slot, futures = pending.popleft()
                for future in futures:
                    future.result()
                yield slot
        finally:
            for _, futures in pending:  # an abandoned epoch: let its decodes finish
                for future in futures:
                    future.cancel()
                for future in futures:
                    if not future.cancelled():
                        future.exception()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _area_resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (h, w, 3) -> (height, width, 3), area filter (the canvas's size rule when the
    full-size decode does not fit: libjpeg-turbo's DCT scaling is not exposed by torchvision)."""
    x = pixels.permute(2, 0, 1).unsqueeze(0).float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="area")
    return x.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous()


__all__ = ["DCT_DENOMINATOR", "DCT_SCALES", "MAX_DEFAULT_CANVAS", "DecodeOnceLoader",
           "TorchvisionMultiCropLoader", "canvas_layout", "default_workers", "seed_generator"]
