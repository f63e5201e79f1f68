"""Reference ring-buffer update for the feature queue.

State lives on the device: ``buffer [A, L, D]``, ``write_pos`` and ``filled`` (0-dim int64).
A push writes B new rows at ``write_pos .. write_pos+B-1 (mod L)`` and advances the
position, with no copy of the rest of the queue and no host synchronisation, so the step
can be captured in a CUDA graph or compiled without recompiling as the position moves.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def ring_push_(
    buffer: torch.Tensor, write_pos: torch.Tensor, filled: torch.Tensor, new: torch.Tensor
) -> None:
    """Write ``new`` ([A, B, D], B <= L) into ``buffer`` ([A, L, D]) in place."""
    if new.dim() != 3 or new.shape[0] != buffer.shape[0] or new.shape[2] != buffer.shape[2]:
        raise ValueError(
            f"new rows must be [{buffer.shape[0]}, B, {buffer.shape[2]}], got {tuple(new.shape)}"
        )
    length, batch = buffer.shape[1], new.shape[1]
    if batch > length:
        raise ValueError(f"cannot push {batch} rows into a queue of length {length}")
    index = torch.remainder(write_pos + torch.arange(batch, device=buffer.device), length)
    buffer.index_copy_(1, index, new.to(buffer.dtype))
    write_pos.copy_(torch.remainder(write_pos + batch, length))
    filled.copy_(torch.clamp(filled + batch, max=length))


def ring_in_official_order(buffer: torch.Tensor, write_pos: torch.Tensor, batch: int) -> torch.Tensor:
    """The queue rows in the order of the official shift-by-copy queue: the newest batch of
    ``batch`` rows first (rows in their original order), then older batches.

    Exact when ``batch`` divides the queue length (the official code enforces that). For
    tests and inspection only: the loss uses the buffer as it lies, since Sinkhorn does not
    depend on the order of samples.
    """
    length = buffer.shape[1]
    t = torch.arange(length, device=buffer.device)
    index = torch.remainder(write_pos - (t // batch + 1) * batch + t % batch, length)
    return buffer.index_select(1, index)
