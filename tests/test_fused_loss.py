"""Fused (Triton) SwAV loss against the PyTorch reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py before any kernel
module is imported) at small, deliberately ragged shapes: B, K, D and the queue length are
not multiples of the tile sizes (16 rows x 32 prototypes under the interpreter), so every
kernel sees several blocks and masked edges. Tests marked ``cuda`` repeat the checks at
bigger shapes on a GPU (bf16 operands then go to the tensor cores).

Tolerances. With ``precision="ieee"`` (the exact mode) the fused path computes in float32
whatever the input dtype, as the reference:
- scores, inverse norms, log-sum-exp: atol 2e-6 (CPU), 1e-5 (CUDA);
- Sinkhorn codes: atol 1e-6 + rtol 1e-4 (exp of score/eps amplifies score rounding by 1/eps);
- loss: rtol 1e-5 (CPU), 1e-4 (CUDA);
- gradients: max |fused - reference| <= 2e-5 * max |reference| (CPU), 2e-4 (CUDA); for
  bf16 inputs the gradients are bf16, so <= 1e-2 * max |reference| (one bf16 rounding);
- distributed (2 gloo processes) vs one process on the concatenated batch: rtol 1e-5.
With the default ``precision="tf32"`` (operands rounded to an 11-bit significand, 16-bit
backward operands): scores equal the float32 product of the rounded operands (atol 2e-6),
and against the reference the loss within rtol 1e-3 and the gradients within 5e-3 of their
largest entry (about 5x the errors of benchmarks/accuracy_loss.py; the official fp16 run's
are larger).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastswav.ops import fused_loss
from fastswav.ops.fused_loss import sinkhorn_and_loss, swav_loss_fused
from fastswav.ops.loss import assignment_codes, swapped_prediction_loss, swav_loss_reference

from conftest import loss_and_grads

triton = pytest.importorskip("triton")

CPU_GRAD_RTOL = 2e-5
CUDA_GRAD_RTOL = 2e-4
BF16_GRAD_RTOL = 1e-2
TF32_LOSS_RTOL = 1e-3
TF32_GRAD_RTOL = 5e-3


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


# ------------------------------------------------------------------------ kernel level

@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_kernel_scores_norms_and_statistics(dtype, precision):
    from fastswav.kernels._common import round_to_tf32_reference
    from fastswav.kernels.scores import prototype_scores

    torch.manual_seed(1)
    groups, rows, dim, n_protos = 3, 19, 24, 37  # ragged against 16 x 32 tiles, D < block
    eps, temp, block_r, block_k = 0.05, 0.1, 16, 32
    x = (torch.randn(groups, rows, dim) * 3).to(dtype)
    w = (torch.randn(n_protos, dim) * 0.5).to(dtype)
    n_rb = triton.cdiv(rows, block_r)
    colmax = torch.full((2, 1 + n_rb, n_protos), float("nan"))
    colsum = torch.full_like(colmax, float("nan"))
    slots = [1, -1, 0]  # group 2 -> slot 0, group 0 -> slot 1
    scores, inv_x, inv_w, rowmax, rowsum = prototype_scores(
        x, w, col_slots=slots, colmax=colmax, colsum=colsum, col_block_offset=1,
        epsilon=eps, row_stats=True, temperature=temp, precision=precision,
        block_r=block_r, block_k=block_k)

    xf, wf = x.float(), w.float()
    if precision == "tf32" and dtype == torch.float32:
        # the product of the operands rounded to tf32, scaled by the exact inverse norms
        want = (round_to_tf32_reference(xf) @ round_to_tf32_reference(wf).t()
                / xf.norm(dim=2, keepdim=True) / wf.norm(dim=1))
        assert (want - F.normalize(xf, dim=2) @ F.normalize(wf, dim=1).t()).abs().max() > 1e-5
    else:  # bf16 x bf16 is exact in every precision
        want = F.normalize(xf, dim=2) @ F.normalize(wf, dim=1).t()
    assert torch.allclose(scores, want, atol=2e-6, rtol=0)
    assert torch.allclose(inv_x, 1 / xf.norm(dim=2).reshape(-1), rtol=1e-6)
    assert torch.allclose(inv_w, 1 / wf.norm(dim=1), rtol=1e-6)
    lse = fused_loss._combine_lse(rowmax, rowsum)
    assert torch.allclose(lse, torch.logsumexp(want.reshape(-1, n_protos) / temp, dim=1), atol=2e-6)
    for slot, group in ((0, 2), (1, 0)):
        part_max, part_sum = colmax[slot, 1:], colsum[slot, 1:]
        top = part_max.amax(dim=0)
        assert torch.allclose(top, want[group].amax(dim=0), atol=2e-6)
        sums = (part_sum * torch.exp((part_max - top) / eps)).sum(dim=0)
        assert torch.allclose(sums, torch.exp((want[group] - top) / eps).sum(dim=0), rtol=1e-5)

    # a non-participating segment (unfilled queue): no max, no mass
    colmax.fill_(float("nan"))
    colsum.fill_(float("nan"))
    prototype_scores(x[:2], w, store_scores=False, col_slots=[0, 1],
                     col_weight=torch.tensor(0.0), colmax=colmax, colsum=colsum,
                     col_block_offset=0, block_r=block_r, block_k=block_k)
    assert torch.isneginf(colmax[:, :n_rb]).all() and (colsum[:, :n_rb] == 0).all()


@pytest.mark.parametrize("valid", [1.0, 0.0])
def test_sinkhorn_kernels_match_scaling_formula(valid):
    """The three Sinkhorn kernels over a (queue, batch) segment; an unfilled queue whose scores lie
    far above the per-prototype max (taken over the batch rows only) adds nothing, no NaN."""
    from fastswav.kernels.sinkhorn import sinkhorn_col_sums, sinkhorn_pass, sinkhorn_row_sums

    torch.manual_seed(2)
    n_crops, batch, q_len, n_protos, eps = 3, 21, 18, 45, 0.01
    assign = (2, 0)
    scores = torch.rand(n_crops * batch, n_protos) * 2 - 1
    queue_scores = torch.rand(2, q_len, n_protos) * 2 - 1 + (1.0 - valid) * 5.0
    segments = [torch.cat([queue_scores[a], scores[c * batch:(c + 1) * batch]])
                for a, c in enumerate(assign)]
    weight = torch.cat([torch.full((q_len,), valid), torch.ones(batch)]).double()
    colmax = torch.stack([seg[weight > 0].amax(dim=0) for seg in segments])
    u = torch.rand(2, n_protos) / n_protos
    v = torch.rand(2, q_len + batch) * weight.float()
    args = (scores, queue_scores, assign, torch.tensor(valid), colmax)
    for offset in (0, q_len):
        c_part = sinkhorn_row_sums(*args, u, batch=batch, row_offset=offset, epsilon=eps,
                                   block_r=16, block_k=32)
        assert c_part.shape == (2, 2, q_len + batch - offset)
        for a, seg in enumerate(segments):
            p = torch.exp((seg.double() - colmax[a].double()) / eps) * weight[:, None]
            assert torch.allclose(c_part[a].sum(dim=0).double(), (p @ u[a].double())[offset:],
                                  rtol=1e-5, atol=0)
    for rows_per_program in (16, 32):
        r_part = sinkhorn_col_sums(*args, v, batch=batch, epsilon=eps,
                                   rows_per_program=rows_per_program, block_r=16, block_k=32)
        assert torch.isfinite(r_part).all()
        for a, seg in enumerate(segments):
            p = torch.exp((seg.double() - colmax[a].double()) / eps) * weight[:, None]
            p = torch.where(weight[:, None] > 0, p, torch.zeros_like(p))
            want = (p * v[a].double()[:, None]).sum(dim=0)
            assert torch.allclose(r_part[a].sum(dim=0).double(), want, rtol=1e-5, atol=0)
    # a whole round in one launch: v from u, then the prototype sums
    n_total = torch.tensor(float(batch + valid * q_len))
    r_part = sinkhorn_pass(*args, u, n_total, batch=batch, epsilon=eps, block_r=16, block_k=32)
    assert r_part.shape == (2, 3, n_protos) and torch.isfinite(r_part).all()
    for a, seg in enumerate(segments):
        p = torch.exp((seg.double() - colmax[a].double()) / eps)
        p = torch.where(weight[:, None] > 0, p, torch.zeros_like(p))
        v_round = weight / (n_total.double() * (p @ u[a].double()).clamp_min(torch.finfo(torch.float32).tiny))
        want = (p * v_round[:, None]).sum(dim=0)
        assert torch.allclose(r_part[a].sum(dim=0).double(), want, rtol=1e-5, atol=0)


def _stats_from_scores(seg_scores, eps):
    """Single-block (max, sum exp) statistics as the score kernel would write them."""
    top = seg_scores.amax(dim=-2, keepdim=True)
    return top, torch.exp((seg_scores - top) / eps).sum(dim=-2, keepdim=True)


@pytest.mark.parametrize("scale", [1.0, 20.0])  # 20 = 1/eps: exponents far beyond fp32 range
@pytest.mark.parametrize("with_queue", [False, True])
def test_sinkhorn_and_cross_entropy_kernels_on_raw_scores(scale, with_queue):
    torch.manual_seed(3)
    n_crops, batch, n_protos, q_len, eps, temp = 4, 19, 37, 23, 0.05, 0.1
    assign = (2, 0)
    scores = (torch.rand(n_crops * batch, n_protos) * 2 - 1) * scale
    queue_scores = (torch.rand(2, q_len, n_protos) * 2 - 1) * scale if with_queue else None
    segs = [scores[c * batch:(c + 1) * batch] for c in assign]
    if with_queue:
        segs = [torch.cat([queue_scores[i], s]) for i, s in enumerate(segs)]
    stats = [_stats_from_scores(s, eps) for s in segs]
    colmax = torch.stack([m for m, _ in stats])
    colsum = torch.stack([s for _, s in stats])
    lse = torch.logsumexp(scores / temp, dim=1)
    for iters in (0, 3):
        loss, codes, code_sum = sinkhorn_and_loss(
            scores, lse, colmax, colsum, queue_scores,
            torch.tensor(1.0) if with_queue else None, n_crops=n_crops, crops_for_assign=assign,
            temperature=temp, epsilon=eps, sinkhorn_iterations=iters)
        want_codes = assignment_codes(scores, n_crops, assign, eps, iters, queue_scores=queue_scores)
        want_loss = swapped_prediction_loss(scores, want_codes, n_crops, assign, temp)
        assert torch.isfinite(codes).all() and torch.isfinite(loss)
        assert torch.allclose(codes, want_codes, atol=1e-6, rtol=1e-4)
        assert torch.allclose(code_sum, want_codes.sum(dim=2), atol=1e-5, rtol=1e-5)
        assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cross_entropy_backward_kernel(out_dtype):
    from fastswav.kernels.swapped_ce import loss_scale, swapped_ce_backward

    torch.manual_seed(4)
    n_crops, batch, n_protos, temp = 5, 17, 41, 0.1
    assign = (3, 1)
    scores = (torch.rand(n_crops * batch, n_protos) * 2 - 1).requires_grad_()
    codes = torch.softmax(torch.randn(2, batch, n_protos), dim=2) * 0.9  # rows need not sum to 1
    grad_out = torch.tensor(-1.7)
    loss = swapped_prediction_loss(scores, codes, n_crops, assign, temp)
    (want,) = torch.autograd.grad(loss, scores, grad_out)
    lse = torch.logsumexp(scores.detach() / temp, dim=1)
    slot_of_crop = [-1, 1, -1, 0, -1]
    unit = out_dtype != torch.float32
    got = swapped_ce_backward(grad_out, scores.detach(), lse, slot_of_crop, codes,
                              codes.sum(dim=2), n_crops=n_crops, temperature=temp, block_r=16,
                              block_k=32, out_dtype=out_dtype, unit_scale=unit)
    assert got.dtype == out_dtype
    if unit:  # O(1) values, the caller applies the factor
        got = got.float() * grad_out * loss_scale(temp, 2, batch, n_crops)
    assert _max_rel(got, want) < (1e-5 if not unit else 1e-2 if out_dtype == torch.bfloat16 else 1e-3)


# ------------------------------------------------------------------------ whole loss

def _inputs(n_crops, batch, n_protos, dim, q_len, dtype, device, seed, n_assign=2):
    g = torch.Generator().manual_seed(seed)
    emb = (torch.randn(n_crops * batch, dim, generator=g) * 2).to(device=device, dtype=dtype)
    protos = torch.randn(n_protos, dim, generator=g).to(device=device, dtype=dtype)
    queue = None
    if q_len:
        queue = torch.randn(n_assign, q_len, dim, generator=g).to(device=device, dtype=dtype)
    return emb, protos, queue


def _compare(emb, protos, grad_out, loss_rtol, grad_rtol, **kwargs):
    got = loss_and_grads(swav_loss_fused, emb, protos, grad_out, **kwargs)
    kwargs.pop("precision", None)  # the reference is exact
    want = loss_and_grads(swav_loss_reference, emb, protos, grad_out, **kwargs)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    assert got[1].dtype == emb.dtype and got[2].dtype == protos.dtype
    assert torch.allclose(got[0], want[0].float(), rtol=loss_rtol, atol=0), (got[0], want[0])
    assert _max_rel(got[1], want[1]) <= grad_rtol, "embedding gradient"
    assert _max_rel(got[2], want[2]) <= grad_rtol, "prototype gradient"


QUEUE_CASES = {"no_queue": (0, None), "queue": (29, 1.0), "unfilled_queue": (29, 0.0)}


def _tolerances(precision, dtype, grad_rtol_fp32, loss_rtol_fp32):
    """(loss rtol, gradient rtol) of the fused path against the reference."""
    if precision == "tf32":
        return TF32_LOSS_RTOL, max(TF32_GRAD_RTOL, BF16_GRAD_RTOL if dtype != torch.float32 else 0)
    return loss_rtol_fp32, grad_rtol_fp32 if dtype == torch.float32 else BF16_GRAD_RTOL


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("queue_case", list(QUEUE_CASES))
def test_fused_loss_matches_reference(dtype, queue_case, precision):
    q_len, valid = QUEUE_CASES[queue_case]
    n_crops, batch, n_protos, dim = 4, 19, 37, 24
    emb, protos, queue = _inputs(n_crops, batch, n_protos, dim, q_len, dtype, "cpu", seed=5)
    kwargs = dict(n_crops=n_crops, crops_for_assign=(0, 1), queue=queue,
                  queue_valid=None if valid is None else torch.tensor(valid), precision=precision)
    loss_rtol, grad_rtol = _tolerances(precision, dtype, CPU_GRAD_RTOL, 1e-5)
    _compare(emb, protos, torch.tensor(2.5), loss_rtol, grad_rtol, **kwargs)


@pytest.mark.parametrize("precision", ["tf32x3", "bf16"])
def test_fused_loss_other_precisions(precision):
    """tf32x3 is near float32; bf16 operands are within one bf16 rounding."""
    n_crops, batch, n_protos, dim = 4, 19, 37, 24
    emb, protos, queue = _inputs(n_crops, batch, n_protos, dim, 29, torch.float32, "cpu", seed=5)
    loss_rtol, grad_rtol = (1e-5, CPU_GRAD_RTOL) if precision == "tf32x3" else (1e-2, 3e-2)
    _compare(emb, protos, torch.tensor(1.0), loss_rtol, grad_rtol, n_crops=n_crops, queue=queue,
             queue_valid=torch.tensor(1.0), precision=precision)
    with pytest.raises(ValueError, match="precision"):
        swav_loss_fused(emb, protos, n_crops=n_crops, precision="fp64")


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_unfilled_queue_far_above_the_batch_gives_finite_codes(precision):
    """A NaN seen once in both Sinkhorns: rows of a queue that is not valid yet are left out of the
    per-prototype max; their scores lie far above it (queue = the prototypes the batch points
    away from, epsilon 0.01) and exp of them overflowed before the 0 weight was applied.
    The queue is partly filled (zero rows after the first 10)."""
    torch.manual_seed(0)
    n_protos, dim, batch, n_crops = 20, 16, 8, 8
    protos = F.normalize(torch.randn(n_protos, dim), dim=1)
    emb = F.normalize(-(protos[0] + protos[1]) + 0.3 * torch.randn(n_crops * batch, dim), dim=1)
    queue = torch.stack([protos[0].expand(16, dim), protos[1].expand(16, dim)]).clone()
    queue[:, 10:] = 0
    kwargs = dict(n_crops=n_crops, epsilon=0.01, queue=queue, queue_valid=torch.tensor(0.0))
    without_queue = swav_loss_reference(emb, protos, n_crops=n_crops, epsilon=0.01)
    reference = swav_loss_reference(emb, protos, **kwargs)
    fused = swav_loss_fused(emb, protos, precision=precision, **kwargs)
    assert torch.isfinite(reference) and torch.isfinite(fused)
    # an invalid queue takes no part at all
    assert torch.allclose(reference, without_queue, rtol=1e-6)
    assert torch.allclose(fused, reference, rtol=1e-5 if precision == "ieee" else TF32_LOSS_RTOL)


@pytest.mark.parametrize("iters,assign,temp,eps", [
    (0, (0, 1), 0.1, 0.05),
    (1, (2,), 0.2, 0.05),
    (5, (2, 0), 0.1, 0.05),
    (3, (0, 1), 0.1, 0.01),  # scores/eps up to 100: exp overflows without the per-prototype shift
])
def test_fused_loss_options(iters, assign, temp, eps):
    n_crops, batch, n_protos, dim = 3, 13, 50, 20
    emb, protos, _ = _inputs(n_crops, batch, n_protos, dim, 0, torch.float32, "cpu", seed=6)
    _compare(emb, protos, torch.tensor(-0.3), 1e-5, CPU_GRAD_RTOL, n_crops=n_crops,
             crops_for_assign=assign, temperature=temp, epsilon=eps, sinkhorn_iterations=iters,
             precision="ieee")


def test_fused_loss_rejects_what_the_reference_rejects():
    emb, protos, _ = _inputs(3, 4, 10, 8, 0, torch.float32, "cpu", seed=7)
    with pytest.raises(ValueError):
        swav_loss_fused(emb, protos, n_crops=5)
    with pytest.raises(ValueError):
        swav_loss_fused(emb, protos, n_crops=3, crops_for_assign=(0, 3))
    with pytest.raises(ValueError):
        swav_loss_fused(emb, protos, n_crops=3, queue=torch.zeros(1, 4, 8))


def test_is_available_needs_cuda():
    assert fused_loss.is_available() == torch.cuda.is_available()


def test_custom_op_fake_and_compile_one_graph():
    """The op's fake implementations agree with the real one, and torch.compile traces the
    loss, forward and backward, as one graph (aot_eager: no C++ compile, stays fast)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    n_crops, batch, n_protos, dim = 3, 5, 20, 16
    emb, protos, queue = _inputs(n_crops, batch, n_protos, dim, 6, torch.float32, "cpu", seed=8)
    args = (emb.requires_grad_(), protos.requires_grad_(), queue, torch.tensor(1.0), n_crops,
            [0, 1], 0.1, 0.05, 3, 0, "tf32")
    torch.library.opcheck(torch.ops.fastswav.swav_loss.default, args,
                          test_utils=("test_schema", "test_faketensor"))

    def step(e, c, q):
        return swav_loss_fused(e, c, n_crops=n_crops, queue=q, queue_valid=torch.tensor(1.0)) * 3

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    got = loss_and_grads(lambda e, c: compiled(e, c, queue), emb, protos, torch.tensor(1.0))
    want = loss_and_grads(lambda e, c: step(e, c, queue), emb, protos, torch.tensor(1.0))
    assert counter.frame_count == 1
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ distributed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, emb, protos, queue, n_crops, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = emb.shape[0] // n_crops // world
        local_emb = emb.view(n_crops, world, batch, -1)[:, rank].reshape(n_crops * batch, -1)
        local_queue = queue.view(queue.shape[0], world, -1, queue.shape[-1])[:, rank]
        e = local_emb.clone().requires_grad_()
        c = protos.clone().requires_grad_()
        loss = swav_loss_fused(e, c, n_crops=n_crops, queue=local_queue,
                               queue_valid=torch.tensor(1.0), precision="ieee")
        loss.backward()
        result[rank] = (loss.detach(), e.grad, c.grad)
    finally:
        dist.destroy_process_group()


def test_distributed_fused_loss_equals_single_process():
    """Two gloo processes, each with half of every crop and half of each queue, give the
    loss and gradients of one process on the concatenated batch: the per-prototype max,
    the counts and the Sinkhorn prototype sums are all_reduced between kernel launches."""
    world, n_crops, batch, n_protos, dim, q_len = 2, 3, 9, 37, 16, 13
    emb, protos, queue = _inputs(n_crops, world * batch, n_protos, dim, world * q_len,
                                 torch.float32, "cpu", seed=9)
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_dist_worker, args=(world, _free_port(), emb, protos, queue, n_crops, result),
                 nprocs=world)
        result = dict(result)
    single = loss_and_grads(swav_loss_fused, emb, protos, torch.tensor(1.0), n_crops=n_crops,
                            queue=queue, queue_valid=torch.tensor(1.0), precision="ieee")
    reference = swav_loss_reference(emb, protos, n_crops=n_crops, queue=queue,
                                    queue_valid=torch.tensor(1.0))
    mean_loss = (result[0][0] + result[1][0]) / world
    assert torch.allclose(mean_loss, single[0], rtol=1e-5)
    assert torch.allclose(mean_loss, reference, rtol=1e-5)
    # Each rank's loss is a mean over its half: d(mean of ranks)/d(rank's rows) = grad / world.
    grad_emb = torch.stack([result[r][1].view(n_crops, batch, dim) for r in range(world)], dim=1)
    assert _max_rel(grad_emb.reshape(-1, dim) / world, single[1]) < 1e-5
    assert _max_rel((result[0][2] + result[1][2]) / world, single[2]) < 1e-5


# ------------------------------------------------------------------------ CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("queue_case", list(QUEUE_CASES))
@pytest.mark.parametrize("batch,n_protos", [(64, 3000), (37, 1001)])
def test_fused_loss_matches_reference_cuda(dtype, queue_case, batch, n_protos, precision):
    q_len, valid = QUEUE_CASES[queue_case]
    q_len = 3 * q_len * 10 + 1 if q_len else 0  # 871: ragged, several blocks
    emb, protos, queue = _inputs(8, batch, n_protos, 128, q_len, dtype, "cuda", seed=10)
    kwargs = dict(n_crops=8, crops_for_assign=(0, 1), queue=queue,
                  queue_valid=None if valid is None else torch.tensor(valid, device="cuda"),
                  precision=precision)
    loss_rtol, grad_rtol = _tolerances(precision, dtype, CUDA_GRAD_RTOL, 1e-4)
    _compare(emb, protos, torch.tensor(2.5, device="cuda"), loss_rtol, grad_rtol, **kwargs)


@pytest.mark.cuda
def test_fused_loss_small_epsilon_cuda():
    emb, protos, _ = _inputs(8, 64, 3000, 128, 0, torch.bfloat16, "cuda", seed=11)
    _compare(emb, protos, torch.tensor(1.0, device="cuda"), 1e-4, BF16_GRAD_RTOL, n_crops=8,
             epsilon=0.01)


@pytest.mark.cuda
def test_fused_loss_compiles_to_one_graph_cuda():
    from torch._dynamo.testing import CompileCounterWithBackend

    emb, protos, queue = _inputs(8, 64, 3000, 128, 256, torch.float32, "cuda", seed=12)

    def step(e, c):
        return swav_loss_fused(e, c, n_crops=8, queue=queue,
                               queue_valid=torch.tensor(1.0, device="cuda"))

    counter = CompileCounterWithBackend("inductor")
    got = loss_and_grads(torch.compile(step, backend=counter, fullgraph=True), emb, protos,
                         torch.tensor(1.0, device="cuda"))
    want = loss_and_grads(step, emb, protos, torch.tensor(1.0, device="cuda"))
    assert counter.frame_count == 1
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)
