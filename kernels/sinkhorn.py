"""Sinkhorn-Knopp in scaling-vector form over stored scores.

The codes are Q[n, k] = w_n * exp((S[n, k] - m_k) / eps) * u_k * v_n: only the prototype
vector u ([K]) and the sample vector v ([rows]) are iterated, and exp is recomputed from S
on every pass instead of keeping Q. m_k is the per-prototype max (over all processes), so
every exponent is <= 0 and bf16-derived scores never overflow; sums run in float32.

One pass over a block of rows: with the current u, compute each row's sum
c_n = sum_k P[n, k] u_k, set v_n = 1 / (n_total * max(c_n, tiny)), then write this block's
partial of the next prototype sums r_k = sum_n P[n, k] v_n. The caller adds the partials,
all_reduces r across processes (the multi-GPU hook) and sets u = 1 / (K * max(r, tiny)).
The row sums c_n need no reduction across processes: each sample lives on one process.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP32_TINY


@triton.jit
def _sinkhorn_pass_kernel(
    s_ptr, row_start_ptr, weight_ptr, colmax_ptr, u_ptr, n_total_ptr, r_part_ptr,
    n_rows, K, n_row_blocks_total, block_offset, inv_eps, tiny,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    row_start = tl.load(row_start_ptr + slot)
    weight = tl.load(weight_ptr).to(tl.float32)
    n_total = tl.load(n_total_ptr)

    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    row_ptrs = s_ptr + (row_start + rows).to(tl.int64)[:, None] * K
    vec_base = slot.to(tl.int64) * K

    # 1) row sums with the current prototype scaling u
    c = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        s = tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0)
        m = tl.load(colmax_ptr + vec_base + cols, mask=col_mask, other=0.0)
        u = tl.load(u_ptr + vec_base + cols, mask=col_mask, other=0.0)
        p = tl.where(mask, tl.exp((s - m[None, :]) * inv_eps), 0.0)
        c += tl.sum(p * u[None, :], axis=1)
    c = c * weight
    # The sample weight is folded into v: removed rows get v = 0 and add nothing.
    v = tl.where(row_mask, weight / (n_total * tl.maximum(c, tiny)), 0.0)

    # 2) this block's share of the next prototype sums
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        s = tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0)
        m = tl.load(colmax_ptr + vec_base + cols, mask=col_mask, other=0.0)
        p = tl.where(mask, tl.exp((s - m[None, :]) * inv_eps), 0.0)
        r = tl.sum(p * v[:, None], axis=0)
        out = (slot * n_row_blocks_total + block_offset + pid).to(tl.int64) * K + cols
        tl.store(r_part_ptr + out, r, mask=col_mask)


def sinkhorn_pass(
    scores: torch.Tensor,
    row_start: torch.Tensor,
    n_rows: int,
    weight: torch.Tensor,
    colmax: torch.Tensor,
    u: torch.Tensor,
    n_total: torch.Tensor,
    r_part: torch.Tensor,
    *,
    block_offset: int = 0,
    epsilon: float = 0.05,
    block_r: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
) -> None:
    """One scaling pass over one segment of rows for each of A assigned crops.

    Args:
        scores: float32 ``[*, K]`` (contiguous); slot ``a`` uses rows
            ``row_start[a] .. row_start[a] + n_rows - 1``.
        row_start: int32 ``[A]``.
        weight: float 0-dim 0/1 tensor: whether this segment takes part (queue_valid).
        colmax: ``[A, K]`` float32 per-prototype max (global, finite).
        u: ``[A, K]`` float32 current prototype scaling.
        n_total: float32 0-dim: participating samples over all processes.
        r_part: ``[A, n_row_blocks_total, K]`` float32 output; this call fills row blocks
            ``block_offset .. block_offset + cdiv(n_rows, block_r) - 1``.
    """
    n_slots, n_protos = u.shape
    n_rb = triton.cdiv(n_rows, block_r)
    if n_rb == 0:
        return
    _sinkhorn_pass_kernel[(n_rb, n_slots)](
        scores, row_start, weight, colmax, u, n_total, r_part,
        n_rows, n_protos, r_part.shape[1], block_offset, 1.0 / epsilon, FP32_TINY,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
    )
