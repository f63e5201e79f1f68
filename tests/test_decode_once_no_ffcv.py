"""The decode-once path with the ``ffcv`` package unimportable, on the shared ImageNet
sample: data.write writes the .beton itself, and the loader decodes it with torchvision's
libjpeg-turbo decoder into the same canvases as the FFCV path.

What "the same" means, measured on the sample: the file's rows (labels, stored and original
sizes) are equal; an image under the size cap is stored as the same JPEG bytes (both writers
hand the same pixels to libjpeg-turbo at the same quality); the torchvision canvases equal
PIL's decode of the stored JPEG exactly, and FFCV's within the error of the fast integer
inverse DCT FFCV asks libjpeg-turbo for (asserted: at most 10 gray levels, under 1.5 on average).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from fastswav.data.batched_multicrop import BatchedMultiCrop
from fastswav.data.beton import BetonFile, BetonSource

from conftest import SHARED_DATA

IMAGES = 100  # of the sample's 1,000: enough sizes and aspect ratios, seconds to write


@pytest.fixture(scope="module")
def sample_zip():
    path = os.path.join(os.path.abspath(SHARED_DATA), "imagenet-sample-jpeg.zip")
    if not os.path.isfile(path):
        pytest.fail(f"shared ImageNet sample not found at {path}; set FASTSWAV_SHARED_DATA")
    return path


@pytest.fixture(scope="module")
def written(sample_zip, tmp_path_factory):
    """(.beton written with ffcv unimportable, .beton written by FFCV or None)."""
    from fastswav.data.sources import open_source
    from fastswav.data.write import write_beton

    root = tmp_path_factory.mktemp("sample")
    ours = str(root / "without_ffcv.beton")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "ffcv", None)  # `import ffcv` fails, as where absent
        source = open_source(sample_zip)
        write_beton(source, ours, workers=2, indices=range(IMAGES))
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return ours, None
    theirs = str(root / "ffcv.beton")
    write_beton(open_source(sample_zip), theirs, workers=2, indices=range(IMAGES),
                use_ffcv=True)
    return ours, theirs


def _canvases(loader):
    """{index: (canvas uint8 [3, h, w] (its valid part), original (h, w))} of one epoch."""
    out = {}
    for images, valid, original, index in loader.canvases():
        for k, i in enumerate(index.tolist()):
            vh, vw = valid[k].tolist()
            out[i] = images[k, :, :vh, :vw].clone(), tuple(original[k].tolist())
    return out


def _torchvision_canvases(path, monkeypatch):
    from fastswav.data.decode_once import TorchvisionMultiCropLoader
    from fastswav.data.ffcv_loader import build_ffcv_multicrop_loader

    monkeypatch.setitem(sys.modules, "ffcv", None)
    loader = build_ffcv_multicrop_loader(path, batch_size=32, num_workers=2, drop_last=False)
    assert isinstance(loader, TorchvisionMultiCropLoader)
    return loader, _canvases(loader)


def test_without_ffcv_the_loader_decodes_what_was_written(written, monkeypatch):
    ours, _ = written
    loader, canvases = _torchvision_canvases(ours, monkeypatch)
    source = BetonSource(ours)
    assert len(source) == IMAGES and sorted(canvases) == list(range(IMAGES))
    assert loader.canvas == int(source.stored_sizes.max())  # every image at full size
    for i, (canvas, original) in canvases.items():
        assert original == tuple(source.original_sizes[i].tolist())
        assert torch.equal(canvas.permute(1, 2, 0), torch.from_numpy(source.decode(i)))
    # ... and the crops come out of it, on the loader's device, in the recipe's shapes.
    crops, skipped = next(iter(loader))
    assert skipped == 0 and [tuple(c.shape[1:]) for c in crops] == (
        [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6)


def test_without_ffcv_the_canvases_match_the_ffcv_path(written, monkeypatch):
    ours, theirs = written
    if theirs is None:
        pytest.skip("needs ffcv (for the FFCV path to compare with)")
    from fastswav.data.ffcv_loader import FFCVMultiCropLoader

    mine, yours = BetonFile(ours), BetonFile(theirs)
    for name in ("label", "orig_height", "orig_width"):
        assert mine.metadata[name].tolist() == yours.metadata[name].tolist()
    for name in ("height", "width"):
        assert mine.metadata["image"][name].tolist() == yours.metadata["image"][name].tolist()

    reference = _canvases(FFCVMultiCropLoader(theirs, BatchedMultiCrop(), batch_size=32,
                                              num_workers=1, drop_last=False))
    _, canvases = _torchvision_canvases(ours, monkeypatch)
    ours_source, theirs_source = BetonSource(ours), BetonSource(theirs)
    same_bytes, errors = 0, []
    for i, (canvas, original) in canvases.items():
        expected, expected_original = reference[i]
        assert original == expected_original and canvas.shape == expected.shape
        error = (canvas.int() - expected.int()).abs()
        if ours_source._read_bytes(i) == theirs_source._read_bytes(i):
            same_bytes += 1
            assert error.max() <= 10, i  # FFCV's fast integer IDCT against the exact one
        errors.append(error.float().mean().item())
    assert same_bytes >= 0.8 * IMAGES  # ImageNet images are mostly under the 512 cap
    assert np.mean(errors) < 1.5, np.mean(errors)


def test_ffcv_reads_the_file_written_without_it(written):
    ours, theirs = written
    if theirs is None:
        pytest.skip("needs ffcv")
    from fastswav.data.ffcv_loader import FFCVMultiCropLoader

    source = BetonSource(ours)
    loader = FFCVMultiCropLoader(ours, BatchedMultiCrop(), batch_size=32, num_workers=1,
                                 drop_last=False)
    canvases = _canvases(loader)
    assert sorted(canvases) == list(range(IMAGES))
    for i, (canvas, original) in canvases.items():
        assert original == tuple(source.original_sizes[i].tolist())
        exact = torch.from_numpy(source.decode(i)).permute(2, 0, 1)
        assert (canvas.int() - exact.int()).abs().max() <= 10
