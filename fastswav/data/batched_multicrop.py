"""Decode once, crop many: the SwAV multi-crop recipe as batched tensor work.

:class:`BatchedMultiCrop` takes a batch of decoded uint8 images (one canvas per image) and
cuts every crop of the recipe in :mod:`fastswav.data.multicrop` with a handful of batched
ops per crop group, on whatever device the images are on (GPU in production, CPU for tests
and CPU training). No Python loop runs over samples; loops run over crop groups and the
four colour-jitter steps only.

Per crop (and per sample), as in the reference:

1. RandomResizedCrop parameters drawn with torchvision's algorithm (area fraction uniform
   in ``scale``, aspect ratio log-uniform in (3/4, 4/3), 10 tries, then the central-crop
   fallback), vectorised: the 10 candidates of every crop are drawn at once and the first
   valid one is kept. They are drawn in the ORIGINAL image's coordinates (``original_sizes``)
   and mapped onto the canvas, so a canvas that holds a resized image (fixed-size decode)
   still gets the official scale and aspect-ratio distribution.
2. Crop + resize as two batched matmuls per crop group: each crop's rows and columns are
   resampled by a weight matrix holding PIL's bilinear filter (widened when shrinking: PIL's
   antialiasing), limited to the box as PIL's crop-then-resize is (:func:`resize_weights`).
   Half precision on CUDA (tensor cores), float32 elsewhere.
3. Horizontal flip with p=0.5, folded into the column weights (free).
4. Colour jitter with p=``jitter_prob``: per-sample brightness, contrast, saturation factors
   in [max(0, 1-0.8s), 1+0.8s] and hue shift in [-0.2s, 0.2s], in a random per-sample order
   (see :func:`_jitter`), then random grayscale.
5. Gaussian blur with p=``blur_prob``, sigma uniform in [0.1, 2.0] (PIL's radius is the
   sigma), as one separable depthwise convolution per crop group.
6. Normalisation, the training dtype, optional channels_last.

All random draws come from the ``generator`` passed in (on the images' device), so a seed
fixes every crop.

Known deviations from the PIL reference (all small; tests check the distributions):
- Pixels stay float between steps; PIL rounds to uint8 after every step.
- Contrast uses the exact mean of the grayscale image (PIL rounds it to an integer).
- Blur is a true Gaussian truncated at 3 sigma with edge-replicate padding; PIL
  approximates the Gaussian with three box blurs.
- The hue step is the exact HSV rotation in float; PIL shifts an 8-bit hue channel.
- Resize: PIL's filter in float (PIL uses 8-bit fixed-point coefficients); on CUDA the
  matmuls run in float16 (about 0.1 gray level of error).
- Jitter order: random per sample, but the position of the hue step is stratified over the
  batch (exactly a quarter of the crops of a group at each position, chosen at random), so
  that the costly hue step runs once per crop, not four times. Each crop's order is still
  uniform over the 24 orders (exactly when the group's crop count is a multiple of 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .multicrop import (BLUR_RADIUS, IMAGENET_MEAN, IMAGENET_STD, _check_rgb_triple,
                        validate_crop_groups)

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
# ITU-R 601-2 luma, as PIL's convert("L") (torchvision's tensor path uses 0.2989).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# Jitter step ids, as in ``CropParams.jitter_order``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def training_crop_dtype(device_type: str) -> torch.dtype:
    """The dtype the trainer's crops are made in: bfloat16 on CUDA, where the step runs
    under bf16 autocast and the first convolution would cast float32 crops to bfloat16
    anyway (the same rounding, so the same values, at half the bytes and bandwidth);
    float32 elsewhere (no autocast on the CPU)."""
    return torch.bfloat16 if device_type == "cuda" else torch.float32


@dataclass
class CropParams:
    """The random parameters of one crop group, one row per crop, crop-major (row c*B + b is
    crop c of sample b). Boxes are in the original image's pixel coordinates."""

    top: torch.Tensor            # [N] float64, whole pixels
    left: torch.Tensor           # [N]
    height: torch.Tensor         # [N]
    width: torch.Tensor          # [N]
    flip: torch.Tensor           # [N] bool
    jitter: torch.Tensor         # [N] bool: jitter applied
    jitter_factors: torch.Tensor  # [N, 4] brightness, contrast, saturation, hue (neutral
    #                               1, 1, 1, 0 where jitter is not applied)
    jitter_order: torch.Tensor   # [N, 4] step ids in the order applied
    grayscale: torch.Tensor      # [N] bool
    blur: torch.Tensor           # [N] bool
    blur_sigma: torch.Tensor     # [N] float32 (drawn for every crop, used where blur)


def random_resized_crop_params(heights: torch.Tensor, widths: torch.Tensor,
                               scale: Sequence[float], ratio: Sequence[float] = CROP_RATIO,
                               generator: Optional[torch.Generator] = None,
                               tries: int = CROP_TRIES) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for many images at once.

    heights, widths: [N] image sizes (any numeric dtype). Returns float64 [N, 4] rows
    (top, left, height, width) of whole pixels: per image, ``tries`` candidates (area
    fraction uniform in ``scale``, log-uniform aspect ratio in ``ratio``, rounded half to even
    as Python's ``round``), the first that fits, else torchvision's central-crop fallback.
    """
    heights = heights.to(torch.float64)
    widths = widths.to(torch.float64)
    n, device = heights.shape[0], heights.device
    draws = torch.rand(n, tries, 2, dtype=torch.float64, device=device, generator=generator)
    offsets = torch.rand(n, 2, dtype=torch.float64, device=device, generator=generator)
    area = (heights * widths).unsqueeze(1) * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[..., 1])
    cand_w = torch.round(torch.sqrt(area * aspect))
    cand_h = torch.round(torch.sqrt(area / aspect))
    fits = ((cand_w > 0) & (cand_w <= widths.unsqueeze(1))
            & (cand_h > 0) & (cand_h <= heights.unsqueeze(1)))
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting try (0 if none)
    found = fits.any(dim=1)
    w = cand_w.gather(1, first).squeeze(1)
    h = cand_h.gather(1, first).squeeze(1)

    in_ratio = widths / heights
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fallback_w = torch.where(wide, torch.round(heights * max(ratio)), widths)
    fallback_h = torch.where(narrow, torch.round(widths / min(ratio)), heights)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    # randint(0, H - h + 1) as floor(u * (H - h + 1)); the fallback is centred.
    top = torch.where(found, torch.floor(offsets[:, 0] * (heights - h + 1)),
                      torch.floor((heights - h) / 2))
    left = torch.where(found, torch.floor(offsets[:, 1] * (widths - w + 1)),
                       torch.floor((widths - w) / 2))
    return torch.stack([top, left, h, w], dim=1)


def resize_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int,
                   valid: torch.Tensor) -> torch.Tensor:
    """PIL's bilinear resampling of the span [start, start + length) of an axis, as a matrix.

    start, length, valid: [N] (canvas pixels; ``valid`` is how many pixels along the axis
    hold image). Returns float32 [N, out_size, in_size]: row i holds the weights of output
    pixel i, PIL's triangle filter widened by the shrink factor (its antialiasing), limited to
    the pixels of the span inside the image and normalised, as PIL does after cropping.
    """
    device = start.device
    start, length = start.to(torch.float32), length.to(torch.float32)
    step = length / out_size                           # input pixels per output pixel
    width = step.clamp(min=1.0).view(-1, 1, 1)         # filter half-width
    centre = start.unsqueeze(1) + (torch.arange(out_size, device=device) + 0.5) * step.unsqueeze(1)
    pixel = torch.arange(in_size, device=device, dtype=torch.float32)
    weights = (1.0 - ((pixel + 0.5) - centre.unsqueeze(2)).abs_().div_(width)).clamp_(min=0)
    inside = ((pixel >= torch.floor(start).unsqueeze(1))
              & (pixel < torch.ceil(start + length).unsqueeze(1))
              & (pixel < valid.to(torch.float32).unsqueeze(1)))
    weights.mul_(inside.unsqueeze(1))
    return weights.div_(weights.sum(dim=2, keepdim=True).clamp_(min=1e-12))


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] grayscale."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend_step(x: torch.Tensor, step: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One brightness / contrast / saturation step, chosen per sample by ``step`` [N].

    All three are blends ``factor * x + (1 - factor) * target`` with target black, the mean
    gray level, or the pixel's gray level, so one blend does any of them for each sample.
    """
    gray = _luma(x)
    factor = factor.view(-1, 1, 1, 1).to(x.dtype)
    step = step.view(-1, 1, 1, 1)
    # target * (1 - factor) = gray * a + b, with a and b per sample.
    a = (1.0 - factor) * (step == SATURATION).to(x.dtype)
    b = (1.0 - factor) * (step == CONTRAST).to(x.dtype) * gray.mean(dim=(2, 3), keepdim=True)
    return torch.addcmul(torch.addcmul(b, gray, a), x, factor).clamp_(0.0, 1.0)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of [N, 3, H, W] images in [0, 1] by ``shift`` [N] turns
    (torchvision's ``adjust_hue``), without building the HSV image: the maximum and the
    chroma stay, so each channel is ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + hue) mod 6``, n = 5, 3, 1 for R, G, B and hue in sextants."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(maxc == r, torch.remainder((g - b) / safe, 6.0),
                      torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = hue + 6.0 * shift.view(-1, 1, 1).to(x.dtype)
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = torch.remainder(hue + offset, 6.0)
        channels.append(maxc - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, dim=1)


def _jitter(x: torch.Tensor, factors: torch.Tensor, blend_order: torch.Tensor,
            hue_rows: List[torch.Tensor]) -> torch.Tensor:
    """Colour jitter in a per-sample order.

    ``blend_order`` [N, 3]: each sample's order of brightness, contrast, saturation (one
    blend per position, see :func:`_blend_step`). The hue step goes before blend position k
    for the rows in ``hue_rows[k]`` (after the last blend for k = 3): these are fixed-size
    random row sets, so the hue step runs once per row and no shape depends on the data.
    """
    for position in range(4):
        rows = hue_rows[position]
        if rows.numel():
            x.index_copy_(0, rows, shift_hue(x.index_select(0, rows), factors[rows, HUE]))
        if position < 3:
            step = blend_order[:, position]
            x = _blend_step(x, step, factors.gather(1, step.unsqueeze(1)).squeeze(1))
    return x


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Per-sample Gaussian blur of [N, C, H, W] with sigma [N] (0 = untouched), as two 1-D
    depthwise convolutions with edge-replicate padding."""
    n, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    sigma = sigma.to(torch.float32).unsqueeze(1)
    # Sigma 0 would divide by zero; a tiny sigma gives the identity (a delta) kernel anyway.
    kernel = torch.exp(-0.5 * (taps / sigma.clamp_min(1e-3)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) plane
    planes = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    planes = F.conv2d(planes, kernel.view(n * c, 1, 1, -1), groups=n * c)
    planes = F.conv2d(planes, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return planes.view(n, c, h, w)


def _to_canvas_batch(images: Union[torch.Tensor, Sequence[torch.Tensor]],
                     valid_sizes: Optional[torch.Tensor]):
    """-> (uint8 [B, 3, H, W], valid sizes [B, 2] (h, w) or None when every canvas is full)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        return images, valid_sizes
    images = list(images)
    if not images:
        raise ValueError("no images given")
    for image in images:
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"each image must be uint8 [3, h, w], got {image.dtype} "
                             f"{tuple(image.shape)}")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    canvas = images[0].new_zeros(len(images), 3, height, width)
    for k, image in enumerate(images):  # packing only; the augmentation has no such loop
        canvas[k, :, :image.shape[1], :image.shape[2]] = image
    if valid_sizes is None:
        valid_sizes = torch.tensor([list(image.shape[1:]) for image in images],
                                   device=canvas.device)
    return canvas, valid_sizes


class BatchedMultiCrop:
    """uint8 images -> list of ``sum(n_crops)`` crop tensors [B, 3, s, s], crop-major, in
    ``out_dtype`` (normalised), as :class:`fastswav.data.multicrop.MultiCropTransform` gives
    per image. See the module docstring for the steps and the deviations from PIL.
    """

    def __init__(
        self,
        size_crops: Sequence[int] = (224, 96),
        n_crops: Sequence[int] = (2, 6),
        min_scale: Sequence[float] = (0.14, 0.05),
        max_scale: Sequence[float] = (1.0, 0.14),
        blur_prob: float = 0.5,
        jitter_strength: float = 1.0,
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        out_dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        flip_prob: float = 0.5,
        blur_sigma: Sequence[float] = BLUR_RADIUS,
        resize_dtype: Optional[torch.dtype] = None,
    ):
        self.size_crops, self.n_crops, self.min_scale, self.max_scale = validate_crop_groups(
            size_crops, n_crops, min_scale, max_scale)
        for name, p in (("blur_prob", blur_prob), ("jitter_prob", jitter_prob),
                        ("grayscale_prob", grayscale_prob), ("flip_prob", flip_prob)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if jitter_strength < 0:
            raise ValueError(f"jitter_strength must be >= 0, got {jitter_strength}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma needs 0 < low <= high, got {tuple(blur_sigma)}")
        if not (out_dtype.is_floating_point):
            raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
        mean = _check_rgb_triple("mean", mean, positive=False)
        std = _check_rgb_triple("std", std, positive=True)

        self.blur_prob = float(blur_prob)
        self.jitter_strength = float(jitter_strength)
        self.jitter_prob = float(jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.flip_prob = float(flip_prob)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.mean, self.std = mean, std
        self.out_dtype = out_dtype
        self.channels_last = bool(channels_last)
        self.resize_dtype = resize_dtype  # None: float16 on CUDA, float32 elsewhere
        self._constants = {}  # device -> normalisation constants (see _normalisation)
        # Jitter factor ranges, as torchvision's ColorJitter(0.8s, 0.8s, 0.8s, 0.2s).
        s = self.jitter_strength
        self.jitter_ranges = ((max(0.0, 1 - 0.8 * s), 1 + 0.8 * s),) * 3 + ((-0.2 * s, 0.2 * s),)

    @property
    def crop_sizes(self) -> list:
        """Size of the crop at each output position."""
        return [s for s, n in zip(self.size_crops, self.n_crops) for _ in range(n)]

    def blur_radius(self, size: int) -> int:
        """Kernel half-width for crops of ``size``: 3 sigma of the largest sigma, and no more
        than the crop itself (edge replication makes wider taps pointless)."""
        return max(1, min(math.ceil(3 * self.blur_sigma[1]), size - 1))

    def draw_params(self, n: int, heights: torch.Tensor, widths: torch.Tensor,
                    scale: Sequence[float], generator: Optional[torch.Generator] = None
                    ) -> CropParams:
        """The random parameters of ``n`` crops of images of sizes ``heights``, ``widths``
        ([n] each), all drawn from ``generator`` on the sizes' device."""
        device = heights.device
        box = random_resized_crop_params(heights, widths, scale, generator=generator)
        u = torch.rand(n, 12, device=device, generator=generator)
        jitter = u[:, 1] < self.jitter_prob if self.jitter_strength > 0 else u[:, 1] < 0
        # Ranges as Python scalars (kernel arguments): a tensor built from a list here would
        # be a blocking host-to-device copy on every call.
        (blend_low, blend_high), (hue_low, hue_high) = self.jitter_ranges[0], self.jitter_ranges[3]
        skipped = ~jitter.unsqueeze(1)
        blends = (blend_low + (blend_high - blend_low) * u[:, 2:5]).masked_fill_(skipped, 1.0)
        hues = (hue_low + (hue_high - hue_low) * u[:, 5:6]).masked_fill_(skipped, 0.0)
        factors = torch.cat([blends, hues], dim=1)  # neutral 1, 1, 1, 0 where not jittered
        blend_order = u[:, 6:9].argsort(dim=1)  # a uniform random order of B, C, S
        # Hue position: stratified over the rows (see _jitter), inserted into blend_order.
        hue_position = torch.empty(n, dtype=torch.long, device=device)
        hue_position[torch.randperm(n, device=device, generator=generator)] = (
            torch.arange(n, device=device) * 4 // n)
        slots = torch.arange(4, device=device).unsqueeze(0)
        before = slots < hue_position.unsqueeze(1)
        shifted = blend_order.gather(1, (slots - 1).clamp(0, 2).expand(n, 4))
        order = torch.where(before, blend_order.gather(1, slots.clamp(max=2).expand(n, 4)),
                            shifted)
        order = torch.where(slots == hue_position.unsqueeze(1), HUE, order)
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[:, 11]
        return CropParams(
            top=box[:, 0], left=box[:, 1], height=box[:, 2], width=box[:, 3],
            flip=u[:, 0] < self.flip_prob, jitter=jitter, jitter_factors=factors,
            jitter_order=order, grayscale=u[:, 9] < self.grayscale_prob,
            blur=u[:, 10] < self.blur_prob, blur_sigma=sigma)

    def __call__(self, images: Union[torch.Tensor, Sequence[torch.Tensor]],
                 generator: Optional[torch.Generator] = None,
                 valid_sizes: Optional[torch.Tensor] = None,
                 original_sizes: Optional[torch.Tensor] = None,
                 return_params: bool = False):
        """Crop, augment and normalise a batch.

        images: uint8 [B, 3, H, W] canvases, or a list of uint8 [3, h, w] images of any sizes
            (packed into one zero-padded canvas batch).
        valid_sizes: [B, 2] (h, w) of the image region at each canvas's top-left corner
            (default: the whole canvas, or each listed image's size). Pixels outside it are
            never read.
        original_sizes: [B, 2] (h, w) of the images before they were resized into their
            valid regions; crop boxes are drawn in these coordinates (default: valid_sizes).
        generator: a torch.Generator on the images' device (default: the device's default).
        Returns the list of crops (and, with ``return_params``, one :class:`CropParams` per
        crop group).
        """
        canvas, valid_sizes = _to_canvas_batch(images, valid_sizes)
        batch, _, height, width = canvas.shape
        device = canvas.device
        if valid_sizes is None:
            valid = torch.empty(batch, 2, dtype=torch.float64, device=device)
            valid[:, 0].fill_(height)  # fills, not a tensor from host data (see draw_params)
            valid[:, 1].fill_(width)
        else:
            valid = valid_sizes.to(device=device, dtype=torch.float64)
        original = (valid if original_sizes is None
                    else original_sizes.to(device=device, dtype=torch.float64))
        to_canvas = valid / original  # canvas pixels per original pixel, (y, x)
        # Resize matmuls: half on GPUs (tensor cores; uint8 values and fp32 accumulation keep
        # the error near 0.1 gray level), float32 elsewhere (CPUs have no fast half matmul).
        resize_dtype = self.resize_dtype or (torch.float16 if device.type == "cuda"
                                             else torch.float32)
        # [B, H, 3 * W]: one matmul per sample then cuts every crop's rows from all channels.
        pixels = canvas.permute(0, 2, 1, 3).to(resize_dtype).reshape(batch, height, 3 * width)

        # ToTensor's 1/255 goes into the resize weights; Normalize is one fused op at the end.
        norm_scale, norm_bias = self._normalisation(device)
        crops, all_params = [], []
        for size, count, low, high in zip(self.size_crops, self.n_crops, self.min_scale,
                                          self.max_scale):
            n = count * batch
            params = self.draw_params(n, original[:, 0].repeat(count),
                                      original[:, 1].repeat(count), (low, high), generator)
            scale_y, scale_x = to_canvas[:, 0].repeat(count), to_canvas[:, 1].repeat(count)
            rows = resize_weights(params.top * scale_y, params.height * scale_y, size, height,
                                  valid[:, 0].repeat(count)) * (1.0 / 255.0)
            cols = resize_weights(params.left * scale_x, params.width * scale_x, size, width,
                                  valid[:, 1].repeat(count))
            cols = torch.where(params.flip.view(-1, 1, 1), cols.flip(1), cols)  # the flip
            # Crop-major rows -> per sample: [B, count * size, H] and [B * count, W, size].
            rows = rows.view(count, batch, size, height).transpose(0, 1).reshape(
                batch, count * size, height).to(resize_dtype)
            cols = cols.view(count, batch, size, width).transpose(0, 1).reshape(
                batch * count, size, width).transpose(1, 2).to(resize_dtype)
            x = torch.bmm(rows, pixels)                    # [B, count * size, 3 * W]
            x = torch.bmm(x.view(batch * count, size * 3, width), cols)  # [B*count, size*3, size]
            x = x.view(batch, count, size, 3, size).permute(1, 0, 3, 2, 4).reshape(
                n, 3, size, size).float()
            if self.jitter_strength > 0 and self.jitter_prob > 0:
                blend_order, hue_rows = self._split_order(params.jitter_order)
                x = _jitter(x, params.jitter_factors, blend_order, hue_rows)
            if self.grayscale_prob > 0:
                x = torch.where(params.grayscale.view(-1, 1, 1, 1), _luma(x).expand_as(x), x)
            if self.blur_prob > 0:
                sigma = torch.where(params.blur, params.blur_sigma,
                                    torch.zeros_like(params.blur_sigma))
                x = _blur(x, sigma, self.blur_radius(size))
            x = torch.addcmul(norm_bias, x, norm_scale).to(self.out_dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            crops.extend(x.chunk(count, dim=0))
            all_params.append(params)
        return (crops, all_params) if return_params else crops

    def _normalisation(self, device: torch.device):
        """(1 / std, -mean / std) as [1, 3, 1, 1] float32 on ``device``, made once per device
        by fills: no tensor from host data, so no host-to-device copy, even on the first call."""
        key = str(device)
        if key not in self._constants:
            scale = torch.empty(1, 3, 1, 1, device=device)
            bias = torch.empty(1, 3, 1, 1, device=device)
            for c in range(3):
                scale[0, c].fill_(1.0 / self.std[c])
                bias[0, c].fill_(-self.mean[c] / self.std[c])
            self._constants[key] = scale, bias
        return self._constants[key]

    @staticmethod
    def _split_order(order: torch.Tensor):
        """-> (blend order [N, 3], rows whose hue step is at each position 0..3).

        The hue positions were stratified in draw_params (row i of a random permutation at
        position i * 4 // N), so each row set's size depends on N only; taking them as slices
        of a sort (not through a boolean mask) keeps a GPU from reporting sizes back."""
        n = order.shape[0]
        hue_position = (order == HUE).to(torch.uint8).argmax(dim=1, keepdim=True)
        slots = torch.arange(3, device=order.device).unsqueeze(0)
        blend_order = order.gather(1, slots + (slots >= hue_position).long())
        rows = hue_position.squeeze(1).argsort(stable=True)
        starts = [(k * n + 3) // 4 for k in range(5)]  # first i with i * 4 // n == k
        return blend_order, [rows[starts[k]:starts[k + 1]] for k in range(4)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size_crops={self.size_crops}, n_crops={self.n_crops}, "
                f"min_scale={self.min_scale}, max_scale={self.max_scale}, "
                f"blur_prob={self.blur_prob}, jitter_strength={self.jitter_strength}, "
                f"jitter_prob={self.jitter_prob}, grayscale_prob={self.grayscale_prob}, "
                f"out_dtype={self.out_dtype}, channels_last={self.channels_last})")
