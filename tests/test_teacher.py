"""DINO-style teacher ops: Sinkhorn-Knopp targets and the teacher-student cross-entropy.

The ground truth is written here in float64 from the published formulas (DINOv2's
``sinkhorn_knopp_teacher``, iBOT's patch form, DINO's cross-entropy): the plain formula
(exp without a shift) where it does not overflow, and the same algorithm in the log domain
where it does. The reference path (float32) is checked against it; the fused path (Triton,
under TRITON_INTERPRET=1 on the CPU, 16 x 32 tiles: the shapes below are ragged against
them) against both.

Tolerances:
- reference Sinkhorn vs float64 formula: atol 1e-6 + rtol 1e-4 (float32 exp of x / T
  amplifies the input rounding by 1/T; the rows sum to 1);
- fused Sinkhorn vs reference: atol 1e-6 + rtol 1e-4; row sums 1 within 1e-5;
- at logits / T ~ 1e3 and beyond (where even float64 overflows) vs the log-domain float64
  computation: atol 1e-6 + rtol 1e-3 (float32 exponents of that size carry ~1e-4 relative
  error into exp);
- marginals after 40 iterations: every prototype's mass N / K within 1e-3 relative;
- cross-entropy loss vs float64: rtol 1e-5 (fp32 logits), 1e-4 for 16-bit logits (against
  the float64 loss of the same rounded logits: only float32 arithmetic differs);
- gradients: max |got - want| <= 1e-5 * max |want| (fp32); 16-bit gradients are rounded to
  their dtype once, so 1e-2 * max |want| (bf16) and 2e-3 (fp16);
- 2 gloo processes vs one process on the concatenated batch: atol 1e-6 + rtol 1e-5.
"""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastswav
from fastswav.ops import teacher as T

triton = pytest.importorskip("triton")

SK_ATOL, SK_RTOL = 1e-6, 1e-4
EXTREME_RTOL = 1e-3
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


# ------------------------------------------------------------------ float64 ground truth

def dinov2_sk_float64(logits, temp, iters, n_valid=None):
    """DINOv2's sinkhorn_knopp_teacher in float64, as published (plain exp, no shift); the
    rows past ``n_valid`` are left out of every sum (and get zeros). Single process: a
    multi-process batch is the concatenation of the processes' valid rows."""
    x = logits.double()
    n = x.shape[0] if n_valid is None else int(n_valid)
    q = torch.exp(x[:n] / temp).t()  # [K, B]
    big_b, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / big_b
    q = q * big_b
    out = torch.zeros_like(x)
    out[:n] = q.t()
    return out


def log_domain_sk_float64(logits, temp, iters):
    """The same algorithm on log Q (logsumexp normalisations): finite at any temperature."""
    lq = (logits.double() / temp).t()
    big_b, k = lq.shape[1], lq.shape[0]
    lq = lq - torch.logsumexp(lq.reshape(-1), dim=0)
    for _ in range(iters):
        lq = lq - torch.logsumexp(lq, dim=1, keepdim=True) - math.log(k)
        lq = lq - torch.logsumexp(lq, dim=0, keepdim=True) - math.log(big_b)
    return torch.exp(lq + math.log(big_b)).t()


def dino_ce_float64(student, targets, n_s, n_t, student_temp, skip_same_view, reduction):
    """DINO's loss as published: for each counted (teacher i, student v) pair,
    sum(-t_i * log_softmax(s_v / T), dim=-1).mean(); summed, divided by the pair count for
    "mean". Differentiable w.r.t. ``student`` (float64)."""
    s = student.double().chunk(n_s)
    t = targets.double().chunk(n_t)
    total, terms = 0, 0
    for i in range(n_t):
        for v in range(n_s):
            if skip_same_view and v == i:
                continue
            total = total + torch.sum(-t[i] * F.log_softmax(s[v] / student_temp, dim=-1),
                                      dim=-1).mean()
            terms += 1
    return total / terms if reduction == "mean" else total


def _close(got, want, atol=SK_ATOL, rtol=SK_RTOL):
    return torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol)


def _max_rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _logits(rows, k, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g) * scale).to(dtype)


# ------------------------------------------------------------------ Sinkhorn-Knopp

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("iters", [0, 1, 3])
def test_reference_and_fused_sinkhorn_match_the_formula(dtype, iters):
    x = _logits(37, 71, seed=iters, dtype=dtype)  # odd B and K
    want = dinov2_sk_float64(x, 0.1, iters)  # the formula on the same (rounded) logits
    ref = T.sinkhorn_knopp_reference(x, 0.1, iters)
    fused = T.sinkhorn_knopp_fused(x, 0.1, iters)
    assert ref.dtype == fused.dtype == torch.float32
    assert _close(ref, want), _max_rel(ref, want)
    assert _close(fused, ref), _max_rel(fused, ref)
    if iters:
        assert torch.allclose(fused.sum(dim=1), torch.ones(37), atol=1e-5)


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_sinkhorn_marginals(path):
    x = _logits(45, 30, scale=1.0, seed=3)
    fn = T.sinkhorn_knopp_reference if path == "reference" else T.sinkhorn_knopp_fused
    q = fn(x, 0.2, 40)
    assert torch.allclose(q.sum(dim=1), torch.ones(45), atol=1e-5)
    assert torch.allclose(q.sum(dim=0).double(), torch.full((30,), 45 / 30, dtype=torch.float64),
                          rtol=1e-3)


@pytest.mark.parametrize("temp", [0.01, 0.004])
def test_sharp_temperature_stays_finite(temp):
    """Cosine-bounded logits (as from DINO's normalised head) at temperatures where
    exp(logits / T) overflows float32: the max-shifted op is finite and equals the
    log-domain float64 computation."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(21, 40, generator=g) * 2 - 1
    with torch.no_grad():
        plain = dinov2_sk_float64(x, temp, 3).float()  # float64 formula cast to float32
        plain32 = torch.exp(x / temp)
    assert torch.isinf(plain32).any()  # the plain float32 formula overflows here
    want = log_domain_sk_float64(x, temp, 3)
    assert _close(plain, want)  # (the float64 formula still holds at these temperatures)
    for q in (T.sinkhorn_knopp_reference(x, temp), T.sinkhorn_knopp_fused(x, temp)):
        assert torch.isfinite(q).all()
        assert _close(q, want), _max_rel(q, want)
        assert torch.allclose(q.sum(dim=1), torch.ones(21), atol=1e-5)


def test_extreme_temperature_matches_log_domain():
    """Where even the float64 formula overflows (logits / T ~ 1e3 to 1e4) the targets stay
    finite and equal the log-domain float64 computation, including a sample lying far below
    every prototype's max (its exponentials all underflow: the log-domain sums keep it)."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(21, 40, generator=g) * 2 - 1
    far = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [1.0, 1.0, 2.0]])
    for logits, temp in ((x, 1e-3), (far, 1e-3)):
        assert not torch.isfinite(dinov2_sk_float64(logits, temp, 3)).all()
        want = log_domain_sk_float64(logits, temp, 3)
        for q in (T.sinkhorn_knopp_reference(logits, temp), T.sinkhorn_knopp_fused(logits, temp)):
            assert torch.isfinite(q).all()
            assert _close(q, want, rtol=EXTREME_RTOL), _max_rel(q, want)
            assert torch.allclose(q.sum(dim=1), torch.ones(len(logits)), atol=1e-5)


def test_padded_patch_rows_take_no_part():
    """iBOT form: the rows past n_valid (garbage, inf, NaN) change nothing and get zeros."""
    x = _logits(29, 45, seed=5)
    n_valid = torch.tensor(17)
    padded = x.clone()
    padded[17:20] = float("nan")
    padded[20:] = 1e30
    want = dinov2_sk_float64(x, 0.07, 3, n_valid=17)
    for fn in (T.sinkhorn_knopp_reference, T.sinkhorn_knopp_fused):
        q = fn(padded, 0.07, 3, n_valid=n_valid)
        assert (q[17:] == 0).all()
        assert _close(q, want), _max_rel(q, want)
    for iters in (0, 2):
        want0 = dinov2_sk_float64(x, 0.07, iters, n_valid=17)
        assert _close(T.sinkhorn_knopp_fused(padded, 0.07, iters, n_valid=n_valid), want0)


def test_public_sinkhorn_picks_backend(monkeypatch):
    x = _logits(19, 33, seed=6)
    want = T.sinkhorn_knopp_reference(x, 0.05)
    monkeypatch.setenv("FASTSWAV_BACKEND", "reference")
    assert torch.equal(fastswav.sinkhorn_knopp(x, 0.05), want)
    monkeypatch.setenv("FASTSWAV_BACKEND", "fused")
    assert _close(fastswav.sinkhorn_knopp(x, 0.05), want)


def test_sinkhorn_rejects_bad_arguments():
    x = _logits(4, 5)
    with pytest.raises(ValueError):
        fastswav.sinkhorn_knopp(x, 0.0)
    with pytest.raises(ValueError):
        fastswav.sinkhorn_knopp(x, 0.1, iterations=-1)
    with pytest.raises(ValueError):
        fastswav.sinkhorn_knopp(x[0], 0.1)
    with pytest.raises(ValueError):
        fastswav.sinkhorn_knopp(x, 0.1, n_valid=torch.tensor([1, 2]))


# ------------------------------------------------------------------ cross-entropy

def _ce_inputs(n_s, n_t, batch, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n_s * batch, k, generator=g) * 2).to(dtype)
    targets = torch.softmax(torch.randn(n_t * batch, k, generator=g) * 3, dim=-1)
    return student, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n_s,n_t,skip,reduction", [
    (4, 2, True, "mean"),    # DINO: 2 global + 2 local student crops, same-view pairs skipped
    (3, 2, False, "sum"),    # DINOv2's DINOLoss.forward: every pair, summed
    (1, 1, False, "mean"),
])
def test_cross_entropy_matches_formula(dtype, n_s, n_t, skip, reduction):
    batch, k, temp = 19, 45, 0.1
    student, targets = _ce_inputs(n_s, n_t, batch, k, dtype, seed=7)
    grad_out = torch.tensor(1.7)
    s64 = student.double().requires_grad_()
    want = dino_ce_float64(s64, targets, n_s, n_t, temp, skip, reduction)
    (want_grad,) = torch.autograd.grad(want, s64, grad_out.double())
    for backend in ("reference", "fused"):
        s = student.clone().requires_grad_()
        rows = T.teacher_student_row_losses(s, targets, n_student_crops=n_s, student_temp=temp,
                                            skip_same_view=skip, backend=backend)
        loss = T._reduce(rows, T.count_pairs(n_s, n_t, skip), reduction)
        (grad,) = torch.autograd.grad(loss, s, grad_out)
        assert grad.dtype == dtype
        assert torch.allclose(loss.double(), want, rtol=LOSS_RTOL[dtype], atol=0), backend
        assert _max_rel(grad, want_grad) <= GRAD_RTOL[dtype], backend


def test_cross_entropy_public_function_and_teacher_logits():
    n_s, n_t, batch, k = 4, 2, 9, 40
    student, _ = _ce_inputs(n_s, n_t, batch, k, torch.float32, seed=8)
    teacher_logits = _logits(n_t * batch, k, seed=9)
    targets = T.sinkhorn_knopp_reference(teacher_logits, 0.05)
    want = dino_ce_float64(student, targets, n_s, n_t, 0.1, True, "mean")
    got = fastswav.teacher_student_cross_entropy(student, targets, n_student_crops=n_s)
    via_logits = fastswav.teacher_student_cross_entropy(
        student, n_student_crops=n_s, teacher_logits=teacher_logits, teacher_temp=0.05)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    assert torch.allclose(via_logits, got, rtol=1e-6)
    with pytest.raises(ValueError):
        fastswav.teacher_student_cross_entropy(student, n_student_crops=n_s)
    with pytest.raises(ValueError):
        fastswav.teacher_student_cross_entropy(student, targets[:-1], n_student_crops=n_s)
    with pytest.raises(ValueError):  # one crop each, skipping the same view: nothing counts
        fastswav.teacher_student_cross_entropy(student[:batch], targets[:batch],
                                               n_student_crops=1)


def test_custom_ops_fake_and_compile_one_graph():
    """Fake implementations agree with the real ops, and a compiled DINO-style loss
    (Sinkhorn teacher + cross-entropy, forward and backward) is one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    n_s, n_t, batch, k = 3, 2, 6, 40
    student, _ = _ce_inputs(n_s, n_t, batch, k, torch.float32, seed=10)
    teacher_logits = _logits(n_t * batch, k, seed=11)
    targets = T.sinkhorn_knopp_fused(teacher_logits, 0.07)
    torch.library.opcheck(torch.ops.fastswav.sinkhorn_knopp_teacher.default,
                          (teacher_logits, torch.tensor(7), 0.07, 3, 0),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastswav.teacher_student_ce.default,
                          (student.clone().requires_grad_(), targets, n_s, n_t, 0.1, True),
                          test_utils=("test_schema", "test_faketensor"))

    def step(s, t_logits):
        t = T.sinkhorn_knopp_fused(t_logits, 0.07)
        rows = T.teacher_student_row_losses(s, t, n_student_crops=n_s, backend="fused")
        return T._reduce(rows, T.count_pairs(n_s, n_t, True), "mean")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    got, want = compiled(s1, teacher_logits), step(s2, teacher_logits)
    got.backward()
    want.backward()
    assert counter.frame_count == 1
    assert torch.allclose(got, want, rtol=1e-6)
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ distributed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, logits, n_valid, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for name, fn in (("reference", T.sinkhorn_knopp_reference),
                         ("fused", T.sinkhorn_knopp_fused)):
            out[name] = fn(logits[rank], 0.05, 3)
            nv = torch.tensor(n_valid[rank])
            out[name + "_patch"] = fn(logits[rank], 0.05, 3, n_valid=nv)
            assert int(nv) == n_valid[rank]
        result[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~35 s on 2 cores: two processes start torch and the interpreter
def test_two_processes_equal_one_process_on_the_concatenated_batch():
    """2 gloo processes (each its own rows; in the patch form a different n_valid each) give
    the targets of one process on the concatenation of their (valid) rows."""
    world, rows, k = 2, 13, 37
    logits = [_logits(rows, k, seed=20 + r) for r in range(world)]
    n_valid = [5, 11]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_dist_worker, args=(world, _free_port(), logits, n_valid, result), nprocs=world)
        result = dict(result)
    whole = dinov2_sk_float64(torch.cat(logits), 0.05, 3)
    valid = torch.cat([lg[:n] for lg, n in zip(logits, n_valid)])
    whole_valid = dinov2_sk_float64(valid, 0.05, 3)
    for name in ("reference", "fused"):
        got = torch.cat([result[r][name] for r in range(world)])
        assert _close(got, whole, rtol=1e-5), name
        got_patch = torch.cat([result[r][name + "_patch"][:n] for r, n in enumerate(n_valid)])
        assert _close(got_patch, whole_valid, rtol=1e-5), name
        assert all((result[r][name + "_patch"][n:] == 0).all() for r, n in enumerate(n_valid))


# ------------------------------------------------------------------ CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [64, 37])
def test_fused_teacher_ops_cuda(dtype, batch):
    k, n_s, n_t = 65536 if batch == 64 else 4099, 10, 2
    x = _logits(n_t * batch, k, seed=30, dtype=dtype).cuda()
    ref = T.sinkhorn_knopp_reference(x, 0.04)
    fused = T.sinkhorn_knopp_fused(x, 0.04)
    assert _close(fused, ref), _max_rel(fused, ref)
    nv = torch.tensor(batch + 3, device="cuda")
    assert _close(T.sinkhorn_knopp_fused(x, 0.04, n_valid=nv),
                  T.sinkhorn_knopp_reference(x, 0.04, n_valid=nv))
    student = _logits(n_s * batch, k, seed=31, dtype=dtype).cuda()
    got, want = [], []
    for backend, out in (("fused", got), ("reference", want)):
        s = student.clone().requires_grad_()
        rows = T.teacher_student_row_losses(s, fused, n_student_crops=n_s, backend=backend)
        loss = T._reduce(rows, T.count_pairs(n_s, n_t, True), "mean")
        loss.backward()
        out += [loss.detach(), s.grad]
    assert torch.allclose(got[0], want[0], rtol=1e-4)
    assert _max_rel(got[1], want[1]) <= max(GRAD_RTOL[dtype], 2e-4)


# ------------------------------------------------------------------ example

@pytest.mark.slow  # ~15-40 s on 2 cores: a subprocess importing torchvision, 2 CPU steps
def test_dino_style_example_runs():
    import re
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "dino_style_loop.py"
    done = subprocess.run([sys.executable, str(example), "--steps", "2", "--batch-size", "4",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"^step \d+ loss ([0-9.]+)", done.stdout, re.MULTILINE)]
    assert len(losses) == 2 and all(0 < v < 50 for v in losses), done.stdout
    assert done.stdout.strip().endswith("done")
