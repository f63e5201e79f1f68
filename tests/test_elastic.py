"""Several processes (gloo on the CPU): a lost worker under torchrun restarts and resumes to the
weights of an uninterrupted run, a stalled worker ends the run within the collective timeout,
an error every rank meets is printed once with one exit status, a full disk is exit 74.

Every process a test starts runs in its own process group, killed in a ``finally``.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from fastswav import checkpoint as checkpoint_module
from fastswav import distributed
from fastswav.checkpoint import checkpoint_path, load_checkpoint
from fastswav.faults import EXIT_DISK_FULL
from fastswav.train import main

# A tiny recipe: 2 processes x 8 images, 3 steps per epoch on conftest's tiny_folder.
RECIPE = ["--workers=0", "--batch_size=8", "--steps_per_epoch=3", "--warmup_epochs=1",
          "--arch=resnet18", "--trunk_width=4", "--hidden_dim=16", "--out_dim=8",
          "--n_prototypes=6", "--n_crops=2,2", "--size_crops=16,8", "--freeze_prototypes_niters=1",
          "--knn_at_end=false", "--log_every=1", "--seed=5", "--in_memory=false",
          "--tensorboard=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def _torchrun(log: Path, args, max_restarts=0, nproc=2):
    """``torchrun --standalone`` (its own rendezvous port) in a new process group, output to
    ``log`` (not a terminal). On the way out its workers (torchrun gives each a process group
    of its own; a stopped one would outlive the launcher) and then the launcher are killed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
               "--monitor-interval=0.2", "-m", "fastswav.train", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGSTOP)  # no new workers while the current ones go
            for pid in _workers(proc.pid).values():
                _kill_group(pid)
        _kill_group(proc.pid)
        proc.wait()


def _workers(launcher_pid: int) -> dict:
    """{rank: pid} of the launcher's live worker processes."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


def _wait_for(condition, deadline: float, proc=None, what=""):
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.05)


def _assert_same_weights(a, b):
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor.float(), b["model"][name].float(), atol=1e-6), name


@pytest.mark.slow
def test_killed_worker_restarts_and_ends_with_the_uninterrupted_weights(tiny_folder, tmp_path):
    epochs, kills = 4, 3
    args = ["--data", str(tiny_folder), *RECIPE, f"--epochs={epochs}"]
    straight = tmp_path / "straight"
    with _torchrun(tmp_path / "straight.log", [*args, "--output-dir", str(straight)]) as proc:
        assert proc.wait(timeout=240) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    deadline = time.monotonic() + 400
    with _torchrun(log, [*args, "--output-dir", str(out)], max_restarts=kills) as proc:
        killed = set()
        for epoch, rank in zip(range(1, kills + 1), (1, 0, 1)):
            # Each time a new epoch's checkpoint appears, SIGKILL the (new) rank 1, then rank 0
            # (the one that picks the checkpoint and writes them), then rank 1 again.
            _wait_for(lambda: checkpoint_path(out, epoch).exists(), deadline, proc,
                      f"checkpoint {epoch}")
            _wait_for(lambda: _workers(proc.pid).get(rank) not in (None, *killed), deadline, proc,
                      f"a live rank {rank}")
            victim = _workers(proc.pid)[rank]
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "connectFullMesh" not in text and "Connection refused" not in text
    # Every restart resumed from the newest complete checkpoint.
    resumed = re.findall(r"resumed from \S*checkpoint_epoch(\d+)\.pt", text)
    assert [int(e) for e in resumed] == list(range(1, kills + 1)), text[-3000:]
    _assert_same_weights(load_checkpoint(checkpoint_path(straight, epochs)),
                         load_checkpoint(checkpoint_path(out, epochs)))


@pytest.mark.slow
def test_stalled_worker_ends_the_run_with_one_line_within_twice_the_timeout(tiny_folder, tmp_path):
    timeout_s = 6
    out, log = tmp_path / "stalled", tmp_path / "stalled.log"
    args = ["--data", str(tiny_folder), *RECIPE, "--epochs=3", f"--dist_timeout_s={timeout_s}",
            "--output-dir", str(out)]
    deadline = time.monotonic() + 240
    with _torchrun(log, args) as proc:
        _wait_for(lambda: checkpoint_path(out, 1).exists(), deadline, proc, "checkpoint 1")
        _wait_for(lambda: 1 in _workers(proc.pid), deadline, proc, "rank 1")
        os.kill(_workers(proc.pid)[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _wait_for(lambda: "error:" in log.read_text(), stopped + 30, None,
                  lambda: f"the error line; the log so far: {log.read_text()[-3000:]}")
        latency = time.monotonic() - stopped
        time.sleep(0.5)  # anything else rank 0 would print
        text = log.read_text()
    print(f"error line {latency:.1f} s after the SIGSTOP")
    assert latency < 2 * timeout_s, (latency, text[-3000:])
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text[-3000:]
    # The phase is where rank 0 was waiting: a step's collectives or a checkpoint write.
    assert re.search(r"a collective during (iteration \d+ \(epoch \d+, step \d+\)|the write of "
                     r"checkpoint_epoch\d+\.pt) "
                     rf"failed \(timeout {timeout_s} s", errors[0]), errors[0]
    assert "rank 1 of 2 stopped responding" in errors[0], errors[0]
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_line_and_one_exit_status(tiny_folder, tmp_path):
    out = tmp_path / "unreadable"
    out.mkdir()
    checkpoint_path(out, 1).write_bytes(b"not a checkpoint")
    args = ["--data", str(tiny_folder), *RECIPE, "--epochs=2", "--output-dir", str(out)]
    port = _free_port()
    procs = []
    try:
        for rank in (0, 1):  # a static two-process launch, as torchrun's workers see it
            env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, "-m", "fastswav.train", *args],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          start_new_session=True))
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [2, 2], results
    err0, err1 = (r[1].decode() for r in results)
    assert err0.count("error:") == 1 and "no readable checkpoint" in err0, err0
    assert "Traceback" not in err0 + err1 and "error:" not in err1, err1
    assert (out / (checkpoint_path(out, 1).name + ".damaged")).is_file()


@pytest.mark.slow
def test_an_error_every_restart_meets_is_said_once_per_launch(tiny_folder, tmp_path):
    """Under --max-restarts=2 a bad input fails all three attempts alike: one error: line for
    the launch, every worker's exit status 2 in torchrun's summary (torchrun exits 1)."""
    log = tmp_path / "restarts.log"
    args = ["--data", str(tmp_path / "no_such_folder"), *RECIPE, "--epochs=1",
            "--output-dir", str(tmp_path / "run")]
    with _torchrun(log, args, max_restarts=2) as proc:
        assert proc.wait(timeout=300) == 1, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("error: data path not found") == 1, text[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", text), text[-3000:]
    assert text.count("failed (exitcode: 2)") == 3, text[-3000:]  # three attempts


def test_said_before_remembers_a_line_per_launch_and_only_under_restarts(monkeypatch):
    from fastswav.faults import said_before

    line = f"error: a line of this test {time.time()}"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not said_before(line) and not said_before(line)  # no torchrun: always said
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"run{os.getpid()}")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert not said_before(line)  # the first attempt says it
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert said_before(line)  # a restart does not
    assert not said_before(line + " (another line)")  # a new error is said
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"other{os.getpid()}")
    assert not said_before(line)  # another launch says it again


def test_full_disk_keeps_earlier_checkpoints_exits_74_and_resumes(tiny_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    argv = ["--data", str(tiny_folder), "--output-dir", str(out), *RECIPE, "--epochs=3",
            "--batch_size=6", "--queue_length=12", "--epoch_queue_starts=0"]
    real_write = checkpoint_module._write
    writes = {"n": 0}

    def fills_the_disk(state, f):
        writes["n"] += 1
        if writes["n"] >= 3:  # epoch 2's queue file: half written, then ENOSPC
            f.write(b"x" * 1000)
            raise OSError(28, "No space left on device")
        real_write(state, f)

    monkeypatch.setattr(checkpoint_module, "_write", fills_the_disk)
    assert main(argv) == EXIT_DISK_FULL == 74
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert str(out) in lines[0] and "bytes needed" in lines[0] and "bytes free" in lines[0], lines
    assert "No space left on device" in lines[0] and "Traceback" not in err
    # No temporary file left; epoch 1 untouched and loadable.
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".pt") or ".tmp" in p.name) == [
        "checkpoint_epoch0001.pt", "queue_rank0_epoch0001.pt"]
    assert load_checkpoint(checkpoint_path(out, 1))["epoch"] == 1

    monkeypatch.setattr(checkpoint_module, "_write", real_write)  # space freed
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(checkpoint_path(out, 3))["epoch"] == 3


def test_a_failed_torch_save_is_a_disk_error_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = checkpoint_path(tmp_path, 1)

    def cut_short(state, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 58")

    monkeypatch.setattr(checkpoint_module, "_write", cut_short)
    with pytest.raises(OSError, match=r"cannot write checkpoint_epoch0001\.pt in .*bytes free"):
        checkpoint_module.save_checkpoint({"w": torch.zeros(10)}, target)
    assert list(tmp_path.iterdir()) == []


def test_room_check_warns_with_the_figure(tmp_path):
    free = checkpoint_module.free_bytes(tmp_path)
    assert checkpoint_module.check_room(tmp_path, 1000, 4) is None
    warning = checkpoint_module.check_room(tmp_path, free, 4)
    assert warning is not None and f"{free:,} bytes free" in warning and "74" in warning


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "checkpoint_epoch0002.pt.ab_c12.tmp").write_bytes(b"x")
    (tmp_path / "queue_rank1_epoch0002_step000004.pt.q9.tmp").write_bytes(b"x")
    (tmp_path / "checkpoint_epoch0001.pt").write_bytes(b"x")
    (tmp_path / "notes.tmp").write_bytes(b"x")
    removed = checkpoint_module.remove_stale_temporaries(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch0001.pt", "notes.tmp"]


def test_join_ignores_a_dead_attempts_keys():
    """A restarted group on torchrun's shared store: the earlier attempt's keys are all there,
    and the handshake still gives every rank the same, new generation."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = lambda: torch.distributed.TCPStore("127.0.0.1", store.port, is_master=False)  # noqa: E731

    def attempt(world):
        got = {}
        threads = [threading.Thread(target=lambda r=r: got.__setitem__(
            r, distributed._fresh_generation(client(), r, world, 20.0))) for r in range(world)]
        # The followers first: they find the previous attempt's leader key and welcomes.
        for t in threads[::-1]:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(30)
        return got

    first = attempt(3)
    second = attempt(3)
    assert set(first.values()) == {1} and set(second.values()) == {2}, (first, second)


def test_runs_sharing_a_store_keep_their_keys_apart(monkeypatch):
    """Two runs on one store (two launches with one rendezvous endpoint): each run's handshake
    lives under its own TORCHELASTIC_RUN_ID and counts its generations alone."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def attempt(run_id, world=2):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
        space = distributed.run_key_space()
        assert space == f"fastswav/{run_id}"
        got = {}
        threads = [threading.Thread(target=lambda r=r: got.__setitem__(r, distributed._fresh_generation(
            torch.distributed.PrefixStore(space, torch.distributed.TCPStore(
                "127.0.0.1", store.port, is_master=False)), r, world, 20.0))) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return got

    assert attempt("swav-a") == {0: 1, 1: 1}
    assert attempt("swav-b") == {0: 1, 1: 1}  # not generation 2: run a's keys are not seen
    assert attempt("swav-a") == {0: 2, 1: 2}
    assert store.check(["fastswav/swav-a/leader", "fastswav/swav-b/leader"])
    assert not store.check(["fastswav/leader"])


def test_progress_is_plain_lines_off_a_terminal(tiny_folder, tmp_path, capsys):
    argv = ["--data", str(tiny_folder), "--output-dir", str(tmp_path / "lines"), *RECIPE,
            "--epochs=1", "--steps_per_epoch=2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "\r" not in text and "it/s" not in text and "step/s" not in text
    lines = [line for line in text.splitlines() if line.startswith("epoch 1/1 step")]
    assert len(lines) == 2, text
    assert re.match(r"epoch 1/1 step 2/2 \(iteration 2/2\): loss [\d.]+ lr [\d.e-]+ [\d.]+ img/s "
                    r"ETA \d\d:\d\d:\d\d$", lines[1]), lines[1]


@pytest.mark.parametrize("text", [
    "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation",
    "Application timeout caused pair closure",
    "[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:62648: Connection reset by peer",
])
def test_gloo_failures_are_collective_failures(text):
    assert distributed.is_collective_failure(RuntimeError(text))
    assert not distributed.is_collective_failure(RuntimeError("shape mismatch in conv2d"))

