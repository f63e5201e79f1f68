"""fastswav: SwAV self-supervised pretraining, fast on GPUs and exact on the CPU."""
from .loss import SwAVLoss, swav_loss
from .queue import FeatureQueue
from .ops.teacher import sinkhorn_knopp, teacher_student_cross_entropy  # noqa: F401 (DINO-style teacher ops)

__version__ = "0.1.0"
__all__ = ["FeatureQueue", "SwAVLoss", "swav_loss", "__version__"]
