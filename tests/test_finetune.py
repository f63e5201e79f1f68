"""Semi-supervised fine-tuning (fastswav.eval.finetune): the subset (seeded class-balanced
draw, or a list file on ImageNet-named data), per-epoch accuracies, the best, the model in
torchvision layout, resume after a crash, and errors as one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastswav.checkpoint import save_checkpoint
from fastswav.config import Config
from fastswav.eval import finetune as ft
from fastswav.model import build_model
from fastswav.official import load_trunk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_checkpoint(folder, seed=0):
    """A fastswav checkpoint of a small CIFAR-style trunk (random weights)."""
    cfg = Config(arch="resnet18", trunk_width=8, small_images=True, hidden_dim=16, out_dim=8,
                 n_prototypes=10, n_crops=(2, 2), size_crops=(32, 16),
                 min_scale_crops=(0.2, 0.08), max_scale_crops=(1.0, 0.3))
    torch.manual_seed(seed)
    model = build_model(cfg)
    return save_checkpoint({"epoch": 1, "model": model.state_dict(), "optimizer": {},
                            "config": cfg.to_dict()}, folder / "checkpoint_epoch0001.pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _small_checkpoint(tmp_path_factory.mktemp("pretrained"))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_cifar10_subset_run_writes_subset_accuracies_best_and_model(checkpoint, shared_data,
                                                                     tmp_path):
    data = os.path.join(shared_data, "cifar10-jpeg.zip")
    run_dir = tmp_path / "run"
    result = ft.finetune(checkpoint, data, 1, output_dir=str(run_dir), epochs=2,
                         decay_epochs=(1,), batch_size=8, steps_per_epoch=2, max_test=20,
                         workers=0, seed=3)
    # 1 % of 5,000 images per class: 50 of each of the 10 classes, written beside the results.
    names = (run_dir / "subset.txt").read_text().splitlines()
    assert len(names) == 500 == result["subset_images"]
    classes = [name.split("/")[-2] for name in names]
    assert sorted(set(classes)) == sorted(result["classes"]) and len(set(classes)) == 10
    assert all(classes.count(c) == 50 for c in set(classes))
    # The same seed draws the same subset; another seed another.
    from fastswav.data.sources import open_source

    source = open_source(data, "train")
    same = [source.name(i) for i in ft.draw_subset(source.labels, 1, 3)]
    assert same == names
    assert [source.name(i) for i in ft.draw_subset(source.labels, 1, 4)] != names

    epochs = _records(run_dir)
    assert [r["epoch"] for r in epochs[:-1]] == [1, 2]
    for record in epochs[:-1]:
        assert 0 <= record["top1"] <= record["top5"] <= 100
        assert record["train_images"] == 16
    assert [r["lr_trunk"] for r in epochs[:-1]] == pytest.approx([0.01, 0.002])  # x0.2 after 1
    assert [r["lr_head"] for r in epochs[:-1]] == pytest.approx([0.2, 0.04])
    best = max(epochs[:-1], key=lambda r: r["top1"])
    assert epochs[-1] == {"event": "best", "epoch": best["epoch"], "top1": best["top1"],
                          "top5": best["top5"]}
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["best_top1"], results["best_top5"]) == (best["top1"], best["top5"])

    # The model in torchvision layout: the trunk's keys and fc; fastswav reads it back as such.
    state = torch.load(run_dir / "finetuned_torchvision.pt", weights_only=True)
    assert state["fc.weight"].shape == (10, 64) and "conv1.weight" in state
    assert not any(k.startswith(("trunk.", "head.", "module.")) for k in state)
    trunk, _ = load_trunk(run_dir / "finetuned_torchvision.pt")
    net = ft.FinetuneNet(trunk, 64, 10)
    net.fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = net.eval()(images)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def _imagenet_named(root, classes=("n01440764", "n01443537"), per_class=3):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for wnid in classes:
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                name = f"{wnid}_{100 + i}.JPEG" if split == "train" else f"ILSVRC_val_{wnid}_{i}.JPEG"
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                    root / split / wnid / name, format="JPEG")
    return root


def test_imagenet_named_data_takes_the_list_file_and_resumes_after_a_crash(checkpoint, tmp_path,
                                                                         monkeypatch):
    data = _imagenet_named(tmp_path / "imagenet")
    listed = ["n01440764_101.JPEG", "n01443537_100.JPEG"]
    (tmp_path / "1percent.txt").write_text("\n".join(listed) + "\n")
    run_dir = tmp_path / "run"
    kwargs = dict(output_dir=str(run_dir), epochs=2, batch_size=2, workers=0,
                  subset_file=str(tmp_path / "1percent.txt"), image_size=16)

    # Without the list: one line naming --subset-file, nothing trained.
    with pytest.raises(ValueError, match="ImageNet-named images: pass --subset-file"):
        ft.finetune(checkpoint, data, 1, output_dir=str(run_dir), workers=0)

    # A crash in the second epoch's evaluation: the first epoch's checkpoint stays.
    evaluate = ft.evaluate
    calls = []

    def crash_in_epoch_two(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("node lost")
        return evaluate(*args, **kw)

    monkeypatch.setattr(ft, "evaluate", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="node lost"):
        ft.finetune(checkpoint, data, 1, **kwargs)
    monkeypatch.setattr(ft, "evaluate", evaluate)
    assert [r["epoch"] for r in _records(run_dir)] == [1]
    assert (run_dir / "subset.txt").read_text().splitlines() == [
        "train/n01440764/n01440764_101.JPEG", "train/n01443537/n01443537_100.JPEG"]

    result = ft.finetune(checkpoint, data, 1, **kwargs)  # the same command: resumes
    assert [r.get("epoch") for r in _records(run_dir)] == [1, 2, result["best_epoch"]]
    assert [r["epoch"] for r in result["history"]] == [1, 2]

    # Another recipe in the same folder is refused rather than mixed in.
    with pytest.raises(ValueError, match="written with other lr"):
        ft.finetune(checkpoint, data, 1, **dict(kwargs, lr=0.5))
    # The written subset file repeats the run's subset.
    with pytest.raises(ValueError, match="1 of its 2 images are not in the training data"):
        (tmp_path / "bad.txt").write_text("n01440764_101.JPEG\nn09999999_1.JPEG\n")
        ft.finetune(checkpoint, data, 1, **dict(kwargs, subset_file=str(tmp_path / "bad.txt"),
                                                 output_dir=str(tmp_path / "other")))


@pytest.mark.parametrize("argv, message", [
    (["--labels-percent", "0"], "labels_percent must lie in (0, 100]"),
    (["--epochs", "two"], "expected int, got 'two'"),
    (["--decay-epochs", "16,12"], "decay_epochs must be increasing"),
    (["--sync-bn", "maybe"], "expected true or false"),
    (["--subset-file", "/nonexistent/10percent.txt"], "subset file not found"),
])
def test_cli_errors_are_one_line_with_status_2(checkpoint, tmp_path, capsys, argv, message):
    folder = tmp_path / "data"
    for split in ("train", "test"):
        (folder / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / split / "a" / "0.png")
    with pytest.raises(SystemExit) as exc:
        sys.exit(ft.main(["--checkpoint", str(checkpoint), "--data", str(folder),
                          "--output-dir", str(tmp_path / "run"), *argv]))
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_help_names_the_recipe_and_the_python_entry(capsys):
    with pytest.raises(SystemExit):
        ft.main(["--help"])
    text = capsys.readouterr().out
    for words in ("--labels-percent", "--subset-file", "--lr-head", "--decay-epochs",
                  "torchrun", "finetuned_torchvision.pt"):
        assert words in text
    import fastswav

    assert fastswav.finetune is ft.finetune


@pytest.mark.slow
def test_two_processes_under_torchrun_share_the_work(checkpoint, tmp_path):
    """DDP on the CPU (gloo): each process trains on its share of the subset and scores its
    share of the test images; the accuracies are summed over both."""
    folder = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 3)):
        for cls in ("a", "b"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    folder / split / cls / f"{i}.png")
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fastswav.eval.finetune", "--checkpoint", str(checkpoint),
         "--data", str(folder), "--labels-percent", "50", "--epochs", "1", "--batch-size", "1",
         "--workers", "0", "--output-dir", str(run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = _records(run_dir)[0]
    assert record["train_images"] == 4  # 2 per process, 4 in the subset
    # 6 test images over 2 processes: a percentage of 6, not of 3.
    assert round(record["top1"] * 6 / 100, 6) == int(round(record["top1"] * 6 / 100))
    assert "2 process(es)" in proc.stdout
