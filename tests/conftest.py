"""Test-wide settings.

Without CUDA, Triton kernels run under the interpreter; TRITON_INTERPRET must be set before
any kernel module is imported, so it is set here, first.
"""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The folder holding cifar10-jpeg.zip: $FASTSWAV_SHARED_DATA (`make test` sets it), else .data/
# in the repository (where `make test` writes the zip when there is none).
SHARED_DATA = os.environ.get("FASTSWAV_SHARED_DATA") or os.path.join(
    os.path.dirname(__file__), "..", ".data")


def pytest_terminal_summary(terminalreporter):
    snippets = sys.modules.get("test_snippets")  # only when the snippet test was collected
    if snippets is not None:
        terminalreporter.write_line(snippets.count_line())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data():
    """The folder holding cifar10-jpeg.zip (SHARED_DATA above; FASTSWAV_SHARED_DATA overrides)."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.fail(f"shared data folder not found at {path}; set FASTSWAV_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """48 random 24x24 images in 3 classes, plus one corrupt file, train/ and test/."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("test", 4)):
        for cls in ("a", "b", "c"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def tiny_config(data, out, **changes):
    """The demo preset shrunk to a 2-step-per-epoch run on ``tiny_folder``."""
    from fastswav.config import preset

    base = preset("demo").replace(
        data=str(data), output_dir=str(out), in_memory=False, workers=0, batch_size=8,
        epochs=3, steps_per_epoch=2, warmup_epochs=1, arch="resnet18", trunk_width=4,
        hidden_dim=16, out_dim=8, n_prototypes=6, n_crops=(2, 2), size_crops=(16, 8),
        freeze_prototypes_niters=1, log_every=1, knn_at_end=False, seed=5,
    )
    return base.replace(**changes)


# Taken before any test module is imported: importing ffcv sets torch's thread count to 1
# (at collection, through pytest.importorskip), and FFCV's loader thread sets it again.
_TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Run every test with the thread count the process started with."""
    if torch.get_num_threads() != _TORCH_THREADS:
        torch.set_num_threads(_TORCH_THREADS)
    yield


def write_files(root, files):
    """Write ``{relative/path: bytes}`` under ``root``; returns ``root`` as a string."""
    for name, data in files.items():
        path = os.path.join(root, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return str(root)


# (size (w, h), PIL mode, file format) of the photos in a stand-in folder of own photos
PHOTOS = [((64, 48), "RGB", "JPEG"), ((40, 72), "RGB", "JPEG"), ((50, 50), "L", "JPEG"),
          ((80, 36), "CMYK", "JPEG"), ((45, 60), "RGBA", "PNG"), ((33, 47), "P", "PNG"),
          ((70, 52), "LA", "PNG"), ((28, 28), "RGB", "PNG")]


def write_photos(folder, copies=2):
    """A folder of photos as a user has them: mixed sizes; grayscale, CMYK, palette, PNG with
    alpha; ``copies`` x 8 random images."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for copy in range(copies):
        for i, ((w, h), mode, fmt) in enumerate(PHOTOS):
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
            image.save(folder / f"photo{copy}_{i}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt)
    return folder


def loss_and_grads(fn, emb, protos, grad_out, **kwargs):
    """(loss, embedding gradient, prototype gradient) of ``fn(emb, protos, **kwargs)`` on
    fresh leaf copies of the inputs, the loss back-propagated with ``grad_out``."""
    e = emb.detach().clone().requires_grad_()
    c = protos.detach().clone().requires_grad_()
    loss = fn(e, c, **kwargs)
    loss.backward(grad_out)
    return loss.detach(), e.grad, c.grad


@pytest.fixture
def usage_error(capsys):
    """``usage_error(main, argv)``: runs a command's ``main`` on bad input, asserts that it
    ended with exit status 2 and one ``error:`` line on stderr, and returns that line."""
    def run(main, argv):
        try:
            status = main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert status == 2 and len(err) == 1 and err[0].startswith("error: "), (status, err)
        return err[0]
    return run


def randomise_batchnorm_(net):
    """Random BatchNorm weights and running statistics (in place), so that comparisons of
    loaded weights cover the running buffers too; returns ``net``."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return net
