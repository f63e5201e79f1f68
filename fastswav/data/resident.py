"""A whole small dataset held as one uint8 tensor, and a multi-crop loader over it.

For CIFAR-10-sized data (50,000 32x32 images are 150 MB as uint8) there is no reason to read
or decode anything per step: :class:`ResidentImages` decodes every image once into one
[N, 3, H, W] tensor (on the CPU or the GPU), and :class:`ResidentMultiCropLoader` indexes it
and runs the batched augmentation (:class:`~fastswav.data.batched_multicrop.BatchedMultiCrop`)
on whole batches where the images live. Batches have the format of
:func:`fastswav.data.loader.build_pretrain_loader`: ``(list of [B, 3, s, s] crops, 0)``.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..profiling import nvtx_range
from .loader import ShardedShuffleSampler
from .sources import ImageSource, UnreadableImageError

log = logging.getLogger("fastswav")

# Largest side of the automatic canvas of images of mixed sizes: 10,000 photos take 1.2 GB.
DEFAULT_MAX_CANVAS = 200


class ResidentImages:
    """Every image of a source, decoded once, as ``images`` uint8 [N, 3, H, W] on ``device``,
    with ``labels`` int64 [N] and ``original_sizes`` int64 [N, 2] (h, w before any resize).

    Images that all share one size are kept as they are. Otherwise (own photos: any sizes,
    grayscale, CMYK or alpha all decoded to RGB) each image is resized (bilinear,
    antialiased) to one canvas, aspect ratio not kept, and its original size is recorded, so
    that :class:`BatchedMultiCrop` (given ``original_sizes``) still draws crop scales and
    aspect ratios in the original image's coordinates and the crops come out undistorted.
    The canvas is ``canvas_size=(H, W)`` when given, else a square as large as the images'
    median shorter side, at most ``max_canvas`` pixels (the memory: N x 3 x side^2 bytes).
    Unreadable images are left out with one log line (``n_unreadable`` counts them).
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 original_sizes: Optional[torch.Tensor] = None, path: str = "the data",
                 n_unreadable: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        n = images.shape[0]
        self.images = images
        self.labels = (torch.full((n,), -1, dtype=torch.long) if labels is None
                       else labels.to(torch.long))
        self.original_sizes = (
            torch.tensor([list(images.shape[2:])], dtype=torch.long).expand(n, 2).contiguous()
            if original_sizes is None else original_sizes.to(torch.long))
        self.path = path
        self.n_unreadable = n_unreadable

    @classmethod
    def from_source(cls, source: ImageSource, device: Union[str, torch.device] = "cpu",
                    canvas_size: Optional[Sequence[int]] = None,
                    max_canvas: int = DEFAULT_MAX_CANVAS) -> "ResidentImages":
        """Decode every image of ``source`` once (see the class docstring)."""
        arrays, labels, sizes = [], [], []
        bad = 0
        for i in range(len(source)):
            try:
                array = source.decode(i)  # uint8 (H, W, 3)
            except UnreadableImageError as err:
                log.warning("leaving out unreadable image %s", err)
                bad += 1
                continue
            arrays.append(array)
            labels.append(int(source.labels[i]))
            sizes.append(array.shape[:2])
        if not arrays:
            raise ValueError(f"no readable image in {source.path}")
        shapes = {a.shape for a in arrays}
        if canvas_size is None and len(shapes) == 1:
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        else:
            if canvas_size is None:
                side = min(int(np.median([min(size) for size in sizes])), int(max_canvas))
                canvas_size = (max(side, 1),) * 2
                log.info("%s: images of %d sizes, each resized once to a %dx%d canvas "
                         "(crops are drawn in the original image's coordinates)",
                         source.path, len(shapes), *canvas_size)
            height, width = (int(v) for v in canvas_size)
            images = torch.empty(len(arrays), 3, height, width, dtype=torch.uint8)
            for k, array in enumerate(arrays):  # once, at build time
                image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
                if tuple(image.shape[1:]) != (height, width):
                    image = F.interpolate(image[None].float(), size=(height, width),
                                          mode="bilinear", antialias=True, align_corners=False)
                    image = image[0].round_().clamp_(0, 255).to(torch.uint8)
                images[k] = image
        return cls(images.to(device), torch.tensor(labels, dtype=torch.long, device=device),
                   torch.tensor(sizes, dtype=torch.long, device=device), path=source.path,
                   n_unreadable=bad)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: Union[str, torch.device]) -> "ResidentImages":
        return ResidentImages(self.images.to(device), self.labels.to(device),
                              self.original_sizes.to(device), self.path, self.n_unreadable)

    def __repr__(self) -> str:
        n, _, h, w = self.images.shape
        return f"{type(self).__name__}({self.path!r}, {n} images, {h}x{w}, {self.device})"


class ResidentMultiCropLoader:
    """Batches ``(list of [B, 3, s, s] crop tensors, 0)`` from :class:`ResidentImages`.

    Order: the same sharded shuffle as the reference loader (``seed + epoch``, padded to a
    multiple of ``world_size``, rank r takes every world_size-th index), so the ranks'
    shards are disjoint and together cover the data once per epoch. The augmentation draws
    from one generator per (seed, epoch, rank, batch), on ``device``. ``len()`` is the number of
    batches per epoch; call ``set_epoch`` every epoch.
    """

    def __init__(self, images: ResidentImages, augment: Callable, batch_size: int,
                 seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, device: Union[str, torch.device, None] = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        n = len(images)
        needed = batch_size * world_size if drop_last else world_size
        if n < needed:
            processes = "process" if world_size == 1 else "processes"
            raise ValueError(f"batch size {batch_size} x {world_size} {processes} needs at least "
                             f"{needed} images, {images.path} has {n}")
        self.images = images
        self.augment = augment
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = torch.device(device) if device is not None else images.device
        self.sampler = ShardedShuffleSampler(n, rank=rank, world_size=world_size, seed=seed,
                                             epoch=epoch, augmentation_seeds=False)
        # Sizes go to the augmentation only when some image was resized into its canvas.
        sizes = images.original_sizes
        canvas = torch.tensor(images.images.shape[2:], device=sizes.device)
        self._pass_sizes = bool((sizes != canvas).any())
        self._start_batch = 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Shuffle for ``epoch``, starting at batch ``start_batch`` (to resume mid-epoch:
        the batches after it are exactly those of an uninterrupted epoch)."""
        self.sampler.set_epoch(epoch)
        self._start_batch = start_batch

    def __len__(self) -> int:
        shard = len(self.sampler)
        return shard // self.batch_size if self.drop_last else math.ceil(shard / self.batch_size)

    def _generator(self, batch: int) -> torch.Generator:
        # One seed per (seed, epoch, rank, batch), mixed so that neighbouring values do not
        # collide; per batch, so that a run resumed mid-epoch draws the same crops.
        mixed = np.random.SeedSequence([self.sampler.seed, self.sampler.epoch, self.sampler.rank,
                                        batch]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(mixed[0]) << 31 | int(mixed[1]) >> 1)
        return generator

    def __iter__(self) -> Iterator:
        shard = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        source_device = self.images.device
        shard = shard.to(source_device)
        for b in range(self._start_batch, len(self)):
            index = shard[b * self.batch_size:(b + 1) * self.batch_size]
            batch = self.images.images.index_select(0, index).to(self.device, non_blocking=True)
            extra = {}
            if self._pass_sizes:
                extra["original_sizes"] = self.images.original_sizes.index_select(0, index).to(
                    self.device)
            with nvtx_range("augment"):
                crops = self.augment(batch, generator=self._generator(b), **extra)
            yield crops, 0
