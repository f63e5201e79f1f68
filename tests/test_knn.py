"""Weighted kNN evaluation: the vote against a float64 brute force, feature extraction, the
evaluation on real CIFAR-10 JPEGs, and the command line."""
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastswav.data.multicrop import eval_transform
from fastswav.data.sources import open_source
from fastswav.eval import knn
from fastswav.eval.knn import balanced_subset, extract_features, knn_eval, knn_predict, knn_top1

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def _brute_force_predictions(train, train_labels, test, k, temperature, n_classes):
    """Weighted kNN in float64, one query at a time, written out plainly."""
    train = train.double().numpy()
    test = test.double().numpy()
    predictions = []
    for query in test:
        similarity = train @ query
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(n_classes)
        for j in nearest:
            votes[int(train_labels[j])] += np.exp(similarity[j] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


def _unit_rows(x):
    return F.normalize(x, dim=1)


@pytest.mark.parametrize("k, temperature, chunk_size", [(1, 0.07, None), (5, 0.07, 7),
                                                        (20, 0.5, 1), (20, 0.07, 1000)])
def test_knn_matches_float64_brute_force(k, temperature, chunk_size):
    generator = torch.Generator().manual_seed(k)
    n_classes = 4
    train = _unit_rows(torch.randn(150, 16, generator=generator))
    train_labels = torch.randint(n_classes, (150,), generator=generator)
    test = _unit_rows(torch.randn(60, 16, generator=generator))
    test_labels = torch.randint(n_classes, (60,), generator=generator)
    expected = _brute_force_predictions(train, train_labels, test, k, temperature, n_classes)
    predicted = knn_predict(train, train_labels, test, k, temperature, n_classes, chunk_size)
    assert predicted.tolist() == expected.tolist()
    top1 = knn_top1(train, train_labels, test, test_labels, k, temperature, n_classes,
                    chunk_size)
    assert top1 == pytest.approx(100.0 * np.mean(expected == test_labels.numpy()))


def test_separable_features_give_100_percent():
    generator = torch.Generator().manual_seed(0)
    n_classes, dim = 10, 32
    centers = torch.eye(dim)[:n_classes] * 5

    def sample(count):
        labels = torch.arange(count) % n_classes
        noise = 0.5 * torch.randn(count, dim, generator=generator)  # far below the gap
        return _unit_rows(centers[labels] + noise), labels

    train, train_labels = sample(500)
    test, test_labels = sample(200)
    assert knn_top1(train, train_labels, test, test_labels, n_classes=n_classes) == 100.0


def test_random_labels_give_chance():
    generator = torch.Generator().manual_seed(1)
    train = _unit_rows(torch.randn(3000, 32, generator=generator))
    test = _unit_rows(torch.randn(2000, 32, generator=generator))
    top1 = knn_top1(train, torch.randint(10, (3000,), generator=generator), test,
                    torch.randint(10, (2000,), generator=generator), n_classes=10)
    assert 7.0 < top1 < 13.0  # chance is 10 %; 2000 queries give a spread of about 0.7 %


def test_k_larger_than_memory_and_argument_errors():
    train = _unit_rows(torch.randn(3, 4))
    labels = torch.tensor([0, 1, 1])
    # k clamps to 3; a high temperature makes the weights nearly equal, so the majority wins.
    assert knn_predict(train, labels, train, k=50, temperature=100.0).tolist() == [1, 1, 1]
    assert knn_predict(train, labels, train, k=50).tolist() == [0, 1, 1]  # self-match wins
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_predict(train, labels, train, k=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_predict(train, labels, train, temperature=0)
    with pytest.raises(ValueError, match="labelled"):
        knn_predict(train, torch.tensor([0, -1, 1]), train)
    with pytest.raises(ValueError, match="different lengths"):
        knn_top1(train, labels, train, labels[:2])


def test_balanced_subset_is_deterministic_and_balanced():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    subset = balanced_subset(labels, 9)
    assert subset == balanced_subset(labels, 9) and subset == sorted(subset)
    assert np.bincount(labels[subset]).tolist() == [3, 3, 3]
    # A class that runs out leaves its share to the others.
    assert np.bincount(labels[balanced_subset(labels, 12)]).tolist() == [5, 3, 4]
    assert balanced_subset(labels, None) == list(range(20))
    assert balanced_subset(labels, 100) == list(range(20))


class _TinyTrunk(torch.nn.Module):
    """A random conv layer and global pooling: deterministic, untrained features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 32, 3, stride=2)
        self.norm = torch.nn.BatchNorm2d(32)

    def forward(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.norm(self.conv(x))), 2).flatten(1)


def _color_folder(root, corrupt=True):
    """train/ and test/ with red and blue images (noisy), plus a corrupt file in train/red."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for name, color in (("blue", (20, 30, 220)), ("red", (220, 30, 20))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(color) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg")
    if corrupt:
        (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    return str(root)


def test_extract_features_normalises_skips_unreadable_and_restores_mode(tmp_path):
    source = open_source(_color_folder(tmp_path / "colors"), "train")
    trunk = _TinyTrunk().train()
    features, labels = extract_features(trunk, source, eval_transform(32), batch_size=4)
    assert features.shape == (12, 128) and labels.tolist() == [0] * 6 + [1] * 6
    torch.testing.assert_close(features.norm(dim=1), torch.ones(12))
    assert trunk.training  # put back in training mode
    # Eval mode: the result does not depend on the batch composition.
    single, _ = extract_features(trunk, source, eval_transform(32), batch_size=1)
    torch.testing.assert_close(single, features, rtol=1e-4, atol=1e-5)


def test_knn_eval_on_color_folder_is_perfect(tmp_path):
    root = _color_folder(tmp_path / "colors")
    top1 = knn_eval(_TinyTrunk(), open_source(root, "train"), open_source(root, "test"),
                    image_size=32, k=3, batch_size=8)
    assert top1 == 100.0


def test_knn_eval_on_shared_cifar10_zip(shared_data):
    path = os.path.join(shared_data, "cifar10-jpeg.zip")
    train, test = open_source(path, "train"), open_source(path, "test")
    top1 = knn_eval(_TinyTrunk(), train, test, image_size=32, batch_size=200,
                    max_train=1000, max_test=200)
    # Random conv features of real images are well above the 10 % of chance.
    assert 15.0 < top1 <= 100.0


def _fake_model_module(monkeypatch, image_size=32):
    """Stands in for fastswav.model.load_trunk_from_checkpoint: the CLI's only link to it."""
    calls = []

    def load_trunk_from_checkpoint(path, map_location=None):
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        calls.append((path, map_location))
        return _TinyTrunk(), image_size

    module = types.ModuleType("fastswav.model")
    module.load_trunk_from_checkpoint = load_trunk_from_checkpoint
    monkeypatch.setitem(sys.modules, "fastswav.model", module)
    return calls


def test_cli_help_explains(capsys):
    with pytest.raises(SystemExit) as exit_info:
        knn.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("kNN top-1", "--checkpoint", "--data", "--k", "--temperature",
                     "--max-train", "--max-test", "--device", "exp(similarity"):
        assert expected in text


def test_cli_prints_top1(tmp_path, monkeypatch, capsys):
    calls = _fake_model_module(monkeypatch)
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"")
    data = _color_folder(tmp_path / "colors")
    assert knn.main(["--checkpoint", str(checkpoint), "--data", data, "--k", "3",
                     "--device", "cpu", "--max-test", "4"]) == 0
    assert capsys.readouterr().out.strip() == "kNN top-1: 100.00%"
    assert calls == [(str(checkpoint), "cpu")]


@pytest.mark.parametrize("argv, message", [
    (["--data", "{missing}"], "data path not found: .*missing"),
    (["--checkpoint", "{missing}"], "checkpoint not found: .*missing"),
    (["--k", "0"], "--k must be >= 1"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--max-train", "0"], "--max-train must be >= 1"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, argv, message, usage_error):
    _fake_model_module(monkeypatch)
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"")
    data = _color_folder(tmp_path / "colors", corrupt=False)
    options = {"--checkpoint": str(checkpoint), "--data": data}
    for flag, value in zip(argv[::2], argv[1::2]):
        options[flag] = value.format(missing=str(tmp_path / "missing"))
    args = [item for pair in options.items() for item in pair]
    assert __import__("re").search(message, usage_error(knn.main, args))
