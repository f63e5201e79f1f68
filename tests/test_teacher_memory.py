"""Memory of the fused teacher, by construction: what a teacher step allocates.

One step at a shape ``[rows, K]``: Sinkhorn-Knopp targets of the teacher logits, the
teacher-student cross-entropy of student logits of the same shape, backward into the
student (the iBOT patch step; the CLS step is the same per row). Every tensor the fused
ops allocate is recorded (:class:`fastswav.ops.allocations.AllocationLog`, a
``TorchDispatchMode`` that enters fastswav's custom ops). The bound:

- the only allocations of ``rows * K`` elements or more are the targets (float32) and the
  student's gradient (the student's dtype): no ``[rows, K]`` float32 temporary;
- everything else together is at most ``AUX_FLOATS_PER_ROW_AND_PROTOTYPE * (rows + K)``
  float32 values (partial sums and scaling vectors; about 80 at the shapes below).

The three shapes of the DINOv3 heads ([8192, 98304]: iBOT patch rows at the ViT-7B's
98,304 prototypes; [128, 262144]: its CLS rows; [4096, 65536]: the default heads) are too
large for the Triton interpreter on this machine (one float32 tensor of the first is 3.2
GB), so they are checked symbolically: the same Python runs on ``meta`` tensors with the
kernel launches skipped and the GPU's tiles (the partial sums have the sizes a GPU run
allocates). That this accounting is the real one is checked at small shapes, where the
kernels run under the interpreter and record the same allocations as the symbolic run.
The plain PyTorch code's peak is recorded at the same shapes for comparison (and must be
larger), and each bound is seen to fail on a variant that materialises a ``[rows, K]``
float32 temporary.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastswav.ops import teacher as T
from fastswav.ops.allocations import AllocationLog, skipped_launches

pytest.importorskip("triton")

LARGE_SHAPES = [(8192, 98304), (128, 262144), (4096, 65536)]
SMALL_SHAPES = [(40, 300), (8, 1100), (33, 129)]
AUX_FLOATS_PER_ROW_AND_PROTOTYPE = 128
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])


def fused_step(teacher, student):
    targets = T.sinkhorn_knopp_fused(teacher, 0.07)
    rows = T.teacher_student_row_losses(student, targets, n_student_crops=1,
                                        skip_same_view=False, backend="fused")
    (rows.sum() / rows.shape[1]).backward()
    return targets


def plain_step(teacher, student):
    """DINOv3's plain code for the same step (one process): exp of the float32 logits,
    in-place normalisations, then the float32 log_softmax of the student and the product."""
    with torch.no_grad():
        q = torch.exp(teacher.float() / 0.07).t()
        n_samples, n_protos = q.shape[1], q.shape[0]
        q /= torch.sum(q)
        for _ in range(3):
            q /= torch.sum(q, dim=1, keepdim=True)
            q /= n_protos
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= n_samples
        q *= n_samples
        targets = q.t()
    lsm = F.log_softmax(student.float() / 0.1, dim=-1)
    loss = -torch.sum(targets * lsm, dim=-1).mean()
    loss.backward()
    return targets


def record(step, rows, k, dtype, *, symbolic, gpu_tiles=True):
    device = "meta" if symbolic else "cpu"
    if symbolic:
        teacher = torch.empty(rows, k, dtype=dtype, device=device)
        student = torch.empty(rows, k, dtype=dtype, device=device, requires_grad=True)
    else:
        g = torch.Generator().manual_seed(rows + k)
        teacher = torch.randn(rows, k, generator=g).to(dtype)
        student = torch.randn(rows, k, generator=g).to(dtype).requires_grad_()
    with AllocationLog() as log:
        if symbolic:
            with skipped_launches(gpu_tiles=gpu_tiles):
                step(teacher, student)
        else:
            step(teacher, student)
    return log


def check_bound(log, rows, k, dtype):
    """The bound of the module docstring; returns the bytes beyond targets and gradient."""
    big = sorted(((a.shape, a.dtype) for a in log.allocations if a.numel >= rows * k),
                 key=str)
    want = sorted([((rows, k), torch.float32), ((rows, k), dtype)], key=str)
    assert big == want, f"[rows, K] allocations {big}, expected targets and gradient {want}"
    required = rows * k * (4 + torch.empty((), dtype=dtype).element_size())
    aux = log.total_bytes() - required
    limit = 4 * AUX_FLOATS_PER_ROW_AND_PROTOTYPE * (rows + k)
    assert aux <= limit, f"{aux} auxiliary bytes > {limit}"
    assert log.peak_bytes <= required + limit
    return aux


@pytest.mark.parametrize("rows,k,dtype", [(*SMALL_SHAPES[0], torch.bfloat16),
                                          (*SMALL_SHAPES[1], torch.float32),
                                          (*SMALL_SHAPES[2], torch.bfloat16)],
                         ids=["bf16", "fp32", "bf16-odd"])
def test_interpreter_run_allocates_what_the_symbolic_run_counts(rows, k, dtype):
    """Kernels really run (TRITON_INTERPRET=1): the bound holds, and the allocations (all of
    nonzero size; the interpreter's own empty placeholders aside) equal the symbolic run's
    with the same tiles."""
    real = record(fused_step, rows, k, dtype, symbolic=False)
    check_bound(real, rows, k, dtype)
    symbolic = record(fused_step, rows, k, dtype, symbolic=True, gpu_tiles=False)
    sizes = [(a.op, a.shape, a.dtype) for a in real.allocations if a.nbytes]
    assert sizes == [(a.op, a.shape, a.dtype) for a in symbolic.allocations if a.nbytes]


@DTYPES
@pytest.mark.parametrize("rows,k", LARGE_SHAPES)
def test_large_shapes_bound_and_the_plain_peak(rows, k, dtype):
    fused = record(fused_step, rows, k, dtype, symbolic=True)
    check_bound(fused, rows, k, dtype)
    plain = record(plain_step, rows, k, dtype, symbolic=True)
    fp32_matrix = 4 * rows * k
    # the plain code holds several float32 [rows, K] tensors at once; fused: the targets,
    # the gradient and vectors
    assert plain.peak_bytes >= 3 * fp32_matrix
    assert fused.peak_bytes < plain.peak_bytes / 1.5


def _leaky_sinkhorn(impl):
    def leaky(logits, *args):
        shifted = logits.float() - 1.0  # a [rows, K] float32 temporary
        del shifted
        return impl(logits, *args)
    return leaky


def _leaky_backward(ce_backward):
    def leaky(grad_rows, student, *args, **kwargs):
        probs = torch.softmax(student.float(), dim=-1)  # the log-softmax a plain loop keeps
        del probs
        return ce_backward(grad_rows, student, *args, **kwargs)
    return leaky


@pytest.mark.parametrize("leak", ["sinkhorn", "ce_backward"])
def test_the_bound_fails_on_a_float32_temporary(monkeypatch, leak):
    from fastswav.kernels import teacher as kernels

    if leak == "sinkhorn":
        monkeypatch.setattr(T, "_sinkhorn_fused_impl", _leaky_sinkhorn(T._sinkhorn_fused_impl))
    else:
        monkeypatch.setattr(kernels, "ce_backward", _leaky_backward(kernels.ce_backward))
    rows, k = LARGE_SHAPES[0]
    log = record(fused_step, rows, k, torch.bfloat16, symbolic=True)
    with pytest.raises(AssertionError, match="rows, K"):
        check_bound(log, rows, k, torch.bfloat16)
    small = record(fused_step, *SMALL_SHAPES[-1], torch.bfloat16, symbolic=False)
    with pytest.raises(AssertionError, match="rows, K"):
        check_bound(small, *SMALL_SHAPES[-1], torch.bfloat16)


def test_memory_table_rows_land_in_the_results_csv(monkeypatch, tmp_path, capsys):
    """``bench_teacher.py --memory`` writes the table it prints, one row per variant and
    shape, so that docs/loss.md's memory table quotes recorded rows."""
    import csv
    import importlib.util
    import sys
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location("bench_teacher_under_test",
                                                  benchmarks / "bench_teacher.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys.modules["common"], "RESULTS_DIR", tmp_path)
    assert bench.main(["--memory"]) == 0
    with open(tmp_path / "bench_teacher_memory.csv") as f:
        rows = list(csv.DictReader(f))
    expected = bench.memory_table()
    assert len(rows) == 2 * len(expected)
    for (rows_k, plain, fused), plain_row, fused_row in zip(expected, rows[::2], rows[1::2]):
        assert plain_row["variant"] == "plain_dinov3" and fused_row["variant"] == "fused"
        assert plain_row["shape"] == fused_row["shape"] == f"rows={rows_k[0]} K={rows_k[1]} dtype=bf16"
        assert float(plain_row["value"]) == pytest.approx(plain, rel=1e-5)
        assert float(fused_row["value"]) == pytest.approx(fused, rel=1e-5)
        assert plain_row["device"].startswith("meta")
    assert "plain/fused" in capsys.readouterr().out
