"""What a long run does when something goes wrong: preemption, divergence, collapse.

Exit codes of ``python -m fastswav.train`` (also in ``--help`` and docs/training.md):

- 0: finished;
- 2: bad command-line input (one ``error:`` line);
- 3: the loss became non-finite; the message names the first bad iteration, and the
  checkpoints already written (the last good ones) are left as they were;
- 69 (``EX_UNAVAILABLE``): with several processes, a collective failed because another
  process died or stopped responding for ``dist_timeout_s``; the message names the phase
  and, as far as the survivors can tell, the rank (torchrun --max-restarts restarts the
  group, which resumes from the newest checkpoint);
- 74 (``EX_IOERR``): a checkpoint or queue file could not be written (disk full, or any
  other OS error); the message names the folder, the bytes needed and the bytes free. The
  half-written file is removed, earlier checkpoints are untouched: free some space and run
  the same command again to resume;
- 75 (``EX_TEMPFAIL``): stopped by SIGTERM or SIGUSR1 (cluster preemption) after finishing
  the current step and writing a checkpoint; run the same command again to resume.

With several processes each failure is reported once, by rank 0 (for a lost peer, by the
lowest rank still answering), and every rank exits with the same status. Under
``torchrun --max-restarts=N`` an error that every attempt meets alike (status 2: a bad
command line, a memory refusal) is printed by the first attempt only (:func:`said_before`);
torchrun itself exits 1 whenever a worker failed, its summary naming the workers' statuses.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("fastswav")

EXIT_DIVERGED = 3
EXIT_PEER_FAILED = 69
EXIT_DISK_FULL = 74
EXIT_PREEMPTED = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def said_before(line: str) -> bool:
    """Whether an earlier attempt of this torchrun launch already printed ``line``.

    torchrun restarts the whole group after any failure, so an error that no restart can
    change would be printed once per attempt (four times under ``--max-restarts=3``). The
    first attempt leaves a marker named by the run id and the line in the temporary folder;
    a restarted attempt that finds it stays quiet. Outside torchrun, or without restarts,
    nothing is remembered."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) == 0:
        return False
    digest = hashlib.sha256(f"{run_id}\0{line}".encode()).hexdigest()[:20]
    marker = Path(tempfile.gettempdir()) / f"fastswav-said-{digest}"
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 and marker.exists():
        return True
    try:
        marker.touch()
    except OSError:
        pass  # a read-only temporary folder: said again on a restart, nothing worse
    return False


class Preempted(Exception):
    """Raised by the training loop after it saved a checkpoint on a preemption signal."""

    def __init__(self, checkpoint, signal_name: str):
        super().__init__(f"stopped by {signal_name}; checkpoint {checkpoint} written, "
                         "run the same command again to resume")
        self.checkpoint = checkpoint


class Diverged(FloatingPointError):
    """The loss became non-finite."""


class DiskFull(OSError):
    """A checkpoint or queue file could not be written (no space left, or another OS
    error); the temporary file is gone and earlier checkpoints are untouched."""


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1 instead of dying, so the loop can finish its step and save.

    Use as a context manager; the previous handlers come back on exit. Handlers can only be
    installed from the main thread; elsewhere (e.g. a notebook's worker thread) this does
    nothing and says so once.
    """

    def __init__(self, signals=PREEMPT_SIGNALS):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: finishing the current step, then saving a checkpoint",
                        signal.Signals(signum).name)
        self.received = signum

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not the main thread: SIGTERM/SIGUSR1 keep their default handlers")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def should_stop(self, distributed: bool, device: torch.device) -> bool:
        """Whether to stop now. With several processes all of them must agree (each may
        have got the signal at a different step), so this is a collective: call it at the
        same iterations on every rank."""
        flag = self.received is not None
        if not distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        if value.item() > 0 and self.received is None:
            self.received = signal.SIGTERM  # another rank was signalled
        return value.item() > 0


class NonFiniteTracker:
    """Remembers, on the device, the first iteration whose loss was not finite.

    :meth:`update` is a few tensor ops (no host synchronisation); :meth:`check` reads the
    result back and raises :class:`Diverged`, and is meant for steps that sync anyway.
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, iteration: int) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, iteration), self.first_bad)

    def check(self, distributed: bool = False) -> None:
        """Raise :class:`Diverged` if any step so far had a non-finite loss. With several
        processes this is a collective (every rank raises together); call it at the same
        iterations on every rank."""
        first_bad = self.first_bad
        if distributed:
            # The earliest bad iteration over all ranks ("none" maps to a huge value for MIN).
            never = torch.iinfo(torch.long).max
            first_bad = torch.where(first_bad < 0, torch.full_like(first_bad, never), first_bad)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            first_bad = torch.where(first_bad == never, torch.full_like(first_bad, -1), first_bad)
        first = int(first_bad.item())
        if first >= 0:
            raise Diverged(f"the loss became non-finite at iteration {first}; stopping. The "
                           "checkpoints written before are untouched: lower base_lr, or "
                           "resume from an earlier one")


def code_entropy_ratio(codes: torch.Tensor) -> float:
    """Mean row entropy of ``[B, K]`` codes divided by ln K (1.0: every row uniform)."""
    k = codes.shape[-1]
    p = codes.float().clamp_min(1e-30)
    p = p / p.sum(dim=-1, keepdim=True)
    entropy = -(p * p.log()).sum(dim=-1).mean()
    return float(entropy) / math.log(k)


def looks_collapsed(loss: float, code_entropy: float, n_prototypes: int,
                    threshold: float = 0.99) -> bool:
    """SwAV's collapse signature: near-uniform codes (every sample assigned to all
    prototypes alike) and a loss at ln K (predictions as uniform as the codes)."""
    return code_entropy >= threshold and loss >= threshold * math.log(n_prototypes)
