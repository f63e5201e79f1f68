"""LARS and the learning-rate schedule against hand-computed values."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastswav.optim import LARS, lars_param_groups, learning_rate


def larc_sgd_by_hand(params, grads, bufs, lr, momentum, wd, trust, eps=1e-8):
    """apex LARC(clip=False) around torch SGD, written out per parameter in float64."""
    out_p, out_b = [], []
    for p, g, b in zip(params, grads, bufs):
        pn, gn = np.linalg.norm(p), np.linalg.norm(g)
        if pn != 0 and gn != 0:
            d = trust * pn / (gn + pn * wd + eps) * (g + wd * p)
        else:
            d = g.copy()
        b = d.copy() if b is None else momentum * b + d
        out_p.append(p - lr * b)
        out_b.append(b)
    return out_p, out_b


def test_lars_matches_hand_computation_over_steps():
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 3)]
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    params[1].data.zero_()  # zero norm: LARC skips adaptation and decay
    opt = LARS(params, lr=0.7, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.001)
    ref = [p.detach().numpy().copy() for p in params]
    bufs = [None] * 3
    for step in range(4):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref, bufs = larc_sgd_by_hand(ref, [g.numpy() for g in grads], bufs, 0.7, 0.9, 1e-2, 0.001)
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-12, atol=1e-14)


def test_lars_skips_params_without_grad_and_plain_group():
    torch.manual_seed(1)
    a = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    frozen = nn.Parameter(torch.randn(2, dtype=torch.float64))
    opt = LARS([{"params": [a, frozen]}, {"params": [b], "lars": False, "weight_decay": 0.0}],
               lr=0.5, momentum=0.9, weight_decay=1e-3)
    a.grad, b.grad = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    before_frozen, before_b, grad_b = frozen.detach().clone(), b.detach().clone(), b.grad.clone()
    opt.step()
    assert torch.equal(frozen, before_frozen) and frozen not in opt.state
    assert torch.allclose(b, before_b - 0.5 * grad_b, rtol=1e-14)


def test_lars_param_groups_exclude_bn_and_bias():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2, bias=False))
    groups = lars_param_groups(model, exclude_bn_and_bias=True)
    assert [len(g["params"]) for g in groups] == [2, 3]
    assert groups[1]["lars"] is False and groups[1]["weight_decay"] == 0.0
    assert len(lars_param_groups(model, exclude_bn_and_bias=False)[0]["params"]) == 5


def official_schedule(n_iter, epochs, warmup_epochs, start, base, final):
    warm = np.linspace(start, base, n_iter * warmup_epochs)
    iters = np.arange(n_iter * (epochs - warmup_epochs))
    cos = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / len(iters)))
                    for t in iters])
    return np.concatenate((warm, cos))


@pytest.mark.parametrize("n_iter, epochs, warmup", [(7, 10, 2), (5, 4, 0), (3, 3, 3), (1, 5, 1)])
def test_schedule_matches_official_arrays(n_iter, epochs, warmup):
    expected = official_schedule(n_iter, epochs, warmup, 0.3, 4.8, 0.0048)
    got = [learning_rate(i, n_iter, epochs, 4.8, 0.0048, warmup, 0.3) for i in range(n_iter * epochs)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_schedule_hand_values():
    # 10 iterations, 2 of warm-up from 0.1 to 1.0, cosine to 0 over the other 8.
    lr = lambda i: learning_rate(i, 5, 2, 1.0, 0.0, warmup_epochs=0, start_warmup=0.0)  # noqa: E731
    assert lr(0) == pytest.approx(1.0)
    assert lr(5) == pytest.approx(0.5)  # half way through the cosine
    assert lr(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert learning_rate(0, 2, 4, 1.0, 0.0, 1, 0.1) == pytest.approx(0.1)
    assert learning_rate(1, 2, 4, 1.0, 0.0, 1, 0.1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        learning_rate(0, 2, 4, 1.0, 0.0, warmup_epochs=5)
