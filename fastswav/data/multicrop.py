"""The official SwAV multi-crop augmentation, with torchvision transforms on PIL images.

Each crop, as in the official code (facebookresearch/swav, ``src/multicropdataset.py``):
RandomResizedCrop(size, scale=(min, max)) -> RandomHorizontalFlip -> color distortion
(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, then RandomGrayscale p=0.2) -> Gaussian
blur with probability ``blur_prob``, radius uniform in [0.1, 2.0] -> ToTensor -> Normalize
(the last two fused into one step, same values).

All randomness comes from torch's global generator (the official blur draws from numpy and
``random``), so one ``torch.manual_seed`` fixes every crop of an image.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

BLUR_RADIUS = (0.1, 2.0)


class RandomGaussianBlur:
    """PIL Gaussian blur applied with probability ``p``, radius uniform in ``radius``."""

    def __init__(self, p: float, radius: Sequence[float] = BLUR_RADIUS):
        self.p = p
        self.radius = tuple(radius)

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return image
        low, high = self.radius
        radius = low + (high - low) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius={self.radius})"


class ToNormalizedTensor:
    """ToTensor + Normalize in one step: RGB PIL image -> float32 [3, H, W], (x/255 - mean)/std.

    Same values as ``Compose([ToTensor(), Normalize(mean, std)])`` to float rounding (about
    1e-6), at a third of the cost on small crops, where the two calls' overhead dominates.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.bias = -mean / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return torch.addcmul(self.bias, pixels, self.scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def color_distortion(strength: float = 1.0) -> transforms.Compose:
    """SimCLR/SwAV color distortion: jitter with p=0.8, then grayscale with p=0.2.

    ``strength`` 0 leaves out the jitter (a no-op then) but keeps the grayscale step.
    """
    steps = []
    if strength > 0:
        jitter = transforms.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength,
                                        0.2 * strength)
        steps.append(transforms.RandomApply([jitter], p=0.8))
    steps.append(transforms.RandomGrayscale(p=0.2))
    return transforms.Compose(steps)


def _check_rgb_triple(name: str, values, positive: bool) -> tuple:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values (one per RGB channel), got {len(values)}")
    if positive and min(values) <= 0:
        raise ValueError(f"{name} values must be > 0, got {values}")
    return values


def validate_crop_groups(size_crops, n_crops, min_scale, max_scale) -> tuple:
    """Check the per-group multi-crop arguments (shared by the PIL and batched paths) and
    return them as (sizes, counts, min scales, max scales) tuples of int/float."""
    groups = [tuple(size_crops), tuple(n_crops), tuple(min_scale), tuple(max_scale)]
    if len({len(g) for g in groups}) != 1 or not groups[0]:
        raise ValueError(
            "size_crops, n_crops, min_scale and max_scale need the same non-zero length, "
            f"got {', '.join(str(len(g)) for g in groups)}")
    for size in size_crops:
        if not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"size_crops must be positive integers, got {tuple(size_crops)}")
    for count in n_crops:
        if not isinstance(count, numbers.Integral) or count <= 0:
            raise ValueError(f"n_crops must be positive integers, got {tuple(n_crops)}")
    for low, high in zip(min_scale, max_scale):
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"crop scales need 0 < min_scale <= max_scale <= 1, got ({low}, {high})")
    return (tuple(int(s) for s in size_crops), tuple(int(n) for n in n_crops),
            tuple(float(s) for s in min_scale), tuple(float(s) for s in max_scale))


class MultiCropTransform:
    """PIL image -> list of ``sum(n_crops)`` float tensors [3, s, s], crop-major order.

    Crops of ``size_crops[0]`` come first (``n_crops[0]`` of them: the large crops whose codes
    are computed), then ``n_crops[1]`` of ``size_crops[1]``, and so on. ``crop_sizes`` lists
    the size of each output position.
    """

    def __init__(
        self,
        size_crops: Sequence[int] = (224, 96),
        n_crops: Sequence[int] = (2, 6),
        min_scale: Sequence[float] = (0.14, 0.05),
        max_scale: Sequence[float] = (1.0, 0.14),
        blur_prob: float = 0.5,
        jitter_strength: float = 1.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.size_crops, self.n_crops, self.min_scale, self.max_scale = validate_crop_groups(
            size_crops, n_crops, min_scale, max_scale)
        if not 0 <= blur_prob <= 1:
            raise ValueError(f"blur_prob must be in [0, 1], got {blur_prob}")
        if jitter_strength < 0:
            raise ValueError(f"jitter_strength must be >= 0, got {jitter_strength}")
        mean = _check_rgb_triple("mean", mean, positive=False)
        std = _check_rgb_triple("std", std, positive=True)

        self.blur_prob = float(blur_prob)
        self.jitter_strength = float(jitter_strength)
        self.mean, self.std = mean, std

        finish = [ToNormalizedTensor(mean, std)]
        color = [color_distortion(jitter_strength)]
        blur = [RandomGaussianBlur(blur_prob)] if blur_prob > 0 else []
        self.crop_transforms = []  # one per output position, crop-major
        for size, count, low, high in zip(self.size_crops, self.n_crops, self.min_scale,
                                          self.max_scale):
            crop = transforms.Compose([
                transforms.RandomResizedCrop(size, scale=(low, high)),
                transforms.RandomHorizontalFlip(p=0.5),
                *color, *blur, *finish,
            ])
            self.crop_transforms.extend([crop] * count)

    @property
    def crop_sizes(self) -> list:
        """Size of the crop at each output position."""
        return [s for s, n in zip(self.size_crops, self.n_crops) for _ in range(n)]

    def __call__(self, image: Image.Image) -> list:
        return [crop(image) for crop in self.crop_transforms]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size_crops={self.size_crops}, n_crops={self.n_crops}, "
                f"min_scale={self.min_scale}, max_scale={self.max_scale}, "
                f"blur_prob={self.blur_prob}, jitter_strength={self.jitter_strength})")


def eval_transform(size: int, resize: Optional[int] = None,
                   mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> transforms.Compose:
    """Deterministic transform for feature extraction: resize the shorter side to ``resize``,
    center-crop ``size``, ToTensor, Normalize.

    ``resize`` defaults to the usual 256/224 ratio for images of 64 pixels and more (256 for
    224) and to ``size`` itself below that, so 32x32 CIFAR images pass through unchanged.
    """
    if not isinstance(size, numbers.Integral) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if resize is None:
        resize = int(round(size * 256 / 224)) if size >= 64 else int(size)
    if not isinstance(resize, numbers.Integral) or resize < size:
        raise ValueError(f"resize must be an integer >= size ({size}), got {resize!r}")
    mean = _check_rgb_triple("mean", mean, positive=False)
    std = _check_rgb_triple("std", std, positive=True)
    return transforms.Compose([
        transforms.Resize(int(resize)),
        transforms.CenterCrop(int(size)),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
