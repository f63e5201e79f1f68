"""The reference ops against float64 hand computations of the official algorithm.

Tolerances: float64 paths agree to 1e-10; float32 reference vs float64 hand computation to
1e-5 relative (loss) and 1e-4 relative (gradients, codes); bf16 inputs to 2e-2.
"""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastswav import FeatureQueue, SwAVLoss, swav_loss
from fastswav.ops import (normalize_prototypes_, swav_codes,
                          swapped_prediction_loss, swav_loss_reference)


def official_sinkhorn_np(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """The official distributed_sinkhorn, single process, in float64 numpy."""
    q = np.exp(scores / eps).T
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def official_loss_f64(z, c, n_crops, crops_for_assign, temperature, eps, iters, queue=None):
    """The official loss loop (per-pair log-softmax) in float64 torch, with autograd."""
    z = F.normalize(z, dim=1)
    c_n = F.normalize(c.detach(), dim=1) + (c - c.detach())
    out = z @ c_n.t()
    bs = z.shape[0] // n_crops
    loss = 0
    for i, crop in enumerate(crops_for_assign):
        s = out[bs * crop: bs * (crop + 1)].detach()
        if queue is not None:
            s = torch.cat([F.normalize(queue[i], dim=1) @ c_n.detach().t(), s])
        q = torch.from_numpy(official_sinkhorn_np(s.numpy(), eps, iters))[-bs:]
        sub = 0
        for v in range(n_crops):
            if v == crop:
                continue
            x = out[bs * v: bs * (v + 1)] / temperature
            sub = sub - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss = loss + sub / (n_crops - 1)
    return loss / len(crops_for_assign)


@pytest.mark.parametrize("n, k", [(64, 30), (37, 101), (5, 3)])
def test_sinkhorn_marginals_converge(n, k):
    torch.manual_seed(n * k)
    q = swav_codes(torch.randn(n, k), epsilon=0.5, n_iters=300)
    assert torch.allclose(q.sum(dim=1), torch.ones(n), atol=1e-5)
    # Mass per prototype is B/K in "rows sum to 1" units, i.e. 1/K of the total.
    assert torch.allclose(q.sum(dim=0) / n, torch.full((k,), 1.0 / k), atol=1e-5)


@pytest.mark.parametrize("iters", [0, 1, 3, 5])
def test_sinkhorn_equals_official_float64(iters):
    torch.manual_seed(iters)
    scores = F.normalize(torch.randn(48, 16, dtype=torch.float64), dim=1) @ \
        F.normalize(torch.randn(40, 16, dtype=torch.float64), dim=1).t()
    expected = official_sinkhorn_np(scores.numpy(), 0.05, iters)
    got64 = swav_codes(scores, 0.05, iters)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), expected, rtol=1e-10, atol=1e-14)
    got32 = swav_codes(scores.float(), 0.05, iters)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), expected, rtol=1e-4, atol=1e-7)


def test_sinkhorn_low_precision_inputs_are_safe():
    torch.manual_seed(0)
    # Cosine scores at +-1: exp(1 / 0.05) = 4.9e8 overflows fp16 and loses bf16 precision
    # without the max shift.
    scores = torch.sign(torch.randn(64, 50))
    for dtype in (torch.bfloat16, torch.float16):
        q = swav_codes(scores.to(dtype), 0.05, 3)
        assert q.dtype == torch.float32
        assert torch.isfinite(q).all()
        assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    # Far outside the cosine range some samples underflow entirely: their rows come out 0,
    # never NaN or inf.
    q = swav_codes(torch.randn(64, 50).bfloat16() * 20, 0.05, 3)
    assert torch.isfinite(q).all()
    # bf16 rounding of cosine scores moves codes by little.
    s = F.normalize(torch.randn(64, 8), dim=1) @ F.normalize(torch.randn(50, 8), dim=1).t()
    ref = swav_codes(s, 0.05, 3)
    low = swav_codes(s.bfloat16(), 0.05, 3)
    assert (low - ref).abs().max() < 0.1 and (low - ref).norm() / ref.norm() < 2e-2


def test_sinkhorn_sample_weight_removes_samples_exactly():
    torch.manual_seed(1)
    s = torch.randn(30, 12, dtype=torch.float64)
    weight = torch.cat([torch.zeros(10), torch.ones(20)]).double()
    masked = swav_codes(s, 0.05, 3, sample_weight=weight)
    alone = swav_codes(s[10:], 0.05, 3)
    assert torch.allclose(masked[10:], alone, rtol=1e-10)
    assert (masked[:10] == 0).all()
    with_all = swav_codes(s, 0.05, 3, sample_weight=torch.ones(30).double())
    assert torch.allclose(with_all, swav_codes(s, 0.05, 3), rtol=1e-12)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="scores must be"):
        swav_codes(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="epsilon"):
        swav_codes(torch.randn(3, 4), epsilon=0)


@pytest.mark.parametrize("n_crops, assign, batch, k, dim", [
    (8, (0, 1), 16, 30, 12), (3, (0, 1, 2), 7, 13, 5), (2, (1,), 9, 4, 3)])
def test_loss_equals_official_float64(n_crops, assign, batch, k, dim):
    torch.manual_seed(batch * k)
    z = torch.randn(n_crops * batch, dim, dtype=torch.float64)
    c = torch.randn(k, dim, dtype=torch.float64)
    expected = official_loss_f64(z, c, n_crops, assign, 0.1, 0.05, 3)
    got = swav_loss_reference(z, c, n_crops=n_crops, crops_for_assign=assign)
    assert abs(got.item() - expected.item()) < 1e-10 * max(1.0, abs(expected.item()))
    got32 = swav_loss_reference(z.float(), c.float(), n_crops=n_crops, crops_for_assign=assign)
    assert abs(got32.item() - expected.item()) < 1e-5 * abs(expected.item())


def test_loss_gradients_match_float64_autograd():
    torch.manual_seed(3)
    n_crops, batch, k, dim = 8, 12, 25, 10
    z64 = torch.randn(n_crops * batch, dim, dtype=torch.float64, requires_grad=True)
    c64 = torch.randn(k, dim, dtype=torch.float64, requires_grad=True)
    official_loss_f64(z64, c64, n_crops, (0, 1), 0.1, 0.05, 3).backward()
    z32 = z64.detach().float().requires_grad_()
    c32 = c64.detach().float().requires_grad_()
    swav_loss(z32, c32, n_crops=n_crops).backward()
    for got, want in ((z32.grad, z64.grad), (c32.grad, c64.grad)):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 1e-4, rel


def test_loss_with_queue_equals_official_float64():
    torch.manual_seed(4)
    n_crops, batch, k, dim, qlen = 4, 8, 20, 6, 24
    z = torch.randn(n_crops * batch, dim, dtype=torch.float64)
    c = torch.randn(k, dim, dtype=torch.float64)
    queue = torch.randn(2, qlen, dim, dtype=torch.float64)
    expected = official_loss_f64(z, c, n_crops, (0, 1), 0.1, 0.05, 3, queue=queue)
    got = swav_loss_reference(z, c, n_crops=n_crops, queue=queue,
                              queue_valid=torch.tensor(1.0, dtype=torch.float64))
    assert abs(got.item() - expected.item()) < 1e-10
    # An invalid (unfilled) queue is the same as no queue.
    no_queue = swav_loss_reference(z, c, n_crops=n_crops)
    invalid = swav_loss_reference(z, c, n_crops=n_crops, queue=queue,
                                  queue_valid=torch.tensor(0.0, dtype=torch.float64))
    assert abs(invalid.item() - no_queue.item()) < 1e-10


def test_swapped_prediction_loss_computes_each_log_softmax_once(monkeypatch):
    calls = []
    original = F.log_softmax

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "log_softmax", counting)
    scores = torch.randn(8 * 4, 10)
    codes = torch.softmax(torch.randn(2, 4, 10), dim=-1)
    swapped_prediction_loss(scores, codes, 8, (0, 1))
    assert len(calls) == 1


def test_loss_rejects_bad_layout():
    with pytest.raises(ValueError, match="do not split"):
        swav_loss(torch.randn(10, 4), torch.randn(5, 4), n_crops=3)
    with pytest.raises(ValueError, match="crops_for_assign entry 5"):
        swav_loss(torch.randn(12, 4), torch.randn(5, 4), n_crops=3, crops_for_assign=(0, 5))
    with pytest.raises(ValueError, match="embedding dim"):
        swav_loss(torch.randn(12, 4), torch.randn(5, 3), n_crops=3)


def test_normalize_prototypes_in_place():
    w = torch.randn(7, 5) * 3
    ptr = w.data_ptr()
    normalize_prototypes_(w)
    assert w.data_ptr() == ptr
    assert torch.allclose(w.norm(dim=1), torch.ones(7), atol=1e-6)


def test_swav_loss_module_feeds_queue_like_official():
    torch.manual_seed(5)
    n_crops, batch, k, dim, qlen = 4, 6, 10, 8, 18
    crit = SwAVLoss(n_crops)
    queue = FeatureQueue(2, qlen, dim)
    official = torch.zeros(2, qlen, dim)
    c = torch.randn(k, dim)
    for step in range(5):
        z = torch.randn(n_crops * batch, dim)
        used = not torch.all(official[:, -1] == 0)
        ref = swav_loss_reference(z, c, n_crops=n_crops, queue=official if used else None)
        got = crit(z, c, queue)
        assert abs(got.item() - ref.item()) < 1e-5, step
        zn = F.normalize(z, dim=1).view(n_crops, batch, dim)
        official[:, batch:] = official[:, :-batch].clone()
        official[:, :batch] = zn[:2]
        assert torch.equal(queue.in_official_order(batch), official)
        assert queue.is_full() == bool(step >= 2)


# ------------------------------------------------------------------ distributed Sinkhorn

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, scores, weight, queue_dict, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = scores.shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        q = swav_codes(scores[part], 0.05, 3, sample_weight=weight[part])
        result[f"q{rank}"] = q
        z, c, queue = queue_dict["z"], queue_dict["c"], queue_dict["queue"]
        n_crops, b = 4, z.shape[0] // 4 // world
        local_z = z.view(n_crops, world, b, -1)[:, rank].reshape(n_crops * b, -1)
        local_queue = queue.view(2, world, -1, queue.shape[-1])[:, rank]
        loss = swav_loss_reference(local_z, c, n_crops=n_crops, queue=local_queue,
                                   queue_valid=torch.tensor(1.0))
        result[f"loss{rank}"] = loss
    finally:
        dist.destroy_process_group()


def test_distributed_sinkhorn_equals_single_process():
    torch.manual_seed(6)
    world = 2
    scores = torch.randn(40, 17)
    weight = torch.ones(40)
    weight[:6] = 0
    weight[20:23] = 0  # unfilled queue rows on both ranks
    z = torch.randn(4 * 2 * 5, 8)
    c = torch.randn(17, 8)
    queue = torch.randn(2, 12, 8)
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_dist_worker, args=(world, _free_port(), scores, weight,
                                     {"z": z, "c": c, "queue": queue}, result), nprocs=world)
        result = dict(result)
    single = swav_codes(scores, 0.05, 3, sample_weight=weight)
    got = torch.cat([result["q0"], result["q1"]])
    assert torch.allclose(got, single, rtol=1e-5, atol=1e-7)
    # The loss on the concatenated batch is the mean of the per-rank losses (each rank's
    # codes come from the global Sinkhorn).
    single_loss = swav_loss_reference(z, c, n_crops=4, queue=queue, queue_valid=torch.tensor(1.0))
    mean_loss = (result["loss0"] + result["loss1"]) / 2
    assert abs(mean_loss.item() - single_loss.item()) < 1e-5
