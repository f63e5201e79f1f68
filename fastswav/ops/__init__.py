"""Ops: the pure-PyTorch reference of each op and the backend choice."""
from .loss import assignment_codes, swapped_prediction_loss, swav_loss_reference
from .prototypes import normalize_prototypes_
from .queue import ring_push_
from .sinkhorn import swav_codes

__all__ = [
    "assignment_codes",
    "normalize_prototypes_",
    "ring_push_",
    "swapped_prediction_loss",
    "swav_codes",
    "swav_loss_reference",
]
