"""Swapped-prediction cross-entropy: final codes, loss pieces, and the score gradient.

Forward, one program per (row block, prototype block), all assigned crops ("slots") in
it, so every crop's scores are read once: finish Sinkhorn for these rows
(codes_a = P_a * u_a * row_scale_a, row_scale from the last sample sums), write the
codes for the backward, and write this block's partial sums of
sum_k codes_a * sum_{v != s_a} S_v and of the code row sums. With the per-row
log-sum-exp of every crop (from the score kernel's statistics) that is the loss, since
-sum_k q_k log softmax(S_v / T)_k = -(q . S_v) / T + (sum_k q_k) * lse_v.

Backward, one elementwise pass over the same tiles writing dS of every crop v:
dS_v = coef * (sum_{a: s_a != v} rowsum_a * softmax(S_v / T) - sum_{a: s_a != v} codes_a),
the softmax rebuilt from the saved log-sum-exp (no second reduction over K). With
``unit_scale`` the factor coef (the upstream gradient over the loss's mean) is left to the
caller, so dS stays O(1) and can be stored in 16 bits for tensor-core matmuls.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import device_guard, pack_crops, pack_slots
from ._packed import crop_of_slot, slot_of_group


@triton.jit
def _swapped_ce_fwd_kernel(
    s_ptr, colmax_ptr, u_ptr, row_scale_ptr,
    codes_ptr, dot_part_ptr, sum_part_ptr,
    B, K, inv_eps,
    N_CROPS: tl.constexpr, N_ASSIGN: tl.constexpr, ASSIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_kb = tl.num_programs(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < B
    col_mask = cols < K
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    s_all = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for v in tl.static_range(N_CROPS):
        s_all += tl.load(s_ptr + (v * B + rows64)[:, None] * K + cols[None, :], mask=mask, other=0.0)
    for a in tl.static_range(N_ASSIGN):
        crop = crop_of_slot(ASSIGN, a)
        s_own = tl.load(s_ptr + (crop * B + rows64)[:, None] * K + cols[None, :], mask=mask,
                        other=0.0)
        m = tl.load(colmax_ptr + a * K + cols, mask=col_mask, other=0.0)
        u = tl.load(u_ptr + a * K + cols, mask=col_mask, other=0.0)
        scale = tl.load(row_scale_ptr + a * B + rows64, mask=row_mask, other=0.0)
        # batch rows always take part, so s_own <= m: no overflow
        q = tl.where(mask, tl.exp((s_own - m[None, :]) * inv_eps) * u[None, :] * scale[:, None], 0.0)
        tl.store(codes_ptr + (a * B + rows64)[:, None] * K + cols[None, :], q, mask=mask)
        out = (a * n_kb + pid_k).to(tl.int64) * B + rows64
        tl.store(dot_part_ptr + out, tl.sum(q * (s_all - s_own), axis=1), mask=row_mask)
        tl.store(sum_part_ptr + out, tl.sum(q, axis=1), mask=row_mask)


@triton.jit
def _swapped_ce_bwd_kernel(
    s_ptr, lse_ptr, codes_ptr, code_sum_ptr, grad_ptr, ds_ptr,
    B, K, inv_temp, scale,
    N_CROPS: tl.constexpr, N_ASSIGN: tl.constexpr, SLOTS: tl.constexpr, UNIT_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < B
    col_mask = cols < K
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    # Targets of a crop: every slot's codes but its own (a crop never predicts itself).
    target_all = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    target_sum_all = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for a in tl.static_range(N_ASSIGN):
        target_all += tl.load(codes_ptr + (a * B + rows64)[:, None] * K + cols[None, :],
                              mask=mask, other=0.0)
        target_sum_all += tl.load(code_sum_ptr + a * B + rows64, mask=row_mask, other=0.0)
    if UNIT_SCALE:
        coef = 1.0
    else:
        coef = tl.load(grad_ptr).to(tl.float32) * scale
    for v in tl.static_range(N_CROPS):
        slot = slot_of_group(SLOTS, v)
        own = slot >= 0
        own_rows = slot * B + rows64
        target = target_all - tl.load(codes_ptr + own_rows[:, None] * K + cols[None, :],
                                      mask=mask & own, other=0.0)
        target_sum = target_sum_all - tl.load(code_sum_ptr + own_rows, mask=row_mask & own,
                                              other=0.0)
        srow = v * B + rows64
        s = tl.load(s_ptr + srow[:, None] * K + cols[None, :], mask=mask, other=0.0)
        lse = tl.load(lse_ptr + srow, mask=row_mask, other=0.0)
        prob = tl.exp(s * inv_temp - lse[:, None])
        ds = coef * (target_sum[:, None] * prob - target)
        tl.store(ds_ptr + srow[:, None] * K + cols[None, :], ds.to(ds_ptr.dtype.element_ty),
                 mask=mask)


def swapped_ce_forward(
    scores: torch.Tensor,
    assign: Sequence[int],
    colmax: torch.Tensor,
    u: torch.Tensor,
    row_scale: torch.Tensor,
    *,
    n_crops: int,
    epsilon: float,
    block_r: int,
    block_k: int,
    num_warps: int = 4,
):
    """Codes of the assigned crops and the per-block pieces of the loss.

    Args:
        scores: ``[n_crops * B, K]`` float32, crop-major.
        assign: crop index of each assigned crop (Python ints: constexpr in the kernel).
        colmax, u: ``[A, K]`` Sinkhorn shift and final prototype scaling.
        row_scale: ``[A, B]`` 1 / (final row sums of P * u), or ones for 0 iterations.

    Returns:
        ``(codes [A, B, K], dot_part [A, n_kb, B], sum_part [A, n_kb, B])``: added over
        dim 1, ``dot`` is sum_k q * sum_{v != s_a} S_v and ``sum`` the code row sums.
    """
    n_rows, n_protos = scores.shape
    batch = n_rows // n_crops
    n_slots = len(assign)
    n_kb = triton.cdiv(n_protos, block_k)
    codes = torch.empty((n_slots, batch, n_protos), device=scores.device, dtype=torch.float32)
    dot_part = torch.empty((n_slots, n_kb, batch), device=scores.device, dtype=torch.float32)
    sum_part = torch.empty_like(dot_part)
    with device_guard(scores):
        _swapped_ce_fwd_kernel[(triton.cdiv(batch, block_r), n_kb)](
            scores, colmax, u, row_scale, codes, dot_part, sum_part,
            batch, n_protos, 1.0 / epsilon,
            N_CROPS=n_crops, N_ASSIGN=n_slots, ASSIGN=pack_crops(assign),
            BLOCK_R=block_r, BLOCK_K=block_k,
            num_warps=num_warps,
        )
    return codes, dot_part, sum_part


def swapped_ce_backward(
    grad_loss: torch.Tensor,
    scores: torch.Tensor,
    lse: torch.Tensor,
    slot_of_crop: Sequence[int],
    codes: torch.Tensor,
    code_sum: torch.Tensor,
    *,
    n_crops: int,
    temperature: float,
    block_r: int,
    block_k: int,
    out_dtype: torch.dtype = torch.float32,
    unit_scale: bool = False,
    num_warps: int = 4,
) -> torch.Tensor:
    """dLoss/dScores ``[n_crops * B, K]`` for the upstream 0-dim ``grad_loss``.

    ``slot_of_crop``: ``n_crops`` Python ints, the slot of an assigned crop, -1 for the others.
    With ``unit_scale`` the result is dS / (grad_loss * scale), where
    ``scale = 1 / (temperature * A * B * (n_crops - 1))``: the caller applies that factor.
    """
    n_rows, n_protos = scores.shape
    batch = n_rows // n_crops
    n_slots = codes.shape[0]
    grad_scores = torch.empty(scores.shape, device=scores.device, dtype=out_dtype)
    with device_guard(scores):
        _swapped_ce_bwd_kernel[(triton.cdiv(batch, block_r), triton.cdiv(n_protos, block_k))](
            scores, lse, codes, code_sum, grad_loss, grad_scores,
            batch, n_protos, 1.0 / temperature, loss_scale(temperature, n_slots, batch, n_crops),
            N_CROPS=n_crops, N_ASSIGN=n_slots, SLOTS=pack_slots(slot_of_crop),
            UNIT_SCALE=unit_scale,
            BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
        )
    return grad_scores


def loss_scale(temperature: float, n_slots: int, batch: int, n_crops: int) -> float:
    """d loss / d (q . S_v / T summed over rows and pairs): the loss's mean over pairs and rows."""
    return 1.0 / (temperature * n_slots * batch * (n_crops - 1))
