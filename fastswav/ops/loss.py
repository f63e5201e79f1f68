"""Reference SwAV loss in plain PyTorch: normalised scores, codes, swapped prediction.

Layout convention used throughout fastswav: the embeddings of all crops are stacked
crop-major, ``[n_crops * B, D]``, crop v occupying rows ``v*B:(v+1)*B`` (the order the
model's multi-crop forward produces, as in the official code).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..profiling import nvtx_range
from .sinkhorn import accumulation_dtype, swav_codes


def check_crop_layout(n_rows: int, n_crops: int, crops_for_assign: Sequence[int]) -> int:
    """Validate the crop-major layout and return the per-crop batch size B."""
    if n_crops < 2:
        raise ValueError(f"SwAV needs at least 2 crops, got n_crops={n_crops}")
    if n_rows == 0:
        raise ValueError(f"empty batch: 0 embedding rows for n_crops={n_crops} "
                         "(each crop needs at least one image)")
    if n_rows % n_crops != 0:
        raise ValueError(f"{n_rows} embedding rows do not split into n_crops={n_crops} equal crops")
    if len(crops_for_assign) == 0:
        raise ValueError("crops_for_assign is empty")
    for c in crops_for_assign:
        if not 0 <= c < n_crops:
            raise ValueError(f"crops_for_assign entry {c} is outside 0..{n_crops - 1}")
    if len(set(crops_for_assign)) != len(crops_for_assign):
        raise ValueError(f"crops_for_assign has duplicates: {list(crops_for_assign)}")
    return n_rows // n_crops


def straight_through_normalize(weight: torch.Tensor) -> torch.Tensor:
    """Rows L2-normalised in the forward; the gradient passes to ``weight`` unchanged.

    This is the official prototype update: the weights are normalised in place before the
    step and the gradient is taken with respect to the normalised rows.
    """
    return weight + (F.normalize(weight.detach(), dim=1) - weight.detach())


def swapped_prediction_loss(
    scores: torch.Tensor,
    codes: torch.Tensor,
    n_crops: int,
    crops_for_assign: Sequence[int],
    temperature: float = 0.1,
) -> torch.Tensor:
    """Cross-entropy of every crop's prediction against the codes of the other crops.

    Args:
        scores: ``[n_crops * B, K]`` prototype scores (crop-major).
        codes: ``[A, B, K]`` codes of the A assigned crops, ``A == len(crops_for_assign)``.
        temperature: softmax temperature of the predictions.

    Returns:
        scalar float32: mean over assigned crops s of the mean over the other crops v of
        ``-mean_b sum_k codes[s, b, k] * log_softmax(scores_v / temperature)[b, k]``.
        Each crop's log-softmax is computed once, not once per (s, v) pair.
    """
    batch = check_crop_layout(scores.shape[0], n_crops, crops_for_assign)
    n_protos = scores.shape[1]
    if codes.shape != (len(crops_for_assign), batch, n_protos):
        raise ValueError(
            f"codes must be [{len(crops_for_assign)}, {batch}, {n_protos}], got {tuple(codes.shape)}"
        )
    log_p = F.log_softmax(scores.to(accumulation_dtype(scores)) / temperature, dim=1).view(n_crops, batch, n_protos)
    log_p_all = log_p.sum(dim=0)  # [B, K]: sum over every crop, then remove the crop itself
    total = log_p.new_zeros(())
    for i, crop in enumerate(crops_for_assign):
        others = log_p_all - log_p[crop]
        total = total - (codes[i].to(log_p.dtype) * others).sum() / (batch * (n_crops - 1))
    return total / len(crops_for_assign)


@torch.no_grad()
def assignment_codes(
    scores: torch.Tensor,
    n_crops: int,
    crops_for_assign: Sequence[int],
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queue_scores: Optional[torch.Tensor] = None,
    queue_valid: Optional[torch.Tensor] = None,
    group=None,
) -> torch.Tensor:
    """Codes ``[A, B, K]`` of the assigned crops by Sinkhorn-Knopp.

    ``queue_scores`` (``[A, L, K]``), when given, are prepended to each assigned crop's
    scores before Sinkhorn (the official order) and dropped from its output; ``queue_valid``
    (0-dim 0/1 tensor, default 1) says whether the queue takes part yet.
    """
    batch = check_crop_layout(scores.shape[0], n_crops, crops_for_assign)
    codes = []
    for i, crop in enumerate(crops_for_assign):
        s = scores[crop * batch:(crop + 1) * batch].detach()
        weight = None
        if queue_scores is not None:
            q_len = queue_scores.shape[1]
            s = torch.cat([queue_scores[i].to(s.dtype), s], dim=0)
            if queue_valid is not None:
                weight = torch.cat([
                    queue_valid.to(device=s.device, dtype=torch.float32).expand(q_len),
                    torch.ones(batch, device=s.device, dtype=torch.float32),
                ])
        with nvtx_range("sinkhorn"):
            q = swav_codes(s, epsilon, sinkhorn_iterations, sample_weight=weight, group=group)
        codes.append(q[-batch:])
    return torch.stack(codes)


def swav_loss_reference(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    n_crops: int,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queue: Optional[torch.Tensor] = None,
    queue_valid: Optional[torch.Tensor] = None,
    group=None,
) -> torch.Tensor:
    """The whole SwAV loss from raw embeddings and prototype weights.

    Args:
        embeddings: ``[n_crops * B, D]`` crop-major; L2-normalised here (with gradient).
        prototypes: ``[K, D]`` prototype weights; rows L2-normalised in the forward with a
            straight-through gradient (see :func:`straight_through_normalize`).
        queue: optional ``[A, L, D]`` past embeddings, one queue per assigned crop.
        queue_valid: optional 0-dim 0/1 tensor: whether the queue is used yet.

    Returns:
        scalar float32 loss (float64 for float64 embeddings).
    """
    if embeddings.dim() != 2 or prototypes.dim() != 2:
        raise ValueError("embeddings must be [n_crops*B, D] and prototypes [K, D]")
    if embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"embedding dim {embeddings.shape[1]} != prototype dim {prototypes.shape[1]}"
        )
    acc = accumulation_dtype(embeddings)
    z = F.normalize(embeddings.to(acc), dim=1)
    c = straight_through_normalize(prototypes.to(acc))
    scores = z @ c.t()
    queue_scores = None
    if queue is not None:
        if queue.dim() != 3 or queue.shape[0] != len(crops_for_assign) or queue.shape[2] != z.shape[1]:
            raise ValueError(
                f"queue must be [{len(crops_for_assign)}, L, {z.shape[1]}], got {tuple(queue.shape)}"
            )
        with torch.no_grad():
            queue_scores = F.normalize(queue.to(acc), dim=2) @ c.detach().t()
    codes = assignment_codes(
        scores, n_crops, crops_for_assign, epsilon, sinkhorn_iterations,
        queue_scores=queue_scores, queue_valid=queue_valid, group=group,
    )
    return swapped_prediction_loss(scores, codes, n_crops, crops_for_assign, temperature)
