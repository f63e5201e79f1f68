"""Reference Sinkhorn-Knopp: the ground truth for every fused path.

Semantics follow the official SwAV ``distributed_sinkhorn``: Q = exp(S / eps)^T is
normalised to total mass 1, then ``n_iters`` times each prototype row is scaled to mass
1/K and each sample column to mass 1/B, where the row sums and B run over all processes;
finally the columns are scaled to sum to 1 and Q is returned sample-major.

Two deliberate, exact-in-real-arithmetic changes keep it safe in low precision:
- scores are upcast to float32 (float64 stays) and each prototype row is shifted by its maximum (taken
  over all processes) before exp. A per-row factor cancels exactly in the first row
  normalisation, so the result is unchanged, but exp never overflows and every row keeps
  at least one entry equal to 1 (with ``n_iters=0`` the shift is one global maximum);
  A sample whose scores all lie more than ~87*eps below every prototype's maximum
  underflows to a zero row (never NaN); with cosine scores (|s| <= 1) and eps >= 0.025
  that cannot happen;
- an optional 0/1 ``sample_weight`` removes samples (an unfilled queue) without a host
  synchronisation: removed samples carry no mass and count nothing towards B.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _dist_active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (for checks); every other float type accumulates in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def all_reduce_(tensor: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """In-place all_reduce over ``group`` when torch.distributed runs; a no-op otherwise."""
    if _dist_active(group):
        dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return tensor


@torch.no_grad()
def swav_codes(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    n_iters: int = 3,
    *,
    sample_weight: Optional[torch.Tensor] = None,
    group=None,
) -> torch.Tensor:
    """Soft codes from prototype scores by Sinkhorn-Knopp.

    Args:
        scores: ``[N, K]`` scores of N samples against K prototypes (any float dtype).
        epsilon: entropic regularisation; Q is proportional to exp(scores / epsilon).
        n_iters: number of (prototype, sample) normalisation rounds.
        sample_weight: optional ``[N]`` tensor of 0/1 values; samples with weight 0 take
            no part (their returned rows are 0). Lets an unfilled queue stay in the batch
            without changing shapes or syncing with the host.
        group: process group for the sums over processes (default: the world, when
            torch.distributed is initialised).

    Returns:
        ``[N, K]`` float32 codes (float64 for float64 scores); each row of a participating sample sums to 1, and over
        all processes each prototype receives total mass B/K.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, K], got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if n_iters < 0:
        raise ValueError(f"n_iters must be >= 0, got {n_iters}")
    s = scores.to(accumulation_dtype(scores))
    n_samples, n_protos = s.shape
    if sample_weight is not None:
        w = sample_weight.to(device=s.device, dtype=s.dtype).reshape(n_samples, 1)
        s_for_max = torch.where(w > 0, s, torch.full_like(s, -torch.inf))
    else:
        w = None
        s_for_max = s
    row_max = s_for_max.amax(dim=0)  # [K], per prototype
    all_reduce_(row_max, op=dist.ReduceOp.MAX if dist.is_available() else None, group=group)
    # A prototype with no participating sample anywhere has max -inf; any finite shift works.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    if n_iters == 0:
        row_max = row_max.max().expand_as(row_max)  # no row normalisation to cancel a per-row shift
    shifted = s - row_max
    if w is not None:
        # Mask before the exp: a sample that takes no part is left out of the max, so its
        # scores may lie far above it, and exp of them times a weight of 0 would be inf * 0.
        shifted = torch.where(w > 0, shifted, torch.full_like(shifted, -torch.inf))
    q = torch.exp(shifted / epsilon).t()  # [K, N], K-major as in the paper
    if w is not None:
        q = q * w.t()
        n_total = w.sum()
    else:
        n_total = torch.full((), float(n_samples), device=s.device, dtype=s.dtype)
    all_reduce_(n_total, group=group)

    total = q.sum()
    all_reduce_(total, group=group)
    q /= total
    tiny = torch.finfo(s.dtype).tiny
    for _ in range(n_iters):
        row_sum = q.sum(dim=1, keepdim=True)
        all_reduce_(row_sum, group=group)
        q /= row_sum.clamp_min(tiny)
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= n_total
    q *= n_total
    return q.t()
