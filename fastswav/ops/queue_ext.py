"""The compiled ring-buffer update (``torch.ops.fastswav.queue_push_`` from ``fastswav._C``)
and the dispatch that the feature queue calls.

``queue_push_`` uses the extension where it is built for the tensors' device and falls back
to the pure-PyTorch :func:`~fastswav.ops.queue.ring_push_` elsewhere (no compiler at install
time, ``FASTSWAV_BACKEND=reference``, or a CPU-only build running on CUDA tensors). Both
write the same rows, advance ``write_pos`` modulo the length, and set ``filled`` the same way.
"""
from __future__ import annotations

import torch

from .backend import queue_extension
from .queue import ring_push_

OP_NAME = "fastswav::queue_push_"


def _register_fake() -> None:
    """Fake kernel: the op only mutates its inputs and returns nothing, so torch.compile
    needs no shapes from it; the position stays a tensor, so compiled code never
    specialises on it (no recompiles as it moves)."""

    @torch.library.register_fake(OP_NAME)
    def _queue_push_fake(buffer, write_pos, filled, new):
        return None


try:
    from fastswav import _C as _built  # registers fastswav::queue_push_ when it loads
except ImportError:
    _built = None
if _built is not None:
    _register_fake()  # whenever the op exists, even if the reference backend is forced

# Decided once, at import (FASTSWAV_BACKEND is read here): dispatch below is then a set
# lookup that torch.compile traces without a graph break.
_extension = queue_extension()
if _extension is None:
    _EXT_DEVICES = frozenset()
elif getattr(_extension, "WITH_CUDA", 0):
    _EXT_DEVICES = frozenset({"cpu", "cuda"})
else:
    _EXT_DEVICES = frozenset({"cpu"})


def extension_supports(buffer: torch.Tensor) -> bool:
    """Whether the compiled op can update ``buffer`` (its device, contiguous layout)."""
    return buffer.device.type in _EXT_DEVICES and buffer.is_contiguous()


@torch.no_grad()
def queue_push_extension_(
    buffer: torch.Tensor, write_pos: torch.Tensor, filled: torch.Tensor, new: torch.Tensor
) -> None:
    """The compiled op itself (raises where the extension is not built)."""
    torch.ops.fastswav.queue_push_(buffer, write_pos, filled, new)


@torch.no_grad()
def queue_push_(
    buffer: torch.Tensor, write_pos: torch.Tensor, filled: torch.Tensor, new: torch.Tensor
) -> None:
    """Write ``new`` ([A, B, D]) into the ring ``buffer`` ([A, L, D]) at ``write_pos``, in place:
    the compiled op where it runs, else the PyTorch reference."""
    if extension_supports(buffer):
        torch.ops.fastswav.queue_push_(buffer, write_pos, filled, new)
    else:
        ring_push_(buffer, write_pos, filled, new)
