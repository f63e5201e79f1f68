"""DINO-style teacher: Sinkhorn-Knopp targets in scaling form, and the teacher-student
cross-entropy with its gradient, as Triton kernels and their launchers.

Sinkhorn-Knopp (the DINOv2 / iBOT teacher), in the log domain: the targets are
T[b, k] = exp((x[b, k] - m_k) / temperature + log u_k + log w_b), m_k the per-prototype max
over every valid row of every process. Only log u ([K]) and log w ([rows]) are iterated;
the exponentials are recomputed from the logits on every pass and never stored, and every
sum is an online log-sum-exp (running max and sum of exp, float32), so neither a sharp
temperature nor a sample far below every prototype's max overflows or underflows a sum.
Passes (each one read of the logits):

- ``colsum`` with FIRST: per-prototype max of x and sum of exp((x - max) / T) over a chunk
  of rows (partials ``[row_splits, K]``, combined and all_reduced by the caller);
- ``colsum``: log-sum-exp over the rows of y = (x - m_k) / T + log w_b;
- ``rowsum``: log-sum-exp over a chunk of prototypes of (x - m_k) / T + log u_k
  (partials ``[k_splits, rows]``);
- ``finalize``: writes T (float32).

Rows at or beyond ``n_valid`` (a device scalar: the patch form's padded rows) are masked
out of every pass and get zero targets. No launch reads a value back to the host.

Cross-entropy: for student crop v and teacher crop i the term is
-sum_k t_i[b, k] log softmax(s_v[b] / T_s)_k = tsum_v[b] * lse_v[b] - (tgt_v[b] . s_v[b]) / T_s,
where tgt_v is the sum of the teacher targets paired with v and tsum_v its row sum. One
forward pass over the student logits writes per-(row, crop) partial online log-sum-exp,
dot and target sums; one backward pass writes
dS_v = g_v[b] / T_s * (tsum_v[b] * softmax(s_v[b] / T_s) - tgt_v[b]) with the softmax rebuilt
from the saved log-sum-exp. The teacher tiles are loaded once per tile for all student
crops. The log-softmax is never materialised.

Tiles are chosen in one place, :func:`tiles`; there is no ``tl.dot`` in these kernels (no
matmul: nothing for tensor cores to do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard, targets_gpu

# H100 SM count: launches aim for at least this many programs (and a few waves of them).
_SMS = 132
_TARGET_PROGRAMS = 4 * _SMS


def tiles(n_rows: int, n_cols: int, gpu: bool, op: str = "sinkhorn") -> dict:
    """Tile sizes and work splits for a ``[n_rows, n_cols]`` matrix, in one place.

    GPU: 16 x 256 fp32 tiles (4,096 elements over 4 warps: 32 registers a tile; 16 x 128
    for the cross-entropy forward, which holds more tiles and per-crop state) and the
    rows (column kernels) or prototypes (row kernels) split so that a launch has at least
    ``4 * 132`` programs where the shape allows. Interpreter: 16 x 32 tiles and splits that
    still give several programs and ragged edges at test shapes.
    """
    block_r, block_k = (16, 256) if gpu else (16, 32)
    if gpu and op == "ce_fwd":
        block_k = 128  # several live tiles (targets, logits, exp) and per-crop state
    n_rb = triton.cdiv(n_rows, block_r)
    n_kb = triton.cdiv(n_cols, block_k)
    target = _TARGET_PROGRAMS if gpu else 4
    # column kernels: grid (row_splits, n_kb), each program over row_tiles row tiles
    row_splits = max(1, min(n_rb, triton.cdiv(target, n_kb)))
    row_tiles = triton.cdiv(n_rb, row_splits)
    row_splits = triton.cdiv(n_rb, row_tiles)
    # row kernels: grid (n_rb, k_splits), each program over k_tiles prototype tiles
    k_splits = max(1, min(n_kb, triton.cdiv(target, n_rb)))
    k_tiles = triton.cdiv(n_kb, k_splits)
    k_splits = triton.cdiv(n_kb, k_tiles)
    return dict(block_r=block_r, block_k=block_k, n_rb=n_rb, n_kb=n_kb,
                row_splits=row_splits, row_tiles=row_tiles,
                k_splits=k_splits, k_tiles=k_tiles, warps=4)


# ------------------------------------------------------------------------- Sinkhorn-Knopp

@triton.jit
def _row_limit(n_valid_ptr, n_rows, HAS_VALID: tl.constexpr):
    if HAS_VALID:
        return tl.minimum(tl.load(n_valid_ptr).to(tl.int32), n_rows)
    else:
        return n_rows


@triton.jit
def _sk_colsum_kernel(
    x_ptr, n_valid_ptr, colmax_ptr, logw_ptr, max_part_ptr, sum_part_ptr,
    n_rows, K, inv_temp, rows_per_prog,
    HAS_VALID: tl.constexpr, FIRST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Online log-sum-exp down each column over a chunk of rows: FIRST of x / T (the max
    kept in logit units), else of y = (x - m_k) / T + log w_b."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    limit = _row_limit(n_valid_ptr, n_rows, HAS_VALID)
    r0 = pid_r * rows_per_prog
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    top = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    if not FIRST:
        m = tl.load(colmax_ptr + cols, mask=col_mask, other=0.0)
    for r in range(r0, r0 + rows_per_prog, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        row_mask = rows < limit
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if FIRST:
            y = tl.where(mask, x, float("-inf"))
            scale = inv_temp
        else:
            logw = tl.load(logw_ptr + rows, mask=row_mask, other=float("-inf"))
            y = tl.where(mask, (x - m[None, :]) * inv_temp + logw[:, None], float("-inf"))
            scale = 1.0
        top_new = tl.maximum(top, tl.max(y, axis=0))
        safe = tl.where(top_new == float("-inf"), 0.0, top_new)
        acc = (acc * tl.exp((top - safe) * scale)
               + tl.sum(tl.exp((y - safe[None, :]) * scale), axis=0))
        top = top_new
    out = pid_r.to(tl.int64) * K + cols
    tl.store(max_part_ptr + out, top, mask=col_mask)
    tl.store(sum_part_ptr + out, acc, mask=col_mask)


@triton.jit
def _sk_rowsum_kernel(
    x_ptr, n_valid_ptr, colmax_ptr, logu_ptr, max_part_ptr, sum_part_ptr,
    n_rows, K, inv_temp, cols_per_prog,
    HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Online log-sum-exp along each row over a chunk of prototypes of
    y = (x - m_k) / T + log u_k (-inf for invalid rows)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    limit = _row_limit(n_valid_ptr, n_rows, HAS_VALID)
    row_mask = rows < limit
    row_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    top = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    k0 = pid_k * cols_per_prog
    for k in range(k0, k0 + cols_per_prog, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        m = tl.load(colmax_ptr + cols, mask=col_mask, other=0.0)
        logu = tl.load(logu_ptr + cols, mask=col_mask, other=0.0)
        y = tl.where(mask, (x - m[None, :]) * inv_temp + logu[None, :], float("-inf"))
        top_new = tl.maximum(top, tl.max(y, axis=1))
        safe = tl.where(top_new == float("-inf"), 0.0, top_new)
        acc = acc * tl.exp(top - safe) + tl.sum(tl.exp(y - safe[:, None]), axis=1)
        top = top_new
    out = pid_k.to(tl.int64) * n_rows + rows
    tl.store(max_part_ptr + out, top, mask=rows < n_rows)
    tl.store(sum_part_ptr + out, acc, mask=rows < n_rows)


@triton.jit
def _sk_finalize_kernel(
    x_ptr, n_valid_ptr, colmax_ptr, logu_ptr, logw_ptr, out_ptr,
    n_rows, K, inv_temp,
    HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    limit = _row_limit(n_valid_ptr, n_rows, HAS_VALID)
    col_mask = cols < K
    valid = (rows < limit)[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(colmax_ptr + cols, mask=col_mask, other=0.0)
    logu = tl.load(logu_ptr + cols, mask=col_mask, other=0.0)
    logw = tl.load(logw_ptr + rows, mask=rows < limit, other=0.0)
    y = tl.where(valid, (x - m[None, :]) * inv_temp + logu[None, :] + logw[:, None],
                 float("-inf"))
    t = tl.exp(y)
    tl.store(out_ptr + offs, t, mask=(rows < n_rows)[:, None] & col_mask[None, :])


def _valid_arg(x: torch.Tensor, n_valid):
    return (n_valid, True) if n_valid is not None else (x, False)


def sk_colsum(x, n_valid, temperature, *, colmax=None, logw=None, cfg=None):
    """Per-prototype partial log-sum-exp over row chunks.

    Args:
        x: ``[rows, K]`` logits (contiguous, any float dtype).
        n_valid: int 0-dim device tensor (rows at or past it take no part) or None.
        colmax: None for the first pass, else the ``[K]`` float32 global max of the logits.
        logw: with ``colmax``: ``[rows]`` float32 log of the sample scaling w.

    Returns:
        ``(max_part, sum_part)``, each ``[row_splits, K]`` float32. First pass: the max of
        the logits and the sum of exp((x - max) / T); else the max a of
        y = (x - m) / T + log w and the sum of exp(y - a).
    """
    n_rows, n_cols = x.shape
    cfg = cfg or tiles(n_rows, n_cols, targets_gpu(x))
    first = colmax is None
    sum_part = torch.empty((cfg["row_splits"], n_cols), device=x.device, dtype=torch.float32)
    max_part = torch.empty_like(sum_part)
    nv, has_valid = _valid_arg(x, n_valid)
    with device_guard(x):
        _sk_colsum_kernel[(cfg["row_splits"], cfg["n_kb"])](
            x, nv, sum_part if first else colmax, sum_part if first else logw,
            max_part, sum_part,
            n_rows, n_cols, 1.0 / temperature, cfg["row_tiles"] * cfg["block_r"],
            HAS_VALID=has_valid, FIRST=first, BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"],
            num_warps=cfg["warps"],
        )
    return max_part, sum_part


def sk_rowsum(x, n_valid, temperature, colmax, logu, *, cfg=None):
    """``(max_part, sum_part)``, each ``[k_splits, rows]`` float32: partial log-sum-exp of
    y = (x - m_k) / T + log u_k along the rows (max -inf and sum 0 for invalid rows)."""
    n_rows, n_cols = x.shape
    cfg = cfg or tiles(n_rows, n_cols, targets_gpu(x))
    max_part = torch.empty((cfg["k_splits"], n_rows), device=x.device, dtype=torch.float32)
    sum_part = torch.empty_like(max_part)
    nv, has_valid = _valid_arg(x, n_valid)
    with device_guard(x):
        _sk_rowsum_kernel[(cfg["n_rb"], cfg["k_splits"])](
            x, nv, colmax, logu, max_part, sum_part, n_rows, n_cols, 1.0 / temperature,
            cfg["k_tiles"] * cfg["block_k"],
            HAS_VALID=has_valid, BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"],
            num_warps=cfg["warps"],
        )
    return max_part, sum_part


def sk_finalize(x, n_valid, temperature, colmax, logu, logw, *, cfg=None):
    """The targets ``[rows, K]`` float32: exp((x - m) / T + log u + log w), zero on invalid
    rows."""
    n_rows, n_cols = x.shape
    cfg = cfg or tiles(n_rows, n_cols, targets_gpu(x))
    out = torch.empty((n_rows, n_cols), device=x.device, dtype=torch.float32)
    nv, has_valid = _valid_arg(x, n_valid)
    with device_guard(x):
        _sk_finalize_kernel[(cfg["n_rb"], cfg["n_kb"])](
            x, nv, colmax, logu, logw, out, n_rows, n_cols, 1.0 / temperature,
            HAS_VALID=has_valid, BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"],
            num_warps=cfg["warps"],
        )
    return out


# ------------------------------------------------------------------------- cross-entropy

@triton.jit
def _ce_fwd_kernel(
    s_ptr, t_ptr, m_part_ptr, l_part_ptr, dot_part_ptr, tsum_part_ptr,
    B, K, inv_temp, cols_per_prog,
    N_S: tl.constexpr, N_T: tl.constexpr, SKIP_SAME: tl.constexpr, NS_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    crop = tl.arange(0, NS_PAD)
    # per (row, student crop) running max, sum of exp, target . s / T and target sums
    M = tl.full((BLOCK_R, NS_PAD), float("-inf"), tl.float32)
    L = tl.zeros((BLOCK_R, NS_PAD), dtype=tl.float32)
    D = tl.zeros((BLOCK_R, NS_PAD), dtype=tl.float32)
    S = tl.zeros((BLOCK_R, NS_PAD), dtype=tl.float32)
    k0 = pid_k * cols_per_prog
    for k in range(k0, k0 + cols_per_prog, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        t_all = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for i in tl.static_range(N_T):
            t_all += tl.load(t_ptr + (i * B + rows64)[:, None] * K + cols[None, :], mask=mask,
                             other=0.0).to(tl.float32)
        # A run-time loop over the student crops (unrolled, the compiler hoists every
        # crop's loads up front and spills).
        for v in range(N_S):
            tgt = t_all
            if SKIP_SAME:
                # a student crop is not trained on the teacher's view of the same crop
                same = mask & (v < N_T)
                tgt = tgt - tl.load(t_ptr + (v * B + rows64)[:, None] * K + cols[None, :],
                                    mask=same, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + (v * B + rows64)[:, None] * K + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32) * inv_temp
            s_m = tl.where(mask, s, float("-inf"))
            sel = crop[None, :] == v
            m_old = tl.max(tl.where(sel, M, float("-inf")), axis=1)
            m_new = tl.maximum(m_old, tl.max(s_m, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_new = (tl.sum(tl.where(sel, L, 0.0), axis=1) * tl.exp(m_old - m_safe)
                     + tl.sum(tl.exp(s_m - m_safe[:, None]), axis=1))
            d_add = tl.sum(tgt * s, axis=1)  # tgt and s are 0 outside the mask
            t_add = tl.sum(tgt, axis=1)
            M = tl.where(sel, m_new[:, None], M)
            L = tl.where(sel, l_new[:, None], L)
            D = tl.where(sel, D + d_add[:, None], D)
            S = tl.where(sel, S + t_add[:, None], S)
    out = (pid_k * N_S + crop[None, :]).to(tl.int64) * B + rows64[:, None]
    smask = row_mask[:, None] & (crop < N_S)[None, :]
    tl.store(m_part_ptr + out, M, mask=smask)
    tl.store(l_part_ptr + out, L, mask=smask)
    tl.store(dot_part_ptr + out, D, mask=smask)
    tl.store(tsum_part_ptr + out, S, mask=smask)


@triton.jit
def _ce_bwd_kernel(
    s_ptr, t_ptr, g_ptr, lse_ptr, tsum_ptr, ds_ptr,
    B, K, inv_temp,
    N_S: tl.constexpr, N_T: tl.constexpr, SKIP_SAME: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < B
    mask = row_mask[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    t_all = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(N_T):
        t_all += tl.load(t_ptr + (i * B + rows64)[:, None] * K + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
    for v in tl.static_range(N_S):
        if SKIP_SAME and v < N_T:
            tgt = t_all - tl.load(t_ptr + (v * B + rows64)[:, None] * K + cols[None, :],
                                  mask=mask, other=0.0).to(tl.float32)
        else:
            tgt = t_all
        srow = v * B + rows64
        offs = srow[:, None] * K + cols[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + srow, mask=row_mask, other=0.0)
        tsum = tl.load(tsum_ptr + srow, mask=row_mask, other=0.0)
        g = tl.load(g_ptr + srow, mask=row_mask, other=0.0).to(tl.float32) * inv_temp
        prob = tl.exp(s * inv_temp - lse[:, None])
        ds = g[:, None] * (tsum[:, None] * prob - tgt)
        tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


def ce_forward(student, targets, *, n_student_crops, n_teacher_crops, temperature,
               skip_same_view, cfg=None):
    """Per-row partials of the teacher-student cross-entropy.

    Args:
        student: ``[n_student_crops * B, K]`` logits, crop-major (any float dtype).
        targets: ``[n_teacher_crops * B, K]`` teacher targets, crop-major.

    Returns:
        ``(m, l, dot, tsum)``, each ``[k_splits, n_student_crops, B]`` float32: running
        max and sum of exp of s / T, sum of tgt * s / T and of tgt over a prototype chunk.
    """
    batch = student.shape[0] // n_student_crops
    n_cols = student.shape[1]
    cfg = cfg or tiles(batch, n_cols, targets_gpu(student), op="ce_fwd")
    shape = (cfg["k_splits"], n_student_crops, batch)
    parts = [torch.empty(shape, device=student.device, dtype=torch.float32) for _ in range(4)]
    with device_guard(student):
        _ce_fwd_kernel[(cfg["n_rb"], cfg["k_splits"])](
            student, targets, *parts, batch, n_cols, 1.0 / temperature,
            cfg["k_tiles"] * cfg["block_k"],
            N_S=n_student_crops, N_T=n_teacher_crops, SKIP_SAME=bool(skip_same_view),
            NS_PAD=triton.next_power_of_2(n_student_crops),
            BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"], num_warps=cfg["warps"],
        )
    return tuple(parts)


def ce_backward(grad_rows, student, targets, lse, tsum, *, n_student_crops, n_teacher_crops,
                temperature, skip_same_view, cfg=None):
    """dLoss/dStudent (student's dtype) for the upstream ``grad_rows`` ``[n_s, B]`` of the
    per-row losses; ``lse`` and ``tsum`` ``[n_s, B]`` float32 from the forward."""
    batch = student.shape[0] // n_student_crops
    n_cols = student.shape[1]
    cfg = cfg or tiles(batch, n_cols, targets_gpu(student), op="ce_bwd")
    grad = torch.empty_like(student)
    with device_guard(student):
        _ce_bwd_kernel[(cfg["n_rb"], cfg["n_kb"])](
            student, targets, grad_rows, lse, tsum, grad, batch, n_cols, 1.0 / temperature,
            N_S=n_student_crops, N_T=n_teacher_crops, SKIP_SAME=bool(skip_same_view),
            BLOCK_R=cfg["block_r"], BLOCK_K=cfg["block_k"], num_warps=cfg["warps"],
        )
    return grad


# ------------------------------------------------------------------------- compile report

COMPILE_K = 65536
COMPILE_BATCHES = (64, 256, 1024)
COMPILE_STUDENT_CROPS = 10
COMPILE_TEACHER_CROPS = 2


def _sinkhorn_launches(x, n_valid, temperature=0.07, iterations=3):
    """The launches of one fused Sinkhorn-Knopp teacher call (``fastswav.ops.teacher``), in
    order; the vectors between launches are placeholders (the report compiles, never runs)."""
    n_rows, n_cols = x.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    colmax = torch.empty(n_cols, **f32)
    logu = torch.empty(n_cols, **f32)
    logw = torch.empty(n_rows, **f32)
    sk_colsum(x, n_valid, temperature)
    for _ in range(iterations - 1):
        sk_rowsum(x, n_valid, temperature, colmax, logu)
        sk_colsum(x, n_valid, temperature, colmax=colmax, logw=logw)
    sk_rowsum(x, n_valid, temperature, colmax, logu)
    sk_finalize(x, n_valid, temperature, colmax, logu, logw)


def _ce_launches(student, targets, n_s, n_t, skip_same_view):
    """The forward and backward launches of one fused cross-entropy call."""
    batch = student.shape[0] // n_s
    f32 = dict(dtype=torch.float32)
    ce_forward(student, targets, n_student_crops=n_s, n_teacher_crops=n_t, temperature=0.1,
               skip_same_view=skip_same_view)
    ce_backward(torch.empty(n_s, batch, **f32), student, targets,
                torch.empty(n_s, batch, **f32), torch.empty(n_s, batch, **f32),
                n_student_crops=n_s, n_teacher_crops=n_t, temperature=0.1,
                skip_same_view=skip_same_view)


# DINOv3's teacher step per GPU: (label, CLS batch B, iBOT masked-patch rows, K of the DINO
# head, K of the iBOT head). The default heads have 65,536 prototypes; the ViT-7B's DINO
# head 262,144 and its iBOT head 98,304. Masked rows: ~6,000 (2 global crops x 64 images x
# 256 patches x ~0.2 mask ratio on average), 8,192 at the high end.
DINOV3_STEPS = (("dinov3", 64, 6000, 65536, 65536),
                ("dinov3_vit7b", 64, 8192, 262144, 98304))
DINOV3_LOCAL_CROPS = 8
# rows * K past 2^31: the offsets of every launch must be 64-bit here
WIDE_ROWS, WIDE_K = 8192, 262144


def dinov3_launches(batch, patch_rows, cls_k, patch_k):
    """Every launch of DINOv3's teacher step through ``fastswav.dino``: Sinkhorn-Knopp on
    the ``[2B, K]`` CLS logits, the local crops against both teacher crops and the global
    crops with ``ignore_diagonal``; Sinkhorn-Knopp on the ``[rows, K]`` masked patches and
    the masked-patch cross-entropy. bf16 logits, float32 targets (never run: see below)."""
    bf16, f32 = dict(dtype=torch.bfloat16), dict(dtype=torch.float32)
    _sinkhorn_launches(torch.empty(2 * batch, cls_k, **bf16), None)
    targets = torch.empty(2 * batch, cls_k, **f32)
    _ce_launches(torch.empty(DINOV3_LOCAL_CROPS * batch, cls_k, **bf16), targets,
                 DINOV3_LOCAL_CROPS, 2, False)
    _ce_launches(torch.empty(2 * batch, cls_k, **bf16), targets, 2, 2, True)
    _sinkhorn_launches(torch.empty(patch_rows, patch_k, **bf16), None)
    _ce_launches(torch.empty(patch_rows, patch_k, **bf16),
                 torch.empty(patch_rows, patch_k, **f32), 1, 1, False)


def compile_cases():
    """``(case name, thunk)`` pairs for the compiled-kernel report: every launch the fused
    teacher ops make on a GPU at K = 65,536 and B = 64, 256, 1,024 per GPU (2 teacher and 10
    student crops; bf16 logits as under autocast, float32 targets), DINOv3's teacher steps
    (:data:`DINOV3_STEPS`) and one ``[8192, 262144]`` step (rows * K past 2^31), with CPU
    tensors that are allocated but never touched (the report compiles the launches without
    running them)."""
    cases = []
    for batch in COMPILE_BATCHES:
        n_s, n_t, n_cols = COMPILE_STUDENT_CROPS, COMPILE_TEACHER_CROPS, COMPILE_K

        def teacher(batch=batch):
            _sinkhorn_launches(torch.empty(n_t * batch, n_cols, dtype=torch.bfloat16), None)

        def teacher_patches(batch=batch):
            # padded patch rows, the valid count as a device tensor
            _sinkhorn_launches(torch.empty(batch, n_cols, dtype=torch.bfloat16),
                               torch.empty((), dtype=torch.int64))

        def cross_entropy(batch=batch):
            _ce_launches(torch.empty(n_s * batch, n_cols, dtype=torch.bfloat16),
                         torch.empty(n_t * batch, n_cols, dtype=torch.float32), n_s, n_t, True)

        cases += [(f"teacher_sinkhorn B={batch} crops={n_t} K={n_cols} bf16", teacher),
                  (f"teacher_sinkhorn_patches rows={batch} K={n_cols} bf16", teacher_patches),
                  (f"teacher_student_ce B={batch} student={n_s} teacher={n_t} K={n_cols} bf16",
                   cross_entropy)]
    for name, batch, rows, cls_k, patch_k in DINOV3_STEPS:
        cases.append((f"teacher_{name} B={batch} K={cls_k} patches={rows} K={patch_k} bf16",
                      lambda a=(batch, rows, cls_k, patch_k): dinov3_launches(*a)))

    def wide():
        _sinkhorn_launches(torch.empty(WIDE_ROWS, WIDE_K, dtype=torch.bfloat16), None)
        _ce_launches(torch.empty(WIDE_ROWS, WIDE_K, dtype=torch.bfloat16),
                     torch.empty(WIDE_ROWS, WIDE_K, dtype=torch.float32), 1, 1, False)

    cases.append((f"teacher_wide rows={WIDE_ROWS} K={WIDE_K} bf16", wide))
    return cases
