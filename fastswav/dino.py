"""Drop-in DINOv2 / DINOv3 loss classes over fastswav's fused teacher ops.

``DINOLoss``, ``iBOTPatchLoss`` and ``SinkhornKnoppTeacher`` keep the public API of
``dinov2.loss`` and ``dinov3.loss``: the same constructor arguments and defaults, method
names, argument names and defaults, the ``center`` buffer (the only state-dict key, so
checkpoints move both ways) and the centering attributes (``updated``, ``reduce_handle``,
``async_batch_center``). The two releases differ; ``flavor="dinov2"`` or ``"dinov3"`` (the
default) picks which one a class follows, as each class docstring lists::

    from fastswav.dino import DINOLoss, iBOTPatchLoss    # was: from dinov3.loss import ...

What runs differently: Sinkhorn-Knopp centering and the cross-entropies are
:func:`fastswav.sinkhorn_knopp` and the fused teacher-student cross-entropy (Triton on CUDA:
no ``[rows, K]`` float32 temporary besides the targets and the student's gradient; the
PyTorch reference elsewhere), computed in float32 whatever the input dtype, in the log
domain (finite at any temperature). Softmax centering (``softmax_center_teacher``,
``update_center``, ``reduce_center_update``, ``apply_center_update``) is the published plain
PyTorch. Sums run over ``group``: a process group, a zero-argument callable returning one
(called at each use, as DINOv3 calls ``get_process_subgroup()``: pass
``dinov3.distributed.get_process_subgroup``), or None for the world (DINOv2). It is a
constructor argument and a settable attribute.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .ops.sinkhorn import all_reduce_
from .ops.teacher import sinkhorn_knopp, teacher_student_row_losses

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]
GroupSpec = Union[None, "dist.ProcessGroup", Callable[[], Optional["dist.ProcessGroup"]]]
FLAVORS = ("dinov2", "dinov3")


def _check_flavor(flavor: str) -> str:
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    return flavor


def _resolve(group: GroupSpec):
    return group() if callable(group) else group


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _group_size(group) -> int:
    return dist.get_world_size(group) if _distributed() else 1


def _rows_of(tensors: TensorOrList) -> "tuple[torch.Tensor, int]":
    """One crop-major ``[n * B, K]`` tensor of n crops and n, from a ``[n, B, K]`` tensor, a
    ``[B, K]`` tensor (n = 1) or a list of ``[B, K]`` tensors. A view when the pieces are
    consecutive rows of one contiguous buffer (``tensor.chunk``), else one concatenation."""
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


def _cross_entropy_rows(student: torch.Tensor, teacher: torch.Tensor,
                        student_temp: float) -> torch.Tensor:
    """-sum(t * log_softmax(s / student_temp), -1) per row of ``[..., K]`` tensors
    (float32, fused on CUDA); the shape of ``student`` less its last dimension."""
    k = student.shape[-1]
    rows = teacher_student_row_losses(student.reshape(-1, k), teacher.reshape(-1, k),
                                      n_student_crops=1, n_teacher_crops=1,
                                      student_temp=student_temp, skip_same_view=False)[0]
    return rows.view(student.shape[:-1])


class _SoftmaxCentering(nn.Module):
    """The softmax-centering state and methods both losses share (plain PyTorch, as
    published): an EMA ``center`` of the teacher's outputs, reduced asynchronously."""

    def __init__(self, center_shape, student_temp, center_momentum, flavor, group):
        super().__init__()
        self.flavor = _check_flavor(flavor)
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        fill = math.nan if flavor == "dinov3" else 0.0  # DINOv3 fills NaN until init_weights
        self.register_buffer("center", torch.full(center_shape, fill))
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None
        self._n_centered = None
        self._group = group

    @property
    def group(self) -> GroupSpec:
        return self._group

    @group.setter
    def group(self, value: GroupSpec) -> None:
        self._group = value

    def init_weights(self) -> None:
        """Zero the center (DINOv3; harmless under ``flavor="dinov2"``, which starts at 0)."""
        self.center.zero_()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp, update_centers=True):
        """softmax((teacher_output - center) / teacher_temp) over the last dimension, after
        applying a pending center update (DINOv3 skips it with ``update_centers=False``;
        DINOv2 has no such argument and always applies it)."""
        if update_centers:
            self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_output) -> None:
        """Start the center update for this batch (applied at the next
        ``softmax_center_teacher`` or ``apply_center_update``)."""
        self.reduce_center_update(teacher_output)

    def _batch_center_sum(self, teacher_output):
        return torch.sum(teacher_output, dim=0, keepdim=True)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output) -> None:
        """Sum this batch's teacher outputs and all_reduce them asynchronously over the
        group."""
        self.updated = False
        self._n_centered = len(teacher_output)
        self.async_batch_center = self._batch_center_sum(teacher_output)
        if _distributed():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True,
                                                 group=_resolve(self.group))

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """center <- center * momentum + batch mean * (1 - momentum), once per update."""
        if self.updated is False:
            world = _group_size(_resolve(self.group))
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            batch_mean = self.async_batch_center / (self._n_centered * world)
            self.center = (self.center * self.center_momentum
                           + batch_mean * (1 - self.center_momentum))
            self.updated = True


class DINOLoss(_SoftmaxCentering):
    """The DINO loss on CLS tokens: ``dinov2.loss.DINOLoss`` / ``dinov3.loss.DINOLoss``.

    Args:
        out_dim: K, the number of prototypes (the head's output size).
        student_temp, center_momentum: as the originals (0.1, 0.9).
        flavor: ``"dinov3"`` (default) or ``"dinov2"``.
        group: the process group of every sum (see the module docstring); None: the world.

    The flavors differ in:

    - ``forward``. DINOv3: ``forward(student_logits, teacher_probs, ignore_diagonal=False)``
      with ``[S, B, K]`` student logits and ``[T, B, K]`` teacher probabilities returns the
      MEAN over the (student crop, teacher crop, sample) terms of
      -sum(t * log_softmax(s / student_temp)); ``ignore_diagonal`` leaves out the pairs
      s == t (the first min(S, T) crops of both are the same views). DINOv2:
      ``forward(student_output_list, teacher_out_softmaxed_centered_list)`` with lists of
      ``[B, K]`` tensors returns the SUM over the crop pairs of the batch means (the caller
      divides). Either accepts a ``[n, B, K]`` tensor or a list of ``[B, K]`` tensors; chunks
      of one buffer are read without a copy.
    - the center: DINOv3 registers it full of NaN (``init_weights()`` zeroes it, as DINOv3's
      meta-architecture does); DINOv2 registers zeros.
    - the group: DINOv3 sums over its process subgroup, DINOv2 over the world.

    ``sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3)`` is the same in
    both: ``[B, K]`` float32 targets, rows summing to 1, over the rows of every process of the
    group. ``softmax_center_teacher`` takes ``update_centers=True`` (DINOv3's argument).
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, *,
                 flavor: str = "dinov3", group: GroupSpec = None):
        super().__init__((1, out_dim), student_temp, center_momentum, flavor, group)

    @property
    def len_teacher_output(self):
        return self._n_centered

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        """Sinkhorn-Knopp targets ``[B, K]`` float32 for the teacher logits ``[B, K]``; every
        sum (and the sample count) runs over the group."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations,
                              group=_resolve(self.group))

    def forward(self, *args, **kwargs):
        if self.flavor == "dinov3":
            return self._forward_dinov3(*args, **kwargs)
        return self._forward_dinov2(*args, **kwargs)

    def _forward_dinov3(self, student_logits, teacher_probs, ignore_diagonal=False):
        student, n_s = _rows_of(student_logits)
        teacher, n_t = _rows_of(teacher_probs)
        rows = teacher_student_row_losses(student, teacher, n_student_crops=n_s,
                                          n_teacher_crops=n_t, student_temp=self.student_temp,
                                          skip_same_view=bool(ignore_diagonal))
        n_pairs = n_s * n_t - (min(n_s, n_t) if ignore_diagonal else 0)
        return rows.sum() / (rows.shape[1] * n_pairs)

    def _forward_dinov2(self, student_output_list, teacher_out_softmaxed_centered_list):
        student, n_s = _rows_of(student_output_list)
        teacher, n_t = _rows_of(teacher_out_softmaxed_centered_list)
        rows = teacher_student_row_losses(student, teacher, n_student_crops=n_s,
                                          n_teacher_crops=n_t, student_temp=self.student_temp,
                                          skip_same_view=False)
        return rows.sum() / rows.shape[1]


class SinkhornKnoppTeacher(nn.Module):
    """DINOv3's ``SinkhornKnoppTeacher``: the iBOT patch teacher as a module, so that it can
    be ``.compile()``d (the fused path is one custom op inside the graph).

    ``forward(teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3)``:
    ``[M, K]`` targets (float32, rows summing to 1) for the ``[M, K]`` teacher logits of the
    masked patches. Every row takes part, as in the original. ``n_masked_patches_tensor`` is
    all_reduced IN PLACE over the group when torch.distributed runs (as the original does:
    afterwards it holds the group's total); that total B only scales the targets when
    ``n_iterations == 0`` (by B / the group's row count), and cancels otherwise.
    """

    def __init__(self, group: GroupSpec = None):
        super().__init__()
        self.group = group

    @torch.no_grad()
    def forward(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        group = _resolve(self.group)
        if _distributed():
            dist.all_reduce(n_masked_patches_tensor, group=group)
        targets = sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, group=group)
        if n_iterations == 0:
            rows = all_reduce_(torch.full((), float(teacher_output.shape[0]),
                                          device=targets.device), group=group)
            targets.mul_(n_masked_patches_tensor.to(targets.device, torch.float32) / rows)
        return targets


class iBOTPatchLoss(_SoftmaxCentering):  # noqa: N801 (the original's name)
    """The iBOT patch loss: ``dinov2.loss.iBOTPatchLoss`` / ``dinov3.loss.iBOTPatchLoss``.

    Args:
        patch_out_dim: K, the number of patch prototypes.
        student_temp, center_momentum: as the originals (0.1, 0.9).
        flavor: ``"dinov3"`` (default) or ``"dinov2"``.
        group: the process group of every sum (see the module docstring); None: the world.

    ``sinkhorn_knopp_teacher`` is a :class:`SinkhornKnoppTeacher` submodule in both flavors
    (DINOv3 has the module, DINOv2 a method of the same signature; a call reads the same, and
    the module holds no state, so the state dict is ``center`` alone either way). DINOv3
    compiles it in its constructor; here it is left to the caller (``.compile()`` works).

    ``forward(student_patch_tokens, teacher_patch_tokens, student_masks_flat)`` (``[B, N,
    K]``, ``[B, N, K]``, ``[B, N]`` bool): the mean over images of the mean over each image's
    masked patches of the cross-entropy. ``forward_masked(student_patch_tokens_masked,
    teacher_patch_tokens_masked, student_masks_flat, n_masked_patches=None,
    masks_weight=None)``: the masked rows only; the sum of their cross-entropies weighted by
    ``masks_weight`` (default: 1 / the image's masked count, from ``student_masks_flat``,
    which costs a host sync) over the first ``n_masked_patches`` rows, divided by the number
    of images. Flavors differ only in the center's initial value (DINOv3: NaN until
    ``init_weights()``; DINOv2: zeros) and the group (subgroup vs world); DINOv3 casts the
    tokens to float32 for the loss, DINOv2 does not: here it is always float32.
    """

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9, *,
                 flavor: str = "dinov3", group: GroupSpec = None):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum, flavor, group)
        self.sinkhorn_knopp_teacher = SinkhornKnoppTeacher(group)

    @_SoftmaxCentering.group.setter
    def group(self, value: GroupSpec) -> None:
        self._group = value
        if "sinkhorn_knopp_teacher" in self._modules:
            self.sinkhorn_knopp_teacher.group = value

    @property
    def len_teacher_patch_tokens(self):
        return self._n_centered

    def _batch_center_sum(self, teacher_patch_tokens):
        return torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        ce = _cross_entropy_rows(student_patch_tokens, teacher_patch_tokens, self.student_temp)
        per_image = (torch.sum(ce * student_masks_flat.float(), dim=-1)
                     / student_masks_flat.sum(dim=-1).clamp(min=1.0))
        return per_image.mean()

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked,
                       student_masks_flat, n_masked_patches=None, masks_weight=None):
        ce = _cross_entropy_rows(student_patch_tokens_masked, teacher_patch_tokens_masked,
                                 self.student_temp)
        if masks_weight is None:
            per_image = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[
                student_masks_flat]
        if n_masked_patches is not None:
            ce = ce[:n_masked_patches]
        return (ce * masks_weight).sum() / student_masks_flat.shape[0]


__all__: Sequence[str] = ("DINOLoss", "SinkhornKnoppTeacher", "iBOTPatchLoss", "FLAVORS")
