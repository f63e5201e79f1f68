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


# Dot precisions a caller may ask for with float32 or mixed operands (see kernels/scores.py).
PRECISIONS = ("tf32", "tf32x3", "bf16", "ieee")
# The default, chosen by accuracy in benchmarks/NOTES_loss.md.
DEFAULT_PRECISION = "tf32"


def dot_mode(a: torch.Tensor, b: torch.Tensor, precision: str) -> str:
    """The DOT_MODE constexpr of a tile dot of ``a`` and ``b`` at ``precision``.

    Two 16-bit operands of one dtype go to the tensor cores as they are (their products are
    exact in the float32 accumulator) whatever the precision; otherwise ``precision``
    applies. Under the interpreter every mode is emulated with float32 dots of the rounded
    operands (triton 3.8's interpreter computes bf16 dots wrongly).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16):
        mode = "native16"
    else:
        mode = precision
    if not targets_gpu(a) and mode in ("native16", "bf16", "tf32"):
        mode += "_emulated"
    return mode


def round_to_tf32_reference(t: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of the kernels' ``round_to_tf32``: float32 rounded to the nearest value
    with an 11-bit significand (ties away from zero), returned as float32."""
    bits = t.to(torch.float32).contiguous().view(torch.int32)
    magnitude = (bits & 0x7FFFFFFF) + 0x1000
    rounded = (bits & -0x80000000) | (magnitude & 0x7FFFE000)
    return rounded.view(torch.float32)


def pow2_at_least(n: int, floor: int = 16) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


# Crop and slot indices reach the kernels as constexpr integers, packed a few bits per entry,
# never as device tensors: a tensor made from host ints is a host-to-device copy, and one
# cached between calls would live in a CUDA graph's memory pool. Each distinct layout
# compiles its own kernel variant (a run has one).
CROP_BITS = 7   # crop index of each assigned crop ("slot"): crops 0..127
SLOT_BITS = 4   # slot + 1 of each crop (0: not assigned): slots 0..14
MAX_ASSIGNED = 63 // CROP_BITS   # 9 assigned crops fit a non-negative int64
MAX_GROUPS = 63 // SLOT_BITS     # 15 crops (or queue segments) per score launch


def layout_error(n_crops: int, crops_for_assign) -> "str | None":
    """Why the fused kernels cannot take this crop layout, or None when they can."""
    if n_crops > MAX_GROUPS or len(crops_for_assign) > MAX_ASSIGNED:
        return (f"the fused SwAV loss takes at most {MAX_GROUPS} crops and {MAX_ASSIGNED} "
                f"assigned crops, got {n_crops} and {len(crops_for_assign)}")
    return None


def pack_crops(crops) -> int:
    """Pack the crop index of each slot (``crops_for_assign``) into one int."""
    crops = [int(c) for c in crops]
    if len(crops) > MAX_ASSIGNED or any(not 0 <= c < 1 << CROP_BITS for c in crops):
        raise ValueError(f"the fused kernels take at most {MAX_ASSIGNED} assigned crops with "
                         f"indices below {1 << CROP_BITS}, got {crops}")
    return sum(c << (CROP_BITS * a) for a, c in enumerate(crops))


def pack_slots(slots) -> int:
    """Pack the slot of each group (-1 for none) into one int, ``slot + 1`` per entry."""
    slots = [int(s) for s in slots]
    if len(slots) > MAX_GROUPS or any(not -1 <= s < (1 << SLOT_BITS) - 1 for s in slots):
        raise ValueError(f"the fused kernels take at most {MAX_GROUPS} crops and "
                         f"{(1 << SLOT_BITS) - 1} slots, got slots {slots}")
    return sum((s + 1) << (SLOT_BITS * g) for g, s in enumerate(slots))
