"""Training and evaluation read FFCV .beton files (written by fastswav.data.write)."""
import pytest
import torch

from fastswav.checkpoint import load_checkpoint
from fastswav.data.sources import beton_split_path, open_source
from fastswav.train import run

from conftest import tiny_config

pytest.importorskip("ffcv", reason="make test installs ffcv (see the Makefile)")


@pytest.fixture(scope="module")
def beton_pair(tiny_folder, tmp_path_factory):
    from fastswav.data.write import write_beton

    out = tmp_path_factory.mktemp("beton")
    for split in ("train", "test"):
        write_beton(open_source(str(tiny_folder), split), str(out / f"tiny_{split}.beton"), workers=1)
    return out


def test_training_on_a_beton_uses_the_decode_once_loader(beton_pair, tmp_path, caplog):
    cfg = tiny_config(beton_pair / "tiny_train.beton", tmp_path / "run", epochs=2, augment="pil")
    with caplog.at_level("WARNING", logger="fastswav"):
        summary = run(cfg, resume=False)
    assert "reference PIL multi-crop" not in caplog.text  # FFCV is there: no fallback
    state = load_checkpoint(tmp_path / "run" / "checkpoint_epoch0002.pt")
    assert state["epoch"] == 2 and torch.isfinite(torch.tensor(summary["loss"]))


def test_knn_cli_reads_the_train_and_test_betons(beton_pair, tiny_folder, tmp_path, capsys):
    from fastswav.eval.knn import main as knn_main

    run(tiny_config(tiny_folder, tmp_path / "run", epochs=1), resume=False)
    ckpt = str(tmp_path / "run" / "checkpoint_epoch0001.pt")
    assert knn_main(["--checkpoint", ckpt, "--data", str(beton_pair / "tiny_train.beton"),
                     "--k", "5", "--device", "cpu"]) == 0
    assert "kNN top-1" in capsys.readouterr().out


def test_beton_split_files_are_found_by_name(beton_pair):
    train = str(beton_pair / "tiny_train.beton")
    assert beton_split_path(train, "test") == str(beton_pair / "tiny_test.beton")
    with pytest.raises(FileNotFoundError, match="tiny_val.beton"):
        open_source(train, "val")
    test = open_source(train, "test")
    assert len(test) == 12 and sorted(set(test.labels.tolist())) == [0, 1, 2]
