"""Prototype row normalisation (the official step-start renormalisation)."""
from __future__ import annotations

import torch

from .sinkhorn import accumulation_dtype


@torch.no_grad()
def normalize_prototypes_(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the rows of ``weight`` ([K, D]) in place, without a copy, and return it.

    Runs outside autograd, as in the official code, so the optimizer sees the normalised
    rows as the parameter's value.
    """
    if weight.dim() != 2:
        raise ValueError(f"prototype weight must be [K, D], got shape {tuple(weight.shape)}")
    norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True, dtype=accumulation_dtype(weight))
    weight.div_(norms.clamp_min(eps).to(weight.dtype))
    return weight
