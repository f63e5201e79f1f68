"""Process-group set-up from the environment torchrun (or SLURM) provides."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(*names, default=None):
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's (or SLURM's) variables, if any.

    gloo on the CPU, NCCL on CUDA. A single process without those variables runs alone.
    """
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if world <= 1:
        return DistInfo()
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun, "
                           "or export MASTER_ADDR and MASTER_PORT under SLURM")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def sync_bn_group(info: DistInfo, group_size: int):
    """The process group for SyncBatchNorm: None (all processes) for ``group_size`` 0 or the
    world size, else consecutive blocks of ``group_size`` ranks (e.g. one node each).

    Every rank creates every block's group (``new_group`` is collective) and keeps its own.
    """
    if group_size in (0, info.world_size) or not info.enabled:
        return None
    if group_size < 1 or info.world_size % group_size:
        raise ValueError(f"sync_bn_group_size={group_size} must divide the process count "
                         f"{info.world_size}")
    mine = None
    for start in range(0, info.world_size, group_size):
        group = dist.new_group(list(range(start, start + group_size)))
        if start <= info.rank < start + group_size:
            mine = group
    return mine
