"""Linear probe: the fast mode's classifier on synthetic features, and the command line in
both modes on a tiny image folder."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastswav.checkpoint import save_checkpoint
from fastswav.config import Config
from fastswav.eval import linear
from fastswav.eval.linear import fast_linear_probe, standardize, train_linear_classifier
from fastswav.model import build_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def _separable(n, n_classes=5, dim=20, seed=0):
    """Gaussian clusters around well-separated class centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(n_classes, (n,), generator=generator)
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def test_fast_probe_separates_separable_features():
    train_x, train_y = _separable(500, seed=0)
    test_x, test_y = _separable(200, seed=1)
    result = fast_linear_probe(train_x, train_y, test_x, test_y, n_classes=5,
                               weight_decays=(1e-4, 1e-3), steps=100)
    assert result["top1"] >= 99.0
    assert result["weight_decay"] in (1e-4, 1e-3)
    assert set(result["val_top1"]) == {1e-4, 1e-3}


def test_classifier_reaches_the_regularised_optimum():
    # Overlapping classes: the optimum is interior, so its gradient must vanish there.
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(300, 6, generator=generator)
    y = (x[:, 0] + 0.7 * torch.randn(300, generator=generator) > 0).long()
    (x,) = standardize(x)
    decay = 1e-2
    classifier = train_linear_classifier(x, y, 2, weight_decay=decay, steps=200)
    weight = classifier.weight.detach().double().requires_grad_()
    bias = classifier.bias.detach().double().requires_grad_()
    objective = F.cross_entropy(x.double() @ weight.T + bias, y) + 0.5 * decay * weight.pow(2).sum()
    grad_w, grad_b = torch.autograd.grad(objective, (weight, bias))
    assert grad_w.abs().max() < 1e-4 and grad_b.abs().max() < 1e-4


def test_single_weight_decay_skips_the_sweep():
    train_x, train_y = _separable(100, n_classes=3, seed=4)
    result = fast_linear_probe(train_x, train_y, train_x, train_y, 3, weight_decays=(1e-3,),
                               steps=50)
    assert result["val_top1"] == {} and result["weight_decay"] == 1e-3


def test_bad_arguments_raise():
    x, y = _separable(10)
    with pytest.raises(ValueError, match="steps"):
        train_linear_classifier(x, y, 5, steps=0)
    with pytest.raises(ValueError, match="val_fraction"):
        fast_linear_probe(x, y, x, y, 5, weight_decays=(0.1, 0.2), val_fraction=1.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny image folder (two colour classes, 16x16 PNGs, train/ and test/) and a
    checkpoint of a tiny small-stem ResNet-18 that trained on 16-pixel crops."""
    root = tmp_path_factory.mktemp("linear")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 6)):
        for label, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            folder = root / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (16, 16, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    cfg = Config(arch="resnet18", trunk_width=8, small_images=True, hidden_dim=16, out_dim=8,
                 n_prototypes=10, size_crops=(16, 8))
    torch.manual_seed(0)
    model = build_model(cfg)
    checkpoint = save_checkpoint({"epoch": 1, "model": model.state_dict(), "optimizer": {},
                                  "config": cfg.to_dict(), "knn_init": None},
                                 root / "checkpoint.pt")
    return root / "images", checkpoint


def _top1(output: str) -> float:
    match = re.search(r"^linear top-1: ([0-9.]+)%$", output, re.MULTILINE)
    assert match, output
    return float(match.group(1))


def test_cli_fast_mode(tiny_run, capsys):
    images, checkpoint = tiny_run
    assert linear.main(["--checkpoint", str(checkpoint), "--data", str(images),
                        "--mode", "fast", "--steps", "50", "--device", "cpu"]) == 0
    # Mean colour alone separates the classes; a random trunk keeps that.
    assert _top1(capsys.readouterr().out) >= 90.0


def test_cli_official_mode_one_epoch(tiny_run, capsys):
    images, checkpoint = tiny_run
    assert linear.main(["--checkpoint", str(checkpoint), "--data", str(images),
                        "--mode", "official", "--epochs", "1", "--batch-size", "8",
                        "--device", "cpu"]) == 0
    assert 0.0 <= _top1(capsys.readouterr().out) <= 100.0


@pytest.mark.parametrize("args, message", [
    (["--data", "train.beton"], "data path not found: train.beton"),
    (["--data", "/nonexistent/folder"], "not found"),
    (["--steps", "0"], "--steps"),
])
def test_cli_errors_are_one_line(tiny_run, args, message, usage_error):
    images, checkpoint = tiny_run
    argv = ["--checkpoint", str(checkpoint), "--data", str(images), *args]
    assert message in usage_error(linear.main, argv)
