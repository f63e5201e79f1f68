"""Checkpoints: written atomically, loaded with ``weights_only=True``, found for resume.

A resume takes the newest checkpoint that loads (:func:`find_resumable`): a damaged one (a
file truncated by a node that died while a network file system flushed, a copy cut short)
is named in one warning line and renamed to ``<name>.damaged`` beside it, never deleted,
and the one before it is tried.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

log = logging.getLogger("fastswav")
DAMAGED_SUFFIX = ".damaged"
# What a checkpoint written by fastswav.train must hold to resume from it.
RESUME_KEYS = ("epoch", "model", "optimizer")


class NoReadableCheckpoint(RuntimeError):
    """The run folder has checkpoints, but none of them loads."""

# checkpoint_epoch0004.pt: 4 epochs done. checkpoint_epoch0004_step000120.pt: 4 epochs and
# 120 steps of the fifth done (written when a run is preempted mid-epoch).
_NAME = re.compile(r"checkpoint_epoch(\d+)(?:_step(\d+))?\.pt$")
_RUN_FILE = re.compile(r"^(checkpoint_epoch\d+(_step\d+)?|queue_rank\d+_epoch\d+(_step\d+)?)\.pt$")
# What save_checkpoint's mkstemp names its temporary files: <final name>.<random>.tmp
_TEMPORARY = re.compile(r"^(checkpoint_epoch\d+(_step\d+)?|queue_rank\d+_epoch\d+(_step\d+)?)\.pt\.\w+\.tmp$")


def _suffix(epoch: int, step: int) -> str:
    return f"epoch{epoch:04d}" + (f"_step{step:06d}" if step else "")


def checkpoint_path(run_dir, epoch: int, step: int = 0) -> Path:
    """The checkpoint after ``epoch`` whole epochs and ``step`` more steps."""
    return Path(run_dir) / f"checkpoint_{_suffix(epoch, step)}.pt"


def queue_path(run_dir, epoch: int, rank: int, step: int = 0) -> Path:
    """Each process keeps its own queue (as in the official code): one file per rank."""
    return Path(run_dir) / f"queue_rank{rank}_{_suffix(epoch, step)}.pt"


def _position(match) -> tuple:
    return int(match.group(1)), int(match.group(2) or 0)


def prune_checkpoints(run_dir, keep: int, rank: int) -> None:
    """Delete all but the ``keep`` newest epochs' files (0: keep everything), and every
    mid-epoch file older than the newest checkpoint (it has been superseded).

    Rank 0 prunes the model checkpoints; every rank prunes its own queue files.
    """
    run_dir = Path(run_dir)
    patterns = [re.compile(rf"queue_rank{rank}_epoch(\d+)(?:_step(\d+))?\.pt$")]
    if rank == 0:
        patterns.append(_NAME)
    for pattern in patterns:
        found = sorted((_position(m), p) for p in run_dir.iterdir() if (m := pattern.search(p.name)))
        if not found:
            continue
        newest = found[-1][0]
        whole = [(pos, p) for pos, p in found if pos[1] == 0]
        doomed = [p for pos, p in found if pos[1] and pos < newest]
        if keep > 0:
            doomed += [p for _, p in whole[:-keep]]
        for path in doomed:
            path.unlink(missing_ok=True)


def state_nbytes(state) -> int:
    """Bytes of the tensors in ``state`` (nested dicts, lists, tuples): about its size on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def free_bytes(folder) -> int:
    """Bytes free to this user in ``folder`` (or its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _write(state: Dict[str, Any], f) -> None:
    """The serialisation itself (one place, so tests can make it fail as a full disk does)."""
    torch.save(state, f)


def save_checkpoint(state: Dict[str, Any], path) -> Path:
    """Write ``state`` to ``path`` through a temporary file in the same folder and a
    rename, so a crash mid-write never leaves a truncated checkpoint under the real name.

    Raises :class:`fastswav.faults.DiskFull` (an ``OSError``) with one line naming the
    folder, the bytes needed and the bytes free when the write fails (ENOSPC, or any other
    OS error); the temporary file is removed and every other file is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            _write(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) or _is_write_failure(exc):
            raise _disk_full(path, state, exc) from None
        raise
    return path


def _is_write_failure(exc: BaseException) -> bool:
    # torch.save's zip writer reports a failed write as a RuntimeError ("unexpected pos"),
    # the OSError behind it as its cause or context.
    return isinstance(exc, RuntimeError) and (
        isinstance(exc.__cause__ or exc.__context__, OSError)
        or "unexpected pos" in str(exc) or "PytorchStreamWriter" in str(exc))


def _disk_full(path: Path, state, exc: BaseException):
    from .faults import DiskFull

    cause = exc if isinstance(exc, OSError) else (exc.__cause__ or exc.__context__)
    reason = (cause.strerror or str(cause)) if isinstance(cause, OSError) else "write failed"
    try:
        free = f"{free_bytes(path.parent):,}"
    except OSError:
        free = "unknown"
    return DiskFull(
        f"cannot write {path.name} in {path.parent} ({reason}): about "
        f"{state_nbytes(state):,} bytes needed, {free} bytes free; the half-written file was "
        "removed and earlier checkpoints are untouched: free some space and run the same "
        "command again to resume")


def remove_stale_temporaries(run_dir) -> List[Path]:
    """Delete the temporary files of checkpoint and queue writes that never finished (a
    process killed mid-write); returns them. Call on one process, before anyone writes."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if _TEMPORARY.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_room(run_dir, checkpoint_bytes: int, count: int) -> Optional[str]:
    """A one-line warning when ``run_dir`` lacks room for ``count`` more checkpoints of
    about ``checkpoint_bytes`` each (the files already there are counted as theirs), else
    None."""
    run_dir = Path(run_dir)
    existing = sum(p.stat().st_size for p in run_dir.iterdir()
                   if _RUN_FILE.match(p.name)) if run_dir.is_dir() else 0
    needed = max(0, count * checkpoint_bytes - existing)
    try:
        free = free_bytes(run_dir)
    except OSError:
        return None
    if free >= needed:
        return None
    return (f"{run_dir} has {free:,} bytes free, but keeping {count} checkpoint(s) of about "
            f"{checkpoint_bytes:,} bytes needs {needed:,} more: the run will stop with exit "
            "status 74 when a checkpoint no longer fits (lower keep_checkpoints, or free space)")


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_position(path) -> Tuple[int, int]:
    """(whole epochs done, steps done in the next epoch) from a checkpoint's file name."""
    match = _NAME.search(Path(path).name)
    if match is None:
        raise ValueError(f"not a fastswav checkpoint name: {path}")
    return _position(match)


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The furthest checkpoint in ``run_dir`` (by epoch, then step), or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(_position(m), p) for p in run_dir.iterdir() if (m := _NAME.search(p.name))]
    return max(found)[1] if found else None


def checkpoints_newest_first(run_dir) -> List[Path]:
    """Every checkpoint in ``run_dir``, the furthest (by epoch, then step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(_position(m), p) for p in run_dir.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def move_aside(path) -> Path:
    """Rename ``path`` to ``<name>.damaged`` (``.damaged.1``, ... when taken); never deletes."""
    path = Path(path)
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{n}")
    os.replace(path, target)
    return target


def find_resumable(run_dir, map_location="cpu") -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The newest checkpoint in ``run_dir`` that loads, and its contents; ``(None, None)``
    when there is none at all.

    Each damaged checkpoint on the way (it does not load, or lacks what a resume needs) is
    named in one warning line and moved aside with :func:`move_aside`. Raises
    :class:`NoReadableCheckpoint` when checkpoints exist but none of them loads. Call it on
    one process (it renames files); the others then find the same file with
    :func:`latest_checkpoint`.
    """
    candidates = checkpoints_newest_first(run_dir)
    damaged = []
    for i, path in enumerate(candidates):
        try:
            state = load_checkpoint(path, map_location=map_location)
            missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
            if missing:
                raise KeyError(f"no {', '.join(missing)} in it")
        except Exception as exc:  # noqa: BLE001 (any failure to load means: damaged)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            moved = move_aside(path)
            damaged.append(moved)
            after = (f"trying {candidates[i + 1].name}" if i + 1 < len(candidates)
                     else "no older checkpoint left")
            log.warning("checkpoint %s is damaged (%s: %s); moved aside to %s, %s",
                        path, type(exc).__name__, reason[:200], moved.name, after)
            continue
        return path, state
    if damaged:
        raise NoReadableCheckpoint(
            f"no readable checkpoint in {run_dir}: {len(damaged)} damaged one(s) moved aside "
            f"({', '.join(p.name for p in damaged)}); start over with --no-resume or use a new "
            "--output-dir")
    return None, None




def set_aside_previous(run_dir) -> Optional[Path]:
    """Move the checkpoints and queues already in ``run_dir`` into a new subfolder
    ``previous_<time>`` (for a run that starts over there: otherwise a later resume could
    take a file of the old run, and pruning could delete the new run's files in favour of
    the old run's higher epochs). Returns the subfolder, or None when there was nothing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    files = sorted(p for p in run_dir.iterdir() if p.is_file() and _RUN_FILE.match(p.name))
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_dir / f"previous_{stamp}", 0
    while target.exists():
        n += 1
        target = run_dir / f"previous_{stamp}.{n}"
    target.mkdir()
    for path in files:
        os.replace(path, target / path.name)
    return target
