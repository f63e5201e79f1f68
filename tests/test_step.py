"""The training step: compiled equals eager, NVTX ranges, the profiler window."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from compile_violations import ViolatingHead
from fastswav import profiling
from fastswav.compile_counts import CompileCounts
from fastswav.loss import SwAVLoss
from fastswav.model import SwAVModel
from fastswav.optim import LARS, lars_param_groups
from fastswav.queue import FeatureQueue
from fastswav.step import TrainStep


def _tiny(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = SwAVModel("resnet18", hidden_dim=16, out_dim=8, n_prototypes=7, small_images=True,
                      width=4).to(dtype)
    optimizer = LARS(lars_param_groups(model, True), lr=0.1, weight_decay=1e-4)
    return model, optimizer


def _crops(batch=6, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # 2 crops at 16x16 and 3 at 8x8: two resolution groups, an odd crop count.
    return [torch.randn(batch, 3, 16, 16, generator=g, dtype=dtype) for _ in range(2)] + \
           [torch.randn(batch, 3, 8, 8, generator=g, dtype=dtype) for _ in range(3)]


def _run_steps(compile_mode, backend, n_steps=3, dtype=torch.float32, counts_after_first=None):
    torch._dynamo.reset()  # code caches of earlier tests' models: no recompile limit reached
    model, optimizer = _tiny(dtype=dtype)
    criterion = SwAVLoss(n_crops=5, crops_for_assign=(0, 1))
    step = TrainStep(model, criterion, optimizer, compile_mode=compile_mode, compile_backend=backend)
    queue = FeatureQueue(2, 12, 8, dtype=dtype)
    losses = []
    for i in range(n_steps):
        loss, emb = step(_crops(seed=i, dtype=dtype), queue, lr=0.1, freeze_prototypes=i == 0)
        losses.append(loss)
        if i == 0 and counts_after_first is not None:
            counts_after_first.append(CompileCounts.read())
        assert emb.shape == (5 * 6, 8) and not emb.requires_grad
    return torch.stack(losses), model, queue


def _assert_same_training(a, b, atol):
    (loss_a, model_a, queue_a), (loss_b, model_b, queue_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=atol), (loss_a, loss_b)
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.allclose(pa.float(), pb.float(), atol=atol), name
    assert torch.allclose(queue_a.embeddings, queue_b.embeddings, atol=atol)


def test_traced_step_equals_eager_and_compiles_whole_graphs_once():
    """AOTAutograd-traced (no C++ compile): same losses, weights and queue as eager; the
    forward and the loss with its queue push are one graph each (no DDP here, so no bucket
    splits), no frame runs eagerly, nothing compiles again after the first step."""
    eager = _run_steps("none", "inductor")
    counter = CompileCounterWithBackend("aot_eager")
    CompileCounts.clear()
    traced = _run_steps("default", counter, counts_after_first=(first := []))
    _assert_same_training(eager, traced, atol=1e-5)
    counts = CompileCounts.read()
    assert counts.problems(first[0]) == []
    assert counter.frame_count == 2 and counts.graphs == 2, counts


@pytest.mark.parametrize("kind,reported", [("graph_break", "graph break"),
                                           ("break_in_context_manager", "run eagerly"),
                                           ("recompile", "compiled again")])
def test_the_compile_guard_fails_on_each_injected_violation(kind, reported):
    """The guard above, seen failing: a break, a break where dynamo cannot resume (it runs
    the frame eagerly and counts no break), a guard that fails every step."""
    torch._dynamo.reset()
    model, optimizer = _tiny()
    model.head = ViolatingHead(model.head, kind)
    step = TrainStep(model, SwAVLoss(n_crops=5), optimizer, compile_mode="default",
                     compile_backend="eager")
    CompileCounts.clear()
    step(_crops(seed=0), None, lr=0.1, freeze_prototypes=False)
    first = CompileCounts.read()
    for seed in (1, 2):
        step(_crops(seed=seed), None, lr=0.1, freeze_prototypes=False)
    problems = CompileCounts.read().problems(first)
    assert any(reported in p for p in problems), problems


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager():
    """The real thing on the CPU: inductor-generated C++ (about a minute to compile here).

    In float64, so that "equal" can be tight: in float32 this tiny net (BatchNorm over 6
    samples) amplifies rounding differences between the two kernels' summation orders to
    ~1e-2 in the weights after two steps, while float64 gradients agree to ~1e-14."""
    eager = _run_steps("none", "inductor", n_steps=2, dtype=torch.float64)
    compiled = _run_steps("default", "inductor", n_steps=2, dtype=torch.float64)
    _assert_same_training(eager, compiled, atol=1e-9)


def test_nvtx_ranges_cover_every_phase_and_balance(monkeypatch):
    events = []
    monkeypatch.setattr(profiling, "_push", lambda name: events.append(("push", name)))
    monkeypatch.setattr(profiling, "_pop", lambda: events.append(("pop", None)))
    model, optimizer = _tiny()
    step = TrainStep(model, SwAVLoss(n_crops=5), optimizer)
    step(_crops(), None, lr=0.1, freeze_prototypes=False)
    names = [name for kind, name in events if kind == "push"]
    assert names == ["forward", "forward/group0", "forward/group1", "loss", "sinkhorn",
                     "sinkhorn", "backward", "optimizer"]
    depth = 0
    for kind, _ in events:
        depth += 1 if kind == "push" else -1
        assert depth >= 0
    assert depth == 0


def test_nvtx_disabled_by_default_costs_nothing():
    assert not profiling.nvtx_enabled()
    with profiling.nvtx_range("anything"):
        pass


def test_profile_window_starts_and_stops_once():
    calls = []
    window = profiling.ProfileWindow((3, 5), torch.device("cpu"),
                                     start_fn=lambda: calls.append("start"),
                                     stop_fn=lambda: calls.append(("stop")))
    for iteration in range(8):
        window.before_iteration(iteration)
        calls.append(iteration)
    window.close()
    assert calls == [0, 1, 2, "start", 3, 4, "stop", 5, 6, 7]
    # Resuming inside the window opens it at once; ending inside it closes it.
    calls.clear()
    window = profiling.ProfileWindow((3, 5), torch.device("cpu"),
                                     start_fn=lambda: calls.append("start"),
                                     stop_fn=lambda: calls.append("stop"))
    window.before_iteration(4)
    window.close()
    assert calls == ["start", "stop"]


def test_profile_window_without_cuda_is_ignored_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="fastswav"):
        window = profiling.ProfileWindow((1, 2), torch.device("cpu"))
    assert window.window is None and "needs a CUDA device" in caplog.text
    window.before_iteration(1)  # no call into the CUDA profiler


@pytest.mark.parametrize("text", ["5", "a:b", "5:5", "-1:3", "7:2"])
def test_profile_window_parsing_rejects_bad_input(text):
    with pytest.raises(ValueError, match="profile="):
        profiling.parse_window(text)


def test_cli_profile_and_compile_errors_are_one_line(capsys):
    from fastswav.train import main

    assert main(["--profile=9"]) == 2
    assert "expected START:STOP" in capsys.readouterr().err
    assert main(["--compile=fast"]) == 2
    assert "compile='fast'" in capsys.readouterr().err


def test_reduce_overhead_with_gradient_accumulation_is_refused_in_one_line(capsys):
    """A CUDA-graph replay would free the gradients the previous micro-batch allocated in
    the graph pool: refused at start, before any data is read or model built."""
    from fastswav.train import main

    assert main(["--preset", "100ep_fast", "--compile=reduce-overhead",
                 "--data", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "grad_accum=2" in err[0], err
    model, optimizer = _tiny()
    step = TrainStep(model, SwAVLoss(n_crops=5), optimizer, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="reduce-overhead cannot accumulate"):
        step([_crops(seed=0), _crops(seed=1)], None, lr=0.1, freeze_prototypes=False)


def test_unknown_compile_mode_is_refused():
    model, optimizer = _tiny()
    with pytest.raises(ValueError, match="compile='turbo'"):
        TrainStep(model, SwAVLoss(n_crops=5), optimizer, compile_mode="turbo")


def test_step_leaves_the_callers_crops_alone():
    model, optimizer = _tiny()
    crops = _crops()
    before = copy.deepcopy(crops)
    TrainStep(model, SwAVLoss(n_crops=5), optimizer)(crops, None, lr=0.1, freeze_prototypes=False)
    assert all(torch.equal(a, b) for a, b in zip(crops, before))


def _in_fresh_process(test_id: str) -> bool:
    """Run this test again in a new interpreter (state left by earlier tests, such as a
    kernel already compiled or an op's first call already made, would hide what a new
    training run meets). Returns True where the caller is that new process."""
    if os.environ.get("FASTSWAV_FRESH_PROCESS") == test_id:
        return True
    # pytest in a process that ends with os._exit once its report is flushed: with torch
    # 2.11 a process that compiled could wait minutes at exit for inductor's workers.
    ends_at_once = ("import os, sys, pytest\ncode = int(pytest.main(sys.argv[1:]))\n"
                    "sys.stdout.flush(); sys.stderr.flush(); os._exit(code)")
    done = subprocess.run(
        [sys.executable, "-c", ends_at_once, "-q", "-p", "no:cacheprovider",
         f"{__file__}::{test_id}"],
        env=dict(os.environ, FASTSWAV_FRESH_PROCESS=test_id), capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "1 passed" in done.stdout, done.stdout[-2000:]
    return False


@pytest.mark.cuda
def test_reduce_overhead_step_runs_in_cuda_graphs_with_the_fused_loss_and_queue():
    """--compile=reduce-overhead, from a fresh process: same training as eager, the fused
    loss and the queue push inside recorded CUDA graphs from the first steps on (no
    cudagraph skip: a host sync or copy in the step, or a tensor an op kept from its first
    call, would cause one or fail the pool check)."""
    if not _in_fresh_process("test_reduce_overhead_step_runs_in_cuda_graphs_with_the_fused_loss_and_queue"):
        return
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    def run(mode):
        torch.manual_seed(0)
        model = SwAVModel("resnet18", hidden_dim=16, out_dim=8, n_prototypes=7,
                          small_images=True, width=4).cuda()
        optimizer = LARS(lars_param_groups(model, True), lr=0.1, weight_decay=1e-4)
        step = TrainStep(model, SwAVLoss(n_crops=5, crops_for_assign=(0, 1)), optimizer,
                         compile_mode=mode)
        queue = FeatureQueue(2, 12, 8, device="cuda")
        losses = [step([c.cuda() for c in _crops(seed=i)], queue, lr=0.1, freeze_prototypes=False)[0]
                  for i in range(5)]
        return torch.stack(losses).cpu(), queue.embeddings.cpu()

    counters.clear()
    graphed = run("reduce-overhead")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None, "no CUDA graph tree was made"
    recorded = int(repr(manager.graph_counter)[len("count("):-1])
    assert recorded >= 2, f"{recorded} CUDA graph(s) recorded: expected the forward and the backward"
    eager = run("none")
    assert torch.allclose(graphed[0], eager[0], rtol=1e-3, atol=1e-4)
    assert torch.allclose(graphed[1], eager[1], atol=1e-3)
