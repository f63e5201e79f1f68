"""Checkpoints: written atomically, loaded with ``weights_only=True``, found for resume."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

_NAME = re.compile(r"checkpoint_epoch(\d+)\.pt$")


def checkpoint_path(run_dir, epoch: int) -> Path:
    return Path(run_dir) / f"checkpoint_epoch{epoch:04d}.pt"


def queue_path(run_dir, epoch: int, rank: int) -> Path:
    """Each process keeps its own queue (as in the official code): one file per rank."""
    return Path(run_dir) / f"queue_rank{rank}_epoch{epoch:04d}.pt"


def prune_checkpoints(run_dir, keep: int, rank: int) -> None:
    """Delete all but the ``keep`` newest epochs' files (0: keep everything).

    Rank 0 prunes the model checkpoints; every rank prunes its own queue files.
    """
    if keep <= 0:
        return
    run_dir = Path(run_dir)
    patterns = [re.compile(rf"queue_rank{rank}_epoch(\d+)\.pt$")]
    if rank == 0:
        patterns.append(_NAME)
    for pattern in patterns:
        found = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := pattern.search(p.name)))
        for _, path in found[:-keep]:
            path.unlink(missing_ok=True)


def save_checkpoint(state: Dict[str, Any], path) -> Path:
    """Write ``state`` to ``path`` through a temporary file in the same folder and a
    rename, so a crash mid-write never leaves a truncated checkpoint under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The checkpoint of the highest epoch in ``run_dir``, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.search(p.name))]
    return max(found)[1] if found else None
