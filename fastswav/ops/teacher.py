"""DINO-style teacher targets (Sinkhorn-Knopp centering) and the teacher-student
cross-entropy: references, fused custom ops, and the public functions.

Sinkhorn-Knopp teacher (DINOv2 ``sinkhorn_knopp_teacher``; iBOT's patch form with
``n_masked_patches_tensor``): Q = exp(logits / temperature)^T ([K, N]); normalise to total
mass 1 over all processes; then ``iterations`` times scale each prototype row to mass 1/K
(row sums all_reduced) and each sample column to mass 1/N_total, where N_total is the sample
count over all processes; finally scale columns to sum to 1 and return Q^T ([N, K]). It is
the same algorithm as SwAV's Sinkhorn (epsilon = temperature). Here it runs in the log
domain on scaling vectors: Q^T[b, k] = exp((x[b, k] - m_k) / temperature + log u_k + log w_b)
with m_k the per-prototype max over all processes (exact: the scalar first normalisation
and the first prototype normalisation cancel it; one global max when ``iterations == 0``),
and every sum an online log-sum-exp, so no temperature overflows a sum or empties a row. The
reference (:func:`sinkhorn_knopp_reference`, PyTorch) and the fused kernels compute the same
iterations. In the patch form only the first ``n_valid`` rows of each process are samples
(a device tensor, summed over processes); the padded rows take no part and get zero targets
(DINOv2 itself lets its padded rows into the sums; here they are excluded, on purpose).

Cross-entropy: student logits ``[n_s * B, K]`` and teacher targets ``[n_t * B, K]``, both
crop-major. A pair (teacher crop i, student crop v) contributes
``mean_b -sum_k t_i[b, k] log softmax(s_v[b] / student_temp)_k``; with ``skip_same_view``
the pairs i == v are left out (DINO: the student's first n_t crops are the teacher's global
views, in the same order). ``reduction="mean"`` divides the sum over counted pairs by their
number (DINO v1's ``total_loss / n_loss_terms``); ``reduction="sum"`` returns the sum
(DINOv2's ``DINOLoss.forward``, which leaves the division to its caller). The teacher
targets take no gradient (the teacher runs under no_grad in DINO).

Both fused ops are ``torch.library.custom_op``s with fake implementations: a compiled step
keeps them inside its graph. The fused path never reads a value back to the host.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .backend import loss_backend
from .fused_loss import _group, _group_key
from .sinkhorn import accumulation_dtype, all_reduce_

_TINY = torch.finfo(torch.float32).tiny
_LOG_TINY = math.log(_TINY)  # a prototype no valid sample reaches: log of the clamp


def _valid_rows(n_rows: int, n_valid: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    if n_valid is None:
        return None
    return torch.arange(n_rows, device=device) < n_valid.to(device).reshape(())


def _check_teacher_args(logits, temperature, iterations, n_valid):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, K], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if n_valid is not None and n_valid.numel() != 1:
        raise ValueError("n_valid must be a one-element tensor (this process's valid rows)")


# ------------------------------------------------------------------ Sinkhorn-Knopp teacher

def _dist_max(t, group):
    return all_reduce_(t, op=dist.ReduceOp.MAX if dist.is_available() else None, group=group)


def _finite_or_zero(t):
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _combine_lse(top, total, dim, group=None):
    """log of sum(total * exp(top)) over ``dim`` of per-chunk (max, sum of exp(. - max))
    pieces, and over the processes of ``group`` when given (max, then sum all_reduced)."""
    big = top.amax(dim=dim)
    if group is not False:
        big = _dist_max(big, group)
    big = _finite_or_zero(big)
    summed = (total * torch.exp(top - big.unsqueeze(dim))).sum(dim=dim)
    if group is not False:
        summed = all_reduce_(summed, group=group)
    return big + torch.log(summed)


def _sample_count(n_rows, n_valid, device, group):
    if n_valid is None:
        n_total = torch.full((), float(n_rows), device=device)
    else:
        n_total = n_valid.reshape(()).clamp(0, n_rows).to(device=device, dtype=torch.float32)
    return all_reduce_(n_total.clone(), group=group)


def _finish_log_scalings(n_protos, global_max, log_r, log_n, inv_t):
    """log u from the prototype sums log_r ([K], over all processes): mass 1/K each."""
    return -math.log(n_protos) - log_r.clamp_min(_LOG_TINY)


def _zero_iterations_log_u(global_max, log_r, log_n, inv_t):
    """0 iterations: Q = exp((x - M) / T) / total * n_total, M one global max; as log u."""
    shift = (global_max - global_max.amax()) * inv_t
    return shift + log_n - torch.logsumexp(log_r + shift, dim=0)


@torch.no_grad()
def sinkhorn_knopp_reference(logits, temperature, iterations=3, group=None, n_valid=None):
    """The PyTorch reference of :func:`sinkhorn_knopp` (float32; float64 stays float64):
    the same log-domain scaling iterations as the fused kernels, on the whole matrix."""
    _check_teacher_args(logits, temperature, iterations, n_valid)
    x = logits.to(accumulation_dtype(logits))
    n_rows, n_protos = x.shape
    valid = _valid_rows(n_rows, n_valid, x.device)
    inv_t = 1.0 / temperature
    neg_inf = torch.full((), float("-inf"), device=x.device, dtype=x.dtype)
    if valid is not None:  # padded rows may hold anything (inf, NaN): they take no part
        x = torch.where(valid[:, None], x, neg_inf)
    global_max = _finite_or_zero(_dist_max(x.amax(dim=0), group))
    z = (x - global_max) * inv_t  # [N, K], <= 0 on valid rows, -inf on padded ones
    log_n = torch.log(_sample_count(n_rows, n_valid, x.device, group).to(x.dtype))
    part_max = _finite_or_zero(z.amax(dim=0, keepdim=True))
    log_r = _combine_lse(part_max, torch.exp(z - part_max).sum(dim=0, keepdim=True), 0, group)
    if iterations == 0:
        log_u = _zero_iterations_log_u(global_max, log_r, log_n, inv_t)
        log_w = torch.zeros(n_rows, device=x.device, dtype=x.dtype)
    else:
        log_u = _finish_log_scalings(n_protos, global_max, log_r, log_n, inv_t)
        for it in range(iterations):
            log_c = torch.logsumexp(z + log_u, dim=1)  # per sample, local
            log_w = -log_c if it == iterations - 1 else -log_c - log_n
            if valid is not None:
                log_w = torch.where(valid, log_w, neg_inf)
            if it == iterations - 1:
                break
            y = z + log_w[:, None]
            top = _finite_or_zero(y.amax(dim=0, keepdim=True))
            log_r = _combine_lse(top, torch.exp(y - top).sum(dim=0, keepdim=True), 0, group)
            log_u = _finish_log_scalings(n_protos, global_max, log_r, log_n, inv_t)
    out = torch.exp(z + log_u + log_w[:, None])
    if valid is not None:
        out = torch.where(valid[:, None], out, torch.zeros_like(out))
    return out


def _sinkhorn_fused_impl(logits, n_valid, temperature, iterations, group):
    from fastswav.kernels.teacher import sk_colsum, sk_finalize, sk_rowsum

    x = logits.contiguous()
    n_rows, n_protos = x.shape
    device = x.device
    nv = None if n_valid is None else n_valid.to(device=device).reshape(()).contiguous()
    valid = _valid_rows(n_rows, nv, device)
    inv_t = 1.0 / temperature
    neg_inf = torch.full((), float("-inf"), device=device)

    # pass 1: per-prototype max and sum of exp over this process's rows, then over all
    max_part, sum_part = sk_colsum(x, nv, temperature)
    global_max = _finite_or_zero(_dist_max(max_part.amax(dim=0), group))
    rescale = torch.where(torch.isfinite(max_part),
                          torch.exp((max_part - global_max) * inv_t), torch.zeros_like(max_part))
    log_r = torch.log(all_reduce_((sum_part * rescale).sum(dim=0), group=group))  # [K]
    log_n = torch.log(_sample_count(n_rows, nv, device, group))

    if iterations == 0:
        log_u = _zero_iterations_log_u(global_max, log_r, log_n, inv_t)
        log_w = torch.zeros(n_rows, device=device)
    else:
        log_u = _finish_log_scalings(n_protos, global_max, log_r, log_n, inv_t)
        for it in range(iterations):
            top, total = sk_rowsum(x, nv, temperature, global_max, log_u.contiguous())
            log_c = _combine_lse(top, total, 0, group=False)  # each sample lives on one process
            log_w = -log_c if it == iterations - 1 else -log_c - log_n
            if valid is not None:
                log_w = torch.where(valid, log_w, neg_inf)
            if it == iterations - 1:
                break
            top, total = sk_colsum(x, nv, temperature, colmax=global_max,
                                   logw=log_w.contiguous())
            log_r = _combine_lse(top, total, 0, group)  # the multi-GPU hook
            log_u = _finish_log_scalings(n_protos, global_max, log_r, log_n, inv_t)
    return sk_finalize(x, nv, temperature, global_max.contiguous(), log_u.contiguous(),
                       log_w.contiguous())


@torch.library.custom_op("fastswav::sinkhorn_knopp_teacher", mutates_args=())
def _sinkhorn_teacher_op(logits: torch.Tensor, n_valid: Optional[torch.Tensor],
                         temperature: float, iterations: int, group_key: int) -> torch.Tensor:
    """Teacher targets ``[N, K]`` float32 through the Triton kernels."""
    return _sinkhorn_fused_impl(logits, n_valid, temperature, iterations, _group(group_key))


@_sinkhorn_teacher_op.register_fake
def _(logits, n_valid, temperature, iterations, group_key):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def sinkhorn_knopp_fused(logits, temperature, iterations=3, group=None, n_valid=None):
    """:func:`sinkhorn_knopp` through the fused custom op, whatever the device."""
    _check_teacher_args(logits, temperature, iterations, n_valid)
    return _sinkhorn_teacher_op(logits.detach(), None if n_valid is None else n_valid.detach(),
                                float(temperature), int(iterations), _group_key(group))


def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3, group=None,
                   n_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (DINOv2 / iBOT), ``[N, K]`` float32, no gradient.

    Args:
        logits: ``[N, K]`` teacher logits of this process (any float dtype).
        temperature: the teacher temperature; Q is proportional to exp(logits / temperature).
            Any value > 0: the per-prototype max shift keeps exp finite.
        iterations: (prototype, sample) normalisation rounds (DINOv2: 3).
        group: process group of the sums (default: the world when torch.distributed runs).
        n_valid: patch form: a one-element device tensor, this process's number of real rows
            (the first ``n_valid`` rows); the others take no part and get zero targets. The
            sample count is its sum over processes. Without it every row counts.

    Each valid row of the result sums to 1 (for ``iterations >= 1``) and, over all processes,
    each prototype receives mass N_total / K after the prototype step. Fused (Triton) on CUDA,
    the PyTorch reference elsewhere (``FASTSWAV_BACKEND`` forces one).
    """
    if loss_backend(logits.device) == "fused":
        return sinkhorn_knopp_fused(logits, temperature, iterations, group, n_valid)
    return sinkhorn_knopp_reference(logits, temperature, iterations, group, n_valid)


# ------------------------------------------------------------------ cross-entropy

def count_pairs(n_student_crops: int, n_teacher_crops: int, skip_same_view: bool) -> int:
    """Number of (teacher crop, student crop) pairs that count."""
    skipped = min(n_student_crops, n_teacher_crops) if skip_same_view else 0
    return n_student_crops * n_teacher_crops - skipped


def _check_ce_args(student, targets, n_student_crops, n_teacher_crops, skip_same_view):
    if student.dim() != 2 or targets.dim() != 2:
        raise ValueError("student logits and teacher targets must be 2-D [crops * B, K]")
    if student.shape[1] != targets.shape[1]:
        raise ValueError(f"student K={student.shape[1]} != teacher K={targets.shape[1]}")
    if n_student_crops < 1 or student.shape[0] % n_student_crops:
        raise ValueError(f"{student.shape[0]} student rows are not {n_student_crops} crops")
    batch = student.shape[0] // n_student_crops
    if n_teacher_crops is None:
        if batch == 0 or targets.shape[0] % batch:
            raise ValueError(f"{targets.shape[0]} teacher rows are not a multiple of B={batch}")
        n_teacher_crops = targets.shape[0] // batch
    if n_teacher_crops < 1 or targets.shape[0] != n_teacher_crops * batch:
        raise ValueError(f"teacher rows {targets.shape[0]} != {n_teacher_crops} crops x B={batch}")
    if count_pairs(n_student_crops, n_teacher_crops, skip_same_view) == 0:
        raise ValueError("no (teacher, student) crop pair counts")
    return int(n_teacher_crops)


def row_losses_reference(student, targets, n_student_crops, n_teacher_crops, student_temp,
                         skip_same_view):
    """``[n_s, B]`` float32 sum over the paired teacher crops of -sum_k t log softmax(s/T)."""
    batch = student.shape[0] // n_student_crops
    t = targets.detach().float().view(n_teacher_crops, batch, -1)
    rows = []
    for v in range(n_student_crops):
        lsm = F.log_softmax(student[v * batch:(v + 1) * batch].float() / student_temp, dim=-1)
        acc = 0
        for i in range(n_teacher_crops):
            if skip_same_view and i == v:
                continue
            acc = acc - torch.sum(t[i] * lsm, dim=-1)
        rows.append(acc)
    return torch.stack(rows)


@torch.library.custom_op("fastswav::teacher_student_ce", mutates_args=())
def _ce_op(student: torch.Tensor, targets: torch.Tensor, n_student_crops: int,
           n_teacher_crops: int, student_temp: float, skip_same_view: bool
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_loss [n_s, B], lse [n_s, B], tsum [n_s, B]), float32; lse and tsum are saved for
    the backward."""
    from fastswav.kernels.teacher import ce_forward

    m, l, dot, tsum = ce_forward(student.contiguous(), targets.contiguous(),
                                 n_student_crops=n_student_crops, n_teacher_crops=n_teacher_crops,
                                 temperature=student_temp, skip_same_view=skip_same_view)
    top = m.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    lse = top + torch.log((l * torch.exp(m - top)).sum(dim=0))
    tsum = tsum.sum(dim=0)
    row_loss = tsum * lse - dot.sum(dim=0)
    return row_loss, lse, tsum


@_ce_op.register_fake
def _(student, targets, n_student_crops, n_teacher_crops, student_temp, skip_same_view):
    shape = (n_student_crops, student.shape[0] // n_student_crops)
    return tuple(student.new_empty(shape, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastswav::teacher_student_ce_backward", mutates_args=())
def _ce_backward_op(grad_rows: torch.Tensor, student: torch.Tensor, targets: torch.Tensor,
                    lse: torch.Tensor, tsum: torch.Tensor, n_student_crops: int,
                    n_teacher_crops: int, student_temp: float, skip_same_view: bool
                    ) -> torch.Tensor:
    from fastswav.kernels.teacher import ce_backward

    return ce_backward(grad_rows.to(torch.float32).contiguous(), student.contiguous(),
                       targets.contiguous(), lse, tsum, n_student_crops=n_student_crops,
                       n_teacher_crops=n_teacher_crops, temperature=student_temp,
                       skip_same_view=skip_same_view)


@_ce_backward_op.register_fake
def _(grad_rows, student, targets, lse, tsum, n_student_crops, n_teacher_crops, student_temp,
      skip_same_view):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _ce_setup_context(ctx, inputs, output):
    student, targets, n_s, n_t, temp, skip = inputs
    _row_loss, lse, tsum = output
    ctx.save_for_backward(student, targets, lse, tsum)
    ctx.args = (n_s, n_t, temp, skip)
    ctx.mark_non_differentiable(lse, tsum)
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, grad_rows, _g_lse, _g_tsum):
    student, targets, lse, tsum = ctx.saved_tensors
    if grad_rows is None or not ctx.needs_input_grad[0]:
        return (None,) * 6
    grad = _ce_backward_op(grad_rows, student, targets, lse, tsum, *ctx.args)
    return grad, None, None, None, None, None


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def _reduce(rows, n_pairs, reduction):
    per_pair_mean = rows.sum() / rows.shape[1]  # each pair: mean over the batch
    if reduction == "mean":
        return per_pair_mean / n_pairs
    if reduction == "sum":
        return per_pair_mean
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def teacher_student_row_losses(student_logits, teacher_targets, *, n_student_crops,
                               n_teacher_crops=None, student_temp=0.1, skip_same_view=True,
                               backend=None):
    """``[n_s, B]`` float32: for each student crop and row, the sum over its paired teacher
    crops of -sum_k t log softmax(s / student_temp). Differentiable w.r.t. the student."""
    n_t = _check_ce_args(student_logits, teacher_targets, n_student_crops, n_teacher_crops,
                         skip_same_view)
    backend = backend or loss_backend(student_logits.device)
    if backend == "fused":
        rows, _, _ = _ce_op(student_logits, teacher_targets.detach(), int(n_student_crops), n_t,
                            float(student_temp), bool(skip_same_view))
        return rows
    return row_losses_reference(student_logits, teacher_targets, n_student_crops, n_t,
                                student_temp, skip_same_view)


def teacher_student_cross_entropy(
    student_logits: torch.Tensor,
    teacher_targets: Optional[torch.Tensor] = None,
    *,
    n_student_crops: int,
    n_teacher_crops: Optional[int] = None,
    student_temp: float = 0.1,
    skip_same_view: bool = True,
    reduction: str = "mean",
    teacher_logits: Optional[torch.Tensor] = None,
    teacher_temp: Optional[float] = None,
    sinkhorn_iterations: int = 3,
    group=None,
) -> torch.Tensor:
    """DINO-style teacher-student cross-entropy (scalar, float32).

    Args:
        student_logits: ``[n_student_crops * B, K]``, crop-major (any float dtype).
        teacher_targets: ``[n_teacher_crops * B, K]`` targets (e.g. from :func:`sinkhorn_knopp`
            or a centered softmax), crop-major. No gradient flows into them.
        teacher_logits, teacher_temp: instead of ``teacher_targets``, the teacher's logits; the
            targets are then ``sinkhorn_knopp(teacher_logits, teacher_temp,
            sinkhorn_iterations, group)``.
        skip_same_view: leave out the pairs where student crop i is teacher crop i (DINO).
        reduction: ``"mean"`` over the counted pairs (DINO) or ``"sum"`` (DINOv2's
            ``DINOLoss.forward``); each pair is a mean over the batch.

    Fused on CUDA (one pass over the student logits forward, one backward, no log-softmax
    stored), the PyTorch formula elsewhere.
    """
    if (teacher_targets is None) == (teacher_logits is None):
        raise ValueError("give exactly one of teacher_targets and teacher_logits")
    if teacher_logits is not None:
        if teacher_temp is None:
            raise ValueError("teacher_logits needs teacher_temp")
        teacher_targets = sinkhorn_knopp(teacher_logits.detach(), teacher_temp,
                                         sinkhorn_iterations, group)
    n_t = _check_ce_args(student_logits, teacher_targets, n_student_crops, n_teacher_crops,
                         skip_same_view)
    rows = teacher_student_row_losses(student_logits, teacher_targets,
                                      n_student_crops=n_student_crops, n_teacher_crops=n_t,
                                      student_temp=student_temp, skip_same_view=skip_same_view)
    return _reduce(rows, count_pairs(n_student_crops, n_t, skip_same_view), reduction)


def teacher_student_cross_entropy_reference(student_logits, teacher_targets, *, n_student_crops,
                                            n_teacher_crops=None, student_temp=0.1,
                                            skip_same_view=True, reduction="mean"):
    """The plain formula (one log_softmax per student crop, a loop over pairs)."""
    n_t = _check_ce_args(student_logits, teacher_targets, n_student_crops, n_teacher_crops,
                         skip_same_view)
    rows = row_losses_reference(student_logits, teacher_targets, n_student_crops, n_t,
                                student_temp, skip_same_view)
    return _reduce(rows, count_pairs(n_student_crops, n_t, skip_same_view), reduction)


__all__: Sequence[str] = (
    "count_pairs", "sinkhorn_knopp", "sinkhorn_knopp_fused", "sinkhorn_knopp_reference",
    "teacher_student_cross_entropy", "teacher_student_cross_entropy_reference",
    "teacher_student_row_losses",
)
