"""Drop-in DINO / DINOv2 / iBOT loss adapters over fastswav's fused teacher ops.

The classes keep the method names and signatures of DINOv2's ``DINOLoss`` and
``iBOTPatchLoss`` so that a DINOv2-style training loop can swap them in:

    dino_loss = DINOLoss(out_dim=65536)                 # was dinov2.loss.DINOLoss
    targets = dino_loss.sinkhorn_knopp_teacher(teacher_cls_out, teacher_temp=0.07)
    loss = dino_loss(student_local_out.chunk(n_local), targets.chunk(2))

``sinkhorn_knopp_teacher`` is :func:`fastswav.sinkhorn_knopp` (fused on CUDA, max-shifted:
finite at any temperature, no host sync). ``forward`` is the fused cross-entropy; like
DINOv2's ``DINOLoss.forward`` it sums over all (student, teacher) pairs of the two lists the
batch mean of -sum(t * log_softmax(s / student_temp)), and leaves the division by the number
of terms to the caller. For DINO v1's rule (skip the pair of a student crop with the
teacher's view of the same image crop, divide by the number of counted pairs), call
:func:`fastswav.teacher_student_cross_entropy` with ``skip_same_view=True``.

The student list is used without a copy when its tensors are consecutive pieces of one
buffer (as ``tensor.chunk`` gives); otherwise it is concatenated once.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.sinkhorn import all_reduce_
from .ops.teacher import sinkhorn_knopp, teacher_student_row_losses

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def _rows_of(tensors: TensorOrList) -> "tuple[torch.Tensor, int]":
    """One ``[n * B, K]`` tensor of the n ``[B, K]`` pieces, and n; a view when the pieces
    are consecutive rows of one contiguous tensor (chunks), else one concatenation."""
    if isinstance(tensors, torch.Tensor):
        if tensors.dim() == 3:
            return tensors.reshape(-1, tensors.shape[-1]), tensors.shape[0]
        return tensors, 1
    pieces = list(tensors)
    if not pieces:
        raise ValueError("empty list of outputs")
    if len(pieces) == 1:
        return pieces[0], 1
    first = pieces[0]
    base = first._base
    if (base is not None and base.is_contiguous()
            and all(p._base is base and p.is_contiguous() and p.shape == first.shape
                    and p.dtype == first.dtype for p in pieces)):
        step = first.numel()
        start = first.storage_offset() - base.storage_offset()
        if all(p.storage_offset() - base.storage_offset() == start + i * step
               for i, p in enumerate(pieces)):
            flat = base.reshape(-1)[start:start + step * len(pieces)]
            return flat.view(len(pieces) * first.shape[0], first.shape[-1]), len(pieces)
    return torch.cat(pieces), len(pieces)


class DINOLoss(nn.Module):
    """DINOv2-style DINO loss (``dinov2.loss.DINOLoss``) with fused Sinkhorn-Knopp and
    cross-entropy. Centering by softmax (``softmax_center_teacher`` / ``update_center``) is
    kept, in plain PyTorch, for loops that switch between the two."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 group=None):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.group = group
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        """Teacher targets ``[N, K]`` (float32); the sample count is summed over processes."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, group=self.group)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float):
        return F.softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch = torch.full((), float(teacher_output.shape[0]), device=teacher_output.device)
        total = all_reduce_(teacher_output.float().sum(dim=0, keepdim=True), group=self.group)
        batch = all_reduce_(batch, group=self.group)
        self.center.mul_(self.center_momentum).add_(total / batch * (1 - self.center_momentum))

    def forward(self, student_output_list: TensorOrList,
                teacher_out_softmaxed_centered_list: TensorOrList) -> torch.Tensor:
        """Sum over every (student, teacher) pair of the batch mean of
        -sum(t * log_softmax(s / student_temp), dim=-1), as DINOv2's ``DINOLoss.forward``."""
        student, n_s = _rows_of(student_output_list)
        teacher, n_t = _rows_of(teacher_out_softmaxed_centered_list)
        rows = teacher_student_row_losses(student, teacher, n_student_crops=n_s,
                                          n_teacher_crops=n_t, student_temp=self.student_temp,
                                          skip_same_view=False)
        return rows.sum() / rows.shape[1]


class iBOTPatchLoss(nn.Module):  # noqa: N801 (DINOv2's name)
    """DINOv2-style iBOT patch loss (``dinov2.loss.iBOTPatchLoss``): Sinkhorn-Knopp over the
    masked patch tokens with their count as a device tensor, and the masked cross-entropy."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, group=None):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.group = group
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float,
                               n_masked_patches_tensor: torch.Tensor,
                               n_iterations: int = 3) -> torch.Tensor:
        """Targets for ``[max_patches, K]`` teacher patch logits whose first
        ``n_masked_patches_tensor`` rows are real (a device tensor, summed over processes);
        the padded rows take no part and get zero targets. The tensor is not modified."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, group=self.group,
                              n_valid=n_masked_patches_tensor)

    def forward_masked(self, student_patch_tokens_masked: torch.Tensor,
                       teacher_patch_tokens_masked: torch.Tensor,
                       student_masks_flat: torch.Tensor,
                       n_masked_patches: Optional[int] = None,
                       masks_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-sum over masked patches of masks_weight * sum(t * log_softmax(s / T)), divided by
        the number of images, as DINOv2's ``iBOTPatchLoss.forward_masked``."""
        rows = teacher_student_row_losses(
            student_patch_tokens_masked, teacher_patch_tokens_masked, n_student_crops=1,
            n_teacher_crops=1, student_temp=self.student_temp, skip_same_view=False)[0]
        if masks_weight is None:
            # as DINOv2 (a boolean index: a host sync; DINOv2's collate passes masks_weight)
            per_image = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            rows = rows[:n_masked_patches]
        return (rows * masks_weight).sum() / student_masks_flat.shape[0]
