"""Feature queue: the reference ring buffer against the official shift-by-copy queue, and the
compiled fastswav._C op (CPU here, CUDA where present) against the reference."""
import os

import pytest
import torch

from fastswav import FeatureQueue
from fastswav.ops import queue_ext
from fastswav.ops.queue import ring_in_official_order, ring_push_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _env_set(name):
    return os.environ.get(name, "0") not in ("", "0")


@pytest.fixture(scope="module")
def extension():
    """fastswav._C: missing is a failure (CI must build it) unless FASTSWAV_NO_EXT is set."""
    try:
        from fastswav import _C
    except ImportError as exc:
        if _env_set("FASTSWAV_NO_EXT"):
            pytest.skip("FASTSWAV_NO_EXT is set, so fastswav._C was not built")
        pytest.fail(f"fastswav._C is not built ({exc}); reinstall with a C++ compiler, "
                    "or set FASTSWAV_NO_EXT=1 to skip the extension tests")
    return _C


@pytest.fixture(scope="module")
def cuda_extension(extension):
    if not extension.WITH_CUDA:
        if _env_set("FASTSWAV_NO_CUDA_EXT"):
            pytest.skip("FASTSWAV_NO_CUDA_EXT is set, so fastswav._C has no CUDA kernel")
        pytest.fail("fastswav._C was built without CUDA on a machine with a GPU; reinstall "
                    "with nvcc and CUDA_HOME, or set FASTSWAV_NO_CUDA_EXT=1 to skip")
    return extension


def _official_push(queue, new):
    """The official SwAV queue update: shift everything back by a batch, newest first."""
    batch = new.shape[1]
    queue[:, batch:] = queue[:, :-batch].clone()
    queue[:, :batch] = new


def _state(n_assign, length, dim, dtype=torch.float32, device="cpu", start=0):
    buffer = torch.zeros(n_assign, length, dim, dtype=dtype, device=device)
    write_pos = torch.tensor(start, dtype=torch.int64, device=device)
    filled = torch.zeros((), dtype=torch.int64, device=device)
    return buffer, write_pos, filled


# --- the reference ring ----------------------------------------------------------------------

@pytest.mark.parametrize("length,batch", [(12, 4), (12, 12), (12, 1), (30, 6)])
def test_ring_matches_official_shift_queue(length, batch):
    gen = torch.Generator().manual_seed(length * 100 + batch)
    buffer, write_pos, filled = _state(2, length, 5)
    official = torch.zeros(2, length, 5)
    for _ in range(5 * length // batch + 3):  # several full wrap-arounds
        new = torch.randn(2, batch, 5, generator=gen)
        ring_push_(buffer, write_pos, filled, new)
        _official_push(official, new)
        assert torch.equal(ring_in_official_order(buffer, write_pos, batch), official)


@pytest.mark.parametrize("length,batch", [(12, 4), (10, 3), (7, 7), (5, 1)])
def test_ring_fill_state_and_validity(length, batch):
    queue = FeatureQueue(n_assign=2, length=length, dim=3)
    assert queue.length == length and not queue.is_full() and queue.valid().item() == 0.0
    for step in range(1, 4 * length // batch + 2):
        queue.push(torch.randn(2, batch, 3))
        pushed = step * batch
        assert queue.write_pos.item() == pushed % length
        assert queue.filled.item() == min(pushed, length)
        assert queue.is_full() == (pushed >= length)
        assert queue.valid().item() == (1.0 if pushed >= length else 0.0)
        assert queue.valid().dtype == torch.float32 and queue.valid().dim() == 0


def test_ring_rows_land_at_the_write_position_when_batch_does_not_divide_length():
    length, batch = 10, 3
    buffer, write_pos, filled = _state(1, length, 1)
    expected = torch.zeros(length)
    for step in range(11):
        values = torch.arange(batch, dtype=torch.float32) + 100 * step
        slots = [(step * batch + i) % length for i in range(batch)]
        expected[slots] = values
        ring_push_(buffer, write_pos, filled, values.view(1, batch, 1))
        assert torch.equal(buffer[0, :, 0], expected)


def test_ring_rejects_bad_shapes():
    buffer, write_pos, filled = _state(2, 8, 4)
    with pytest.raises(ValueError):
        ring_push_(buffer, write_pos, filled, torch.zeros(3, 2, 4))
    with pytest.raises(ValueError):
        ring_push_(buffer, write_pos, filled, torch.zeros(2, 9, 4))


def test_state_dict_round_trip():
    queue = FeatureQueue(n_assign=2, length=9, dim=4)
    for _ in range(4):
        queue.push(torch.randn(2, 4, 4))
    state = queue.state_dict()
    assert set(state) == {"embeddings", "write_pos", "filled"}
    restored = FeatureQueue(n_assign=2, length=9, dim=4)
    restored.load_state_dict(state)
    new = torch.randn(2, 4, 4)
    queue.push(new)
    restored.push(new)
    for name in ("embeddings", "write_pos", "filled"):
        assert torch.equal(getattr(queue, name), getattr(restored, name)), name


# --- the extension, CPU --------------------------------------------------------------------

def _compare_with_reference(push, device, dtype, n_assign, length, batch, dim, start, steps,
                            new_dtype=None):
    """Runs ``push`` and the reference side by side; both must agree bit for bit."""
    gen = torch.Generator().manual_seed(1000 * length + 10 * batch + dim)
    ours = _state(n_assign, length, dim, dtype, device, start)
    ref = _state(n_assign, length, dim, dtype, device, start)
    for step in range(steps):
        new = torch.randn(n_assign, batch, dim, generator=gen).to(device, new_dtype or dtype)
        push(*ours, new)
        ring_push_(*ref, new)
        for got, want, name in zip(ours, ref, ("buffer", "write_pos", "filled")):
            assert torch.equal(got, want), f"{name} differs after push {step}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length,batch,dim", [(12, 4, 8), (10, 3, 5), (7, 7, 128), (5, 1, 3),
                                              (64, 24, 16)])
def test_extension_cpu_matches_reference(extension, dtype, length, batch, dim):
    steps = 4 * length // batch + 3  # several wrap-arounds, landing at every offset when B∤L
    _compare_with_reference(torch.ops.fastswav.queue_push_, "cpu", dtype, 2, length, batch, dim,
                            start=0, steps=steps)


def test_extension_cpu_casts_and_handles_odd_inputs(extension):
    # fp32 rows into a bf16 queue (cast like the reference), a start position outside [0, L)
    # (reduced modulo L like the reference), and non-contiguous new rows.
    _compare_with_reference(torch.ops.fastswav.queue_push_, "cpu", torch.bfloat16, 3, 11, 4, 6,
                            start=-5, steps=9, new_dtype=torch.float32)
    buffer, write_pos, filled = _state(2, 6, 4)
    ref = _state(2, 6, 4)
    new = torch.randn(4, 3, 2).transpose(0, 2)  # [2, 3, 4], not contiguous
    torch.ops.fastswav.queue_push_(buffer, write_pos, filled, new)
    ring_push_(*ref, new)
    assert torch.equal(buffer, ref[0]) and write_pos.item() == 3 and filled.item() == 3


def test_extension_rejects_bad_arguments(extension):
    push = torch.ops.fastswav.queue_push_
    buffer, write_pos, filled = _state(2, 8, 4)
    with pytest.raises(RuntimeError, match="new rows"):
        push(buffer, write_pos, filled, torch.zeros(3, 2, 4))
    with pytest.raises(RuntimeError, match="cannot push"):
        push(buffer, write_pos, filled, torch.zeros(2, 9, 4))
    with pytest.raises(RuntimeError, match="write_pos"):
        push(buffer, write_pos.int(), filled, torch.zeros(2, 2, 4))
    with pytest.raises(RuntimeError, match="contiguous"):
        push(torch.zeros(8, 2, 4).transpose(0, 1), write_pos, filled, torch.zeros(2, 2, 4))


def _reference_forced():
    return os.environ.get("FASTSWAV_BACKEND", "").strip().lower() == "reference"


def test_feature_queue_pushes_through_the_extension(extension, monkeypatch):
    if _reference_forced():
        pytest.skip("FASTSWAV_BACKEND=reference: FeatureQueue uses the reference ring")
    assert "cpu" in queue_ext._EXT_DEVICES, "the extension is built but FeatureQueue ignores it"

    def reference_called(*args):
        raise AssertionError("FeatureQueue.push fell back to the reference ring")

    monkeypatch.setattr(queue_ext, "ring_push_", reference_called)
    queue = FeatureQueue(n_assign=2, length=8, dim=4)
    queue.push(torch.randn(2, 3, 4))
    assert queue.write_pos.item() == 3 and queue.filled.item() == 3


def test_compiled_step_compiles_once_as_the_position_moves(extension):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(5, 8, generator=gen)
    queue, reference = FeatureQueue(2, 12, 8), FeatureQueue(2, 12, 8)

    def step(queue, z):
        queue.push(z)
        return (queue.embeddings @ prototypes.T) * queue.valid()

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for i in range(7):  # B=5 does not divide L=12: positions 5, 10, 3, 8, 1, 6, 11
        z = torch.randn(2, 5, 8, generator=gen)
        out = compiled(queue, z)
        ring_push_(reference.embeddings, reference.write_pos, reference.filled, z)
        expected = (reference.embeddings @ prototypes.T) * reference.valid()
        torch.testing.assert_close(out, expected)
        for name in ("embeddings", "write_pos", "filled"):
            assert torch.equal(getattr(queue, name), getattr(reference, name)), (name, i)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    if not _reference_forced():
        assert any("queue_push_" in str(g.code) for g in counter.graphs), "op not in the graph"


# --- the extension, CUDA -------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length,batch,dim", [(3840, 256, 128), (100, 64, 128), (10, 3, 5),
                                              (7, 7, 3), (65536, 64, 128)])
def test_extension_cuda_matches_reference(cuda_extension, dtype, length, batch, dim):
    steps = min(4 * length // batch + 3, 70)
    _compare_with_reference(torch.ops.fastswav.queue_push_, "cuda", dtype, 2, length, batch, dim,
                            start=0, steps=steps)


@pytest.mark.cuda
def test_extension_cuda_odd_inputs(cuda_extension):
    _compare_with_reference(torch.ops.fastswav.queue_push_, "cuda", torch.bfloat16, 3, 11, 4, 6,
                            start=-5, steps=9, new_dtype=torch.float32)
    # new rows at an odd element offset force the narrow-word copy path
    buffer, write_pos, filled = _state(2, 9, 5, torch.float16, "cuda")
    ref = _state(2, 9, 5, torch.float16, "cuda")
    for _ in range(7):
        new = torch.randn(2 * 4 * 5 + 1, device="cuda", dtype=torch.float16)[1:].view(2, 4, 5)
        torch.ops.fastswav.queue_push_(buffer, write_pos, filled, new)
        ring_push_(*ref, new)
        assert torch.equal(buffer, ref[0]) and torch.equal(write_pos, ref[1])


@pytest.mark.cuda
def test_extension_cuda_push_does_not_sync(cuda_extension):
    queue = FeatureQueue(2, 3840, 128, device="cuda")
    z = torch.randn(2, 256, 128, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            queue.push(z)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert queue.write_pos.item() == (20 * 256) % 3840 and queue.is_full()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extension_cuda_graph_capture_and_replay(cuda_extension, dtype):
    length, batch, dim = 40, 16, 128  # B does not divide L: every replay moves the offset
    queue = FeatureQueue(2, length, dim, dtype=dtype, device="cuda")
    reference = FeatureQueue(2, length, dim, dtype=dtype, device="cuda")
    static_z = torch.zeros(2, batch, dim, device="cuda", dtype=dtype)
    prototypes = torch.randn(30, dim, device="cuda", dtype=dtype)

    def step():
        queue.push(static_z)
        return (queue.embeddings @ prototypes.T) * queue.valid().to(dtype)

    side = torch.cuda.Stream()  # warm up off the default stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    reference.push(static_z)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the kernels without running them
        static_out = step()

    gen = torch.Generator(device="cuda").manual_seed(0)
    for i in range(12):
        static_z.copy_(torch.randn(2, batch, dim, device="cuda", generator=gen).to(dtype))
        graph.replay()
        reference.push(static_z)
        expected = (reference.embeddings @ prototypes.T) * reference.valid().to(dtype)
        for name in ("embeddings", "write_pos", "filled"):
            assert torch.equal(getattr(queue, name), getattr(reference, name)), (name, i)
        torch.testing.assert_close(static_out, expected)
