"""What an op allocates: every fresh tensor, its bytes, and the peak of the live ones.

:class:`AllocationLog` is a ``TorchDispatchMode`` that records each tensor an ATen op returns
that is not a view or an in-place result (``empty``, ``new_empty``, ``empty_like``, ``exp``,
``clone``, ...), its size, and the peak of the bytes alive at once; a tensor stops counting
when its storage dies (not when the first tensor object on it does: views and tensors saved
for backward keep it). fastswav's custom ops (``fastswav::*``) are entered: their Python
bodies run under the log, so the allocations inside the fused ops count, whatever the
device. Under :func:`skipped_launches` the Triton launches of the teacher kernels do
nothing, so the same Python runs on ``meta`` tensors: sizes at any shape, no memory used,
with the GPU's tiles (the launch grids a GPU run would use). This is how the memory of the
fused teacher is checked at K = 262,144 on a machine that could not hold one such tensor.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Allocation:
    op: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype, device="meta").element_size()


class AllocationLog(TorchDispatchMode):
    """Records the fresh tensors of every op run under it (``with AllocationLog() as log``):
    ``allocations`` (in order), ``live_bytes`` now and ``peak_bytes``."""

    def __init__(self):
        super().__init__()
        self.allocations: List[Allocation] = []
        self.live_bytes = 0
        self.peak_bytes = 0

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastswav":
            from torch._library.custom_ops import _maybe_get_opdef

            body = _maybe_get_opdef(func)
            if body is not None:
                with self:
                    return body._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, tensor in zip(func._schema.returns, outs):
            if isinstance(tensor, torch.Tensor) and ret.alias_info is None:
                record = Allocation(str(func), tuple(tensor.shape), tensor.dtype)
                self.allocations.append(record)
                self.live_bytes += record.nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                # a storage outlives its first tensor (views, tensors saved for backward)
                weakref.finalize(tensor.untyped_storage(), self._release, record.nbytes)
        return out

    def total_bytes(self) -> int:
        return sum(a.nbytes for a in self.allocations)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


_TEACHER_KERNELS = ("_sk_colsum_kernel", "_sk_rowsum_kernel", "_sk_finalize_kernel",
                    "_ce_fwd_kernel", "_ce_bwd_kernel")


@contextlib.contextmanager
def skipped_launches(gpu_tiles: bool = True) -> Iterator[None]:
    """Within it the teacher ops take their fused path on any device, and the kernels'
    launches do nothing (so the launchers run on ``meta`` tensors), with the tiles and
    grids of a GPU (``gpu_tiles``) or of the interpreter."""
    from fastswav.kernels import teacher as kernels
    from fastswav.ops import teacher as ops

    saved = {name: getattr(kernels, name) for name in _TEACHER_KERNELS + ("targets_gpu",)}
    saved_backend = ops.loss_backend
    try:
        for name in _TEACHER_KERNELS:
            setattr(kernels, name, _NoLaunch())
        kernels.targets_gpu = lambda t: gpu_tiles
        ops.loss_backend = lambda device: "fused"
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)
        ops.loss_backend = saved_backend


__all__ = ("Allocation", "AllocationLog", "skipped_launches")
