"""fastswav: SwAV self-supervised pretraining, fast on GPUs and exact on the CPU."""
from .loss import SwAVLoss, swav_loss
from .queue import FeatureQueue

__version__ = "0.1.0"
__all__ = ["FeatureQueue", "SwAVLoss", "swav_loss", "__version__"]
