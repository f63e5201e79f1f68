"""Nothing in the loss op or the training step reads from the host or waits for the device,
and no op keeps a tensor between calls.

A dispatch-mode trace (tests/host_traffic.py) records every aten op that the fused ops
(forward and backward, their custom-op bodies included) and a whole training step run,
with the Triton launches replaced by no-ops (the host code between launches is what can
sync; the kernels themselves cannot). It fails on:

- tensors made from host data (``torch.tensor(list)``: ``aten.lift_fresh``), which on a
  GPU are pageable host-to-device copies that wait for the host and break CUDA graphs;
- reads of a device value on the host (``.item()``, ``bool(t)``, ``nonzero``, ``equal``);
- copies between devices.

The first call is what is traced: under ``--compile=reduce-overhead`` it is the CUDA-graph
warm-up, whose allocations live in the graph pool, so a tensor an op made then and kept
would be memory the pool later reuses. The fresh-process test runs every fused op's first
call in a new interpreter (tests/first_call_probe.py) and also fails on any tensor a call
leaves alive.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from host_traffic import HostTrafficTrace, launches_stubbed  # noqa: E402


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
        trace = HostTrafficTrace()
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
        for lr in (0.1, 0.05):  # the first step and a later one
            trace = HostTrafficTrace()
            names.clear()
            with trace:
                step(crops, queue, lr=lr, freeze_prototypes=False)
            assert trace.found == [], lr
    assert "_scores_kernel" in names  # the fused loss ran inside the step
    assert trace.found == []


@pytest.mark.parametrize("violation,reported", [("item", "host read"),
                                                ("tensor_from_list", "tensor from host data")])
def test_the_step_trace_fails_on_an_injected_host_read_or_copy(monkeypatch, violation, reported):
    """The step guard above, seen failing: the same traced step with a ``.item()`` (what a
    logging line in the step would do) or a tensor built from a Python list in the loss."""
    monkeypatch.setenv("FASTSWAV_BACKEND", "fused")
    from fastswav.loss import SwAVLoss
    from fastswav.model import SwAVModel
    from fastswav.optim import LARS, lars_param_groups
    from fastswav.step import TrainStep

    class LossWithViolation(SwAVLoss):
        def forward(self, embeddings, prototypes, queue=None):
            loss = super().forward(embeddings, prototypes, queue)
            if violation == "item":
                loss.item()
            else:
                loss = loss * torch.tensor([1.0]).sum()
            return loss

    torch.manual_seed(0)
    model = SwAVModel("resnet18", hidden_dim=16, out_dim=8, n_prototypes=7, small_images=True,
                      width=4)
    optimizer = LARS(lars_param_groups(model, True), lr=0.1, weight_decay=1e-4)
    step = TrainStep(model, LossWithViolation(n_crops=3, crops_for_assign=(0, 1)), optimizer)
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8)]
    with launches_stubbed():
        trace = HostTrafficTrace()
        with trace:
            step(crops, None, lr=0.1, freeze_prototypes=False)
    assert any(reported in f for f in trace.found), trace.found


_MODULE_LEVEL_CACHE = {}


def test_the_kept_tensor_probe_fails_on_a_module_level_cache():
    """The first-call probe's "kept" check, seen failing: an op that caches a device tensor
    in a module-level dict on its first call (the pattern that once hid in an index cache)."""
    from host_traffic import probe_first_call

    def op_with_cache():
        x = torch.randn(5, 3)
        index = _MODULE_LEVEL_CACHE.setdefault("index", torch.arange(3))
        return x[:, index].sum()

    _MODULE_LEVEL_CACHE.clear()
    report = probe_first_call(op_with_cache)
    assert report["kept"] == ["(3,)"], report
    assert probe_first_call(lambda: torch.randn(5, 3).sum())["kept"] == []


def test_first_call_of_every_fused_op_copies_nothing_and_keeps_nothing():
    """In a fresh process: the first call of the SwAV loss (three precisions, with and
    without a queue), the teacher Sinkhorn-Knopp and cross-entropy, the queue push and the
    SwAV loss module with its queue, forward and backward."""
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(tests))
    done = subprocess.run([sys.executable, str(tests / "first_call_probe.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 8
    for name, seen in report.items():
        assert seen["host"] == [], (name, seen["host"])
        assert seen["kept"] == [], (name, seen["kept"])
        if name != "queue push":  # the others trace their custom-op bodies
            assert seen["ops"] > 30 and seen["kernels"], (name, seen)
    assert {"_scores_kernel", "_pass_kernel", "_swapped_ce_fwd_kernel",
            "_swapped_ce_bwd_kernel"} <= set(report["swav_loss tf32 with queue"]["kernels"])
