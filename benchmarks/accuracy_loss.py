"""Accuracy of the score-matmul precisions against a float64 SwAV loss, on the CPU.

    python benchmarks/accuracy_loss.py             # official shape (about 2 min on 2 cores)
    python benchmarks/accuracy_loss.py --small     # a quick look

Each candidate rounds the operands of the three matmuls of the loss (scores, and the two
backward products with dS) as the GPU would, in PyTorch on the CPU; Sinkhorn and the
cross-entropy run in float32 as in the fused kernels; everything is compared with the
float64 reference (`swav_loss_reference` on float64 inputs). The candidates:

- ieee: float32 throughout (the fused loss's exact mode);
- tf32x3: three tf32 products (big*big + big*small + small*big) for scores, float32 backward;
- tf32: operands rounded to nearest tf32 (11-bit significand) for the scores, fp16 operands
  (unit-scaled dS) for the backward: the fused loss's default;
- fp16: normalised operands cast to fp16, float32 products and outputs;
- bf16: operands cast to bf16 (scores) and bf16 backward operands;
- official_fp16: what the official apex O1 run computes: fp16 operands and fp16 outputs of
  all three matmuls, float32 Sinkhorn and log-softmax.

The matmuls run on the CPU in float32 with exactly the rounded operands; a GPU adds only its
own float32 accumulation order. The kernels' tf32 rounding is checked against
`round_to_tf32_reference` by the tests. Inputs: bf16 embeddings (the head's autocast output)
clustered around random prototypes (peaked codes, like a trained model) or plain random,
fp32 unit prototypes and an fp32 queue of unit rows. Rows go to
benchmarks/results/accuracy_loss.csv (device: the CPU; the figures do not depend on it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultWriter, shape_key  # noqa: E402

from fastswav.kernels._common import round_to_tf32_reference as rna_tf32  # noqa: E402
from fastswav.ops.loss import (assignment_codes, swapped_prediction_loss,  # noqa: E402
                               swav_loss_reference)

CANDIDATES = ("ieee", "tf32x3", "tf32", "fp16", "bf16", "official_fp16")


def _scores(x, w, inv_x, inv_w, mode):
    """Normalised scores of raw rows x against raw rows w as computed in ``mode``."""
    if mode == "ieee":
        return (x @ w.t()) * inv_x[:, None] * inv_w[None, :]
    if mode == "tf32":
        return (rna_tf32(x) @ rna_tf32(w).t()) * inv_x[:, None] * inv_w[None, :]
    if mode == "tf32x3":
        xb, wb = rna_tf32(x), rna_tf32(w)
        xs, ws = rna_tf32(x - xb), rna_tf32(w - wb)
        return (xb @ wb.t() + (xb @ ws.t() + xs @ wb.t())) * inv_x[:, None] * inv_w[None, :]
    if mode == "bf16":
        return (x.bfloat16().float() @ w.bfloat16().float().t()) * inv_x[:, None] * inv_w[None, :]
    z, c = (x * inv_x[:, None]).half().float(), (w * inv_w[:, None]).half().float()
    s = z @ c.t()
    return s.half().float() if mode == "official_fp16" else s


def _backward_mm(a, b, mode, unit):
    """a @ b of the backward in ``mode``; ``unit`` rescales dS (a) to O(1) for 16 bits."""
    if mode in ("ieee", "tf32x3"):
        return a @ b
    low = torch.bfloat16 if mode == "bf16" else torch.float16
    out = (a / unit).to(low).float() @ b.to(low).float()
    if mode == "official_fp16":
        out = out.half().float()
    return out * unit


def candidate_loss(emb, protos, queue, mode, *, n_crops, eps, temp=0.1, iters=3):
    """(loss, codes, grad_embeddings, grad_prototypes) computed as ``mode`` would."""
    assign = (0, 1)
    x = emb.float()
    w = protos.float()
    inv_x = 1 / x.norm(dim=1).clamp_min(1e-12)
    inv_w = 1 / w.norm(dim=1).clamp_min(1e-12)
    scores = _scores(x, w, inv_x, inv_w, mode).requires_grad_()
    q = queue.float().reshape(-1, queue.shape[-1])
    queue_scores = _scores(q, w, 1 / q.norm(dim=1).clamp_min(1e-12), inv_w, mode)
    codes = assignment_codes(scores.detach(), n_crops, assign, eps, iters,
                             queue_scores=queue_scores.view(queue.shape[0], queue.shape[1], -1))
    loss = swapped_prediction_loss(scores, codes, n_crops, assign, temp)
    (d_scores,) = torch.autograd.grad(loss, scores)
    batch = emb.shape[0] // n_crops
    unit = 1.0 / (temp * len(assign) * batch * (n_crops - 1))
    z = x * inv_x[:, None]
    c = w * inv_w[:, None]
    grad_z = _backward_mm(d_scores, c, mode, unit)
    grad_c = _backward_mm(d_scores.t(), z, mode, unit)
    grad_x = (grad_z - z * (z * grad_z).sum(dim=1, keepdim=True)) * inv_x[:, None]
    return loss.detach(), codes, grad_x, grad_c


def reference64(emb, protos, queue, *, n_crops, eps):
    e = emb.double().requires_grad_()
    c = protos.double().requires_grad_()
    loss = swav_loss_reference(e, c, n_crops=n_crops, epsilon=eps, queue=queue.double())
    loss.backward()
    z = F.normalize(e.detach(), dim=1)
    scores = z @ F.normalize(c.detach(), dim=1).t()
    queue_scores = F.normalize(queue.double(), dim=2) @ F.normalize(c.detach(), dim=1).t()
    codes = assignment_codes(scores, n_crops, (0, 1), eps, 3, queue_scores=queue_scores)
    return loss.detach(), codes, e.grad, c.grad


def make_inputs(batch, n_protos, dim, n_crops, q_len, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(n_protos, dim, generator=g), dim=1)
    if kind == "clustered":
        # each image near one prototype, its crops scattered around it
        centre = protos[torch.randint(0, n_protos, (batch,), generator=g)]
        emb = centre.repeat(n_crops, 1) + 0.08 * torch.randn(n_crops * batch, dim, generator=g)
        qc = protos[torch.randint(0, n_protos, (2 * q_len,), generator=g)]
        queue = F.normalize(qc + 0.08 * torch.randn(2 * q_len, dim, generator=g), dim=1)
    else:
        emb = torch.randn(n_crops * batch, dim, generator=g)
        queue = F.normalize(torch.randn(2 * q_len, dim, generator=g), dim=1)
    emb = (emb * 3.0).to(torch.bfloat16)  # raw head output, not unit length
    return emb, protos, queue.view(2, q_len, dim)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="B=32, K=500, queue 256")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    batch, n_protos, dim, n_crops, q_len = (32, 500, 128, 8, 256) if args.small else \
        (256, 3000, 128, 8, 3840)
    torch.set_grad_enabled(True)
    writer = ResultWriter("accuracy_loss", torch.device("cpu"))
    head = (f"{'inputs':10s} {'eps':>5s} {'candidate':14s} {'codes max|err|':>15s} "
            f"{'loss |err|':>11s} {'grad_emb rel':>13s} {'grad_proto rel':>15s}")
    print(f"B={batch} K={n_protos} D={dim} crops={n_crops} queue={q_len} (x2), errors vs float64")
    print(head)
    print("-" * len(head))
    for kind in ("clustered", "random"):
        emb, protos, queue = make_inputs(batch, n_protos, dim, n_crops, q_len, kind)
        for eps in (0.05, 0.02):
            start = time.time()
            ref = reference64(emb, protos, queue, n_crops=n_crops, eps=eps)
            shape = shape_key(B=batch, K=n_protos, D=dim, crops=n_crops, queue=q_len,
                              eps=eps, inputs=kind)
            for mode in CANDIDATES:
                loss, codes, gx, gc = candidate_loss(emb, protos, queue, mode, n_crops=n_crops,
                                                     eps=eps)
                errs = dict(
                    codes_max_abs_err=(codes.double() - ref[1]).abs().max().item(),
                    loss_abs_err=abs(loss.double().item() - ref[0].item()),
                    grad_emb_rel_err=((gx.double() - ref[2]).abs().max() / ref[2].abs().max()).item(),
                    grad_proto_rel_err=((gc.double() - ref[3]).abs().max() / ref[3].abs().max()).item(),
                )
                for metric, value in errs.items():
                    writer.add(mode, shape, metric, value, "")
                print(f"{kind:10s} {eps:5.2f} {mode:14s} {errs['codes_max_abs_err']:15.2e} "
                      f"{errs['loss_abs_err']:11.2e} {errs['grad_emb_rel_err']:13.2e} "
                      f"{errs['grad_proto_rel_err']:15.2e}")
            print(f"  ({time.time() - start:.0f} s; loss {ref[0].item():.5f})", flush=True)
    if not args.no_write:
        print(f"rows appended to {writer.write()}")


if __name__ == "__main__":
    main()
