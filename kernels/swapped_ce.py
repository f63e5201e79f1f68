"""Swapped-prediction cross-entropy: final codes, loss, and the score gradient.

Forward, one program per (row block, assigned crop a): finish Sinkhorn for these rows
(codes_a = P_a * u_a / max(sum_k P_a * u_a, tiny)), write the codes for the backward, and
accumulate sum_k codes_a * sum_{v != s_a} S_v and the code row sums; with the per-row
log-sum-exp of every crop (from the score kernel's statistics) that is the loss, since
-sum_k q_k log softmax(S_v / T)_k = -(q . S_v) / T + (sum_k q_k) * lse_v.

Backward, one elementwise pass writing dS: for crop v,
dS_v = coef * (sum_{a: s_a != v} codes_a - (sum_{a: s_a != v} rowsum_a) * softmax(S_v / T)),
the softmax rebuilt from the saved log-sum-exp (no second reduction over K).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP32_TINY


@triton.jit
def _swapped_ce_fwd_kernel(
    s_ptr, lse_ptr, assign_ptr, colmax_ptr, u_ptr,
    codes_ptr, code_sum_ptr, loss_part_ptr,
    B, K, inv_eps, inv_temp, tiny,
    N_CROPS: tl.constexpr, NORMALIZE_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    n_blocks = tl.num_programs(0)
    crop = tl.load(assign_ptr + slot)

    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    own_ptrs = s_ptr + (crop * B + rows64)[:, None] * K
    vec_base = slot.to(tl.int64) * K

    # 1) Sinkhorn's last column normalisation: row sums with the final u
    if NORMALIZE_ROWS:
        c = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            mask = row_mask[:, None] & col_mask[None, :]
            s = tl.load(own_ptrs + cols[None, :], mask=mask, other=0.0)
            m = tl.load(colmax_ptr + vec_base + cols, mask=col_mask, other=0.0)
            u = tl.load(u_ptr + vec_base + cols, mask=col_mask, other=0.0)
            p = tl.where(mask, tl.exp((s - m[None, :]) * inv_eps), 0.0)
            c += tl.sum(p * u[None, :], axis=1)
        row_scale = 1.0 / tl.maximum(c, tiny)
    else:
        row_scale = tl.full((BLOCK_R,), 1.0, tl.float32)

    # 2) codes, their row sums and their dot with the other crops' scores
    q_dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    q_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        m = tl.load(colmax_ptr + vec_base + cols, mask=col_mask, other=0.0)
        u = tl.load(u_ptr + vec_base + cols, mask=col_mask, other=0.0)
        s_own = tl.load(own_ptrs + cols[None, :], mask=mask, other=0.0)
        s_all = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for v in tl.static_range(N_CROPS):
            s_all += tl.load(s_ptr + (v * B + rows64)[:, None] * K + cols[None, :],
                             mask=mask, other=0.0)
        q = tl.where(mask, tl.exp((s_own - m[None, :]) * inv_eps) * u[None, :]
                     * row_scale[:, None], 0.0)
        tl.store(codes_ptr + (slot * B + rows64)[:, None] * K + cols[None, :], q, mask=mask)
        q_dot += tl.sum(q * (s_all - s_own), axis=1)
        q_sum += tl.sum(q, axis=1)

    lse_others = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v in tl.static_range(N_CROPS):
        lse_others += tl.load(lse_ptr + v * B + rows64, mask=row_mask, other=0.0)
    lse_others -= tl.load(lse_ptr + crop * B + rows64, mask=row_mask, other=0.0)
    # sum over rows of sum_{v != s_a} sum_k q log p_v (negated and averaged by the caller)
    per_row = tl.where(row_mask, q_dot * inv_temp - q_sum * lse_others, 0.0)
    tl.store(code_sum_ptr + slot * B + rows64, q_sum, mask=row_mask)
    tl.store(loss_part_ptr + slot * n_blocks + pid, tl.sum(per_row, axis=0))


@triton.jit
def _swapped_ce_bwd_kernel(
    s_ptr, lse_ptr, assign_ptr, codes_ptr, code_sum_ptr, grad_ptr, ds_ptr,
    B, K, inv_temp, scale,
    N_ASSIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    crop = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < B
    col_mask = cols < K
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    target = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    target_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for a in tl.static_range(N_ASSIGN):
        # a crop is never trained to predict its own codes
        use = (tl.load(assign_ptr + a) != crop).to(tl.float32)
        target += use * tl.load(codes_ptr + (a * B + rows64)[:, None] * K + cols[None, :],
                                mask=mask, other=0.0)
        target_sum += use * tl.load(code_sum_ptr + a * B + rows64, mask=row_mask, other=0.0)

    srow = (crop * B + rows64)
    s = tl.load(s_ptr + srow[:, None] * K + cols[None, :], mask=mask, other=0.0)
    lse = tl.load(lse_ptr + srow, mask=row_mask, other=0.0)
    prob = tl.exp(s * inv_temp - lse[:, None])
    coef = tl.load(grad_ptr).to(tl.float32) * scale
    ds = coef * (target_sum[:, None] * prob - target)
    tl.store(ds_ptr + srow[:, None] * K + cols[None, :], ds, mask=mask)


def swapped_ce_forward(
    scores: torch.Tensor,
    lse: torch.Tensor,
    assign: torch.Tensor,
    colmax: torch.Tensor,
    u: torch.Tensor,
    *,
    n_crops: int,
    epsilon: float,
    temperature: float,
    normalize_rows: bool = True,
    block_r: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
):
    """Codes of the assigned crops and the per-block loss sums.

    Args:
        scores: ``[n_crops * B, K]`` float32, crop-major.
        lse: ``[n_crops * B]`` float32 log-sum-exp of each row of scores / temperature.
        assign: int32 ``[A]`` crop index of each assigned crop.
        colmax, u: ``[A, K]`` Sinkhorn shift and final prototype scaling.
        normalize_rows: apply Sinkhorn's last column normalisation (False only for 0 iterations).

    Returns:
        ``(codes [A, B, K], code_sum [A, B], loss_part [A, n_blocks])``;
        the loss is ``-loss_part.sum() / (A * B * (n_crops - 1))``.
    """
    n_rows, n_protos = scores.shape
    batch = n_rows // n_crops
    n_slots = assign.shape[0]
    n_rb = triton.cdiv(batch, block_r)
    codes = torch.empty((n_slots, batch, n_protos), device=scores.device, dtype=torch.float32)
    code_sum = torch.empty((n_slots, batch), device=scores.device, dtype=torch.float32)
    loss_part = torch.empty((n_slots, n_rb), device=scores.device, dtype=torch.float32)
    _swapped_ce_fwd_kernel[(n_rb, n_slots)](
        scores, lse, assign, colmax, u, codes, code_sum, loss_part,
        batch, n_protos, 1.0 / epsilon, 1.0 / temperature, FP32_TINY,
        N_CROPS=n_crops, NORMALIZE_ROWS=normalize_rows,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
    )
    return codes, code_sum, loss_part


def swapped_ce_backward(
    grad_loss: torch.Tensor,
    scores: torch.Tensor,
    lse: torch.Tensor,
    assign: torch.Tensor,
    codes: torch.Tensor,
    code_sum: torch.Tensor,
    *,
    n_crops: int,
    temperature: float,
    block_r: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
) -> torch.Tensor:
    """dLoss/dScores ``[n_crops * B, K]`` float32 for the upstream 0-dim ``grad_loss``."""
    n_rows, n_protos = scores.shape
    batch = n_rows // n_crops
    n_slots = assign.shape[0]
    grad_scores = torch.empty_like(scores)
    scale = 1.0 / (temperature * n_slots * batch * (n_crops - 1))
    grid = (triton.cdiv(batch, block_r), triton.cdiv(n_protos, block_k), n_crops)
    _swapped_ce_bwd_kernel[grid](
        scores, lse, assign, codes, code_sum, grad_loss, grad_scores,
        batch, n_protos, 1.0 / temperature, scale,
        N_ASSIGN=n_slots, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
    )
    return grad_scores
