"""Call signatures of other self-supervised learning libraries, computed by fastswav.

``LightlyStyleSwaVLoss`` takes what lightly's ``SwaVLoss`` takes, so code written for
lightly can switch by changing one import::

    criterion = LightlyStyleSwaVLoss()          # temperature 0.1, 3 Sinkhorn rounds, eps 0.05
    high = [prototypes(z) for z in high_res_embeddings]   # scores z·C^T, one [B, K] per crop
    low = [prototypes(z) for z in low_res_embeddings]
    loss = criterion(high, low, queue_outputs=None)

Semantics (lightly's, which are the official SwAV loss expressed on scores):

- every input is a prototype *score* matrix ``[B, K]`` (the user's network already computed
  z·C^T with normalised z and C); nothing is normalised here;
- the codes are computed for **every high-resolution crop** (lightly has no
  ``crops_for_assign``): crop i's scores, with ``queue_outputs[i]`` (``[L, K]`` scores of
  past high-resolution embeddings) joining Sinkhorn when given, the queue rows dropped from
  the codes afterwards;
- the loss is the mean over high-resolution crops i of the mean over all other crops v (high
  and low) of ``-mean_b sum_k q_i[b, k] log softmax(s_v[b] / temperature)_k``; no gradient
  flows through the codes.

Where this differs from lightly's own code (all differences vanish in exact arithmetic or
are about failure modes):

- Sinkhorn is fastswav's :func:`fastswav.ops.sinkhorn.swav_codes`: each prototype row is
  shifted by its maximum before ``exp`` (the row normalisation cancels the shift), so large
  scores or a small epsilon never overflow to inf/NaN, where a plain ``exp(s / eps)`` can;
- scores are upcast to float32 for Sinkhorn and the log-softmax (float64 stays float64), so
  bf16/fp16 inputs give a float32 loss;
- fewer than 2 crops in all, or crops of different batch sizes, raise ValueError instead of
  dividing by zero or broadcasting.

Where it is the same: the constructor raises ValueError, as lightly's does, when
``sinkhorn_gather_distributed=True`` and this torch has no ``torch.distributed``; the loss
has lightly's shape ``(1,)`` (a one-element tensor, not 0-d: ``.item()`` and
``.backward()`` work on both).

Differences from :class:`fastswav.SwAVLoss`: that takes raw embeddings and prototype
weights (normalising both itself, with the official straight-through prototype gradient),
chooses the assigned crops by index (``crops_for_assign``, default the first two), uses the
queue only once it is full, and can run the fused GPU kernels. With normalised embeddings,
scores computed from normalised prototypes, and the high-resolution crops first, the two
give the same loss value.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .ops.loss import swapped_prediction_loss
from .ops.sinkhorn import swav_codes


class LightlyStyleSwaVLoss(nn.Module):
    """SwAV loss with lightly's ``SwaVLoss`` constructor and ``forward`` signature.

    Args:
        temperature: softmax temperature of the predictions (0.1).
        sinkhorn_iterations: Sinkhorn rounds (3).
        sinkhorn_epsilon: Sinkhorn regularisation (0.05).
        sinkhorn_gather_distributed: when torch.distributed runs with several processes,
            True makes Sinkhorn's marginals sum over all of them (the official behaviour);
            False keeps each process's Sinkhorn on its own batch (lightly's default).
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 sinkhorn_epsilon: float = 0.05, sinkhorn_gather_distributed: bool = False):
        super().__init__()
        if sinkhorn_gather_distributed and not dist.is_available():
            # lightly's check, with its exception type: this torch was built without it.
            raise ValueError("sinkhorn_gather_distributed=True but torch.distributed is not "
                             "available in this torch build; set "
                             "sinkhorn_gather_distributed=False")
        if temperature <= 0 or sinkhorn_epsilon <= 0:
            raise ValueError("temperature and sinkhorn_epsilon must be > 0")
        if sinkhorn_iterations < 0:
            raise ValueError(f"sinkhorn_iterations must be >= 0, got {sinkhorn_iterations}")
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_gather_distributed = sinkhorn_gather_distributed
        self._local_group = None

    def _sinkhorn_group(self):
        """None (the world) when gathering; otherwise a one-process group, so that
        fastswav's Sinkhorn, which sums over the world by default, stays local."""
        if self.sinkhorn_gather_distributed or not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() == 1:
            return None
        if self._local_group is None:
            # Collective: every process builds the loss's first forward at the same step.
            self._local_group, _ = dist.new_subgroups(group_size=1)
        return self._local_group

    def forward(self, high_resolution_outputs: List[torch.Tensor],
                low_resolution_outputs: List[torch.Tensor],
                queue_outputs: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """The loss as a one-element tensor of shape ``(1,)`` (lightly's shape); see the
        module docstring for the exact function.

        high_resolution_outputs / low_resolution_outputs: one ``[B, K]`` score tensor per crop;
        queue_outputs: None, or one ``[L, K]`` score tensor per high-resolution crop.
        """
        high = list(high_resolution_outputs)
        low = list(low_resolution_outputs)
        if not high:
            raise ValueError("SwAV needs at least one high-resolution crop (its codes are the targets)")
        crops = high + low
        if len(crops) < 2:
            raise ValueError("SwAV needs at least 2 crops in all (one to assign, one to predict it)")
        shape = crops[0].shape
        if len(shape) != 2 or any(c.shape != shape for c in crops):
            raise ValueError("every crop's scores must be [B, K] of one shape, got "
                             f"{[tuple(c.shape) for c in crops]}")
        if queue_outputs is not None and len(queue_outputs) != len(high):
            raise ValueError(f"queue_outputs needs one entry per high-resolution crop "
                             f"({len(high)}), got {len(queue_outputs)}")
        batch = shape[0]
        group = self._sinkhorn_group()
        codes = []
        with torch.no_grad():
            for i, scores in enumerate(high):
                scores = scores.detach()
                if queue_outputs is not None and queue_outputs[i] is not None:
                    past = queue_outputs[i].detach()
                    if past.dim() != 2 or past.shape[1] != shape[1]:
                        raise ValueError(f"queue_outputs[{i}] must be [L, {shape[1]}], "
                                         f"got {tuple(past.shape)}")
                    # Row order does not change Sinkhorn's result; the batch goes first so
                    # its codes are the first B rows (lightly appends the queue too).
                    scores = torch.cat([scores, past.to(scores.dtype)])
                codes.append(swav_codes(scores, self.sinkhorn_epsilon,
                                            self.sinkhorn_iterations, group=group)[:batch])
        # Crop-major stack with the high-resolution crops first: they are the assigned crops.
        loss = swapped_prediction_loss(torch.cat(crops), torch.stack(codes), len(crops),
                                       tuple(range(len(high))), self.temperature)
        return loss.reshape(1)  # lightly returns shape (1,), not a 0-d tensor

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
                f"sinkhorn_epsilon={self.sinkhorn_epsilon}, "
                f"sinkhorn_gather_distributed={self.sinkhorn_gather_distributed}")
