"""The data path's steps never build a tensor from host data nor read a device value on the
host: one call of the batched multi-crop augmentation, and one step of the decode-once
loader (gather of the sizes, augmentation), traced with the dispatch-mode trace of
tests/host_traffic.py.

On a GPU a tensor built from a Python list (``aten.lift_fresh``) is a blocking
host-to-device copy: the host waits while the GPU idles, once per such tensor, several per
step. The first call of a fresh augmentation object is traced (constants it makes then must
be made on the device too). Each guard has a twin that injects such a tensor and expects
the trace to see it.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fastswav.data.batched_multicrop import BatchedMultiCrop
from host_traffic import HostTrafficTrace


def _canvases(batch=4, side=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=g)
    valid = torch.tensor([[side, side], [30, side], [side, 25], [33, 31]])[:batch]
    original = valid * 3
    return images, valid, original


def _augment():
    return BatchedMultiCrop((24, 12), (2, 3), (0.14, 0.05), (1.0, 0.14), blur_prob=0.5)


def _traced_augment(augment, with_sizes=True):
    images, valid, original = _canvases()
    sizes = dict(valid_sizes=valid, original_sizes=original) if with_sizes else {}
    trace = HostTrafficTrace()
    with trace:
        crops = augment(images, torch.Generator().manual_seed(1), **sizes)
    assert len(crops) == 5
    return trace


@pytest.mark.parametrize("with_sizes", [True, False])
def test_one_augment_call_builds_no_tensor_from_host_data(with_sizes):
    trace = _traced_augment(_augment(), with_sizes)  # a fresh object: its first call
    assert trace.ops > 200  # the trace saw the whole augmentation
    assert trace.found == []


def test_the_augment_guard_fails_on_a_tensor_from_host_data(monkeypatch):
    """The twin: normalisation constants built from Python lists (what the augmentation
    did before) are seen."""
    def from_lists(self, device):
        scale = (1.0 / torch.tensor(self.std, device=device)).view(1, 3, 1, 1)
        return scale, (-torch.tensor(self.mean, device=device) * scale.flatten()).view(1, 3, 1, 1)

    monkeypatch.setattr(BatchedMultiCrop, "_normalisation", from_lists)
    found = _traced_augment(_augment()).found
    assert found and all("host data" in f for f in found)


@pytest.fixture(scope="module")
def tiny_beton(tmp_path_factory):
    """A .beton of 12 small JPEGs written without FFCV."""
    from PIL import Image

    from fastswav.data.sources import open_source
    from fastswav.data.write import write_beton
    from conftest import write_files

    rng = np.random.default_rng(0)
    files = {}
    for i in range(12):
        h, w = 30 + 3 * i, 50 - 2 * i
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "JPEG")
        files[f"c{i % 2}/x{i}.jpg"] = buffer.getvalue()
    root = tmp_path_factory.mktemp("tiny")
    folder = write_files(root / "images", files)
    out = str(root / "tiny.beton")
    write_beton(open_source(folder), out, workers=1, use_ffcv=False)
    return out


def _loader(kind, path):
    if kind == "ffcv":
        pytest.importorskip("ffcv")
        from fastswav.data.ffcv_loader import FFCVMultiCropLoader as cls
    else:
        from fastswav.data.decode_once import TorchvisionMultiCropLoader as cls
    return cls(path, _augment(), batch_size=4, num_workers=1, seed=3)


def _traced_second_step(loader):
    """One step of the loader, after a first (which starts the epoch), traced."""
    batches = iter(loader)
    next(batches)
    trace = HostTrafficTrace()
    with trace:
        crops, skipped = next(batches)
    assert skipped == 0 and len(crops) == 5
    return trace


@pytest.mark.parametrize("kind", ["torchvision", "ffcv"])
def test_one_loader_step_builds_no_tensor_from_host_data(tiny_beton, kind):
    trace = _traced_second_step(_loader(kind, tiny_beton))
    assert trace.ops > 200
    assert trace.found == []
    # The first step of an epoch also moves the epoch's order (one tensor for all its
    # steps, from numpy) to the device: that and nothing else (FFCV's own epoch start makes
    # a few more of its own, once per epoch too).
    if kind == "ffcv":
        return
    loader = _loader(kind, tiny_beton)
    trace = HostTrafficTrace()
    with trace:
        next(iter(loader))
    assert trace.found == ["tensor from host data: aten.lift_fresh.default"]


def test_the_loader_guard_fails_on_sizes_gathered_on_the_host(tiny_beton, monkeypatch):
    """The twin: a step that builds its batch's indices from a Python list is seen."""
    from fastswav.data.decode_once import DecodeOnceLoader

    original = DecodeOnceLoader.canvases

    def canvases(self):
        for images, valid, sizes, index in original(self):
            rows = torch.tensor(index.tolist(), device=self.device)  # host-built
            yield images, self.valid_sizes.index_select(0, rows), sizes, index

    monkeypatch.setattr(DecodeOnceLoader, "canvases", canvases)
    found = _traced_second_step(_loader("torchvision", tiny_beton)).found
    assert any("host data" in f for f in found)


@pytest.mark.cuda
def test_on_cuda_one_loader_step_copies_nothing_but_the_canvases(tiny_beton):
    """On a GPU: no tensor from host data, and the only host-to-device copy of a step is the
    canvas batch (uint8, from a pinned buffer, on the loader's copy stream)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fastswav.data.decode_once import TorchvisionMultiCropLoader

    loader = TorchvisionMultiCropLoader(tiny_beton, _augment(), batch_size=4, num_workers=1,
                                        device="cuda")
    trace = _traced_second_step(loader)
    copies = [f for f in trace.found if f.startswith("copy")]
    assert [f for f in trace.found if not f.startswith("copy")] == []
    assert len(copies) == 1 and "cpu -> cuda" in copies[0]
    assert all(slot.is_pinned() for slot in loader._slots)
