"""Public SwAV loss: ``SwAVLoss`` (module) and ``swav_loss`` (functional).

Both take raw embeddings and prototype weights and return the scalar loss. They run the
fused kernels on CUDA where available and the exact PyTorch reference elsewhere
(``FASTSWAV_BACKEND`` forces one; see :mod:`fastswav.ops.backend`).

Example, with your own network::

    from fastswav import SwAVLoss
    criterion = SwAVLoss(n_crops=8)                  # 2 large + 6 small crops
    z = head(trunk(images))                          # [8 * B, 128], crop-major
    loss = criterion(z, prototypes.weight)           # prototypes.weight: [K, 128]
    loss.backward()

Prototype rows are L2-normalised in the forward, with the gradient taken with respect to
the normalised rows (the official update); keep them at unit norm between steps with
``fastswav.ops.normalize_prototypes_`` as the official code does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernels._common import DEFAULT_PRECISION, layout_error  # torch only: needs no Triton
from .ops.backend import log, loss_backend
from .ops.loss import check_crop_layout, swav_loss_reference
from .queue import FeatureQueue


_float64_logged: list = []  # non-empty once the float64 line has been logged
_layout_logged: list = []  # likewise for a crop layout beyond the fused kernels


def swav_loss(
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
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor:
    """SwAV swapped-prediction loss.

    Args:
        embeddings: ``[n_crops * B, D]``, crop-major (crop v in rows ``v*B:(v+1)*B``).
        prototypes: ``[K, D]`` prototype weights.
        n_crops: number of crops per image (all resolutions together).
        crops_for_assign: crops whose codes are predicted by the others.
        temperature: softmax temperature of the predictions (0.1 in the paper).
        epsilon: Sinkhorn regularisation (0.05).
        sinkhorn_iterations: Sinkhorn rounds (3).
        queue: optional ``[len(crops_for_assign), L, D]`` past embeddings.
        queue_valid: optional 0-dim 0/1 tensor: whether the queue takes part yet.
        group: process group whose samples share the Sinkhorn marginals.
        precision: matmul precision of the fused path (``"tf32"``, ``"tf32x3"``, ``"bf16"``,
            or ``"ieee"``, the exact mode; see :func:`fastswav.ops.fused_loss.swav_loss_fused`).
            The reference path is always exact.

    Returns:
        scalar loss: float32, or float64 for float64 embeddings. float64 inputs (embeddings
        or prototypes) always take the exact reference (the fused kernels compute in
        float32), so the result's dtype never depends on the device or backend.
    """
    kwargs = dict(
        n_crops=n_crops, crops_for_assign=tuple(crops_for_assign), temperature=temperature,
        epsilon=epsilon, sinkhorn_iterations=sinkhorn_iterations, queue=queue,
        queue_valid=queue_valid, group=group,
    )
    # Layout first (shapes only, no sync): an empty or ragged batch is a ValueError on every
    # backend, before any kernel sees it.
    check_crop_layout(embeddings.shape[0], n_crops, kwargs["crops_for_assign"])
    if embeddings.dtype == torch.float64 or prototypes.dtype == torch.float64:
        if not _float64_logged:
            _float64_logged.append(True)
            log.info("float64 inputs: the SwAV loss takes the float64 PyTorch reference (the "
                     "fused kernels compute in float32)")
        return swav_loss_reference(embeddings, prototypes, **kwargs)
    too_large = layout_error(n_crops, kwargs["crops_for_assign"])
    if too_large and not _layout_logged:
        _layout_logged.append(True)
        log.info("%s: the SwAV loss takes the PyTorch reference", too_large)
    if not too_large and loss_backend(embeddings.device) == "fused":
        from .ops.fused_loss import swav_loss_fused

        return swav_loss_fused(embeddings, prototypes, precision=precision, **kwargs)
    return swav_loss_reference(embeddings, prototypes, **kwargs)


class SwAVLoss(nn.Module):
    """SwAV loss as a module; optionally reads and feeds a :class:`FeatureQueue`.

    ``forward(embeddings, prototypes, queue=None)``: when a queue is given, its contents
    join Sinkhorn once it is full, and the (normalised, detached) embeddings of the
    assigned crops are pushed into it after the codes are computed, as in the official code.
    """

    def __init__(self, n_crops: int, crops_for_assign: Sequence[int] = (0, 1),
                 temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, group=None, precision: str = DEFAULT_PRECISION):
        super().__init__()
        check_crop_layout(n_crops * 1, n_crops, crops_for_assign)
        self.n_crops = n_crops
        self.crops_for_assign = tuple(crops_for_assign)
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.group = group
        self.precision = precision

    def forward(self, embeddings: torch.Tensor, prototypes: torch.Tensor,
                queue: Optional[FeatureQueue] = None) -> torch.Tensor:
        loss = swav_loss(
            embeddings, prototypes, n_crops=self.n_crops, crops_for_assign=self.crops_for_assign,
            temperature=self.temperature, epsilon=self.epsilon,
            sinkhorn_iterations=self.sinkhorn_iterations,
            queue=None if queue is None else queue.embeddings,
            queue_valid=None if queue is None else queue.valid(),
            group=self.group, precision=self.precision,
        )
        if queue is not None:
            batch = check_crop_layout(embeddings.shape[0], self.n_crops, self.crops_for_assign)
            # Normalised in the queue's own precision (at least float32), stored in its dtype.
            acc = torch.promote_types(queue.embeddings.dtype, torch.float32)
            z = F.normalize(embeddings.detach().to(acc), dim=1).view(self.n_crops, batch, -1)
            # views by Python ints and one stack: no index tensor copied from the host
            queue.push(torch.stack([z[c] for c in self.crops_for_assign]))
        return loss

    def extra_repr(self) -> str:
        return (f"n_crops={self.n_crops}, crops_for_assign={self.crops_for_assign}, "
                f"temperature={self.temperature}, epsilon={self.epsilon}, "
                f"sinkhorn_iterations={self.sinkhorn_iterations}")
