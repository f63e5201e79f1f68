"""Nothing in the loss op or the training step reads from the host or waits for the device.

A dispatch-mode trace records every aten op that the fused loss (forward and backward) and
a whole training step run, with the Triton launches replaced by no-ops (the host code
between launches is what can sync; the kernels themselves cannot). It fails on:

- tensors made from host data (``torch.tensor(list)``: ``aten.lift_fresh``), which on a
  GPU are pageable host-to-device copies that wait for the host and break CUDA graphs;
- reads of a device value on the host (``.item()``, ``bool(t)``, ``nonzero``, ``equal``);
- copies between devices.

The first call of an op may make its cached index tensors (one copy per device, before any
graph is captured); the trace is taken on the second call.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")
from triton.runtime.jit import KernelInterface  # noqa: E402

aten = torch.ops.aten

HOST_READS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero}
HOST_DATA = {aten.lift_fresh, aten.lift_fresh_copy}


class HostTrafficTrace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        packet = func.overloadpacket
        if packet in HOST_READS:
            self.found.append(f"host read: {func}")
        elif packet in HOST_DATA:
            self.found.append(f"tensor from host data: {func}")
        elif packet in (aten._to_copy, aten.copy_):
            src = args[1] if packet is aten.copy_ else args[0]
            dst_device = args[0].device if packet is aten.copy_ else kwargs.get("device", src.device)
            if torch.device(dst_device) != src.device:
                self.found.append(f"copy {src.device} -> {dst_device}: {func}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def launches_stubbed():
    """Triton launches record their kernel's name and do nothing."""
    names = []
    previous = KernelInterface.__getitem__

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            names.append(getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)))
        return launch

    KernelInterface.__getitem__ = getitem
    try:
        yield names
    finally:
        KernelInterface.__getitem__ = previous


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(4 * 6, 16, generator=g).requires_grad_()
    protos = torch.randn(11, 16, generator=g).requires_grad_()
    queue = torch.randn(2, 8, 16, generator=g)
    return emb, protos, queue, torch.tensor(1.0)


@pytest.mark.parametrize("precision,with_queue", [("tf32", True), ("ieee", True), ("tf32", False)])
def test_fused_loss_forward_and_backward_never_touch_the_host(precision, with_queue):
    """The bodies of the forward and backward custom ops (a dispatch mode sees a custom op
    as one op, so their implementations are traced directly)."""
    from fastswav.ops import fused_loss

    emb, protos, queue, valid = (t.detach() for t in _loss_inputs())
    if not with_queue:
        queue = valid = None
    grad = torch.ones(())

    def run():
        out = fused_loss._forward_impl(emb, protos, queue, valid, 4, [0, 1], 0.1, 0.05, 3, 0,
                                       precision)
        _loss, scores, codes, code_sum, lse, inv_x, inv_w = out
        fused_loss._backward_impl(grad, emb, protos, scores, codes, code_sum, lse, inv_x, inv_w,
                                  4, [0, 1], 0.1, precision)

    with launches_stubbed() as names:
        run()  # warm-up: index tensors are cached here
        trace = HostTrafficTrace()
        names.clear()
        with trace:
            run()
    # with a queue a Sinkhorn round is one launch (_pass_kernel), without it two
    rounds = {"_pass_kernel"} if with_queue else {"_col_sums_kernel"}
    assert {"_scores_kernel", "_row_sums_kernel", "_swapped_ce_fwd_kernel",
            "_swapped_ce_bwd_kernel"} | rounds <= set(names)
    assert trace.ops > 50  # the trace saw the op's host code
    assert trace.found == []


def test_the_trace_catches_what_it_should():
    trace = HostTrafficTrace()
    with trace:
        t = torch.tensor([0, 1], dtype=torch.int32)
        bool(t.sum() > 0)
        t.to("meta")
    assert any("host data" in f for f in trace.found)
    assert any("host read" in f for f in trace.found)
    assert any("copy cpu -> meta" in f for f in trace.found)


def test_training_step_never_touches_the_host(monkeypatch):
    """A whole step (prototype renormalisation, multi-crop forward, fused loss with the
    queue read and pushed, backward, LARS) on a tiny model."""
    monkeypatch.setenv("FASTSWAV_BACKEND", "fused")
    from fastswav.loss import SwAVLoss
    from fastswav.model import SwAVModel
    from fastswav.optim import LARS, lars_param_groups
    from fastswav.queue import FeatureQueue
    from fastswav.step import TrainStep

    torch.manual_seed(0)
    model = SwAVModel("resnet18", hidden_dim=16, out_dim=8, n_prototypes=7, small_images=True,
                      width=4)
    optimizer = LARS(lars_param_groups(model, True), lr=0.1, weight_decay=1e-4)
    step = TrainStep(model, SwAVLoss(n_crops=3, crops_for_assign=(0, 1)), optimizer)
    queue = FeatureQueue(2, 8, 8)
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8)]
    with launches_stubbed() as names:
        step(crops, queue, lr=0.1, freeze_prototypes=False)
        trace = HostTrafficTrace()
        names.clear()
        with trace:
            step(crops, queue, lr=0.05, freeze_prototypes=False)
    assert "_scores_kernel" in names  # the fused loss ran inside the step
    assert trace.found == []
