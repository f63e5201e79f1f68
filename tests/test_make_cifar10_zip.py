"""tests/make_cifar10_zip.py writes the layout the data tests read (checked on a stand-in for
torchvision's CIFAR-10: no download)."""
import numpy as np

import make_cifar10_zip
from fastswav.data.sources import open_source


def test_writes_train_and_test_splits_by_class(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10:
        classes = ["airplane", "automobile", "truck"]

        def __init__(self, root, train=True, download=False):
            count = 6 if train else 3
            rng = np.random.default_rng(int(train))
            self.data = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 3 for i in range(count)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    out = tmp_path / "data" / "cifar10-jpeg.zip"
    monkeypatch.setenv("FASTSWAV_DATA_CACHE", str(tmp_path / "cache"))
    assert make_cifar10_zip.main([str(out)]) == 0
    train, test = open_source(str(out), "train"), open_source(str(out), "test")
    assert (len(train), len(test)) == (6, 3)
    assert train.classes == FakeCIFAR10.classes
    assert np.bincount(train.labels).tolist() == [2, 2, 2]
    assert sorted(train.name(i) for i in range(6))[:2] == ["train/airplane/0000.jpg",
                                                          "train/airplane/0001.jpg"]
    image, _ = test.load(2)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert not (tmp_path / "data" / "cifar10-jpeg.zip.tmp").exists()
