"""Normalised prototype scores S = normalize(X) . normalize(W)^T, with reductions in the epilogue.

One kernel computes a tile of scores from the raw rows (norms accumulated in the same loop
over D, applied to the dot product at the end) and, while the tile is in registers, the
partial statistics the later stages need, so the scores are not read again for them:

- per prototype column (for Sinkhorn): max of the scores over the tile's participating rows
  and sum of exp((s - max) / eps), i.e. the first Sinkhorn row sums up to a rescaling;
- per row (for the log-softmax): max of s / T over the tile's columns and sum of
  exp(s / T - max).

Partials are written per tile and combined by the caller (deterministic, no atomics).

Dot precision (``DOT_MODE``, from :func:`fastswav.kernels._common.dot_mode`): two 16-bit
operands of one dtype go to the tensor cores as they are ("native16", exact products);
otherwise the caller's precision: "tf32" (default; operands rounded to nearest to tf32's
11-bit significand, the same rounding as fp16 without its range limits), "tf32x3" (three
tf32 passes, near fp32), "bf16" (operands cast to bf16), "ieee" (fp32 FMA, exact mode).
Norms are always taken from the unrounded values in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from typing import Sequence

from ._common import device_guard, dot_mode, pack_slots, pow2_at_least
from ._packed import slot_of_group


@triton.jit
def round_to_tf32(x):
    """Round fp32 to the nearest tf32 (ties away from zero): the tensor cores then see the
    same operand whether they truncate or round, and so does the interpreter."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x1000) >> 13) << 13
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def tile_dot(x, w_t, acc, DOT_MODE: tl.constexpr):
    """acc + x @ w_t in the precision DOT_MODE names (see the module docstring)."""
    if DOT_MODE == "native16":
        acc = tl.dot(x, w_t, acc)
    elif DOT_MODE == "native16_emulated":  # interpreter: bf16 dots are wrong in triton 3.8
        acc = tl.dot(x.to(tl.float32), w_t.to(tl.float32), acc, input_precision="ieee")
    elif DOT_MODE == "bf16":
        acc = tl.dot(x.to(tl.bfloat16), w_t.to(tl.bfloat16), acc)
    elif DOT_MODE == "bf16_emulated":
        acc = tl.dot(x.to(tl.bfloat16).to(tl.float32), w_t.to(tl.bfloat16).to(tl.float32), acc,
                     input_precision="ieee")
    elif DOT_MODE == "tf32":
        acc = tl.dot(round_to_tf32(x.to(tl.float32)), round_to_tf32(w_t.to(tl.float32)), acc,
                     input_precision="tf32")
    elif DOT_MODE == "tf32_emulated":
        acc = tl.dot(round_to_tf32(x.to(tl.float32)), round_to_tf32(w_t.to(tl.float32)), acc,
                     input_precision="ieee")
    elif DOT_MODE == "tf32x3":
        acc = tl.dot(x.to(tl.float32), w_t.to(tl.float32), acc, input_precision="tf32x3")
    else:
        acc = tl.dot(x.to(tl.float32), w_t.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _scores_kernel(
    x_ptr, w_ptr, s_ptr, inv_x_ptr, inv_w_ptr,
    col_weight_ptr, colmax_ptr, colsum_ptr,
    rowmax_ptr, rowsum_ptr,
    R, K, D, n_row_blocks_total, col_block_offset,
    inv_eps, inv_temp,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    STORE_SCORES: tl.constexpr, COL_STATS: tl.constexpr, ROW_STATS: tl.constexpr,
    DOT_MODE: tl.constexpr, COL_SLOTS: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    group = tl.program_id(2)
    n_k_blocks = tl.num_programs(1)

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < R
    col_mask = cols < K
    global_rows = (group * R + rows).to(tl.int64)

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    sq_x = tl.zeros((BLOCK_R,), dtype=tl.float32)
    sq_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        x = tl.load(x_ptr + global_rows[:, None] * D + ds[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * D + ds[None, :],
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        xf = x.to(tl.float32)
        wf = w.to(tl.float32)
        sq_x += tl.sum(xf * xf, axis=1)
        sq_w += tl.sum(wf * wf, axis=1)
        acc = tile_dot(x, tl.trans(w), acc, DOT_MODE)
    # F.normalize semantics: x / max(||x||, 1e-12)
    inv_x = 1.0 / tl.maximum(tl.sqrt(sq_x), 1e-12)
    inv_w = 1.0 / tl.maximum(tl.sqrt(sq_w), 1e-12)
    s = acc * inv_x[:, None] * inv_w[None, :]
    tile_mask = row_mask[:, None] & col_mask[None, :]

    if pid_k == 0:
        tl.store(inv_x_ptr + global_rows, inv_x, mask=row_mask)
    if (pid_r == 0) & (group == 0):
        tl.store(inv_w_ptr + cols, inv_w, mask=col_mask)
    if STORE_SCORES:
        tl.store(s_ptr + global_rows[:, None] * K + cols[None, :], s, mask=tile_mask)

    if COL_STATS:
        slot = slot_of_group(COL_SLOTS, group)
        if slot >= 0:
            weight = tl.load(col_weight_ptr).to(tl.float32)
            part = tl.where(row_mask, weight, 0.0) > 0
            valid = part[:, None] & col_mask[None, :]
            s_masked = tl.where(valid, s, float("-inf"))
            cmax = tl.max(s_masked, axis=0)
            shift = tl.where(cmax > float("-inf"), cmax, 0.0)
            # masked before the exp: rows that take no part may lie far above the max
            e = tl.exp(tl.where(valid, (s - shift[None, :]) * inv_eps, float("-inf")))
            csum = tl.sum(e, axis=0) * weight
            out = (slot * n_row_blocks_total + col_block_offset + pid_r).to(tl.int64) * K + cols
            tl.store(colmax_ptr + out, cmax, mask=col_mask)
            tl.store(colsum_ptr + out, csum, mask=col_mask)

    if ROW_STATS:
        t = tl.where(tile_mask, s * inv_temp, float("-inf"))
        rmax = tl.max(t, axis=1)
        rshift = tl.where(rmax > float("-inf"), rmax, 0.0)
        rsum = tl.sum(tl.where(tile_mask, tl.exp(t - rshift[:, None]), 0.0), axis=1)
        out = global_rows * n_k_blocks + pid_k
        tl.store(rowmax_ptr + out, rmax, mask=row_mask)
        tl.store(rowsum_ptr + out, rsum, mask=row_mask)


def prototype_scores(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    store_scores: bool = True,
    col_slots: Sequence[int] | None = None,
    col_weight: torch.Tensor | None = None,
    colmax: torch.Tensor | None = None,
    colsum: torch.Tensor | None = None,
    col_block_offset: int = 0,
    epsilon: float = 0.05,
    row_stats: bool = False,
    temperature: float = 0.1,
    precision: str = "tf32",
    block_r: int = 64,
    block_k: int = 64,
    block_d: int | None = None,
    num_warps: int = 4,
):
    """Scores of ``x`` ([G, R, D], any float dtype) against ``w`` ([K, D]).

    Args:
        store_scores: write the ``[G, R, K]`` float32 scores (else only the statistics).
        col_slots: ``G`` Python ints (constexpr in the kernel): slot ``a`` in ``colmax``/``colsum`` for groups that feed
            Sinkhorn, ``-1`` for the others. Enables the per-column statistics.
        col_weight: float 0-dim tensor, 0 or 1: whether these rows take part (queue_valid).
        colmax, colsum: ``[A, n_row_blocks_total, K]`` float32 outputs; this call fills row
            blocks ``col_block_offset .. col_block_offset + cdiv(R, block_r) - 1``.
        row_stats: also return per-(row, column block) max and sum-exp of s / temperature.
        precision: dot precision for float32 or mixed operands (module docstring).

    Returns:
        ``(scores or None, inv_norm_x [G*R], inv_norm_w [K], rowmax, rowsum)``, the last
        two ``[G*R, cdiv(K, block_k)]`` or None.
    """
    x = x.contiguous()
    w = w.contiguous()
    groups, rows, dim = x.shape
    n_protos = w.shape[0]
    device = x.device
    block_d = block_d or min(128, pow2_at_least(dim, 16))
    n_rb = triton.cdiv(rows, block_r)
    n_kb = triton.cdiv(n_protos, block_k)
    scores = torch.empty((groups, rows, n_protos), device=device, dtype=torch.float32) \
        if store_scores else None
    inv_x = torch.empty(groups * rows, device=device, dtype=torch.float32)
    inv_w = torch.empty(n_protos, device=device, dtype=torch.float32)
    col_stats = col_slots is not None
    if col_stats:
        n_rb_total = colmax.shape[1]
        if col_weight is None:
            col_weight = torch.ones((), device=device, dtype=torch.float32)
    else:
        n_rb_total = 1
    if row_stats:
        rowmax = torch.empty((groups * rows, n_kb), device=device, dtype=torch.float32)
        rowsum = torch.empty_like(rowmax)
    else:
        rowmax = rowsum = None
    dummy = inv_w  # placeholder pointer for disabled outputs (never touched)
    mode = dot_mode(x, w, precision)
    with device_guard(x):
        _scores_kernel[(n_rb, n_kb, groups)](
            x, w, scores if store_scores else dummy, inv_x, inv_w,
            col_weight if col_stats else dummy,
            colmax if col_stats else dummy, colsum if col_stats else dummy,
            rowmax if row_stats else dummy, rowsum if row_stats else dummy,
            rows, n_protos, dim, n_rb_total, col_block_offset,
            1.0 / epsilon, 1.0 / temperature,
            BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d,
            STORE_SCORES=store_scores, COL_STATS=col_stats, ROW_STATS=row_stats,
            DOT_MODE=mode, COL_SLOTS=pack_slots(col_slots) if col_stats else 0,
            num_warps=num_warps,
        )
    return scores, inv_x, inv_w, rowmax, rowsum
