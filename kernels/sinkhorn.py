"""Sinkhorn-Knopp in scaling-vector form over stored scores.

The codes are Q[n, k] = w_n * exp((S[n, k] - m_k) / eps) * u_k * v_n: only the prototype
vector u ([K]) and the sample vector v ([rows]) are iterated, and exp is recomputed from S
on every pass instead of keeping Q. m_k is the per-prototype max over the participating
rows of all processes, so every exponent of a participating row is <= 0 and nothing
overflows; rows that take no part (an unfilled queue, w_n = 0) are masked before the exp,
so their scores, which may lie above m_k, never make inf * 0 = NaN.

Each assigned crop ("slot") has one segment of rows: its queue (``L`` rows, weighted by
the 0/1 ``valid``), then its batch rows (``B``, weight 1). One Sinkhorn round is two
launches when the segment is short (B = 64 and no queue: too few rows to fill a GPU with
row blocks alone), each split over rows, prototype columns and slots:

- :func:`sinkhorn_row_sums`: partial sums c_n = sum_k P[n, k] u_k per block of columns
  (the caller adds them and sets v_n = w_n / (n_total * c_n); no reduction across
  processes: each sample lives on one process);
- :func:`sinkhorn_col_sums`: partial sums r_k = sum_n P[n, k] v_n per chunk of rows (the
  caller adds them, all_reduces r across processes and sets u = 1 / (K * r)).

When the segment is long (a queue), one launch does a round: :func:`sinkhorn_pass`, one
program per block of rows sweeping all K twice (sample sums, then its share of the
prototype sums); the second sweep reads the block's scores again from L2, so a round costs
one read of the scores from DRAM instead of two.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import FP32_TINY, device_guard, pack_crops
from ._packed import crop_of_slot


@triton.jit
def _segment_exp(s_ptr, q_ptr, slot, crop, valid, rows, in_range, cols, col_mask, colmax,
                 B, L, K, inv_eps):
    """P = exp((S - m) / eps) of a tile of segment rows (0 where a row takes no part)."""
    is_queue = rows < L
    takes_part = in_range & (tl.where(is_queue, valid, 1.0) > 0)
    mask = takes_part[:, None] & col_mask[None, :]
    queue_rows = (slot * L + rows).to(tl.int64) * K
    batch_rows = (crop * B + rows - L).to(tl.int64) * K
    s = tl.load(q_ptr + queue_rows[:, None] + cols[None, :],
                mask=mask & is_queue[:, None], other=0.0)
    s += tl.load(s_ptr + batch_rows[:, None] + cols[None, :],
                 mask=mask & (rows >= L)[:, None], other=0.0)
    return tl.exp(tl.where(mask, (s - colmax[None, :]) * inv_eps, float("-inf"))), takes_part


@triton.jit
def _row_sums_kernel(
    s_ptr, q_ptr, valid_ptr, colmax_ptr, u_ptr, c_part_ptr,
    B, L, K, row_offset, n_rows, inv_eps,
    ASSIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = tl.program_id(2)
    crop = crop_of_slot(ASSIGN, slot)
    valid = tl.load(valid_ptr).to(tl.float32)
    local = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = local < n_rows
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    vec = slot.to(tl.int64) * K + cols
    colmax = tl.load(colmax_ptr + vec, mask=col_mask, other=0.0)
    u = tl.load(u_ptr + vec, mask=col_mask, other=0.0)
    p, _ = _segment_exp(s_ptr, q_ptr, slot, crop, valid, row_offset + local, in_range, cols,
                        col_mask, colmax, B, L, K, inv_eps)
    c = tl.sum(p * u[None, :], axis=1)
    out = (slot * tl.num_programs(1) + pid_k).to(tl.int64) * n_rows + local
    tl.store(c_part_ptr + out, c, mask=in_range)


@triton.jit
def _col_sums_kernel(
    s_ptr, q_ptr, valid_ptr, colmax_ptr, v_ptr, r_part_ptr,
    B, L, K, rows_per_program, inv_eps,
    ASSIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = tl.program_id(2)
    crop = crop_of_slot(ASSIGN, slot)
    valid = tl.load(valid_ptr).to(tl.float32)
    seg_rows = L + B
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    colmax = tl.load(colmax_ptr + slot.to(tl.int64) * K + cols, mask=col_mask, other=0.0)
    r = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for r0 in range(0, rows_per_program, BLOCK_R):
        rows = pid_c * rows_per_program + r0 + tl.arange(0, BLOCK_R)
        in_range = rows < seg_rows
        p, takes_part = _segment_exp(s_ptr, q_ptr, slot, crop, valid, rows, in_range, cols,
                                     col_mask, colmax, B, L, K, inv_eps)
        v = tl.load(v_ptr + slot.to(tl.int64) * seg_rows + rows, mask=takes_part, other=0.0)
        r += tl.sum(p * v[:, None], axis=0)
    out = (slot * tl.num_programs(0) + pid_c).to(tl.int64) * K + cols
    tl.store(r_part_ptr + out, r, mask=col_mask)


@triton.jit
def _pass_kernel(
    s_ptr, q_ptr, valid_ptr, colmax_ptr, u_ptr, n_total_ptr, r_part_ptr,
    B, L, K, inv_eps, tiny,
    ASSIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    crop = crop_of_slot(ASSIGN, slot)
    valid = tl.load(valid_ptr).to(tl.float32)
    n_total = tl.load(n_total_ptr).to(tl.float32)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < L + B
    vec = slot.to(tl.int64) * K
    # 1) sample sums with the current prototype scaling u
    c = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        colmax = tl.load(colmax_ptr + vec + cols, mask=col_mask, other=0.0)
        u = tl.load(u_ptr + vec + cols, mask=col_mask, other=0.0)
        p, _ = _segment_exp(s_ptr, q_ptr, slot, crop, valid, rows, in_range, cols, col_mask,
                            colmax, B, L, K, inv_eps)
        c += tl.sum(p * u[None, :], axis=1)
    takes_part = in_range & (tl.where(rows < L, valid, 1.0) > 0)
    v = tl.where(takes_part, 1.0 / (n_total * tl.maximum(c, tiny)), 0.0)
    # 2) this block's share of the next prototype sums (the block's scores are in L2 now)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        colmax = tl.load(colmax_ptr + vec + cols, mask=col_mask, other=0.0)
        p, _ = _segment_exp(s_ptr, q_ptr, slot, crop, valid, rows, in_range, cols, col_mask,
                            colmax, B, L, K, inv_eps)
        out = (slot * tl.num_programs(0) + pid).to(tl.int64) * K + cols
        tl.store(r_part_ptr + out, tl.sum(p * v[:, None], axis=0), mask=col_mask)


def _queue_operand(scores: torch.Tensor, queue_scores: "torch.Tensor | None"):
    """(pointer tensor, L) of the queue segment: without a queue, L = 0 and the kernels never
    load through the pointer (scores stands in for it)."""
    if queue_scores is None:
        return scores, 0
    return queue_scores, queue_scores.shape[1]


def sinkhorn_pass(
    scores: torch.Tensor,
    queue_scores: "torch.Tensor | None",
    assign: Sequence[int],
    valid: torch.Tensor,
    colmax: torch.Tensor,
    u: torch.Tensor,
    n_total: torch.Tensor,
    *,
    batch: int,
    epsilon: float,
    block_r: int,
    block_k: int,
    num_warps: int = 4,
) -> torch.Tensor:
    """One whole round over each slot's segment: v from u, then partial prototype sums.

    ``n_total``: float32 0-dim, participating samples over all processes. Other arguments
    as in :func:`sinkhorn_row_sums`. Returns ``[A, cdiv(L + B, block_r), K]`` float32
    partial sums of ``sum_n P[n, k] v_n`` (add over dim 1).
    """
    n_slots, n_protos = u.shape
    queue_ptr, q_len = _queue_operand(scores, queue_scores)
    n_rb = triton.cdiv(q_len + batch, block_r)
    r_part = torch.empty((n_slots, n_rb, n_protos), device=scores.device, dtype=torch.float32)
    with device_guard(scores):
        _pass_kernel[(n_rb, n_slots)](
            scores, queue_ptr, valid, colmax, u,
            n_total, r_part, batch, q_len, n_protos, 1.0 / epsilon, FP32_TINY,
            ASSIGN=pack_crops(assign), BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
        )
    return r_part


def sinkhorn_row_sums(
    scores: torch.Tensor,
    queue_scores: "torch.Tensor | None",
    assign: Sequence[int],
    valid: torch.Tensor,
    colmax: torch.Tensor,
    u: torch.Tensor,
    *,
    batch: int,
    row_offset: int,
    epsilon: float,
    block_r: int,
    block_k: int,
    num_warps: int = 4,
) -> torch.Tensor:
    """Partial sample sums of segment rows ``row_offset ..`` (``L + B`` rows a segment).

    Args:
        scores: ``[n_crops * B, K]`` float32, crop-major; slot ``a``'s batch rows are crop
            ``assign[a]``'s.
        queue_scores: ``[A, L, K]`` float32 or None (L = 0).
        assign: the crop of each slot (Python ints: constexpr in the kernel); valid: float 0-dim 0/1 (queue takes part).
        colmax, u: ``[A, K]`` float32 shift (finite) and prototype scaling.
        row_offset: first segment row to cover (``L`` covers the batch rows only).

    Returns:
        ``[A, cdiv(K, block_k), n_rows]`` float32 partial sums (add over dim 1).
    """
    n_slots, n_protos = u.shape
    queue_ptr, q_len = _queue_operand(scores, queue_scores)
    n_rows = q_len + batch - row_offset
    n_kb = triton.cdiv(n_protos, block_k)
    c_part = torch.empty((n_slots, n_kb, n_rows), device=scores.device, dtype=torch.float32)
    with device_guard(scores):
        _row_sums_kernel[(triton.cdiv(n_rows, block_r), n_kb, n_slots)](
            scores, queue_ptr, valid, colmax, u,
            c_part, batch, q_len, n_protos, row_offset, n_rows, 1.0 / epsilon,
            ASSIGN=pack_crops(assign), BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
        )
    return c_part


def sinkhorn_col_sums(
    scores: torch.Tensor,
    queue_scores: "torch.Tensor | None",
    assign: Sequence[int],
    valid: torch.Tensor,
    colmax: torch.Tensor,
    v: torch.Tensor,
    *,
    batch: int,
    epsilon: float,
    rows_per_program: int,
    block_r: int,
    block_k: int,
    num_warps: int = 4,
) -> torch.Tensor:
    """Partial prototype sums ``sum_n P[n, k] v_n`` over chunks of the whole segment.

    ``v``: ``[A, L + B]`` float32 sample scaling (0 for rows that take no part);
    ``rows_per_program`` a multiple of ``block_r``. Other arguments as in
    :func:`sinkhorn_row_sums`. Returns ``[A, n_chunks, K]`` float32 (add over dim 1).
    """
    if rows_per_program % block_r:
        raise ValueError(f"rows_per_program {rows_per_program} is not a multiple of {block_r}")
    n_slots, n_protos = colmax.shape
    queue_ptr, q_len = _queue_operand(scores, queue_scores)
    n_chunks = triton.cdiv(q_len + batch, rows_per_program)
    r_part = torch.empty((n_slots, n_chunks, n_protos), device=scores.device, dtype=torch.float32)
    with device_guard(scores):
        _col_sums_kernel[(n_chunks, triton.cdiv(n_protos, block_k), n_slots)](
            scores, queue_ptr, valid, colmax, v,
            r_part, batch, q_len, n_protos, rows_per_program, 1.0 / epsilon,
            ASSIGN=pack_crops(assign), BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
        )
    return r_part
