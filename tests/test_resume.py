"""Resuming in a run folder: damaged checkpoints are moved aside and the one before is used;
a different recipe stops with one line naming the fields; harmless changes are allowed."""
import json
import logging

import pytest
import torch

from fastswav.checkpoint import (NoReadableCheckpoint, checkpoint_path, find_resumable,
                                 latest_checkpoint, load_checkpoint, save_checkpoint)
from fastswav.config import resume_differences
from fastswav.train import main, run

from conftest import tiny_config

# The tiny run of conftest.tiny_config, as a command line (3 epochs of 2 steps).
CLI = ["--workers=0", "--batch_size=8", "--epochs=3", "--steps_per_epoch=2", "--warmup_epochs=1",
       "--arch=resnet18", "--trunk_width=4", "--hidden_dim=16", "--out_dim=8", "--n_prototypes=6",
       "--n_crops=2,2", "--size_crops=16,8", "--freeze_prototypes_niters=1", "--knn_at_end=false",
       "--log_every=1", "--seed=5", "--in_memory=false"]


def _argv(data, out, *extra):
    return ["--data", str(data), "--output-dir", str(out), *CLI, *extra]


def _truncate(path, size=1000):
    """What a node dying while a network file system flushed leaves behind."""
    data = path.read_bytes()
    assert len(data) > size
    path.write_bytes(data[:size])


def test_damaged_newest_checkpoint_resumes_from_the_one_before(tiny_folder, tmp_path, caplog):
    straight = tiny_config(tiny_folder, tmp_path / "straight")
    run(straight, resume=False)
    out = tmp_path / "damaged"
    run(tiny_config(tiny_folder, out), resume=False)
    # As if the node died during epoch 3, while epoch 2's checkpoint was being flushed.
    checkpoint_path(out, 3).unlink()
    newest = checkpoint_path(out, 2)
    _truncate(newest)
    caplog.set_level(logging.WARNING, logger="fastswav")
    run(tiny_config(tiny_folder, out), resume=True)
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and newest.name in warnings[0], warnings
    # Moved aside, not deleted, byte for byte; the run redid epoch 2 and finished epoch 3.
    aside = out / (newest.name + ".damaged")
    assert aside.is_file() and aside.stat().st_size == 1000
    resumed = load_checkpoint(checkpoint_path(out, 3))
    expected = load_checkpoint(checkpoint_path(tmp_path / "straight", 3))
    for name, tensor in expected["model"].items():
        assert torch.allclose(tensor.float(), resumed["model"][name].float(), atol=1e-6), name


def test_cli_damaged_newest_checkpoint_is_one_warning_and_exit_0(tiny_folder, tmp_path, capsys, caplog):
    out = tmp_path / "cli"
    assert main(_argv(tiny_folder, out, "--epochs=2")) == 0
    json_config = json.loads((out / "config.json").read_text())
    assert json_config["epochs"] == 2
    _truncate(checkpoint_path(out, 2))
    capsys.readouterr()
    assert main(_argv(tiny_folder, out, "--epochs=2")) == 0
    assert f"resumed from {checkpoint_path(out, 1)}" in capsys.readouterr().out
    assert (out / "checkpoint_epoch0002.pt.damaged").is_file()
    assert load_checkpoint(checkpoint_path(out, 2))["epoch"] == 2  # written again


def test_no_readable_checkpoint_is_one_error_line_and_exit_2(tiny_folder, tmp_path, capsys):
    out = tmp_path / "all_bad"
    assert main(_argv(tiny_folder, out, "--epochs=2")) == 0
    for path in out.glob("checkpoint_*.pt"):
        _truncate(path)
    capsys.readouterr()
    assert main(_argv(tiny_folder, out, "--epochs=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no readable checkpoint in"), err
    assert "--no-resume" in err[0] and "--output-dir" in err[0]
    # Nothing deleted: both damaged files are still there under their new names.
    assert sorted(p.name for p in out.glob("checkpoint_*")) == [
        "checkpoint_epoch0001.pt.damaged", "checkpoint_epoch0002.pt.damaged"]


def test_find_resumable_skips_files_without_a_model(tmp_path):
    save_checkpoint({"epoch": 1, "model": {}, "optimizer": {}}, checkpoint_path(tmp_path, 1))
    save_checkpoint({"weights": torch.zeros(2)}, checkpoint_path(tmp_path, 2))  # not a run's
    path, state = find_resumable(tmp_path)
    assert path == checkpoint_path(tmp_path, 1) and state["epoch"] == 1
    assert (tmp_path / "checkpoint_epoch0002.pt.damaged").is_file()
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)


def test_find_resumable_in_an_empty_folder_and_when_all_are_damaged(tmp_path):
    assert find_resumable(tmp_path) == (None, None)
    checkpoint_path(tmp_path, 1).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(NoReadableCheckpoint, match="checkpoint_epoch0001.pt.damaged"):
        find_resumable(tmp_path)


def test_different_recipe_stops_with_one_line_naming_the_fields(tiny_folder, tmp_path, capsys):
    out = tmp_path / "recipe"
    assert main(_argv(tiny_folder, out, "--epochs=1")) == 0
    before = (out / "config.json").read_text()
    capsys.readouterr()
    assert main(_argv(tiny_folder, out, "--epochs=1", "--n_prototypes=5", "--base_lr=0.1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "n_prototypes 6 -> 5" in err[0] and "base_lr 0.3 -> 0.1" in err[0]
    assert "--no-resume" in err[0] and "--output-dir" in err[0]
    assert (out / "config.json").read_text() == before  # the folder's recipe is kept
    # The two ways out both work. Starting over moves the old run's files into a subfolder
    # (kept), so a later resume there can only take the new run's checkpoints.
    assert main(_argv(tiny_folder, out, "--epochs=1", "--n_prototypes=5", "--no-resume")) == 0
    previous = list(out.glob("previous_*/checkpoint_epoch0001.pt"))
    assert len(previous) == 1
    assert load_checkpoint(previous[0])["model"]["prototypes.weight"].shape[0] == 6
    assert load_checkpoint(checkpoint_path(out, 1))["model"]["prototypes.weight"].shape[0] == 5
    assert main(_argv(tiny_folder, out, "--epochs=1", "--n_prototypes=5")) == 0
    assert main(_argv(tiny_folder, tmp_path / "new", "--epochs=1", "--n_prototypes=5")) == 0


def test_allowed_changes_resume_and_are_logged(tiny_folder, tmp_path, capsys, caplog):
    out = tmp_path / "allowed"
    assert main(_argv(tiny_folder, out, "--epochs=1")) == 0
    caplog.set_level(logging.INFO, logger="fastswav")
    capsys.readouterr()
    assert main(_argv(tiny_folder, out, "--epochs=1", "--log_every=2", "--tensorboard=false")) == 0
    assert "resumed from" in capsys.readouterr().out
    changed = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert len(changed) == 1 and "log_every 1 -> 2" in changed[0] and "tensorboard" in changed[0]


def test_resume_differences_checks_the_global_batch():
    cfg = tiny_config("data", "out")
    saved = cfg.to_dict()
    # Same global batch on twice the processes: allowed, and said.
    blocking, allowed = resume_differences(saved, cfg.replace(batch_size=4), 1, 2)
    assert blocking == [] and allowed and "processes 1 -> 2" in allowed[0]
    # A different global batch: refused, with both products shown.
    blocking, _ = resume_differences(saved, cfg.replace(batch_size=4), 1, 1)
    assert blocking == ["global batch 8 x 1 x 1 = 8 -> 4 x 1 x 1 = 4"]
    # Half the batch with twice the accumulation: the same global batch, allowed.
    blocking, allowed = resume_differences(saved, cfg.replace(batch_size=4, grad_accum=2), 1, 1)
    assert blocking == [] and "accumulation 1 -> 2" in allowed[0]
    # Shape fields refuse, logging fields do not; fields only one side knows are ignored.
    blocking, allowed = resume_differences(dict(saved, removed_field=1),
                                           cfg.replace(out_dim=4, workers=3), 1, 1)
    assert blocking == ["out_dim 8 -> 4"] and allowed == ["workers 0 -> 3"]
