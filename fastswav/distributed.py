"""Process-group set-up from the environment torchrun (or SLURM) provides.

Joining survives an elastic restart. torchrun's agent keeps one TCP store for the whole
job and hands every attempt the same ``MASTER_ADDR:MASTER_PORT`` without a per-attempt key
prefix, so the keys of a failed attempt (gloo's and NCCL's peer addresses, the init
barrier's counters) are still there when the restarted group joins: a new rank could read
a dead process's address (``connectFullMesh failed ... Connection refused``) or a barrier
count that never matches (a hang). :func:`init_distributed` therefore agrees on a fresh
generation number with a handshake that stale keys cannot satisfy, and builds the process
group inside that generation's own key space. All of it lives under a prefix of the run
(``fastswav/<TORCHELASTIC_RUN_ID>``: torchrun's ``--rdzv-id``, a fresh id per ``--standalone``
launch; ``SLURM_JOB_ID`` under srun), so two runs that share a store never meet.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist

# Collective timeout when none is given (Config.dist_timeout_s holds the run's own).
DEFAULT_TIMEOUT_S = 300.0
_KEYS = "fastswav"


def run_key_space() -> str:
    """The store prefix of this run's keys: its torchrun run id (``--rdzv-id``), else its
    SLURM job id, else one space for a plain static launch."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "static"
    return f"{_KEYS}/{run_id}"


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


@dataclass
class _Group:
    """This process's view of the job: the generation's store, for the post-mortem probe."""
    store: Optional[dist.Store] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    phase: str = "the set-up"  # what the collectives running now belong to


_group = _Group()


def _env_int(*names, default=None):
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def _job_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The job's TCP store: torchrun's agent hosts it (``TORCHELASTIC_USE_AGENT_STORE``),
    otherwise rank 0 does (a static or SLURM launch)."""
    addr = os.environ["MASTER_ADDR"]
    port = int(os.environ.setdefault("MASTER_PORT", "29500"))
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(addr, port, world_size=world, is_master=rank == 0 and not agent,
                         timeout=timeout, wait_for_workers=False, multi_tenant=True)


def _fresh_generation(store: dist.Store, rank: int, world: int, timeout_s: float) -> int:
    """A number every rank of this attempt agrees on and no earlier attempt used
    (``store``: the run's key space, :func:`run_key_space`).

    Rank 0 draws it from an atomic counter and welcomes each rank that says hello under it
    by echoing that rank's one-off token; a rank trusts only a welcome carrying its own
    token, so a generation left by a dead attempt is never taken for the current one.
    """
    if rank == 0:
        generation = store.add("generation", 1)
        store.set("leader", str(generation))
        for peer in range(1, world):  # blocks up to the store's timeout per peer
            token = store.get(f"{generation}/hello{peer}")
            store.set(f"{generation}/welcome{peer}", token)
        return generation
    token = uuid.uuid4().hex.encode()
    deadline = time.monotonic() + timeout_s
    said_hello_to = None
    while time.monotonic() < deadline:
        if store.check(["leader"]):
            generation = int(store.get("leader"))
            if generation != said_hello_to:
                store.set(f"{generation}/hello{rank}", token)
                said_hello_to = generation
            welcome = f"{generation}/welcome{rank}"
            if store.check([welcome]) and store.get(welcome) == token:
                return generation
        time.sleep(0.05)
    raise TimeoutError(f"rank {rank} found no rank 0 to join within {timeout_s:.0f} s "
                       "(dist_timeout_s)")


def init_distributed(device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group described by torchrun's (or SLURM's) variables, if any.

    gloo on the CPU, NCCL on CUDA. A single process without those variables runs alone.
    A collective that waits longer than ``timeout_s`` (a rank stopped responding) fails
    with an error instead of hanging; for NCCL the watchdog's async error handling is on.
    """
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if world <= 1:
        return DistInfo()
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun, "
                           "or export MASTER_ADDR and MASTER_PORT under SLURM")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if device_type == "cuda":
            # Read by the NCCL process group when it is created: a timed-out collective
            # aborts the communicator instead of leaving the process hung.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            torch.cuda.set_device(local_rank)
        store = dist.PrefixStore(run_key_space(), _job_store(rank, world, timeout))
        generation = _fresh_generation(store, rank, world, timeout_s)
        store = dist.PrefixStore(f"{generation}/pg", store)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=world, timeout=timeout)
        _group.store, _group.timeout_s = store, timeout_s
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _group.store = None


def set_phase(text: str) -> None:
    """Name what the next collectives belong to (e.g. ``iteration 17``, ``the write of X``), for the message a
    failed collective turns into."""
    _group.phase = text


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed: timed out, or lost its peer."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    tb = exc.__traceback__
    while tb is not None:  # raised inside a torch.distributed call (or DDP's own)
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "torch/distributed/" in name or name.endswith("torch/nn/parallel/distributed.py"):
            return True
        tb = tb.tb_next
    text = str(exc).lower()
    # gloo's wordings seen: "Timed out waiting 5000ms for recv operation", "Application
    # timeout caused pair closure", "Read error ...: Connection reset by peer".
    return any(mark in text for mark in ("gloo", "nccl", "timed out", "timeout", "pair closure",
                                         "connection reset", "connection closed",
                                         "connection refused", "broken pipe"))


def responsive_ranks(info: DistInfo, grace_s: float) -> Optional[List[int]]:
    """After a collective failed: the ranks that still answer, or None when unknown.

    Every surviving rank leaves its mark in the store and waits ``grace_s`` for the others';
    a rank that was killed or stopped leaves none.
    """
    store = _group.store
    if store is None:
        return None
    try:
        store.set_timeout(timedelta(seconds=max(2 * grace_s, 1.0)))
        store.set(f"alive{info.rank}", b"1")
        time.sleep(grace_s)
        return [r for r in range(info.world_size) if store.check([f"alive{r}"])]
    except Exception:  # noqa: BLE001 (the store's host itself may be gone)
        return None


class PeerFailed(RuntimeError):
    """A collective failed because another process died or stopped responding."""

    def __init__(self, message: str, report: bool):
        super().__init__(message)
        self.report = report  # whether this process is the one that prints the message


def peer_failure(info: DistInfo, exc: BaseException) -> PeerFailed:
    """:class:`PeerFailed` for a failed collective: names the phase, the timeout and the
    ranks that stopped answering. The lowest responsive rank reports it."""
    grace = min(5.0, max(0.5, _group.timeout_s / 10))
    alive = responsive_ranks(info, grace)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "GLHF" in first or len(first) > 240:  # gloo's long tail adds nothing
        first = first.split(". ")[0][:240]
    if alive is None:  # no store to ask (its host is gone): every survivor speaks for itself
        who, reporter = "another rank failed or stopped responding", True
    else:
        lost = [r for r in range(info.world_size) if r not in alive]
        who = (f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of "
               f"{info.world_size} stopped responding or died" if lost
               else "every rank still answers (a collective failed on one of them)")
        reporter = info.rank == min(alive) if alive else info.is_main
    message = (f"a collective during {_group.phase} failed (timeout {_group.timeout_s:g} s, "
               f"dist_timeout_s): {who} [{first}]; under torchrun --max-restarts the group "
               "restarts and resumes from the newest checkpoint, otherwise run the same "
               "command again")
    return PeerFailed(message, reporter)


def agree_on_error(info: DistInfo, message: Optional[str]) -> Optional[str]:
    """A collective: the first (lowest-rank) error message any rank has, else None.

    For failures a rank meets alone (its own file write) that every rank must act on
    together; costs one tiny all_reduce when nothing failed."""
    if not info.enabled:
        return message
    flag = torch.tensor([0.0 if message is None else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return None
    messages: List[Optional[str]] = [None] * info.world_size
    dist.all_gather_object(messages, message)
    return next(m for m in messages if m is not None)


def decided_by_main(info: DistInfo, value):
    """``value`` as rank 0 has it, on every rank (a collective; picklable values)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cuda", torch.cuda.current_device())
                               if dist.get_backend() == "nccl" else None)
    return box[0]


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
