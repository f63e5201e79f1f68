"""The demo's data off this project's machines: the shared CIFAR-10 zip first, else
torchvision's CIFAR-10 in a cache folder, and offline one line that names both ways."""
import os
import urllib.error

import pytest

from fastswav.data.sources import DEMO_CIFAR10_ZIP, cifar10_fallback
from fastswav.train import UsageError, main, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_shared_zip_stays_the_first_choice(shared_data, monkeypatch):
    monkeypatch.chdir(REPO)  # ../shared/data is beside the repository here and in CI
    assert os.path.exists(DEMO_CIFAR10_ZIP)
    cfg, _, _ = parse_args([])
    assert (cfg.data, cfg.data_kind) == (DEMO_CIFAR10_ZIP, "auto")


@pytest.mark.parametrize("argv", [[], ["--data", DEMO_CIFAR10_ZIP], ["--preset", "cifar10_speedrun"]])
def test_without_the_zip_the_demo_reads_torchvision_cifar10_from_the_cache(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)  # a fresh clone elsewhere: no ../shared
    monkeypatch.setenv("FASTSWAV_DATA_CACHE", str(tmp_path / "cache"))
    cfg, _, _ = parse_args(argv)
    assert cfg.data == str(tmp_path / "cache" / "cifar10")
    assert cfg.data_kind == "torchvision-cifar10"
    out = capsys.readouterr().out
    assert "torchvision's CIFAR-10" in out and "--data PATH" in out


def test_another_missing_path_is_still_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="data path not found"):
        parse_args(["--data", "elsewhere/cifar10-jpeg.zip"])
    assert cifar10_fallback("missing.zip") == ("missing.zip", "auto")
    assert cifar10_fallback(DEMO_CIFAR10_ZIP, "zip") == (DEMO_CIFAR10_ZIP, "zip")


def test_cache_folder_follows_xdg(tmp_path, monkeypatch):
    from fastswav.data.sources import download_cache_dir

    monkeypatch.delenv("FASTSWAV_DATA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert download_cache_dir() == os.path.join(str(tmp_path), "fastswav", "data")


def test_offline_demo_is_one_line_naming_both_ways_and_exit_2(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    class Offline:
        classes = []

        def __init__(self, root, train=True, download=False):
            if download:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTSWAV_DATA_CACHE", str(tmp_path / "cache"))
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "--data PATH" in err[0] and "internet" in err[0] and "offline" in err[0]
