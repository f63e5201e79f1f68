"""The training loop end to end on tiny data: checkpoints, resume, queue, bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastswav.checkpoint import latest_checkpoint, load_checkpoint
from fastswav.train import UsageError, main, run

from conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_folder, tmp_path):
    straight = tiny_config(tiny_folder, tmp_path / "straight")
    run(straight, resume=False)
    # Same run, stopped after epoch 2 of 3 (as a crash would), then resumed.
    stopped = tiny_config(tiny_folder, tmp_path / "stopped", epochs=3)
    shutil.rmtree(tmp_path / "stopped", ignore_errors=True)
    run(stopped.replace(epochs=3), resume=False)
    os.remove(tmp_path / "stopped" / "checkpoint_epoch0003.pt")
    assert latest_checkpoint(tmp_path / "stopped").name == "checkpoint_epoch0002.pt"
    run(stopped, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_epoch0003.pt")
    b = load_checkpoint(tmp_path / "stopped" / "checkpoint_epoch0003.pt")
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor.float(), b["model"][name].float(), atol=1e-6), name
    log = [json.loads(line) for line in open(tmp_path / "straight" / "log.jsonl")]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2, 3]
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["epochs"] == 3
    assert all(np.isfinite(r["loss"]) for r in log if r["event"] == "step")


def test_prototypes_frozen_then_trained_and_queue_fills(tiny_folder, tmp_path):
    cfg = tiny_config(tiny_folder, tmp_path / "q", epochs=2, steps_per_epoch=2,
                      freeze_prototypes_niters=2, queue_length=16, epoch_queue_starts=0)
    run(cfg, resume=False)
    first = load_checkpoint(tmp_path / "q" / "checkpoint_epoch0001.pt")["model"]["prototypes.weight"]
    second = load_checkpoint(tmp_path / "q" / "checkpoint_epoch0002.pt")["model"]["prototypes.weight"]
    # Frozen for the 2 steps of epoch 1: only renormalised; trained afterwards.
    assert torch.allclose(first.norm(dim=1), torch.ones(first.shape[0]), atol=1e-5)
    assert not torch.allclose(first, second)
    queue = load_checkpoint(tmp_path / "q" / "queue_rank0_epoch0002.pt")
    assert int(queue["filled"]) == 16 and int(queue["write_pos"]) == 0


def test_batch_size_the_data_cannot_fill(tiny_folder, tmp_path):
    with pytest.raises(UsageError, match="needs at least 4096 images"):
        run(tiny_config(tiny_folder, tmp_path / "big", batch_size=4096), resume=False)


def test_cli_reports_unfillable_batch_in_one_line(tiny_folder, tmp_path, capsys):
    code = main(["--data", str(tiny_folder), "--batch_size=4096", "--workers=0",
                 "--output-dir", str(tmp_path / "cli")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: batch size 4096")


def _torchrun_launch_and_resume(tiny_folder, out):
    """Two gloo processes under torchrun train 2 epochs; a second launch of the same command,
    after losing the last checkpoint (as a crash would), resumes from epoch 1. Both launches
    must end with status 0 and no worker may abort on its way out."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--standalone", "-m", "fastswav.train",
            "--data", str(tiny_folder), "--output-dir", str(out), "--workers=0",
            "--batch_size=4", "--epochs=2", "--steps_per_epoch=2", "--warmup_epochs=0",
            "--arch=resnet18", "--trunk_width=4", "--hidden_dim=16", "--out_dim=8",
            "--n_prototypes=6", "--n_crops=2,2", "--size_crops=16,8", "--knn_at_end=false",
            "--in_memory=false", "--queue_length=16", "--epoch_queue_starts=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for launch in ("first", "resumed"):
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        # A worker that aborts on its way out, its files written, still fails the launch:
        # torchrun exits 1 and names the signal in its summary.
        assert done.returncode == 0, f"{launch} launch: {done.stderr[-3000:]}"
        if launch == "first":
            assert (out / "checkpoint_epoch0002.pt").exists()
            assert (out / "queue_rank0_epoch0002.pt").exists()
            assert (out / "queue_rank1_epoch0002.pt").exists()
            os.remove(out / "checkpoint_epoch0002.pt")
    # (A launch with more epochs is a different recipe: the cosine schedule spans all epochs,
    # so it stops with exit status 2; see test_resume.py.)
    assert "resumed from" in done.stdout and "checkpoint_epoch0001.pt" in done.stdout
    assert load_checkpoint(out / "checkpoint_epoch0002.pt")["epoch"] == 2


@pytest.mark.slow
def test_torchrun_two_processes_train_and_resume(tiny_folder, tmp_path):
    """A worker once aborted at exit ("terminate called without an active exception") in 3
    of some 40 launch-resume cycles on a loaded 2-core machine, from a thread other than the
    main one while the interpreter finalized; torch's autograd device threads, started a
    quarter of a second before exit, were the only such threads, and a trainer no longer has
    them (test_a_trainer_ends_with_its_main_thread_alone). Repeat the cycle
    (FASTSWAV_RESUME_CYCLES times, 4 by default) so that CI would meet a return."""
    cycles = int(os.environ.get("FASTSWAV_RESUME_CYCLES", "4"))
    for cycle in range(cycles):
        _torchrun_launch_and_resume(tiny_folder, tmp_path / f"cycle{cycle}")


# Prints the threads alive at interpreter exit: registered before fastswav is imported, so
# it runs after every exit handler the run registers (tqdm's monitor, logging, ...).
_THREADS_AT_EXIT = """
import atexit, os, sys
def report():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    print("threads at exit:", len(names), sorted(names))
atexit.register(report)
from fastswav.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through /proc")
def test_a_trainer_ends_with_its_main_thread_alone(tiny_folder, tmp_path):
    """No thread but the main one is left to meet the interpreter's finalization: torch's
    autograd device threads (8 on the CPU once the memory estimate has run, started by the
    first backward a fraction of a second before exit in a short run) are never created
    (fastswav/autograd_engine.py). A worker that aborted on its way out did so in a thread
    other than the main one while the interpreter finalized, and these were the only others."""
    args = ["--data", str(tiny_folder), "--output-dir", str(tmp_path / "run"), "--workers=0",
            "--batch_size=4", "--epochs=1", "--steps_per_epoch=2", "--warmup_epochs=0",
            "--arch=resnet18", "--trunk_width=4", "--hidden_dim=16", "--out_dim=8",
            "--n_prototypes=6", "--n_crops=2,2", "--size_crops=16,8", "--knn_at_end=false",
            "--in_memory=false", "--queue_length=0"]
    done = subprocess.run([sys.executable, "-c", _THREADS_AT_EXIT, *args], cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = [line for line in done.stdout.splitlines() if line.startswith("threads at exit:")]
    assert len(report) == 1 and report[0].split()[3] == "1", report


def test_tensorboard_scalars_beside_the_json_log(tiny_folder, tmp_path):
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_config(tiny_folder, tmp_path / "tb", epochs=2), resume=False)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/img_per_s", "train/code_entropy", "epoch/loss"} <= tags
    assert [e.step for e in events.Scalars("epoch/loss")] == [1, 2]
    assert len(events.Scalars("train/loss")) == 4  # 2 epochs x 2 steps, log_every=1
    # Turned off, no event files.
    run(tiny_config(tiny_folder, tmp_path / "no_tb", epochs=1, tensorboard=False), resume=False)
    assert not (tmp_path / "no_tb" / "tensorboard").exists()
