"""Batched multi-crop augmentation and the resident-dataset loader.

The fast path is compared with the reference recipe (torchvision/PIL) by distribution:
crop boxes by two-sample Kolmogorov-Smirnov tests against ``RandomResizedCrop.get_params``,
the coin flips by binomial tolerances, and the pixel operations by direct comparison with
torchvision's tensor functions on the parameters the fast path reports.
"""
import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from fastswav.data.batched_multicrop import (BatchedMultiCrop, _blur, _jitter, HUE,
                                             random_resized_crop_params, shift_hue)
from fastswav.data.multicrop import CIFAR10_MEAN, CIFAR10_STD
from fastswav.data.resident import ResidentImages, ResidentMultiCropLoader
from fastswav.data.sources import ImageSource

SCALES = {"large": (0.14, 1.0), "small": (0.05, 0.14)}


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (ties handled)."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    """Asymptotic critical value c(alpha) * sqrt((n + m) / (n m)); conservative for the
    discrete distributions here (whole-pixel boxes)."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


def reference_boxes(height, width, scale, n, seed):
    torch.manual_seed(seed)
    image = torch.empty(3, height, width)
    return np.array([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
                     for _ in range(n)], dtype=np.float64)


@pytest.mark.parametrize("group", sorted(SCALES))
@pytest.mark.parametrize("height,width", [(32, 32), (180, 300), (60, 400)])
def test_crop_boxes_follow_torchvision(group, height, width):
    scale, n = SCALES[group], 3000
    ref = reference_boxes(height, width, scale, n, seed=1)
    sizes = torch.full((n,), 1)
    ours = random_resized_crop_params(sizes * height, sizes * width, scale,
                                      generator=torch.Generator().manual_seed(2)).numpy()
    critical = ks_critical(n, n)
    for name, stat in (("area fraction", lambda b: b[:, 2] * b[:, 3] / (height * width)),
                       ("aspect ratio", lambda b: b[:, 3] / b[:, 2]),
                       ("top", lambda b: b[:, 0] / height), ("left", lambda b: b[:, 1] / width)):
        d = ks_statistic(stat(ours), stat(ref))
        assert d < critical, f"{name}: KS {d:.4f} >= {critical:.4f} ({height}x{width}, {group})"
    # Every box lies inside the image, in whole pixels.
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    assert (ours == np.round(ours)).all()


def test_crop_box_fallback_is_torchvision_central_crop():
    # Every try fails on a 10x1000 strip at scale >= 0.9: torchvision's central fallback.
    boxes = random_resized_crop_params(torch.tensor([10, 1000]), torch.tensor([1000, 10]),
                                       (0.9, 1.0), generator=torch.Generator().manual_seed(0))
    expected = [RandomResizedCrop.get_params(torch.empty(3, h, w), [0.9, 1.0], [3 / 4, 4 / 3])
                for h, w in ((10, 1000), (1000, 10))]
    assert boxes.tolist() == [list(map(float, box)) for box in expected]


def test_full_pipeline_boxes_follow_torchvision_per_group():
    """The boxes BatchedMultiCrop draws (through __call__), per crop group, on CIFAR-sized
    images, against the reference sampler."""
    batch = 600
    augment = BatchedMultiCrop((32, 16), (2, 4), (0.14, 0.05), (1.0, 0.14), blur_prob=0,
                               jitter_strength=0, grayscale_prob=0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    _, params = augment(images, torch.Generator().manual_seed(3), return_params=True)
    for group, p in zip(("large", "small"), params):
        n = p.top.numel()
        ref = reference_boxes(32, 32, SCALES[group], n, seed=4)
        area = (p.height * p.width / 1024).numpy()
        aspect = (p.width / p.height).numpy()
        assert ks_statistic(area, ref[:, 2] * ref[:, 3] / 1024) < ks_critical(n, n)
        assert ks_statistic(aspect, ref[:, 3] / ref[:, 2]) < ks_critical(n, n)


def test_coin_flip_rates_and_jitter_ranges():
    batch, strength = 500, 0.7
    augment = BatchedMultiCrop((16, 8), (2, 4), (0.14, 0.05), (1.0, 0.14), blur_prob=0.5,
                               jitter_strength=strength, jitter_prob=0.8, grayscale_prob=0.2)
    images = torch.randint(0, 256, (batch, 3, 20, 20), dtype=torch.uint8)
    _, params = augment(images, torch.Generator().manual_seed(5), return_params=True)
    for p in params:
        n = p.flip.numel()
        for name, flags, rate in (("flip", p.flip, 0.5), ("jitter", p.jitter, 0.8),
                                  ("grayscale", p.grayscale, 0.2), ("blur", p.blur, 0.5)):
            assert binomial_ok(int(flags.sum()), n, rate), f"{name} rate {flags.float().mean()}"
        sigma = p.blur_sigma
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0
        assert sigma.min() < 0.2 and sigma.max() > 1.9  # spans the range
        factors = p.jitter_factors[p.jitter]
        low, high = 1 - 0.8 * strength, 1 + 0.8 * strength
        for k in range(3):
            assert factors[:, k].min() >= low and factors[:, k].max() <= high
            assert factors[:, k].min() < low + 0.05 and factors[:, k].max() > high - 0.05
        hue = factors[:, 3]
        assert hue.min() >= -0.2 * strength and hue.max() <= 0.2 * strength
        assert hue.min() < -0.18 * strength and hue.max() > 0.18 * strength
        neutral = p.jitter_factors[~p.jitter]
        assert (neutral == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
        # Each row's order is a permutation; each of the 24 orders turns up.
        assert (p.jitter_order.sort(dim=1).values == torch.arange(4)).all()
        orders = {tuple(row) for row in p.jitter_order.tolist()}
        assert len(orders) == 24
        # The hue step sits at each position for exactly a quarter of the rows.
        counts = torch.bincount((p.jitter_order == HUE).int().argmax(1), minlength=4)
        assert counts.max() - counts.min() <= 1


def test_jitter_matches_torchvision_in_the_reported_order():
    generator = torch.Generator().manual_seed(6)
    n = 16
    x = torch.rand(n, 3, 9, 11, generator=generator)
    augment = BatchedMultiCrop((9,), (1,), (0.5,), (1.0,), jitter_strength=1.0, jitter_prob=1.0)
    params = augment.draw_params(n, torch.full((n,), 9), torch.full((n,), 11), (0.5, 1.0),
                                 generator)
    blend_order, hue_rows = augment._split_order(params.jitter_order)
    ours = _jitter(x.clone(), params.jitter_factors, blend_order, hue_rows)
    steps = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(n):
        expected = x[i]
        for step in params.jitter_order[i].tolist():
            expected = steps[step](expected, float(params.jitter_factors[i, step]))
        # torchvision's tensor path weighs gray 0.2989 (PIL, and we, 0.299).
        torch.testing.assert_close(ours[i], expected, atol=3e-3, rtol=0)


def test_shift_hue_matches_torchvision():
    x = torch.rand(4, 3, 7, 5, generator=torch.Generator().manual_seed(7))
    x[0, :, 0, 0] = 0.5  # gray pixel: hue undefined, must stay gray
    for shift in (-0.5, -0.13, 0.0, 0.29, 0.5):
        torch.testing.assert_close(shift_hue(x, torch.full((4,), shift)),
                                   TF.adjust_hue(x, shift), atol=2e-6, rtol=0)


def test_blur_matches_gaussian_away_from_the_edges():
    x = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(8))
    sigma = torch.tensor([0.0, 0.7, 2.0])
    radius = 6
    ours = _blur(x.clone(), sigma, radius)
    torch.testing.assert_close(ours[0], x[0], atol=1e-6, rtol=0)  # sigma 0: untouched
    for i in (1, 2):
        expected = TF.gaussian_blur(x[i], [2 * radius + 1] * 2, [float(sigma[i])] * 2)
        inner = (slice(None), slice(radius, -radius), slice(radius, -radius))
        torch.testing.assert_close(ours[i][inner], expected[inner], atol=1e-5, rtol=0)


def _unnormalise(crop, mean, std):
    return crop.float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


@pytest.mark.parametrize("out_dtype,channels_last", [(torch.float32, False),
                                                     (torch.bfloat16, True)])
def test_shapes_dtypes_and_value_range(out_dtype, channels_last):
    augment = BatchedMultiCrop((24, 12), (2, 3), (0.14, 0.05), (1.0, 0.14), blur_prob=0.5,
                               mean=CIFAR10_MEAN, std=CIFAR10_STD, out_dtype=out_dtype,
                               channels_last=channels_last)
    images = torch.randint(0, 256, (10, 3, 40, 30), dtype=torch.uint8)
    crops = augment(images, torch.Generator().manual_seed(9))
    assert [tuple(c.shape) for c in crops] == [(10, 3, 24, 24)] * 2 + [(10, 3, 12, 12)] * 3
    assert augment.crop_sizes == [24, 24, 12, 12, 12]
    tolerance = 1e-5 if out_dtype == torch.float32 else 2e-2
    for crop in crops:
        assert crop.dtype == out_dtype
        if channels_last:
            assert crop.is_contiguous(memory_format=torch.channels_last)
        pixels = _unnormalise(crop, CIFAR10_MEAN, CIFAR10_STD)
        assert pixels.min() >= -tolerance and pixels.max() <= 1 + tolerance
        assert pixels.std() > 0.05  # not a constant


def test_deterministic_given_the_seed():
    augment = BatchedMultiCrop((16, 8), (2, 2), (0.14, 0.05), (1.0, 0.14))
    images = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8)
    first = augment(images, torch.Generator().manual_seed(10))
    again = augment(images, torch.Generator().manual_seed(10))
    other = augment(images, torch.Generator().manual_seed(11))
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def _gradient(height, width):
    """R = column, G = row, B = 128 (uint8)."""
    cols = torch.arange(width).view(1, width).expand(height, width)
    rows = torch.arange(height).view(height, 1).expand(height, width)
    return torch.stack([cols, rows, torch.full_like(cols, 128)]).to(torch.uint8)


def _crop_region_check(crops, params, to_canvas_x=1.0, to_canvas_y=1.0, tolerance=0.6):
    """Mean R and G of each crop against the centre of its box (in canvas pixels); the R ramp
    runs right to left in flipped crops."""
    batch = crops[0].shape[0]
    for position, crop in enumerate(crops):
        p = params[0]
        rows = slice(position * batch, (position + 1) * batch)
        pixels = crop.float() * 255  # mean 0, std 1 below: plain [0, 255] values
        centre_x = (p.left[rows] + p.width[rows] / 2) * to_canvas_x - 0.5
        centre_y = (p.top[rows] + p.height[rows] / 2) * to_canvas_y - 0.5
        torch.testing.assert_close(pixels[:, 0].mean((1, 2)).double(), centre_x,
                                   atol=tolerance, rtol=0)
        torch.testing.assert_close(pixels[:, 1].mean((1, 2)).double(), centre_y,
                                   atol=tolerance, rtol=0)
        slope = pixels[:, 0, :, -1].mean(1) - pixels[:, 0, :, 0].mean(1)
        assert ((slope < 0) == p.flip[rows]).all()


def test_crop_lands_where_the_parameters_say():
    augment = BatchedMultiCrop((20,), (2,), (0.1,), (0.6,), blur_prob=0, jitter_strength=0,
                               grayscale_prob=0, mean=(0, 0, 0), std=(1, 1, 1))
    images = _gradient(64, 96).expand(12, 3, 64, 96).contiguous()
    crops, params = augment(images, torch.Generator().manual_seed(12), return_params=True)
    _crop_region_check(crops, params)


def test_crop_boxes_drawn_in_original_coordinates():
    # 96x192 originals squeezed into 64x96 canvases: boxes (and their aspect ratios) are in
    # the original's pixels, placed at (2/3, 1/2) of their coordinates on the canvas.
    augment = BatchedMultiCrop((20,), (2,), (0.3,), (1.0,), blur_prob=0, jitter_strength=0,
                               grayscale_prob=0, mean=(0, 0, 0), std=(1, 1, 1))
    images = _gradient(64, 96).expand(40, 3, 64, 96).contiguous()
    original = torch.tensor([[96, 192]]).expand(40, 2)
    crops, params = augment(images, torch.Generator().manual_seed(13), original_sizes=original,
                            return_params=True)
    p = params[0]
    # Sizes only possible in original coordinates, and all inside the original.
    assert p.width.max() > 96 and p.height.max() > 64
    assert (p.top + p.height <= 96).all() and (p.left + p.width <= 192).all()
    _crop_region_check(crops, params, to_canvas_x=0.5, to_canvas_y=2 / 3, tolerance=1.0)


def test_resize_matches_pil_resized_crop():
    """Same boxes, no colour steps: the crops are PIL's antialiased bilinear resize of the
    box (enlarging and shrinking), up to PIL's 8-bit rounding."""
    generator = torch.Generator().manual_seed(17)
    images = torch.randint(0, 256, (16, 3, 48, 40), dtype=torch.uint8, generator=generator)
    augment = BatchedMultiCrop((24, 8), (1, 1), (0.3, 0.5), (1.0, 1.0), blur_prob=0,
                               jitter_strength=0, grayscale_prob=0, flip_prob=0.0,
                               mean=(0, 0, 0), std=(1, 1, 1))
    crops, params = augment(images, generator, return_params=True)
    for crop, p, size in zip(crops, params, (24, 8)):
        for i in range(16):
            pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
            box = [int(v[i]) for v in (p.top, p.left, p.height, p.width)]
            expected = TF.pil_to_tensor(TF.resized_crop(
                pil, *box, [size, size], interpolation=TF.InterpolationMode.BILINEAR))
            error = (crop[i] * 255 - expected.float()).abs()
            # PIL rounds after each of its two passes: at most about one level apart.
            assert error.max() <= 1.01 and error.mean() < 0.35


def test_variable_size_list_reads_only_each_valid_region():
    augment = BatchedMultiCrop((16, 8), (2, 2), (0.14, 0.05), (1.0, 0.14), blur_prob=1.0,
                               jitter_strength=0, grayscale_prob=0, mean=(0, 0, 0),
                               std=(1, 1, 1))
    sizes = [(20, 50), (64, 30), (33, 33)]
    images = [torch.full((3, h, w), 200, dtype=torch.uint8) for h, w in sizes]
    crops = augment(images, torch.Generator().manual_seed(14))
    for crop in crops:  # padding (zeros) never leaks in, not even through the blur
        torch.testing.assert_close(crop * 255, torch.full_like(crop, 200.0), atol=1e-3,
                                   rtol=0)


def test_grayscale_and_blur_take_effect():
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(15))
    plain = dict(jitter_strength=0, mean=(0, 0, 0), std=(1, 1, 1), flip_prob=0.0)
    gray = BatchedMultiCrop((32,), (1,), (0.5,), (1.0,), blur_prob=0, grayscale_prob=0.5,
                            **plain)
    (crop,), (p,) = gray(images, torch.Generator().manual_seed(16), return_params=True)
    spread = (crop.max(1).values - crop.min(1).values).amax((1, 2))
    assert (spread[p.grayscale] < 1e-6).all() and (spread[~p.grayscale] > 0.05).all()
    blur = BatchedMultiCrop((32,), (1,), (0.5,), (1.0,), blur_prob=0.5, grayscale_prob=0,
                            **plain)
    (crop,), (p,) = blur(images, torch.Generator().manual_seed(16), return_params=True)
    roughness = (crop[..., 1:] - crop[..., :-1]).abs().mean((1, 2, 3))
    # Same seed, so the same boxes: blurred crops are smoother than the unblurred ones.
    (sharp,), _ = gray.__class__((32,), (1,), (0.5,), (1.0,), blur_prob=0.0, grayscale_prob=0,
                                 **plain)(images, torch.Generator().manual_seed(16),
                                          return_params=True)
    sharp_roughness = (sharp[..., 1:] - sharp[..., :-1]).abs().mean((1, 2, 3))
    strong = p.blur & (p.blur_sigma > 0.5)
    assert strong.sum() > 20
    assert (roughness[strong] < 0.8 * sharp_roughness[strong]).all()
    assert (roughness[p.blur] <= sharp_roughness[p.blur] + 1e-6).all()
    torch.testing.assert_close(roughness[~p.blur], sharp_roughness[~p.blur])


def test_rejects_bad_input():
    augment = BatchedMultiCrop((8,), (1,), (0.5,), (1.0,))
    with pytest.raises(ValueError, match="uint8"):
        augment(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="same non-zero length"):
        BatchedMultiCrop((8, 4), (1,), (0.5,), (1.0,))


# --- resident data -----------------------------------------------------------------------

def _indexed_images(n):
    """uint8 [n, 3, 2, 2] images whose first two bytes spell their index."""
    images = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    index = torch.arange(n)
    images[:, 0, 0, 0] = (index // 256).to(torch.uint8)
    images[:, 0, 0, 1] = (index % 256).to(torch.uint8)
    return images


def _batch_indices(batch, generator=None):
    return [(batch[:, 0, 0, 0].long() * 256 + batch[:, 0, 0, 1].long())]


@pytest.mark.parametrize("n,batch_size,drop_last", [(103, 10, True), (103, 10, False),
                                                     (100, 25, True)])
def test_resident_shards_cover_the_data_once_per_epoch(n, batch_size, drop_last):
    images = ResidentImages(_indexed_images(n))
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            loader = ResidentMultiCropLoader(images, _batch_indices, batch_size, seed=3,
                                             epoch=epoch, rank=rank, world_size=2,
                                             drop_last=drop_last)
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(skipped == 0 for _, skipped in batches)
            shards.append(torch.cat([crops[0] for crops, _ in batches]).tolist())
        per_rank = math.ceil(n / 2)
        padding = 2 * per_rank - n  # the sampler repeats this many to equal the shards
        assert len(set(shards[0]) & set(shards[1])) <= padding  # distinct shards
        assert len(set(shards[0])) == len(shards[0]) and len(set(shards[1])) == len(shards[1])
        if drop_last:
            assert len(shards[0]) == len(shards[1]) == per_rank // batch_size * batch_size
        else:  # every image once (plus the sampler's padding to equal shards)
            assert set(shards[0]) | set(shards[1]) == set(range(n))
            assert len(shards[0]) + len(shards[1]) == 2 * per_rank
        if epoch == 0:
            first_epoch = shards
    assert first_epoch != shards  # reshuffled per epoch
    again = ResidentMultiCropLoader(images, _batch_indices, batch_size, seed=3, epoch=1,
                                    rank=0, world_size=2, drop_last=drop_last)
    assert torch.cat([c[0] for c, _ in again]).tolist() == shards[0]


def test_resident_loader_batches_and_errors():
    images = ResidentImages(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8))
    augment = BatchedMultiCrop((32, 16), (2, 4), (0.14, 0.05), (1.0, 0.14), blur_prob=0,
                               jitter_strength=0.5)
    loader = ResidentMultiCropLoader(images, augment, batch_size=8, seed=0)
    assert len(loader) == 5
    crops, skipped = next(iter(loader))
    assert skipped == 0 and [tuple(c.shape) for c in crops] == (
        [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 4)
    # Same (seed, epoch, rank): same crops.
    again, _ = next(iter(ResidentMultiCropLoader(images, augment, batch_size=8, seed=0)))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    with pytest.raises(ValueError, match=r"^batch size 16 x 3 processes needs at least 48 "
                                         r"images, the data has 40$"):
        ResidentMultiCropLoader(images, augment, batch_size=16, world_size=3)


class _MemorySource(ImageSource):
    """Encoded images in memory; ``None`` stands for a corrupt file."""

    def __init__(self, arrays):
        super().__init__()
        self.path, self.split, self.classes = "memory", None, ["a"]
        self._files = []
        for array in arrays:
            if array is None:
                self._files.append(b"not an image")
                continue
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            self._files.append(buffer.getvalue())
        self.labels = np.zeros(len(arrays), dtype=np.int64)

    def name(self, i):
        return f"memory[{i}]"

    def _read_bytes(self, i):
        return self._files[i]


def test_resident_images_from_source():
    rng = np.random.default_rng(0)
    same = [rng.integers(0, 256, (8, 10, 3), dtype=np.uint8) for _ in range(3)]
    resident = ResidentImages.from_source(_MemorySource(same + [None]))
    assert resident.images.shape == (3, 3, 8, 10) and resident.n_unreadable == 1
    assert torch.equal(resident.images[1], torch.from_numpy(same[1]).permute(2, 0, 1))
    mixed = same[:1] + [rng.integers(0, 256, (20, 6, 3), dtype=np.uint8)]
    # Mixed sizes without canvas_size: a square canvas of the median shorter side (8, 6 -> 7).
    auto = ResidentImages.from_source(_MemorySource(mixed))
    assert auto.images.shape == (2, 3, 7, 7) and auto.original_sizes.tolist() == [[8, 10], [20, 6]]
    assert ResidentImages.from_source(_MemorySource(mixed), max_canvas=5).images.shape[2:] == (5, 5)
    resident = ResidentImages.from_source(_MemorySource(mixed), canvas_size=(8, 8))
    assert resident.images.shape == (2, 3, 8, 8)
    assert resident.original_sizes.tolist() == [[8, 10], [20, 6]]
    # The loader hands the original sizes to the augmentation.
    augment = BatchedMultiCrop((8,), (1,), (0.5,), (1.0,))
    crops, _ = next(iter(ResidentMultiCropLoader(resident, augment, batch_size=2)))
    assert crops[0].shape == (2, 3, 8, 8)


# --- GPU -----------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_path_matches_float32_resize_and_is_deterministic():
    images = torch.randint(0, 256, (64, 3, 160, 192), dtype=torch.uint8, device="cuda")
    kwargs = dict(size_crops=(96, 48), n_crops=(2, 4), min_scale=(0.14, 0.05),
                  max_scale=(1.0, 0.14))
    half = BatchedMultiCrop(**kwargs, out_dtype=torch.bfloat16, channels_last=True)
    full = BatchedMultiCrop(**kwargs, resize_dtype=torch.float32)
    a = half(images, torch.Generator("cuda").manual_seed(0))
    b = half(images, torch.Generator("cuda").manual_seed(0))
    c = full(images, torch.Generator("cuda").manual_seed(0))
    for x, y, z in zip(a, b, c):
        assert x.is_cuda and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, y)
        torch.testing.assert_close(x.float(), z, atol=0.05, rtol=0.02)


@pytest.mark.cuda
def test_cuda_resident_loader():
    images = ResidentImages(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)).to("cuda")
    augment = BatchedMultiCrop((32, 16), (2, 4), (0.14, 0.05), (1.0, 0.14))
    crops, _ = next(iter(ResidentMultiCropLoader(images, augment, batch_size=32)))
    assert all(c.is_cuda for c in crops)
