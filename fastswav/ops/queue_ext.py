"""The compiled ring-buffer update (``torch.ops.fastswav.queue_push_`` from ``fastswav._C``)
and the dispatch that the feature queue calls.

``queue_push_`` uses the extension where it is built for the tensors' device and falls back
to the pure-PyTorch :func:`~fastswav.ops.queue.ring_push_` elsewhere (no compiler at install
or first use, ``FASTSWAV_BACKEND=reference``, or a CPU-only build running on CUDA tensors).
Where the install did not build the extension, the first queue builds it (once per machine,
into a per-user cache: :mod:`fastswav.ops.ext_build`). Both
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


_EXT_DEVICES = frozenset()
_resolved = False
_fake_registered = False


def _use(extension) -> None:
    """Route pushes to ``extension`` (or to the reference where it is None)."""
    global _EXT_DEVICES, _fake_registered
    if extension is not None and not _fake_registered:
        _register_fake()  # whenever the op exists, even if the reference backend is forced
        _fake_registered = True
    if extension is None:
        _EXT_DEVICES = frozenset()
    elif getattr(extension, "WITH_CUDA", 0):
        _EXT_DEVICES = frozenset({"cpu", "cuda"})
    else:
        _EXT_DEVICES = frozenset({"cpu"})


def ensure_extension() -> frozenset:
    """Decide, once, where the compiled op runs: the installed ``fastswav._C``, else a
    first-use build of it (see :func:`fastswav.ops.backend.queue_extension`), else nowhere.
    Returns the device types it serves. :class:`fastswav.FeatureQueue` calls this when it is
    built, outside any compiled region, so dispatch below stays a set lookup that
    torch.compile traces without a graph break."""
    global _resolved
    if not _resolved:
        _use(queue_extension(build=True))
        _resolved = True
    return _EXT_DEVICES


try:
    from fastswav import _C as _built  # registers fastswav::queue_push_ when it loads
except ImportError:
    _built = None
if _built is not None:
    _register_fake()
    _fake_registered = True
# At import only the installed module is looked at (FASTSWAV_BACKEND is read here); a
# first-use build waits for ensure_extension(), i.e. for the first queue.
_installed = queue_extension(build=False)
if _installed is not None:
    _use(_installed)
    _resolved = True


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
    if not _resolved and not torch.compiler.is_compiling():
        ensure_extension()
    if extension_supports(buffer):
        torch.ops.fastswav.queue_push_(buffer, write_pos, filled, new)
    else:
        ring_push_(buffer, write_pos, filled, new)
