"""LARS (the official SwAV optimizer: SGD with momentum wrapped in LARC) and the schedule."""
from __future__ import annotations

import math
from typing import List

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as apex's LARC(clip=False)
    wraps it in the official code.

    For each parameter p with gradient g, when ||p|| > 0 and ||g|| > 0::

        d = trust * ||p|| / (||g|| + wd * ||p|| + eps) * (g + wd * p)

    otherwise ``d = g`` (LARC then applies neither adaptation nor decay); then
    ``buf = momentum * buf + d`` (``buf = d`` on the first step) and ``p -= lr * buf``.
    A param group with ``lars=False`` gets plain SGD with momentum and its own
    ``weight_decay`` (``d = g + wd * p``): the usual treatment of BN and bias parameters.
    All arithmetic is per-tensor on the device: no host synchronisation.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS: lr, momentum, weight_decay must be >= 0 and trust > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd = group["weight_decay"]
            if group["lars"]:
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                active = (p_norm > 0) & (g_norm > 0)
                trust = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                scale = torch.where(active, trust, torch.ones_like(trust))
                decay = torch.where(active, torch.full_like(trust, wd), torch.zeros_like(trust))
                updates = torch._foreach_mul(params, list(decay.unbind()))
                torch._foreach_add_(updates, grads)
                torch._foreach_mul_(updates, list(scale.unbind()))
            else:
                updates = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
            bufs = self._momentum_buffers(params, updates, group["momentum"])
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss

    def _momentum_buffers(self, params: List[torch.Tensor], updates: List[torch.Tensor],
                          momentum: float) -> List[torch.Tensor]:
        bufs, fresh = [], []
        stale_bufs, stale_updates = [], []
        for p, d in zip(params, updates):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = d.clone()
                fresh.append(state["momentum_buffer"])
            else:
                stale_bufs.append(state["momentum_buffer"])
                stale_updates.append(d)
            bufs.append(state["momentum_buffer"])
        if stale_bufs:
            torch._foreach_mul_(stale_bufs, momentum)
            torch._foreach_add_(stale_bufs, stale_updates)
        return bufs


def lars_param_groups(model: nn.Module, exclude_bn_and_bias: bool) -> List[dict]:
    """Parameter groups for :class:`LARS`; with ``exclude_bn_and_bias`` the 1-d tensors
    (BN weights and biases, linear biases) get neither adaptation nor weight decay."""
    if not exclude_bn_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    adapted, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if p.dim() <= 1 else adapted).append(p)
    return [{"params": adapted}, {"params": plain, "lars": False, "weight_decay": 0.0}]


def learning_rate(iteration: int, iters_per_epoch: int, epochs: int, base_lr: float,
                  final_lr: float, warmup_epochs: int = 0, start_warmup: float = 0.0) -> float:
    """The official per-iteration schedule: a linear warm-up from ``start_warmup`` to
    ``base_lr`` over ``warmup_epochs`` (numpy.linspace, end point included), then a cosine
    from ``base_lr`` to ``final_lr`` over the remaining iterations."""
    if iters_per_epoch < 1 or epochs < 1:
        raise ValueError("iters_per_epoch and epochs must be >= 1")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs={warmup_epochs} must lie in 0..epochs={epochs}")
    warmup_iters = iters_per_epoch * warmup_epochs
    if iteration < warmup_iters:
        if warmup_iters == 1:
            return start_warmup
        return start_warmup + (base_lr - start_warmup) * iteration / (warmup_iters - 1)
    cosine_iters = iters_per_epoch * (epochs - warmup_epochs)
    t = min(iteration - warmup_iters, cosine_iters)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / cosine_iters))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
