"""GPU paths of the fused loss that the other CUDA tests do not reach.

- The one-launch Sinkhorn round (``sinkhorn_pass``): the tile rule picks it on a GPU only
  when the row blocks of one Sinkhorn segment (queue + batch) fill the card, i.e. with a
  long queue; tests/test_fused_loss.py's CUDA shapes (queue 871) stay on the two-kernel
  round. The shape here (B = 64, queue 3841: ragged against the 16-row pass tile) crosses
  the threshold; a CPU test checks that the rule still picks the path for it, and each CUDA
  test counts the pass kernel's launches, so the path cannot be missed silently.
- ``precision="tf32x3"`` and ``precision="bf16"`` on the tensor cores (the CPU tests run them
  under the interpreter only).

Each case compares the fused forward and backward with ``swav_loss_reference`` on fresh
random inputs. Tolerances per precision (gradients: max |error| / max |reference|), from
the accuracy table in benchmarks/NOTES_loss.md with a margin: ``ieee`` and ``tf32x3`` are
float32 products (loss rtol 1e-4, gradients 2e-4, as the other CUDA tests' exact mode);
``tf32`` loss 1e-3, gradients 5e-3; ``bf16`` operands loss 1e-2, gradients 3e-2 (as the CPU
test of that mode). bf16 inputs give bf16 gradients: at least 1e-2 (one bf16 rounding).
"""
from __future__ import annotations

import pytest
import torch

from fastswav.ops.fused_loss import swav_loss_fused
from fastswav.ops.loss import swav_loss_reference

from conftest import loss_and_grads

triton = pytest.importorskip("triton")

N_CROPS, BATCH, N_PROTOS, DIM, QUEUE_LEN = 8, 64, 3000, 128, 3841
CROPS_FOR_ASSIGN = (0, 1)
SINKHORN_ITERATIONS = 3  # the round loop runs iterations - 1 times: two one-launch rounds

# (loss rtol, gradient rtol) against the float32 reference, fp32 inputs.
TOLERANCES = {"ieee": (1e-4, 2e-4), "tf32x3": (1e-4, 2e-4), "tf32": (1e-3, 5e-3),
              "bf16": (1e-2, 3e-2)}
BF16_INPUT_GRAD_RTOL = 1e-2


def _one_launch_selected(precision: str) -> bool:
    from fastswav.kernels.tiles import loss_tiles

    return loss_tiles(True, batch=BATCH, n_protos=N_PROTOS, dim=DIM, n_crops=N_CROPS,
                      n_assign=len(CROPS_FOR_ASSIGN), queue_len=QUEUE_LEN,
                      precision=precision).one_launch_rounds


@pytest.mark.parametrize("precision", list(TOLERANCES))
def test_the_shape_selects_the_one_launch_round_on_a_gpu(precision):
    assert _one_launch_selected(precision) is True
    # and the same shape without its queue does not: the queue is what crosses the threshold
    from fastswav.kernels.tiles import loss_tiles

    assert loss_tiles(True, batch=BATCH, n_protos=N_PROTOS, dim=DIM, n_crops=N_CROPS,
                      n_assign=len(CROPS_FOR_ASSIGN), queue_len=0,
                      precision=precision).one_launch_rounds is False


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.fixture
def pass_launches(monkeypatch):
    """Counts launches of the one-launch round kernel (the loss imports it at call time)."""
    from fastswav.kernels import sinkhorn

    calls = []
    original = sinkhorn.sinkhorn_pass

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sinkhorn, "sinkhorn_pass", counted)
    return calls


# (precision, input dtype, queue_valid): every precision with fp32 inputs, the queue in use
# and not yet valid (its rows then take no part in the pass); bf16 inputs (the head's output
# under autocast) with the queue in use.
CASES = ([(p, torch.float32, v) for p in TOLERANCES for v in (1.0, 0.0)]
         + [(p, torch.bfloat16, 1.0) for p in TOLERANCES])


@pytest.mark.cuda
@pytest.mark.parametrize("precision,dtype,valid", CASES,
                         ids=[f"{p}-{str(d).split('.')[-1]}-valid{v:g}" for p, d, v in CASES])
def test_one_launch_round_matches_the_reference(precision, dtype, valid, pass_launches):
    assert _one_launch_selected(precision)
    # fresh inputs per case, reproducible
    g = torch.Generator().manual_seed(100 + CASES.index((precision, dtype, valid)))
    emb = (torch.randn(N_CROPS * BATCH, DIM, generator=g) * 2).to("cuda", dtype)
    protos = torch.randn(N_PROTOS, DIM, generator=g).to("cuda", dtype)
    queue = torch.nn.functional.normalize(
        torch.randn(len(CROPS_FOR_ASSIGN), QUEUE_LEN, DIM, generator=g), dim=2).to("cuda", dtype)
    grad_out = torch.tensor(1.5, device="cuda")
    kwargs = dict(n_crops=N_CROPS, crops_for_assign=CROPS_FOR_ASSIGN, queue=queue,
                  queue_valid=torch.tensor(valid, device="cuda"),
                  sinkhorn_iterations=SINKHORN_ITERATIONS)

    got = loss_and_grads(swav_loss_fused, emb, protos, grad_out, precision=precision, **kwargs)
    torch.cuda.synchronize()
    assert len(pass_launches) == SINKHORN_ITERATIONS - 1, "the one-launch round did not run"
    want = loss_and_grads(swav_loss_reference, emb, protos, grad_out, **kwargs)

    loss_rtol, grad_rtol = TOLERANCES[precision]
    if dtype == torch.bfloat16:
        grad_rtol = max(grad_rtol, BF16_INPUT_GRAD_RTOL)
    assert all(torch.isfinite(t).all() for t in got)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert torch.allclose(got[0], want[0].float(), rtol=loss_rtol, atol=0), (got[0], want[0])
    assert _max_rel(got[1], want[1]) <= grad_rtol, "embedding gradient"
    assert _max_rel(got[2], want[2]) <= grad_rtol, "prototype gradient"
