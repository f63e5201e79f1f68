"""The CIFAR-10 presets' default data: torchvision's CIFAR-10 in a cache folder (fetched on
first use), any --data path read as it is, and offline one line that names both ways out."""
import os
import urllib.error
import zipfile

import pytest

from fastswav.config import preset
from fastswav.data.sources import CIFAR10_DOWNLOAD, open_source, resolve_download
from fastswav.train import UsageError, main, parse_args


@pytest.mark.parametrize("name", ["demo", "cifar10_speedrun"])
def test_cifar10_presets_default_to_the_download_cache(name):
    assert (preset(name).data, preset(name).data_kind) == (CIFAR10_DOWNLOAD, "auto")


@pytest.mark.parametrize("argv", [[], ["--data", CIFAR10_DOWNLOAD], ["--preset", "cifar10_speedrun"]])
def test_the_default_reads_torchvision_cifar10_from_the_cache(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTSWAV_DATA_CACHE", str(tmp_path / "cache"))
    cfg, _, _ = parse_args(argv)
    assert cfg.data == str(tmp_path / "cache" / "cifar10")
    assert cfg.data_kind == "torchvision-cifar10"
    out = capsys.readouterr().out
    assert "torchvision's CIFAR-10" in out and "--data PATH" in out


def test_a_given_zip_is_read_as_it_is(tmp_path):
    zip_path = str(tmp_path / "cifar10-jpeg.zip")
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("train/cat/0000.jpg", b"")
    cfg, _, _ = parse_args(["--data", zip_path])
    assert (cfg.data, cfg.data_kind) == (zip_path, "auto")


def test_a_missing_path_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="data path not found"):
        parse_args(["--data", "elsewhere/cifar10-jpeg.zip"])
    assert resolve_download("missing.zip") == ("missing.zip", "auto")
    with pytest.raises(FileNotFoundError, match="data path not found"):
        open_source("missing.zip")


def test_cache_folder_follows_xdg(tmp_path, monkeypatch):
    from fastswav.data.sources import download_cache_dir

    monkeypatch.delenv("FASTSWAV_DATA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert download_cache_dir() == os.path.join(str(tmp_path), "fastswav", "data")
    assert resolve_download(CIFAR10_DOWNLOAD) == (
        os.path.join(str(tmp_path), "fastswav", "data", "cifar10"), "torchvision-cifar10")


def _offline(monkeypatch):
    import torchvision.datasets

    class Offline:
        classes = []

        def __init__(self, root, train=True, download=False):
            if download:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)


def test_offline_demo_is_one_line_naming_both_ways_and_exit_2(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTSWAV_DATA_CACHE", str(tmp_path / "cache"))
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "--data PATH" in err[0] and "internet" in err[0] and "offline" in err[0]


def test_eval_sources_understand_the_default_too(tmp_path, monkeypatch):
    _offline(monkeypatch)
    monkeypatch.setenv("FASTSWAV_DATA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 is not under .*cache.cifar10"):
        open_source(CIFAR10_DOWNLOAD, "test")
