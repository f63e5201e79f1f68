"""Edges of the public loss API: float64 always takes the reference (so the output dtype
never depends on the backend), the queue keeps its dtype, an empty batch is a ValueError."""
import logging

import pytest
import torch
import torch.nn.functional as F

import fastswav.loss as loss_module
from fastswav import FeatureQueue, SwAVLoss, swav_loss
from fastswav.ops import fused_loss
from fastswav.ops.loss import swav_loss_reference


def _inputs(dtype, n_crops=4, batch=6, dim=16, n_protos=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n_crops * batch, dim, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(n_protos, dim, generator=gen, dtype=torch.float64).to(dtype))


@pytest.fixture
def fused_forced(monkeypatch):
    """FASTSWAV_BACKEND=fused (on the CPU it runs under TRITON_INTERPRET=1, set by conftest),
    with a record of every call that reached the fused path."""
    monkeypatch.setenv("FASTSWAV_BACKEND", "fused")
    calls = []
    original = fused_loss.swav_loss_fused

    def spy(embeddings, prototypes, **kwargs):
        calls.append(embeddings.dtype)
        return original(embeddings, prototypes, **kwargs)

    monkeypatch.setattr(fused_loss, "swav_loss_fused", spy)
    monkeypatch.setattr(loss_module, "_float64_logged", [], raising=False)
    return calls


def test_float64_takes_the_reference_even_where_the_fused_path_is_forced(fused_forced, caplog):
    caplog.set_level(logging.INFO, logger="fastswav")
    z, c = _inputs(torch.float64)
    got = swav_loss(z, c, n_crops=4)
    again = SwAVLoss(n_crops=4)(z, c)
    assert got.dtype == again.dtype == torch.float64
    assert fused_forced == []  # the fused kernels never saw float64
    assert torch.equal(got, swav_loss_reference(z, c, n_crops=4))
    lines = [r for r in caplog.records if "float64" in r.getMessage()]
    assert len(lines) == 1  # logged the first time only
    # float64 prototypes with float32 embeddings: the reference too (which computes in the
    # embeddings' precision), so the dtype is the reference's on every device.
    mixed = swav_loss(z.float(), c, n_crops=4)
    assert fused_forced == []
    assert torch.equal(mixed, swav_loss_reference(z.float(), c, n_crops=4))


def test_float32_still_takes_the_forced_fused_path(fused_forced):
    z, c = _inputs(torch.float32)
    got = swav_loss(z, c, n_crops=4)
    assert fused_forced == [torch.float32] and got.dtype == torch.float32
    torch.testing.assert_close(got, swav_loss_reference(z, c, n_crops=4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_queue_keeps_its_dtype_and_precision(dtype):
    z, c = _inputs(torch.float64, n_crops=4, batch=3)
    queue = FeatureQueue(n_assign=2, length=6, dim=16, dtype=dtype)
    SwAVLoss(n_crops=4)(z.to(dtype), c.to(dtype), queue)
    assert queue.embeddings.dtype == dtype
    # The assigned crops (0 and 1), normalised in at least float32 and stored in the queue's
    # dtype: a float64 queue holds float64 values, not float32-rounded ones.
    acc = torch.promote_types(dtype, torch.float32)
    want = F.normalize(z.to(dtype).to(acc), dim=1).view(4, 3, 16)[:2].to(dtype)
    assert torch.equal(queue.embeddings[:, :3], want)


def test_empty_batch_is_a_clear_value_error():
    z = torch.empty(0, 16)
    c = torch.randn(10, 16)
    with pytest.raises(ValueError, match="empty batch"):
        swav_loss(z, c, n_crops=4)
    with pytest.raises(ValueError, match="empty batch"):
        SwAVLoss(n_crops=4)(z, c)
    with pytest.raises(ValueError, match="empty batch"):
        swav_loss_reference(z, c, n_crops=4)
