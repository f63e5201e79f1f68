"""LightlyStyleSwaVLoss against a direct float64 computation of lightly's semantics, and
against fastswav's own loss on the same embeddings."""
import pytest
import torch
import torch.nn.functional as F

from fastswav import SwAVLoss
from fastswav.adapters import LightlyStyleSwaVLoss
from fastswav.ops.loss import swav_loss_reference


def _direct_sinkhorn(scores, epsilon, iterations):
    """Sinkhorn-Knopp written out plainly: Q = exp(S/eps)^T, total mass 1, then alternately
    every prototype row to mass 1/K and every sample column to mass 1/N; columns sum to 1."""
    q = torch.exp(scores / epsilon).T
    q = q / q.sum()
    n_protos, n_samples = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / n_protos
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).T


def _direct_loss(high, low, queue=None, temperature=0.1, epsilon=0.05, iterations=3):
    """Mean over high-resolution crops i of the mean over every other crop v of the
    cross-entropy of softmax(s_v / T) against crop i's codes (queue rows join Sinkhorn)."""
    crops = high + low
    total = 0.0
    for i, scores in enumerate(high):
        with torch.no_grad():
            joined = scores if queue is None else torch.cat([scores, queue[i]])
            codes = _direct_sinkhorn(joined, epsilon, iterations)[:scores.shape[0]]
        per_crop = [-(codes * F.log_softmax(crops[v] / temperature, dim=1)).sum(dim=1).mean()
                    for v in range(len(crops)) if v != i]
        total = total + sum(per_crop) / (len(crops) - 1)
    return (total / len(high)).reshape(1)  # lightly's loss has shape (1,)


def _scores(n, batch, n_protos, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(n_protos, dim, generator=generator, dtype=torch.float64), dim=1)
    return [(F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1)
             @ prototypes.T).requires_grad_() for _ in range(n)]


@pytest.mark.parametrize("n_high, n_low, batch, n_protos, queue_len", [
    (2, 6, 8, 30, 0), (2, 0, 5, 7, 0), (3, 2, 4, 11, 0), (1, 1, 6, 5, 0), (2, 4, 8, 30, 24),
])
def test_matches_direct_float64_computation(n_high, n_low, batch, n_protos, queue_len):
    crops = _scores(n_high + n_low, batch, n_protos, seed=n_high * 10 + n_low)
    high, low = crops[:n_high], crops[n_high:]
    queue = None
    if queue_len:
        queue = [s.detach() for s in _scores(n_high, queue_len, n_protos, seed=99)]
    expected = _direct_loss(high, low, queue)
    expected_grads = torch.autograd.grad(expected, crops, allow_unused=True, materialize_grads=True)
    got = LightlyStyleSwaVLoss()(high, low, queue)
    got_grads = torch.autograd.grad(got, crops, allow_unused=True, materialize_grads=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_non_default_hyperparameters_match():
    crops = _scores(4, 6, 9, seed=3)
    expected = _direct_loss(crops[:2], crops[2:], temperature=0.2, epsilon=0.1, iterations=5)
    got = LightlyStyleSwaVLoss(temperature=0.2, sinkhorn_iterations=5, sinkhorn_epsilon=0.1)(
        crops[:2], crops[2:])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_float32_and_large_scores_stay_finite():
    generator = torch.Generator().manual_seed(0)
    high = [torch.randn(8, 20, generator=generator) * 10 for _ in range(2)]
    low = [torch.randn(8, 20, generator=generator) * 10 for _ in range(2)]
    # exp(100 / 0.05) overflows without the per-prototype shift
    loss = LightlyStyleSwaVLoss()(high, low)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = _direct_loss([h.double() / 10 for h in high], [v.double() / 10 for v in low],
                            temperature=0.01, epsilon=0.005)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-4)


def test_equals_fastswav_loss_on_normalised_embeddings():
    generator = torch.Generator().manual_seed(5)
    n_crops, batch, dim, n_protos = 6, 8, 16, 12
    embeddings = torch.randn(n_crops * batch, dim, generator=generator, dtype=torch.float64)
    prototypes = torch.randn(n_protos, dim, generator=generator, dtype=torch.float64)
    queue = torch.randn(2, 16, dim, generator=generator, dtype=torch.float64)
    z = F.normalize(embeddings, dim=1)
    c = F.normalize(prototypes, dim=1)
    scores = list((z @ c.T).split(batch))
    queue_scores = [F.normalize(queue[i], dim=1) @ c.T for i in range(2)]
    adapter = LightlyStyleSwaVLoss()
    # fastswav's own loss is 0-d; the adapter has lightly's shape (1,).
    expected = SwAVLoss(n_crops=n_crops, crops_for_assign=(0, 1))(embeddings, prototypes).reshape(1)
    torch.testing.assert_close(adapter(scores[:2], scores[2:]), expected, rtol=1e-10, atol=1e-12)
    with_queue = swav_loss_reference(embeddings, prototypes, n_crops=n_crops, queue=queue).reshape(1)
    torch.testing.assert_close(adapter(scores[:2], scores[2:], queue_scores), with_queue,
                               rtol=1e-10, atol=1e-12)


def test_bad_inputs_raise():
    crops = _scores(3, 4, 5)
    loss = LightlyStyleSwaVLoss()
    with pytest.raises(ValueError, match="at least 2 crops"):
        loss(crops[:1], [])
    with pytest.raises(ValueError, match="high-resolution"):
        loss([], crops)
    with pytest.raises(ValueError, match="one shape"):
        loss(crops[:2], [torch.randn(3, 5, dtype=torch.float64)])
    with pytest.raises(ValueError, match="one entry per high-resolution crop"):
        loss(crops[:2], crops[2:], [torch.randn(4, 5)])
    with pytest.raises(ValueError, match="queue_outputs"):
        loss(crops[:2], crops[2:], [torch.randn(4, 6), torch.randn(4, 6)])


def test_output_shape_and_dtype_follow_lightly():
    """lightly's SwaVLoss returns ``new_zeros(1)`` accumulated: shape (1,), not 0-d."""
    crops = _scores(4, 5, 7, seed=8)
    loss = LightlyStyleSwaVLoss()(crops[:2], crops[2:])
    assert loss.shape == (1,) and loss.dtype == torch.float64
    loss.backward()  # a one-element loss backpropagates without an explicit gradient
    assert all(c.grad is not None for c in crops)


def test_gather_distributed_without_torch_distributed_raises(monkeypatch):
    """lightly raises ValueError in the constructor when gathering is asked for and this
    torch has no torch.distributed; without gathering it still builds."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        LightlyStyleSwaVLoss(sinkhorn_gather_distributed=True)
    LightlyStyleSwaVLoss(sinkhorn_gather_distributed=False)
