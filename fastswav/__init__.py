"""fastswav: SwAV self-supervised pretraining, fast on GPUs and exact on the CPU."""
from .loss import SwAVLoss, swav_loss
from .queue import FeatureQueue
from .ops.teacher import sinkhorn_knopp, teacher_student_cross_entropy  # noqa: F401 (DINO-style teacher ops)

__version__ = "0.1.0"
__all__ = ["FeatureQueue", "SwAVLoss", "swav_loss", "embed", "finetune", "train", "__version__"]

# fastswav.train(...) and fastswav.embed(...): the submodules, imported on first use (they
# pull in the model and data code) and callable (see fastswav._callable).
_CALLABLE_SUBMODULES = ("train", "embed")


def __getattr__(name):
    if name in _CALLABLE_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name == "finetune":  # fastswav.finetune(...): the function of fastswav.eval.finetune
        from .eval.finetune import finetune

        return finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
