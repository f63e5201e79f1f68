"""The decode-once data path: .beton writer, FFCV canvas loader, sharding and fallback.

Tests that need FFCV guard with ``pytest.importorskip("ffcv")`` only; CI installs it
(``make test``), so they run there. Crop boxes are compared with torchvision's
``RandomResizedCrop.get_params`` on each image's ORIGINAL size by two-sample
Kolmogorov-Smirnov tests; the images are non-square and written with a resolution cap, and
the canvas is smaller still, so boxes drawn in any other coordinates would fail.
"""
import io
import logging
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from fastswav.data.batched_multicrop import BatchedMultiCrop
from fastswav.data.beton import BetonSource, FFCVUnavailableError, import_ffcv
from fastswav.data.ffcv_loader import build_ffcv_multicrop_loader, canvas_layout
from fastswav.data.sources import open_source

from conftest import write_files

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


# --- helpers -------------------------------------------------------------------------------

def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (ties handled)."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical(n, m, alpha=1e-3) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def binomial_ok(hits, n, p, sigmas=4.5) -> bool:
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def _encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _smooth(rng, height, width):
    """A smooth RGB image (gradients around a random colour): survives JPEG and scaling."""
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(40, 200, 3)
    image = np.stack([base[0] + 50 * x / width, base[1] + 50 * y / height,
                      base[2] + 25 * (x + y) / (width + height)], axis=-1)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


CORRUPT = "train/cat/c_corrupt.jpg"
CAP = 96  # --max-resolution of the small test file


def _small_folder_files():
    """train/{cat,dog}: smooth RGB JPEGs of assorted non-square sizes (some above the cap), a
    grayscale JPEG, a CMYK JPEG, an RGBA PNG and a truncated JPEG."""
    rng = np.random.default_rng(0)
    files = {}
    for i, (h, w) in enumerate([(60, 90), (150, 100), (40, 200), (120, 121), (33, 47)]):
        files[f"train/cat/c{i}.jpg"] = _encode(_smooth(rng, h, w), "JPEG", quality=95)
    for i, (h, w) in enumerate([(80, 64), (200, 300), (64, 64)]):
        files[f"train/dog/d{i}.jpg"] = _encode(_smooth(rng, h, w), "JPEG", quality=95)
    files["train/cat/c_gray.jpg"] = _encode(_smooth(rng, 70, 50).convert("L"), "JPEG")
    files["train/dog/d_cmyk.jpg"] = _encode(_smooth(rng, 48, 72).convert("CMYK"), "JPEG")
    files["train/dog/d_alpha.png"] = _encode(_smooth(rng, 90, 30).convert("RGBA"), "PNG")
    good = _encode(_smooth(rng, 64, 64), "JPEG")
    files[CORRUPT] = good[: len(good) // 2]
    files["test/cat/t0.jpg"] = _encode(_smooth(rng, 32, 32), "JPEG")
    return files


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _write(source, out, **kwargs):
    """write_beton, returning the result and the WARNING records of the main process."""
    from fastswav.data.write import write_beton

    handler = _Records()
    logger = logging.getLogger("fastswav")
    logger.addHandler(handler)
    try:
        result = write_beton(source, out, **kwargs)
    finally:
        logger.removeHandler(handler)
    return result, handler.records


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(source folder, its train source, .beton path, write result, warning records)."""
    pytest.importorskip("ffcv")
    root = tmp_path_factory.mktemp("small")
    folder = write_files(root / "images", _small_folder_files())
    source = open_source(folder, "train")
    out = str(root / "small.beton")
    result, records = _write(source, out, max_resolution=CAP, jpeg_quality=95, workers=2,
                             chunk_size=3)
    return folder, source, out, result, records


# Two original sizes (landscape and portrait) of gradient images: R follows the column, G the
# row, so a crop's mean colour says where in the original image it was cut.
GRADIENT_SIZES = [(180, 300), (260, 140)]
GRADIENT_IMAGES = 64


def _gradient(height, width):
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([255 * x / (width - 1), 255 * y / (height - 1), np.full(x.shape, 128.0)],
                     axis=-1)
    return Image.fromarray(image.round().astype(np.uint8))


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """.beton of GRADIENT_IMAGES gradient PNGs, alternating the two sizes, capped at 120."""
    pytest.importorskip("ffcv")
    root = tmp_path_factory.mktemp("gradients")
    files = {}
    for i in range(GRADIENT_IMAGES):
        h, w = GRADIENT_SIZES[i % 2]
        files[f"g/{i:03d}.png"] = _encode(_gradient(h, w), "PNG")
    folder = write_files(root / "images", files)
    out = str(root / "gradients.beton")
    _write(open_source(folder), out, max_resolution=120, jpeg_quality=95, workers=1)
    return out


# --- canvas layout (no FFCV needed) ---------------------------------------------------------

def test_canvas_layout_picks_fast_dct_scales_and_fits():
    heights = np.array([375, 375, 100, 32, 1000, 100])
    widths = np.array([500, 500, 70, 32, 10, 70])
    raw = np.array([False, False, False, False, False, True])
    k, decoded, valid = canvas_layout(heights, widths, raw, (512, 512))
    assert k.tolist() == [8, 8, 8, 8, 4, 8]
    assert valid.tolist()[:4] == [[375, 500], [375, 500], [100, 70], [32, 32]]
    assert valid[5].tolist() == [100, 70]  # raw, fits: copied as is
    # 1000 x 10 at 4/8 is 500 x 5 (ceil): the largest fast scale that fits.
    assert decoded[4].tolist() == [500, 5] and valid[4].tolist() == [500, 5]
    k, decoded, valid = canvas_layout(heights, widths, raw, (256, 256))
    assert k.tolist() == [4, 4, 8, 8, 2, 8]
    assert valid[0].tolist() == [188, 250]  # ceil(375 / 2), 500 / 2
    # Too large even at 1/8 (canvas 8): decoded at 1/8, then resized to fit, aspect kept.
    k, decoded, valid = canvas_layout(np.array([100]), np.array([70]), np.array([False]), (8, 8))
    assert k.tolist() == [1] and decoded[0].tolist() == [13, 9] and valid[0].tolist() == [8, 5]
    # Raw images are not DCT-scaled: resized to fit when too large.
    _, _, valid = canvas_layout(np.array([100]), np.array([70]), np.array([True]), (50, 50))
    assert valid[0].tolist() == [50, 35]


# --- writer ---------------------------------------------------------------------------------

def test_writer_skips_corrupt_and_converts_modes(small):
    folder, source, out, result, records = small
    names = [source.name(i) for i in range(len(source))]
    assert result.skipped == [CORRUPT]
    assert result.written == len(source) - 1
    # One log line in the main process: the count and the names.
    lines = [r.getMessage() for r in records if "unreadable" in r.getMessage()]
    assert len(lines) == 1 and "1 unreadable" in lines[0] and CORRUPT in lines[0]
    assert not os.path.exists(out + ".partial")

    beton = BetonSource(out)
    good = [i for i, name in enumerate(names) if name != CORRUPT]
    assert len(beton) == len(good)
    assert beton.labels.tolist() == source.labels[good].tolist()
    originals = [source.decode(i).shape[:2] for i in good]
    assert beton.original_sizes.tolist() == [list(s) for s in originals]
    # Stored at the cap: longer side CAP where the original was larger, else unchanged.
    for (h, w), (sh, sw) in zip(originals, beton.stored_sizes.tolist()):
        if max(h, w) > CAP:
            assert max(sh, sw) == CAP and abs(sh / sw - h / w) < 0.05
        else:
            assert (sh, sw) == (h, w)
    # Grayscale, CMYK and PNG came in as RGB; pixels close to the source's own RGB decode.
    for name in ("train/cat/c_gray.jpg", "train/dog/d_cmyk.jpg", "train/dog/d_alpha.png",
                 "train/cat/c0.jpg"):
        row = good.index(names.index(name))
        stored = beton.decode(row)
        assert stored.shape[2] == 3 and stored.dtype == np.uint8
        expected = np.asarray(Image.fromarray(source.decode(names.index(name))).resize(
            stored.shape[1::-1], Image.BILINEAR), dtype=float)
        assert np.abs(stored - expected).mean() < 4, name
    gray = beton.decode(good.index(names.index("train/cat/c_gray.jpg"))).astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 3

    # FFCV's own reader agrees.
    from ffcv.reader import Reader

    reader = Reader(out)
    assert reader.num_samples == len(good)
    assert reader.metadata["f1"].tolist() == beton.labels.tolist()


def test_writer_cli_help_and_one_line_errors(tmp_path, capsys, small):
    from fastswav.data.write import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--max-resolution", "--jpeg-quality", "--split", "--workers"):
        assert option in text
    for argv in ([str(tmp_path / "missing"), str(tmp_path / "o.beton")],
                 [small[0], str(tmp_path / "o.beton"), "--jpeg-quality", "0"],
                 [small[0], str(tmp_path / "o.beton"), "--max-resolution", "many"],
                 [small[0], str(tmp_path / "o.beton"), "--bogus"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert not os.path.exists(tmp_path / "o.beton")


def test_writer_cli_writes(tmp_path, small):
    from fastswav.data.write import main

    out = tmp_path / "cli.beton"
    assert main([small[0], str(out), "--split", "test", "--workers", "1"]) == 0
    assert len(BetonSource(str(out))) == 1


def test_without_ffcv_the_writer_writes_the_same_file(tmp_path, small, monkeypatch, caplog):
    """With ``ffcv`` unimportable, data.write writes the format itself: the same rows
    (labels, stored and original sizes, the unreadable image left out) as FFCV's writer."""
    from fastswav.data.beton import BetonFile
    from fastswav.data.write import main

    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` now fails
    with pytest.raises(FFCVUnavailableError, match="pip install"):
        import_ffcv()
    out = tmp_path / "own.beton"
    with caplog.at_level(logging.INFO, logger="fastswav"):
        assert main([small[0], str(out), "--max-resolution", str(CAP), "--jpeg-quality", "95",
                     "--workers", "2"]) == 0
    assert any("ffcv is not importable" in r.getMessage() for r in caplog.records)
    ours, theirs = BetonFile(str(out)), BetonFile(small[2])
    assert ours.fields == theirs.fields and ours.num_samples == theirs.num_samples
    assert int(ours.header["page_size"]) == int(theirs.header["page_size"])
    for name in ("label", "orig_height", "orig_width"):
        assert ours.metadata[name].tolist() == theirs.metadata[name].tolist()
    for name in ("height", "width", "mode"):
        assert ours.metadata["image"][name].tolist() == theirs.metadata["image"][name].tolist()
    for i in range(ours.num_samples):  # same pixels up to the two encoders and resizers
        a, b = BetonSource(str(out)).decode(i), BetonSource(small[2]).decode(i)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


# --- decode-once loader ---------------------------------------------------------------------

class _Recorder:
    """Wraps a BatchedMultiCrop and keeps the crop parameters and sizes of every call."""

    def __init__(self, augment):
        self.augment = augment
        self.calls = []

    def __call__(self, images, generator=None, **sizes):
        crops, params = self.augment(images, generator, return_params=True, **sizes)
        self.calls.append((params, sizes["original_sizes"].cpu(), crops))
        return crops


def _reference_boxes(sizes, scale, seed):
    """torchvision's RandomResizedCrop.get_params, one box per (h, w) of ``sizes``."""
    torch.manual_seed(seed)
    return np.array([RandomResizedCrop.get_params(torch.empty(1, h, w), list(scale),
                                                  [3 / 4, 4 / 3]) for h, w in sizes.tolist()],
                    dtype=np.float64)


@pytest.fixture(scope="module")
def gradient_run(gradients):
    """Four epochs of the decode-once loader over the gradient file (canvas 64: the 120-pixel
    images decode at 4/8), recording every crop's parameters."""
    from fastswav.data.ffcv_loader import FFCVMultiCropLoader

    augment = _Recorder(BatchedMultiCrop((32, 16), (2, 6), (0.14, 0.05), (1.0, 0.14),
                                         blur_prob=0.5, mean=(0, 0, 0), std=(1, 1, 1)))
    loader = FFCVMultiCropLoader(gradients, augment, batch_size=16, seed=5, canvas=64,
                                 num_workers=1)
    batches = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        batches.extend(crops for crops, _ in loader)
    return loader, augment, batches


def test_loader_crops_follow_reference_in_original_coordinates(gradient_run):
    loader, augment, _ = gradient_run
    assert loader.canvas == 64 and len(loader) == GRADIENT_IMAGES // 16
    for group, scale in enumerate([(0.14, 1.0), (0.05, 0.14)]):
        params = [call[0][group] for call in augment.calls]
        count = params[0].top.numel() // augment.calls[0][1].shape[0]
        sizes = torch.cat([call[1].repeat(count, 1) for call in augment.calls]).numpy()
        assert {tuple(size) for size in sizes.tolist()} == set(GRADIENT_SIZES)  # the originals
        top, left, height, width = (torch.cat([getattr(p, k) for p in params]).numpy()
                                    for k in ("top", "left", "height", "width"))
        # Inside the original image, and larger than the canvas could hold: original pixels.
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + height <= sizes[:, 0]).all() and (left + width <= sizes[:, 1]).all()
        if group == 0:
            assert width.max() > 120 and height.max() > 120
        ref = _reference_boxes(sizes, scale, seed=group)
        n = len(top)
        critical = ks_critical(n, n)
        area = height * width / (sizes[:, 0] * sizes[:, 1])
        ref_area = ref[:, 2] * ref[:, 3] / (sizes[:, 0] * sizes[:, 1])
        for name, ours, theirs in (("area fraction", area, ref_area),
                                   ("aspect ratio", width / height, ref[:, 3] / ref[:, 2]),
                                   ("top", top / sizes[:, 0], ref[:, 0] / sizes[:, 0]),
                                   ("left", left / sizes[:, 1], ref[:, 1] / sizes[:, 1])):
            d = ks_statistic(ours, theirs)
            assert d < critical, f"group {group} {name}: KS {d:.4f} >= {critical:.4f} (n={n})"


def test_loader_crops_show_their_box_of_the_original(gradient_run):
    """Plain crops (no jitter, no grayscale): mean R and G give the box centre in original
    coordinates, through the writer's cap, JPEG and the 4/8 DCT decode."""
    _, augment, _ = gradient_run
    checked = 0
    for params, sizes, crops in augment.calls:
        assert {tuple(size) for size in sizes.tolist()} <= set(GRADIENT_SIZES)
        batch = sizes.shape[0]
        for group, p in enumerate(params):
            count = p.top.numel() // batch
            first = sum(c for c in (2, 6)[:group])
            stacked = torch.cat(crops[first:first + count])  # crop-major, as the params
            plain = ~p.jitter & ~p.grayscale
            h, w = sizes[:, 0].repeat(count).double(), sizes[:, 1].repeat(count).double()
            centre_x = 255 * (p.left + p.width / 2 - 0.5) / (w - 1)
            centre_y = 255 * (p.top + p.height / 2 - 0.5) / (h - 1)
            mean = stacked.double().mean((2, 3)) * 255
            torch.testing.assert_close(mean[plain, 0], centre_x[plain], atol=6.0, rtol=0)
            torch.testing.assert_close(mean[plain, 1], centre_y[plain], atol=6.0, rtol=0)
            checked += int(plain.sum())
    assert checked > 300


def test_loader_outputs_rates_and_determinism(gradient_run):
    loader, augment, batches = gradient_run
    for crops in batches:
        assert [tuple(c.shape) for c in crops] == [(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)] * 6
        for crop in crops:
            assert crop.dtype == torch.float32 and crop.device.type == "cpu"
            assert crop.min() >= -1e-5 and crop.max() <= 1 + 1e-5
    for group in range(2):
        params = [call[0][group] for call in augment.calls]
        for name, rate in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
            flags = torch.cat([getattr(p, name) for p in params])
            assert binomial_ok(int(flags.sum()), flags.numel(), rate), (group, name)
        gray = torch.cat([p.grayscale for p in params])
        assert gray.any()
    # Same seed and epoch: same crops; a resumed epoch gives exactly the remaining batches.
    loader.set_epoch(3)
    again = [crops for crops, _ in loader]
    for ours, theirs in zip(again, batches[-len(loader):]):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    loader.set_epoch(3, start_batch=2)
    resumed = [crops for crops, _ in loader]
    assert len(resumed) == len(loader) - 2
    for ours, theirs in zip(resumed, batches[-2:]):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    loader.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0][0], again[0][0])


def _canvas_indices(loader, beton):
    """The indices of one epoch of ``loader.canvases()``, checking on the way that each canvas
    holds the image its index names (the stored image area-resized to its valid size)."""
    import cv2

    indices = []
    for images, valid, original, index in loader.canvases():
        assert images.dtype == torch.uint8
        assert images.shape[1:] == (3, loader.canvas, loader.canvas)
        for j, i in enumerate(index.tolist()):
            h, w = valid[j].tolist()
            assert max(h, w) <= loader.canvas
            assert original[j].tolist() == beton.original_sizes[i].tolist()
            canvas = images[j, :, :h, :w].permute(1, 2, 0).numpy().astype(float)
            expected = cv2.resize(beton.decode(i), (w, h), interpolation=cv2.INTER_AREA)
            assert np.abs(canvas - expected).mean() < 6, (i, h, w)
        indices.extend(index.tolist())
    return indices


def test_two_ranks_cover_the_data_once_per_epoch_with_the_right_pixels(small):
    """Canvas 40: the small file's images decode at full size, 1/2 and 1/4; canvas 10: at
    1/8, and the larger ones are then resized to fit. Every canvas holds the image its index
    names."""
    from fastswav.data.ffcv_loader import FFCVMultiCropLoader

    out = small[2]
    beton = BetonSource(out)
    n = len(beton)

    def make(rank, canvas):
        return FFCVMultiCropLoader(out, BatchedMultiCrop((8,), (1,), (0.5,), (1.0,)),
                                   batch_size=2, seed=7, rank=rank, world_size=2,
                                   canvas=canvas, num_workers=1, drop_last=False)

    loaders = [make(0, 40), make(1, 40)]
    seen = {}
    for epoch in (0, 1):
        shards = []
        for loader in loaders:
            loader.set_epoch(epoch)
            shards.append(_canvas_indices(loader, beton))
        per_rank = math.ceil(n / 2)
        assert len(shards[0]) == len(shards[1]) == per_rank
        padding = 2 * per_rank - n
        assert len(set(shards[0]) & set(shards[1])) <= padding
        assert set(shards[0]) | set(shards[1]) == set(range(n))
        seen[epoch] = shards
    assert seen[0] != seen[1]  # reshuffled per epoch
    # Deterministic given the seed (whatever the canvas): a new loader, the same shard.
    again = make(1, 10)
    again.set_epoch(1)
    assert _canvas_indices(again, beton) == seen[1][1]


class _Arrays:
    """An indexable dataset of (image, label) for FFCV's own writer."""

    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        return self.arrays[i], i


def test_loader_reads_ffcv_files_with_raw_images_and_no_original_sizes(tmp_path):
    """A file written by FFCV itself (image + label, pixels stored raw): the stored size
    stands for the original; images that fit are copied exactly, larger ones resized."""
    pytest.importorskip("ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from fastswav.data.ffcv_loader import FFCVMultiCropLoader

    rng = np.random.default_rng(3)
    arrays = [np.asarray(_smooth(rng, h, w)) for h, w in [(20, 24), (30, 12), (48, 60), (24, 24)]]
    out = str(tmp_path / "raw.beton")
    DatasetWriter(out, {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(_Arrays(arrays))
    loader = FFCVMultiCropLoader(out, BatchedMultiCrop((8,), (1,), (0.5,), (1.0,)),
                                 batch_size=2, canvas=24, num_workers=1, drop_last=False)
    assert loader.original_sizes.tolist() == [list(a.shape[:2]) for a in arrays]
    seen = 0
    for images, valid, original, index in loader.canvases():
        for j, i in enumerate(index.tolist()):
            h, w = valid[j].tolist()
            canvas = images[j, :, :h, :w].permute(1, 2, 0).numpy()
            if arrays[i].shape[:2] == (h, w):
                assert np.array_equal(canvas, arrays[i])
            else:  # too large for the canvas: resized to fit, aspect kept (48x60 -> 19x24)
                assert max(h, w) == 24 and {(h, w)} <= {(19, 24), (24, 9)}
                import cv2

                expected = cv2.resize(arrays[i], (w, h), interpolation=cv2.INTER_AREA)
                assert np.abs(canvas.astype(int) - expected).max() <= 1
            seen += 1
    assert seen == len(arrays)
    crops, _ = next(iter(loader))
    assert crops[0].shape == (2, 3, 8, 8)


def test_builder_gives_the_ffcv_loader_and_checks_its_input(small, tmp_path):
    from fastswav.data.ffcv_loader import FFCVMultiCropLoader

    loader = build_ffcv_multicrop_loader(small[2], batch_size=4, size_crops=(16, 8),
                                         n_crops=(2, 2), seed=1, num_workers=1)
    assert isinstance(loader, FFCVMultiCropLoader) and loader.canvas == CAP
    crops, skipped = next(iter(loader))
    assert skipped == 0 and [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [
        (4, 3, 8, 8)] * 2
    with pytest.raises(FileNotFoundError, match="not found"):
        build_ffcv_multicrop_loader(str(tmp_path / "nope.beton"), batch_size=4)
    with pytest.raises(ValueError, match="not an FFCV .beton"):
        build_ffcv_multicrop_loader(small[0], batch_size=4)
    with pytest.raises(ValueError, match="needs at least"):
        build_ffcv_multicrop_loader(small[2], batch_size=64, world_size=2)


def test_builder_gives_the_torchvision_loader_without_ffcv(small, monkeypatch, caplog):
    from fastswav.data.decode_once import TorchvisionMultiCropLoader

    monkeypatch.setitem(sys.modules, "ffcv", None)  # as where ffcv is not installed
    with caplog.at_level(logging.INFO, logger="fastswav"):
        loader = build_ffcv_multicrop_loader(small[2], batch_size=4, size_crops=(16, 8),
                                             n_crops=(2, 2), seed=1, rank=1, world_size=2,
                                             num_workers=1)
    lines = [r.getMessage() for r in caplog.records if "decode-once loader" in r.getMessage()]
    assert len(lines) == 1 and "torchvision" in lines[0] and "not importable" in lines[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert isinstance(loader, TorchvisionMultiCropLoader) and loader.canvas == CAP
    loader.set_epoch(1)
    crops, skipped = next(iter(loader))
    assert skipped == 0 and [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [
        (4, 3, 8, 8)] * 2
