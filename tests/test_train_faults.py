"""Long-run faults: preemption signals, a non-finite loss, collapse; mid-epoch checkpoints."""
import math
import signal

import pytest
import torch

from fastswav import faults
from fastswav.checkpoint import (checkpoint_path, checkpoint_position, latest_checkpoint,
                                 load_checkpoint, prune_checkpoints)
from fastswav.loss import SwAVLoss
from fastswav.step import TrainStep
from fastswav.train import main, run

from conftest import tiny_config


def _signal_at(monkeypatch, call_index: int, signum=signal.SIGUSR1):
    """Make the training step send ``signum`` to this process during its ``call_index``-th call
    (0-based), as a cluster's preemption notice arriving mid-step would."""
    original = TrainStep.__call__
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if calls["n"] == call_index:
            signal.raise_signal(signum)
        calls["n"] += 1
        return out

    monkeypatch.setattr(TrainStep, "__call__", step)


def _assert_same_weights(a, b):
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor.float(), b["model"][name].float(), atol=1e-6), name


@pytest.mark.parametrize("augment", ["batched", "pil"])
def test_preemption_mid_epoch_checkpoints_and_resumes_exactly(tiny_folder, tmp_path, monkeypatch, augment):
    steps = dict(epochs=2, steps_per_epoch=4, batch_size=6, augment=augment,
                 queue_length=12, epoch_queue_starts=0)
    straight = tiny_config(tiny_folder, tmp_path / "straight", **steps)
    run(straight, resume=False)

    cfg = tiny_config(tiny_folder, tmp_path / "preempted", **steps)
    with monkeypatch.context() as m:
        _signal_at(m, 5)  # the second step of epoch 2
        with pytest.raises(faults.Preempted, match="SIGUSR1"):
            run(cfg, resume=False)
    ckpt = latest_checkpoint(tmp_path / "preempted")
    assert ckpt.name == "checkpoint_epoch0001_step000002.pt"
    assert checkpoint_position(ckpt) == (1, 2)
    assert (tmp_path / "preempted" / "queue_rank0_epoch0001_step000002.pt").exists()
    # The handlers are put back after the run.
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL

    run(cfg, resume=True)
    _assert_same_weights(load_checkpoint(tmp_path / "straight" / "checkpoint_epoch0002.pt"),
                         load_checkpoint(tmp_path / "preempted" / "checkpoint_epoch0002.pt"))
    # The mid-epoch files are superseded by the epoch checkpoint and pruned.
    names = sorted(p.name for p in (tmp_path / "preempted").iterdir())
    assert not [n for n in names if "_step" in n], names


def test_sigterm_through_the_cli_exits_75_with_a_checkpoint(tiny_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    _signal_at(monkeypatch, 0, signal.SIGTERM)
    argv = ["--data", str(tiny_folder), "--output-dir", str(out), "--workers=0", "--batch_size=8",
            "--epochs=2", "--steps_per_epoch=2", "--arch=resnet18", "--trunk_width=4",
            "--hidden_dim=16", "--out_dim=8", "--n_prototypes=6", "--n_crops=2,2",
            "--size_crops=16,8", "--knn_at_end=false", "--log_every=1"]
    assert main(argv) == faults.EXIT_PREEMPTED == 75
    err = capsys.readouterr().err
    assert "stopped by SIGTERM" in err and "run the same command again" in err
    assert (out / "checkpoint_epoch0000_step000001.pt").exists()
    monkeypatch.undo()
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint_epoch0002.pt")["epoch"] == 2


def test_nan_loss_stops_with_the_iteration_and_leaves_checkpoints(tiny_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    original = SwAVLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 4 else loss  # iteration 3: epoch 2, step 2

    monkeypatch.setattr(SwAVLoss, "forward", poisoned)
    argv = ["--data", str(tiny_folder), "--output-dir", str(out), "--workers=0", "--batch_size=8",
            "--epochs=3", "--steps_per_epoch=3", "--arch=resnet18", "--trunk_width=4",
            "--hidden_dim=16", "--out_dim=8", "--n_prototypes=6", "--n_crops=2,2",
            "--size_crops=16,8", "--knn_at_end=false", "--log_every=3"]
    good = checkpoint_path(out, 1)
    assert main(argv) == faults.EXIT_DIVERGED == 3
    err = capsys.readouterr().err
    assert "non-finite at iteration 3" in err, err
    assert sorted(p.name for p in out.glob("checkpoint_*")) == [good.name]
    state = load_checkpoint(good)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nonfinite_tracker_keeps_the_first_bad_iteration():
    tracker = faults.NonFiniteTracker(torch.device("cpu"))
    tracker.update(torch.tensor(1.0), 0)
    tracker.check()
    tracker.update(torch.tensor(float("inf")), 1)
    tracker.update(torch.tensor(float("nan")), 2)
    with pytest.raises(faults.Diverged, match="iteration 1;"):
        tracker.check()


def test_collapse_signature():
    k = 50
    uniform = torch.full((8, k), 1.0 / k)
    assert faults.code_entropy_ratio(uniform) == pytest.approx(1.0, abs=1e-6)
    peaked = torch.eye(k)[:8]
    assert faults.code_entropy_ratio(peaked) < 0.01
    assert faults.looks_collapsed(math.log(k), 1.0, k)
    assert not faults.looks_collapsed(math.log(k), 0.5, k)       # codes still informative
    assert not faults.looks_collapsed(0.5 * math.log(k), 1.0, k)  # predictions still sharp


def test_collapse_is_warned_about(tiny_folder, tmp_path, caplog):
    # Identical images for every sample cannot be told apart: codes are uniform and the
    # loss sits at ln K, which is exactly what the warning looks for.
    cfg = tiny_config(tiny_folder, tmp_path / "collapse", epochs=1, steps_per_epoch=2,
                      warmup_epochs=0, freeze_prototypes_niters=0, jitter_strength=0.0,
                      min_scale_crops=(1.0, 1.0), max_scale_crops=(1.0, 1.0))
    original = TrainStep.__call__

    def same_images(self, micro_batches, *args, **kwargs):
        micro_batches = [[torch.zeros_like(c) for c in crops] for crops in micro_batches]
        return original(self, micro_batches, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(TrainStep, "__call__", same_images)
        with caplog.at_level("WARNING", logger="fastswav"):
            run(cfg, resume=False)
    assert any("looks collapsed" in r.message for r in caplog.records), caplog.text


def test_prune_keeps_newest_epochs_and_drops_superseded_mid_epoch_files(tmp_path):
    for epoch, step in [(1, 0), (1, 5), (2, 0), (3, 0), (3, 7)]:
        checkpoint_path(tmp_path, epoch, step).write_bytes(b"x")
        (tmp_path / checkpoint_path(tmp_path, epoch, step).name.replace("checkpoint_", "queue_rank0_")).write_bytes(b"x")
    prune_checkpoints(tmp_path, keep=2, rank=0)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint_epoch0002.pt", "checkpoint_epoch0003.pt",
                    "checkpoint_epoch0003_step000007.pt", "queue_rank0_epoch0002.pt",
                    "queue_rank0_epoch0003.pt", "queue_rank0_epoch0003_step000007.pt"]
    assert latest_checkpoint(tmp_path).name == "checkpoint_epoch0003_step000007.pt"
