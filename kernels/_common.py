"""Small helpers shared by the launchers."""
from __future__ import annotations

import contextlib
import os

import torch

# Smallest normal float32: the clamp the reference Sinkhorn uses for its divisions.
FP32_TINY = torch.finfo(torch.float32).tiny

# Set by fastswav.kernels.compile_report while it compiles launches for a GPU target from
# CPU tensors: launchers then pick the tiles and dot precisions they would pick on that GPU.
_aot_arch: "int | None" = None


def interpreting(t: torch.Tensor) -> bool:
    """Whether kernels on ``t`` run under the Triton interpreter (CPU tensors)."""
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def targets_gpu(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` is compiled for a GPU (real, or the compile report's)."""
    return _aot_arch is not None or not interpreting(t)


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current for a launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def dot_in_fp32(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether tl.dot must take float32 operands.

    16-bit operands go to the tensor cores as they are (their products are exact in the
    float32 accumulator). float32 or mixed inputs are multiplied in IEEE float32 to match
    the reference. Under the interpreter bf16 dots are wrong (triton 3.8), so always fp32.
    """
    if not targets_gpu(a):
        return True
    return not (a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16))


def pow2_at_least(n: int, floor: int = 16) -> int:
    p = floor
    while p < n:
        p *= 2
    return p
