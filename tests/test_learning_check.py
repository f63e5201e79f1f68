"""Learning checks on real CIFAR-10 images (cifar10-jpeg.zip in the test data folder).

- the fused (Triton, interpreted on the CPU) and the reference loss paths, same seed and
  data, give the same loss curve over the first steps of a real training run;
- the demo run lifts kNN accuracy over the untrained network by at least 4 points.
"""
import json
import os
import zipfile

import pytest

from fastswav.train import run

from conftest import tiny_config

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_subset(zip_path, root, train_per_class, test_per_class):
    """The first images of each class of the CIFAR-10 zip, as an image folder."""
    with zipfile.ZipFile(zip_path) as archive:
        names = set(archive.namelist())
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for cls in CLASSES:
                members = sorted(n for n in names if n.startswith(f"{split}/{cls}/") and n.endswith(".jpg"))
                assert len(members) >= count, f"{split}/{cls}: {len(members)} images"
                folder = root / split / cls
                folder.mkdir(parents=True)
                for name in members[:count]:
                    (folder / os.path.basename(name)).write_bytes(archive.read(name))
    return root


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "log.jsonl")) if r["event"] == "step"]


def test_fused_and_reference_losses_follow_the_same_curve(shared_data, tmp_path, monkeypatch):
    """The demo's model and crops (batch 64, 2x32 + 4x16, K=100) for 8 steps on 600 real
    CIFAR-10 images, once per loss backend, same seed and data. The fused path runs its
    exact mode (``loss_precision=ieee``), so the two are the same arithmetic; the default
    tf32 path's own error is bounded in tests/test_fused_loss.py (its loss moves by 1e-4
    relative after two steps here, measured)."""
    data = cifar_subset(os.path.join(shared_data, "cifar10-jpeg.zip"), tmp_path / "cifar", 60, 1)
    cfg = tiny_config(data, tmp_path / "run", epochs=1, steps_per_epoch=8, batch_size=64,
                      n_crops=(2, 4), size_crops=(32, 16), trunk_width=16, hidden_dim=512,
                      out_dim=64, n_prototypes=100, freeze_prototypes_niters=2, warmup_epochs=0,
                      optimizer="sgd", base_lr=0.05, log_every=1, loss_precision="ieee")
    curves = {}
    for backend in ("reference", "fused"):
        monkeypatch.setenv("FASTSWAV_BACKEND", backend)
        out = tmp_path / backend
        run(cfg.replace(output_dir=str(out)), resume=False)
        curves[backend] = _losses(out)
    ref, fused = curves["reference"], curves["fused"]
    assert len(ref) == len(fused) == 8
    # The same arithmetic in another order. The first steps agree to float32 rounding
    # (measured: < 1e-5 relative); after that the training dynamics amplify rounding
    # differences, and the reference against itself with 1 instead of 2 CPU threads moves by
    # up to 0.2 % by step 4, the fused path by up to 0.4 % here: hence 1 % from step 3 on.
    for step, (a, b) in enumerate(zip(ref, fused)):
        bound = 1e-4 if step < 3 else 1e-2
        assert abs(a - b) <= bound * abs(a), f"step {step}: reference {a} vs fused {b}"
    assert ref[-1] < ref[0] - 0.3  # and it is a curve: the loss moves


@pytest.mark.slow
def test_demo_lifts_knn_over_initialisation(shared_data, tmp_path):
    """The demo itself (what `make demo` runs, about 7 minutes on 2 cores): its kNN top-1
    after training must beat the untrained network's, on the same 2,000 test images, by the
    4 points the demo promises (measured lifts are about twice that; the standard error of
    one measurement is about 1 point)."""
    from fastswav.config import preset

    cfg = preset("demo").replace(data=os.path.join(shared_data, "cifar10-jpeg.zip"),
                                 output_dir=str(tmp_path / "demo"))
    summary = run(cfg, resume=False)
    lift = summary["knn_trained"] - summary["knn_init"]
    print(f"kNN top-1: init {summary['knn_init']:.2f}% -> trained {summary['knn_trained']:.2f}%")
    assert lift >= 4.0, summary
