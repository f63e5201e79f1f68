"""Multi-crop dataset, batching and the sharded, reproducible pretraining loader.

- :class:`MultiCropDataset` turns an image source into multi-crop samples and skips images
  that cannot be decoded (logged once by name, counted in every batch).
- :class:`ShardedShuffleSampler` shuffles with ``seed + epoch`` (as DistributedSampler does)
  and gives each rank its own shard. It also hands out one augmentation seed per image and
  epoch, so the crops of an image depend only on (seed, epoch, image), not on the number of
  workers, the rank count or where a run was resumed.
- :func:`build_pretrain_loader` puts them together in a DataLoader with ``set_epoch``.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .sources import ImageSource, UnreadableImageError

log = logging.getLogger("fastswav")

# Augmentation seeds are drawn below this bound (torch.manual_seed takes any 64-bit value).
_SEED_BOUND = 2**62


class MultiCropDataset(Dataset):
    """``dataset[i] -> (crops, n_skipped)``: the transform's list of crop tensors for image
    ``i``, and how many unreadable images were passed over to find a readable one.

    An unreadable image is logged once (per process) by name and replaced by the next
    readable image, wrapping at the end. ``i`` may also be ``(i, augmentation_seed)`` (what
    :class:`ShardedShuffleSampler` yields): the transform then draws from a torch generator
    seeded with it, leaving the global generator as it was.
    """

    def __init__(self, source: ImageSource, transform: Callable):
        self.source = source
        self.transform = transform
        self._unreadable: set = set()  # indices known to be bad in this process

    def __len__(self) -> int:
        return len(self.source)

    def _load_readable(self, index: int):
        """The first readable image at or after ``index`` (wrapping), and the count skipped."""
        n = len(self.source)
        skipped = 0
        for step in range(n):
            i = (index + step) % n
            if i in self._unreadable:
                skipped += 1
                continue
            try:
                image, _ = self.source.load(i)
                return image, skipped
            except UnreadableImageError as err:
                self._unreadable.add(i)
                log.warning("skipping unreadable image %s", err)
                skipped += 1
        raise RuntimeError(f"no readable image in {self.source.path}: all {n} failed to decode")

    def __getitem__(self, index: Union[int, tuple]):
        augmentation_seed: Optional[int] = None
        if isinstance(index, tuple):
            index, augmentation_seed = index
        image, skipped = self._load_readable(int(index))
        if augmentation_seed is None:
            return self.transform(image), skipped
        # Seed the CPU generator for this sample, then put its state back, so seeding does not
        # disturb the training loop's own random stream (with num_workers=0). The generator's
        # own methods: torch.manual_seed also visits every accelerator (~200 us a call).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(augmentation_seed)
        try:
            return self.transform(image), skipped
        finally:
            generator.set_state(state)


def collate_multicrop(batch):
    """[(crops, n_skipped), ...] -> ([tensor [B, 3, s, s] per crop position], total skipped)."""
    crops_per_sample = [crops for crops, _ in batch]
    positions = len(crops_per_sample[0])
    stacked = [torch.stack([crops[p] for crops in crops_per_sample]) for p in range(positions)]
    return stacked, sum(int(skipped) for _, skipped in batch)


class ShardedShuffleSampler(Sampler):
    """Deterministic shuffle of ``n`` indices with ``seed + epoch``, sharded over ranks.

    Like ``DistributedSampler``: the permutation is padded (by repeating its start) to a
    multiple of ``world_size`` and rank r takes positions r, r + world_size, ... So the shards
    are disjoint and together cover every index once per epoch (plus the padding). Yields
    ``(index, augmentation_seed)`` pairs, or plain indices with ``augmentation_seeds=False``.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, shuffle: bool = True, augmentation_seeds: bool = True):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.augmentation_seeds = augmentation_seeds
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Shuffle for ``epoch``; leave out the first ``skip`` indices of this rank's shard
        (resuming mid-epoch: the rest come exactly as in an uninterrupted epoch)."""
        self.epoch = epoch
        self.skip = skip

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self) -> Iterator:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        padding = len(self) * self.world_size - self.n
        if padding:
            order = torch.cat([order, order[:padding]])
        shard = order[self.rank::self.world_size].tolist()
        shard = shard[self.skip:]
        if not self.augmentation_seeds:
            return iter(shard)
        # One seed per image (drawn for all n, so it does not depend on the sharding).
        seeds = torch.randint(_SEED_BOUND, (self.n,), generator=generator).tolist()
        return iter([(i, seeds[i]) for i in shard])


class PretrainLoader(DataLoader):
    """A DataLoader over a :class:`ShardedShuffleSampler`; call ``set_epoch`` every epoch."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Shuffle for ``epoch``, starting at batch ``start_batch`` (to resume mid-epoch)."""
        self.sampler.set_epoch(epoch, skip=start_batch * self.batch_size)


def build_pretrain_loader(dataset: MultiCropDataset, batch_size: int, num_workers: int = 0,
                          seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                          drop_last: bool = True, pin_memory: bool = False,
                          prefetch_factor: Optional[int] = None) -> PretrainLoader:
    """Batches of ``(list of [B, 3, s, s] crop tensors, number of images skipped)`` for rank
    ``rank`` of ``world_size``, shuffled with ``seed + epoch``.

    Workers are persistent (kept across epochs; the sampler runs in the main process, so
    ``set_epoch`` still reaches it). Raises ValueError when the data cannot fill one batch
    per rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    n = len(dataset)
    needed = batch_size * world_size if drop_last else world_size
    if n < needed:
        where = getattr(getattr(dataset, "source", None), "path", "the data")
        processes = "process" if world_size == 1 else "processes"
        raise ValueError(f"batch size {batch_size} x {world_size} {processes} needs at least "
                         f"{needed} images, {where} has {n}")
    sampler = ShardedShuffleSampler(n, rank=rank, world_size=world_size, seed=seed,
                                    epoch=epoch)
    extra = {}
    if num_workers > 0:
        extra["persistent_workers"] = True
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return PretrainLoader(dataset, batch_size=batch_size, sampler=sampler,
                          num_workers=num_workers, collate_fn=collate_multicrop,
                          pin_memory=pin_memory, drop_last=drop_last, **extra)
