"""Fused SwAV loss: the Triton kernels of ``fastswav.kernels`` behind one custom op.

Same function and gradients as :func:`fastswav.ops.loss.swav_loss_reference`; the
difference is how it is computed:

1. one kernel computes the normalised scores of every crop (norms in the kernel) and, in its
   epilogue, the per-prototype max and first Sinkhorn sums of the assigned crops and the
   per-row log-sum-exp pieces of every crop; a second launch of it does the queue, whose
   scores are only read by Sinkhorn;
2. Sinkhorn runs on the scaling vectors (``sinkhorn_iterations - 1`` passes over the
   assigned crops' scores); between passes the prototype sums are all_reduced across
   processes, like the per-prototype max, the sample count and (for 0 iterations) the mass;
3. one kernel finishes the codes and computes the loss, and the backward is one
   elementwise pass writing dS, followed by two matmuls and the normalisation backward.

``torch.ops.fastswav.swav_loss`` is a ``torch.library.custom_op`` with fake
implementations and a registered backward, so torch.compile keeps the training step in
one graph around it. Usage, with your own embeddings and prototypes on a GPU::

    from fastswav.ops.fused_loss import swav_loss_fused
    loss = swav_loss_fused(z, prototypes.weight, n_crops=8, crops_for_assign=(0, 1))
    loss.backward()

Most code should call :func:`fastswav.swav_loss`, which picks this path on CUDA.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .loss import check_crop_layout
from ..profiling import nvtx_range
from fastswav.kernels._common import DEFAULT_PRECISION, PRECISIONS, layout_error  # torch only
from .sinkhorn import all_reduce_


def is_available() -> bool:
    """Whether the fused loss can run here: Triton importable and a CUDA device present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        from fastswav.kernels import scores  # noqa: F401
    except Exception:  # an ImportError, or a Triton that fails to initialise
        return False
    return True


# --- process groups cannot pass through a custom op's schema: pass a key instead ---------
_GROUPS: "dict[int, object]" = {}
_next_key = itertools.count(1)


def _group_key(group) -> int:
    """0 for the default group (None); a stable positive key for any other group object."""
    if group is None:
        return 0
    for key, known in _GROUPS.items():
        if known is group:
            return key
    key = next(_next_key)
    _GROUPS[key] = group
    return key


def _group(key: int):
    return None if key == 0 else _GROUPS[key]


def _slot_of_crop(n_crops: int, crops_for_assign: Sequence[int]) -> List[int]:
    """Slot ``a`` of crop ``v`` when ``v == crops_for_assign[a]``, else -1."""
    slots = [-1] * n_crops
    for a, crop in enumerate(crops_for_assign):
        slots[crop] = a
    return slots


def _tiles(like: torch.Tensor, *, batch, n_protos, n_crops, n_assign, queue_len, dim=128,
           precision=DEFAULT_PRECISION):
    from fastswav.kernels._common import targets_gpu
    from fastswav.kernels.tiles import loss_tiles

    return loss_tiles(targets_gpu(like), batch=batch, n_protos=n_protos, dim=dim,
                      n_crops=n_crops, n_assign=n_assign, queue_len=queue_len,
                      precision=precision)


def _combine_lse(rowmax: torch.Tensor, rowsum: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp of each row from per-column-block (max, sum exp(x - max)) pieces."""
    top = rowmax.amax(dim=1, keepdim=True)
    return (top + torch.log((rowsum * torch.exp(rowmax - top)).sum(dim=1, keepdim=True))).squeeze(1)


def _forward_impl(embeddings, prototypes, queue, queue_valid, n_crops, crops_for_assign,
                  temperature, epsilon, sinkhorn_iterations, group_key, precision):
    from fastswav.kernels.scores import prototype_scores

    group = _group(group_key)
    device = embeddings.device
    n_rows, dim = embeddings.shape
    batch = n_rows // n_crops
    n_protos = prototypes.shape[0]
    n_slots = len(crops_for_assign)
    has_queue = queue is not None and queue.shape[1] > 0
    q_len = queue.shape[1] if has_queue else 0
    tiles = _tiles(embeddings, batch=batch, n_protos=n_protos, n_crops=n_crops,
                   n_assign=n_slots, queue_len=q_len, dim=dim, precision=precision)

    score_r, score_k = tiles.scores.rows, tiles.scores.cols
    n_qb = -(-q_len // score_r)
    n_bb = -(-batch // score_r)
    colmax = torch.empty((n_slots, n_qb + n_bb, n_protos), device=device, dtype=torch.float32)
    colsum = torch.empty_like(colmax)
    common = dict(epsilon=epsilon, precision=precision, block_r=score_r, block_k=score_k,
                  block_d=tiles.score_d, num_warps=tiles.scores.warps)
    scores, inv_x, inv_w, rowmax, rowsum = prototype_scores(
        embeddings.view(n_crops, batch, dim), prototypes,
        col_slots=_slot_of_crop(n_crops, crops_for_assign),
        colmax=colmax, colsum=colsum, col_block_offset=n_qb, row_stats=True,
        temperature=temperature, **common)
    scores = scores.view(n_rows, n_protos)
    lse = _combine_lse(rowmax, rowsum)

    if has_queue:
        valid = (queue_valid.to(device=device, dtype=torch.float32).reshape(())
                 if queue_valid is not None else torch.ones((), device=device))
        queue_scores, _, _, _, _ = prototype_scores(
            queue, prototypes, col_slots=list(range(n_slots)), col_weight=valid,
            colmax=colmax, colsum=colsum, col_block_offset=0, **common)
    else:
        queue_scores = valid = None
    # The op body runs eagerly even in a compiled step, so this range shows there too.
    with nvtx_range("sinkhorn+ce"):
        loss, codes, code_sum = sinkhorn_and_loss(
            scores, lse, colmax, colsum, queue_scores, valid, n_crops=n_crops,
            crops_for_assign=crops_for_assign, temperature=temperature, epsilon=epsilon,
            sinkhorn_iterations=sinkhorn_iterations, group=group, tiles=tiles)
    return loss, scores, codes, code_sum, lse, inv_x, inv_w


def sinkhorn_and_loss(scores, lse, colmax, colsum, queue_scores, valid, *, n_crops,
                      crops_for_assign, temperature, epsilon, sinkhorn_iterations, group=None,
                      tiles=None):
    """Stages 2 and 3 from stored scores and the score kernel's statistics.

    Args:
        scores: ``[n_crops * B, K]`` float32; lse: ``[n_crops * B]`` of scores / temperature.
        colmax, colsum: ``[A, blocks, K]`` per-block max and sum of exp((s - max) / eps)
            over the participating rows of each assigned crop and its queue.
        queue_scores: ``[A, L, K]`` float32 or None; valid: float 0-dim 0/1 or None.
        tiles: :class:`fastswav.kernels.tiles.LossTiles` (default: the rule's for this shape).

    Returns:
        ``(loss, codes [A, B, K], code_sum [A, B])``.
    """
    from fastswav.kernels.sinkhorn import sinkhorn_col_sums, sinkhorn_pass, sinkhorn_row_sums
    from fastswav.kernels.swapped_ce import swapped_ce_forward

    device = scores.device
    n_protos = scores.shape[1]
    batch = scores.shape[0] // n_crops
    n_slots = len(crops_for_assign)
    has_queue = queue_scores is not None and queue_scores.shape[1] > 0
    q_len = queue_scores.shape[1] if has_queue else 0
    if not has_queue:
        queue_scores = None
    if tiles is None:
        tiles = _tiles(scores, batch=batch, n_protos=n_protos, n_crops=n_crops,
                       n_assign=n_slots, queue_len=q_len)
    assign = list(crops_for_assign)
    if has_queue:
        if valid is None:
            valid = torch.ones((), device=device)
        n_total = batch + valid * q_len
    else:
        valid = torch.ones((), device=device)
        n_total = torch.full((), float(batch), device=device)
    n_total = all_reduce_(n_total.clone(), group=group)

    # Per-prototype max over all processes; rescale this process's sums to it.
    local_max = colmax.amax(dim=1)
    global_max = all_reduce_(local_max.clone(), op=dist.ReduceOp.MAX if dist.is_available() else None,
                             group=group)
    global_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    rescale = torch.where(torch.isfinite(colmax), torch.exp((colmax - global_max[:, None]) / epsilon),
                          torch.zeros_like(colmax))
    proto_sums = all_reduce_((colsum * rescale).sum(dim=1), group=group)  # [A, K]

    tiny = torch.finfo(torch.float32).tiny
    rows_tile, cols_tile = tiles.row_sums, tiles.col_sums
    segment = dict(batch=batch, epsilon=epsilon)
    if sinkhorn_iterations == 0:
        # Q = exp((S - M) / eps) / total * n_total with one shift M for all prototypes (as the
        # reference: no row normalisation to cancel a per-prototype shift); fold into u.
        top = global_max.amax(dim=1, keepdim=True)
        to_top = torch.exp((global_max - top) / epsilon)
        total = (proto_sums * to_top).sum(dim=1, keepdim=True)
        u = n_total * to_top / total
        row_scale = torch.ones((n_slots, batch), device=device, dtype=torch.float32)
    else:
        u = 1.0 / (n_protos * proto_sums.clamp_min(tiny))
        for _ in range(sinkhorn_iterations - 1):
            if tiles.one_launch_rounds:
                pass_tile = tiles.pass_tile
                r = sinkhorn_pass(scores, queue_scores, assign, valid, global_max, u, n_total,
                                  block_r=pass_tile.rows, block_k=pass_tile.cols,
                                  num_warps=pass_tile.warps, **segment).sum(dim=1)
                r = all_reduce_(r, group=group)  # the multi-GPU hook
                u = 1.0 / (n_protos * r.clamp_min(tiny))
                continue
            c = sinkhorn_row_sums(scores, queue_scores, assign, valid, global_max, u,
                                  row_offset=0, block_r=rows_tile.rows, block_k=rows_tile.cols,
                                  num_warps=rows_tile.warps, **segment).sum(dim=1)
            v = 1.0 / (n_total * c.clamp_min(tiny))
            if has_queue:
                v[:, :q_len] *= valid  # queue rows that take no part get v = 0
            r = sinkhorn_col_sums(scores, queue_scores, assign, valid, global_max, v,
                                  rows_per_program=tiles.col_rows_per_program,
                                  block_r=cols_tile.rows, block_k=cols_tile.cols,
                                  num_warps=cols_tile.warps, **segment).sum(dim=1)
            r = all_reduce_(r, group=group)  # the multi-GPU hook
            u = 1.0 / (n_protos * r.clamp_min(tiny))
        # The last sample normalisation, of the batch rows only: each code row sums to 1.
        last = tiles.last_row_sums
        c = sinkhorn_row_sums(scores, queue_scores, assign, valid, global_max, u,
                              row_offset=q_len, block_r=last.rows, block_k=last.cols,
                              num_warps=last.warps, **segment).sum(dim=1)
        row_scale = 1.0 / c.clamp_min(tiny)

    ce = tiles.ce_forward
    codes, dot_part, sum_part = swapped_ce_forward(
        scores, assign, global_max.contiguous(), u.contiguous(), row_scale.contiguous(),
        n_crops=n_crops, epsilon=epsilon, block_r=ce.rows, block_k=ce.cols, num_warps=ce.warps)
    code_dot = dot_part.sum(dim=1)
    code_sum = sum_part.sum(dim=1)
    lse_by_crop = lse.view(n_crops, batch)
    # basic indexing by Python ints: views, no index tensor from the host
    lse_others = lse_by_crop.sum(dim=0) - torch.stack([lse_by_crop[c] for c in crops_for_assign])
    per_row = code_dot / temperature - code_sum * lse_others
    loss = -per_row.sum() / (n_slots * batch * (n_crops - 1))
    return loss, codes, code_sum


@torch.library.custom_op("fastswav::swav_loss", mutates_args=())
def _swav_loss_op(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    queue: Optional[torch.Tensor],
    queue_valid: Optional[torch.Tensor],
    n_crops: int,
    crops_for_assign: List[int],
    temperature: float,
    epsilon: float,
    sinkhorn_iterations: int,
    group_key: int,
    precision: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(loss, scores, codes, code_sum, lse, inv_norm_embeddings, inv_norm_prototypes);
    all but the loss are saved for the backward."""
    return _forward_impl(embeddings.contiguous(), prototypes.contiguous(),
                         None if queue is None else queue.contiguous(), queue_valid, n_crops,
                         list(crops_for_assign), temperature, epsilon, sinkhorn_iterations,
                         group_key, precision)


@_swav_loss_op.register_fake
def _(embeddings, prototypes, queue, queue_valid, n_crops, crops_for_assign, temperature,
      epsilon, sinkhorn_iterations, group_key, precision):
    n_rows = embeddings.shape[0]
    batch = n_rows // n_crops
    n_protos = prototypes.shape[0]
    n_slots = len(crops_for_assign)
    f32 = dict(device=embeddings.device, dtype=torch.float32)
    return (embeddings.new_empty((), dtype=torch.float32),
            embeddings.new_empty((n_rows, n_protos), **f32),
            embeddings.new_empty((n_slots, batch, n_protos), **f32),
            embeddings.new_empty((n_slots, batch), **f32),
            embeddings.new_empty((n_rows,), **f32),
            embeddings.new_empty((n_rows,), **f32),
            embeddings.new_empty((n_protos,), **f32))


# Backward matmul operands per precision: "tf32" rounds the forward's operands to an 11-bit
# significand, so its backward multiplies fp16 operands (the same significand; dS is kept
# O(1) by leaving out the loss's 1/(T A B (V-1)), and z, c are unit rows, so fp16's range is
# never an issue); "bf16" multiplies bf16; "ieee" and "tf32x3" keep float32 (torch's float32
# matmul setting applies to those).
_BACKWARD_DTYPE = {"tf32": torch.float16, "bf16": torch.bfloat16}


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with 16-bit operands, float32 accumulation and output (emulated off CUDA)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _backward_impl(grad_loss, embeddings, prototypes, scores, codes, code_sum, lse, inv_x,
                   inv_w, n_crops, crops_for_assign, temperature, precision):
    """Gradients of the loss w.r.t. the raw embeddings and (straight-through) prototypes."""
    from fastswav.kernels.swapped_ce import loss_scale, swapped_ce_backward

    batch = scores.shape[0] // n_crops
    n_slots = len(crops_for_assign)
    tile = _tiles(scores, batch=batch, n_protos=scores.shape[1], n_crops=n_crops,
                  n_assign=n_slots, queue_len=0).ce_backward
    grad_loss = grad_loss.to(torch.float32).reshape(()).contiguous()
    low = _BACKWARD_DTYPE.get(precision)
    grad_scores = swapped_ce_backward(
        grad_loss, scores, lse, _slot_of_crop(n_crops, crops_for_assign),
        codes, code_sum, n_crops=n_crops, temperature=temperature, block_r=tile.rows,
        block_k=tile.cols, num_warps=tile.warps, out_dtype=low or torch.float32,
        unit_scale=low is not None)
    x = embeddings.float()
    z = x * inv_x[:, None]
    c = prototypes.float() * inv_w[:, None]
    if low is not None:
        coef = grad_loss * loss_scale(temperature, n_slots, batch, n_crops)
        grad_z = _mm_fp32_out(grad_scores, c.to(low)) * coef
        grad_c = _mm_fp32_out(grad_scores.t(), z.to(low)) * coef
    else:
        grad_z = grad_scores @ c
        grad_c = grad_scores.t() @ z
    # Backward of x / max(||x||, 1e-12): project out the radial part where the norm was used.
    norm_used = (inv_x < 1e12)[:, None]
    radial = z * (z * grad_z).sum(dim=1, keepdim=True)
    grad_x = (grad_z - torch.where(norm_used, radial, torch.zeros_like(radial))) * inv_x[:, None]
    # Prototypes: straight-through, the gradient w.r.t. the normalised rows.
    return grad_x.to(embeddings.dtype), grad_c.to(prototypes.dtype)


@torch.library.custom_op("fastswav::swav_loss_backward", mutates_args=())
def _swav_loss_backward_op(
    grad_loss: torch.Tensor,
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    scores: torch.Tensor,
    codes: torch.Tensor,
    code_sum: torch.Tensor,
    lse: torch.Tensor,
    inv_x: torch.Tensor,
    inv_w: torch.Tensor,
    n_crops: int,
    crops_for_assign: List[int],
    temperature: float,
    precision: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the loss w.r.t. the raw embeddings and (straight-through) prototypes."""
    return _backward_impl(grad_loss, embeddings, prototypes, scores, codes, code_sum, lse, inv_x,
                          inv_w, n_crops, list(crops_for_assign), temperature, precision)


@_swav_loss_backward_op.register_fake
def _(grad_loss, embeddings, prototypes, scores, codes, code_sum, lse, inv_x, inv_w, n_crops,
      crops_for_assign, temperature, precision):
    return torch.empty_like(embeddings), torch.empty_like(prototypes)


def _setup_context(ctx, inputs, output):
    (embeddings, prototypes, _queue, _valid, n_crops, crops_for_assign, temperature, _eps,
     _iters, _key, precision) = inputs
    _loss, scores, codes, code_sum, lse, inv_x, inv_w = output
    ctx.save_for_backward(embeddings, prototypes, scores, codes, code_sum, lse, inv_x, inv_w)
    ctx.n_crops = n_crops
    ctx.crops_for_assign = list(crops_for_assign)
    ctx.temperature = temperature
    ctx.precision = precision
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused_grads):
    embeddings, prototypes, scores, codes, code_sum, lse, inv_x, inv_w = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 11
    grad_x, grad_c = _swav_loss_backward_op(
        grad_loss, embeddings, prototypes, scores, codes, code_sum, lse, inv_x, inv_w,
        ctx.n_crops, ctx.crops_for_assign, ctx.temperature, ctx.precision,
    )
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_c if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None, None, None, None)


_swav_loss_op.register_autograd(_backward, setup_context=_setup_context)


def swav_loss_fused(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    n_crops: int,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queue: Optional[torch.Tensor] = None,
    queue_valid: Optional[torch.Tensor] = None,
    group=None,
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor:
    """The SwAV loss through the fused kernels; arguments as in ``swav_loss_reference``.

    ``precision`` sets the tensor-core precision of the score matmul (float32 or mixed
    inputs) and of the backward matmuls: ``"tf32"`` (default: operands rounded to an 11-bit
    significand, as accurate as the official fp16 run or better; see
    benchmarks/NOTES_loss.md), ``"tf32x3"`` (near float32), ``"bf16"``, or ``"ieee"``
    (float32 FMA throughout: the exact mode for checks). Two bf16 (or fp16) inputs are
    multiplied as they are, exactly, in every mode.

    The queue only ever enters Sinkhorn (no gradient flows into it), the codes carry no
    gradient, and the prototype gradient is straight-through, exactly as in the reference.
    """
    if embeddings.dim() != 2 or prototypes.dim() != 2:
        raise ValueError("embeddings must be [n_crops*B, D] and prototypes [K, D]")
    if embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"embedding dim {embeddings.shape[1]} != prototype dim {prototypes.shape[1]}"
        )
    check_crop_layout(embeddings.shape[0], n_crops, crops_for_assign)
    too_large = layout_error(n_crops, crops_for_assign)
    if too_large:
        raise ValueError(too_large + " (swav_loss takes the reference for such layouts)")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if sinkhorn_iterations < 0:
        raise ValueError(f"sinkhorn_iterations must be >= 0, got {sinkhorn_iterations}")
    if queue is not None:
        if (queue.dim() != 3 or queue.shape[0] != len(crops_for_assign)
                or queue.shape[2] != embeddings.shape[1]):
            raise ValueError(
                f"queue must be [{len(crops_for_assign)}, L, {embeddings.shape[1]}], "
                f"got {tuple(queue.shape)}"
            )
        queue = queue.detach()
    if queue_valid is not None:
        queue_valid = queue_valid.detach()
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    out = _swav_loss_op(embeddings, prototypes, queue, queue_valid, int(n_crops),
                        [int(c) for c in crops_for_assign], float(temperature), float(epsilon),
                        int(sinkhorn_iterations), _group_key(group), precision)
    return out[0]
