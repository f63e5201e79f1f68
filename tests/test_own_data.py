"""Own data and own trunks end to end: fastswav.train(...) from Python, the help's
defaults, fastswav.embed, the neighbour picture, evaluation data forms and export of
torchvision/timm trunks."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import fastswav

pytest.importorskip("timm")

TINY_MOBILENET = "torchvision/mobilenet_v3_small:width_mult=0.25"
TINY_VIT = "timm/vit_tiny_patch16_224:patch_size=4,depth=1,embed_dim=32,num_heads=2"
TINY_FIELDS = dict(epochs=2, steps_per_epoch=2, warmup_epochs=1, batch_size=8, hidden_dim=16,
                   out_dim=8, n_prototypes=6, n_crops=(2, 2), size_crops=(16, 8),
                   freeze_prototypes_niters=1, log_every=1, seed=5, tensorboard=False)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mobilenet_run(tiny_folder, tmp_path_factory):
    """A torchvision trunk trained from Python, with kNN (and so the neighbour picture)."""
    out = tmp_path_factory.mktemp("runs") / "mobilenet"
    summary = fastswav.train(data=str(tiny_folder), output_dir=str(out), resume=False,
                             arch=TINY_MOBILENET, knn_at_end=True, knn_k=5, **TINY_FIELDS)
    return out, summary


@pytest.fixture(scope="module")
def vit_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vit"
    fastswav.train(data=str(tiny_folder), output_dir=str(out), resume=False, arch=TINY_VIT,
                   knn_at_end=False, **dict(TINY_FIELDS, size_crops=(16, 8)))
    return out


def test_python_train_returns_the_run_and_its_metrics(mobilenet_run):
    out, summary = mobilenet_run
    assert summary["run_dir"] == str(out) and (out / "checkpoint_epoch0002.pt").is_file()
    assert np.isfinite(summary["loss"])
    assert 0 <= summary["knn_init"] <= 100 and 0 <= summary["knn_trained"] <= 100
    picture = Image.open(summary["neighbors_png"])
    assert picture.format == "PNG" and picture.width > 200 and picture.height > 100


def test_calling_train_again_on_a_finished_run_gives_its_summary(mobilenet_run, tiny_folder):
    """The same call again resumes a run with nothing left to train: it still reports the
    run's loss and kNN figures, not NaN."""
    out, first = mobilenet_run
    again = fastswav.train(data=str(tiny_folder), output_dir=str(out), arch=TINY_MOBILENET,
                           knn_at_end=True, knn_k=5, **TINY_FIELDS)
    assert again["loss"] == first["loss"] and again["knn_init"] == first["knn_init"]
    assert again["knn_trained"] == first["knn_trained"]


def test_train_and_embed_are_callable_however_imported(tiny_folder, tmp_path):
    import fastswav.embed
    import fastswav.train
    from fastswav.train import main, parse_args  # noqa: F401 (the module's names still import)

    assert callable(fastswav.train) and callable(fastswav.embed)
    assert fastswav.train.main is main
    with pytest.raises(ValueError, match="data path not found: .*missing"):
        fastswav.train(data=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown config field 'epoch'"):
        fastswav.train(data=str(tiny_folder), epoch=3)
    with pytest.raises(ValueError, match="small_images apply to the built-in ResNets only"):
        fastswav.train(data=str(tiny_folder), arch=TINY_MOBILENET, small_images=True)


def test_a_fresh_interpreter_gets_callable_modules():
    """``import fastswav`` alone (no submodule imported yet) gives callable train and embed."""
    code = ("import fastswav, sys\n"
            "assert 'fastswav.train' not in sys.modules\n"
            "assert callable(fastswav.train) and callable(fastswav.embed)\n"
            "from fastswav.train import main\n"
            "import fastswav.train\n"
            "assert fastswav.train.main is main and callable(fastswav.train)\n"
            "try:\n"
            "    fastswav.train(data='missing-folder')\n"
            "except ValueError as err:\n"
            "    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "data path not found: missing-folder"


def test_help_shows_the_recipe_that_runs(capsys):
    from fastswav.train import main

    with pytest.raises(SystemExit):
        main(["--preset", "100ep", "--help"])
    text = capsys.readouterr().out
    assert "--epochs=<int>  training epochs [default 100]" in text
    assert "\nresume:\n" in text and "\nexit status:\n" in text
    # Without --preset the demo runs: its values are the defaults shown.
    done = subprocess.run([sys.executable, "-m", "fastswav.train", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--epochs=<int>  training epochs [default 6]" in done.stdout
    assert "--arch=<str>" in done.stdout and "[default 'resnet18']" in done.stdout


def _flat_folder(tiny_folder, root):
    """The tiny training images copied flat, unlabelled (names without '_'), plus junk."""
    root.mkdir()
    for i, path in enumerate(sorted((tiny_folder / "train").rglob("*.png"))):
        (root / f"img{i}.png").write_bytes(path.read_bytes())
    (root / "junk.png").write_bytes(b"not an image")
    return root


def test_embed_cli_writes_pt_npy_csv_and_lists_unreadable_images(mobilenet_run, tiny_folder,
                                                                  tmp_path, capsys):
    from fastswav.embed import main

    run, _ = mobilenet_run
    assert main(["--checkpoint", str(run), "--data", str(tiny_folder), "--out",
                 str(tmp_path / "e.pt"), "--batch-size", "7"]) == 0
    assert "skipped 1 unreadable image(s): train/a/broken.jpg" in capsys.readouterr().out
    saved = torch.load(tmp_path / "e.pt", weights_only=True)
    assert saved["embeddings"].dtype == torch.float32 and saved["embeddings"].shape[0] == 48
    assert len(saved["names"]) == 48 and saved["names"][0].startswith("train/a/")
    assert saved["skipped"] == ["train/a/broken.jpg"]
    # The same from Python, any output format; the features do not depend on the batch.
    result = fastswav.embed(run / "checkpoint_epoch0002.pt", tiny_folder, tmp_path / "e.npy",
                            batch_size=32, progress=False)
    difference = (result["embeddings"] - saved["embeddings"]).abs().max()
    assert difference <= 1e-4 * saved["embeddings"].abs().max()  # convolution order alone
    assert np.load(tmp_path / "e.npy").shape == tuple(saved["embeddings"].shape)
    assert (tmp_path / "e.names.txt").read_text().split() == saved["names"]
    fastswav.embed(run, tiny_folder, tmp_path / "e.csv", progress=False)
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert len(rows) == 49 and rows[1].split(",")[0] == saved["names"][0]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_embed_reads_flat_unlabelled_folders_and_zips(vit_run, tiny_folder, tmp_path):
    flat = _flat_folder(tiny_folder, tmp_path / "flat")
    result = fastswav.embed(vit_run, flat, progress=False)
    assert result["embeddings"].shape == (48, 32) and result["skipped"] == ["junk.png"]
    # Training on unlabelled images: kNN is skipped, the neighbour picture still drawn.
    summary = fastswav.train(data=str(flat), output_dir=str(tmp_path / "run"), resume=False,
                             arch=TINY_VIT, knn_at_end=True, augment="pil",
                             **dict(TINY_FIELDS, epochs=1))
    assert summary["knn_trained"] is None and os.path.isfile(summary["neighbors_png"])
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(flat.glob("img*.png"))[:10]:
            z.write(path, f"photos/{path.name}")
    zipped = fastswav.embed(vit_run, archive, tmp_path / "z.pt", progress=False)
    assert zipped["embeddings"].shape == (10, 32) and zipped["names"][0] == "photos/img0.png"


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "nowhere", "--data", ".", "--out", "e.pt"], "checkpoint not found"),
    (["--checkpoint", ".", "--data", ".", "--out", "e.pt"], "no checkpoint in ."),
])
def test_embed_errors_are_one_line(argv, message, tmp_path, monkeypatch, usage_error):
    from fastswav.embed import main

    monkeypatch.chdir(tmp_path)
    assert message in usage_error(main, argv)


def test_embed_refuses_an_unknown_format_before_any_work(vit_run, tiny_folder):
    with pytest.raises(ValueError, match=r"\.pt, \.npy, \.csv"):
        fastswav.embed(vit_run, tiny_folder, "out.parquet")


def test_neighbor_picture_cli(vit_run, tmp_path, capsys, usage_error):
    from fastswav.plot import main

    assert main([str(vit_run), "--neighbors", "--queries", "3", "--k", "2",
                 "--output", str(tmp_path)]) == 0
    picture = Image.open(tmp_path / "neighbors.png")
    assert picture.format == "PNG" and picture.height >= 3 * 48
    assert "no checkpoint" in usage_error(main, [str(tmp_path), "--neighbors"])


def test_knn_takes_a_run_folder_and_the_shared_zip(mobilenet_run, shared_data, capsys):
    from fastswav.eval.knn import main

    run, _ = mobilenet_run
    assert main(["--checkpoint", str(run), "--data",
                 os.path.join(shared_data, "cifar10-jpeg.zip"), "--max-train", "100",
                 "--max-test", "50", "--device", "cpu"]) == 0
    assert "kNN top-1:" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["knn", "linear"])
def test_evaluation_reads_the_demos_download_cifar10_like_training(module, mobilenet_run,
                                                                  tmp_path, monkeypatch,
                                                                  usage_error):
    import importlib

    import fastswav.data.sources as sources

    run, _ = mobilenet_run
    opened = []

    def fake_open(path, split="train", kind="auto", **kwargs):
        opened.append((path, kind))
        raise FileNotFoundError("CIFAR-10 not found (offline)")

    monkeypatch.setattr(sources, "open_source", fake_open)
    monkeypatch.setenv("FASTSWAV_DATA_CACHE", str(tmp_path / "cache"))
    assert "offline" in usage_error(importlib.import_module(f"fastswav.eval.{module}").main,
                                    ["--checkpoint", str(run), "--data", sources.CIFAR10_DOWNLOAD])
    assert opened[0] == (str(tmp_path / "cache" / "cifar10"), "torchvision-cifar10")


def test_linear_probe_reads_betons(mobilenet_run, tiny_folder, tmp_path, capsys):
    pytest.importorskip("ffcv", reason="make test installs ffcv (see the Makefile)")
    from fastswav.data.sources import open_source
    from fastswav.data.write import write_beton
    from fastswav.eval.linear import main

    for split in ("train", "test"):
        write_beton(open_source(str(tiny_folder), split), str(tmp_path / f"tiny_{split}.beton"),
                    workers=1)
    run, _ = mobilenet_run
    assert main(["--checkpoint", str(run), "--data", str(tmp_path / "tiny_train.beton"),
                 "--mode", "fast", "--steps", "10", "--device", "cpu"]) == 0
    assert "linear top-1:" in capsys.readouterr().out


def test_export_writes_each_library_its_own_layout(mobilenet_run, vit_run, tmp_path,
                                                    usage_error):
    import timm
    import torchvision

    from fastswav.export import main

    run, _ = mobilenet_run
    assert main([str(run / "checkpoint_epoch0002.pt"), "--output", str(tmp_path / "tv.pt")]) == 0
    net = torchvision.models.get_model("mobilenet_v3_small", width_mult=0.25)
    result = net.load_state_dict(torch.load(tmp_path / "tv.pt", weights_only=True), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("classifier.") for k in result.missing_keys)
    assert main([str(vit_run / "checkpoint_epoch0002.pt"), "--output", str(tmp_path / "t.pt")]) == 0
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, patch_size=4, depth=1,
                            embed_dim=32, num_heads=2)
    vit.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))  # strict
    assert "export it --to timm" in usage_error(
        main, [str(vit_run / "checkpoint_epoch0002.pt"), "--to", "torchvision"])
