"""Every command ends bad input with one ``error:`` line on stderr and exit status 2.

The table runs each command's ``main`` with a missing path and with a malformed value (and,
where the command reads a checkpoint, with a file that is not one); one case runs as the
user types it, ``python -m ...`` in a subprocess.
"""
import importlib
import subprocess
import sys

import pytest
from PIL import Image

MISSING = "/nonexistent/fastswav-cli-test"

# command -> (missing path, malformed value)
CASES = {
    "fastswav.train": (["--data", MISSING], ["--epochs=two"]),
    "fastswav.eval.knn": (["--checkpoint", f"{MISSING}.pt", "--data", MISSING],
                          ["--checkpoint", f"{MISSING}.pt", "--k", "many"]),
    "fastswav.eval.linear": (["--checkpoint", f"{MISSING}.pt", "--data", MISSING],
                             ["--checkpoint", f"{MISSING}.pt", "--val-fraction", "half"]),
    "fastswav.embed": (["--checkpoint", f"{MISSING}.pt", "--data", MISSING, "--out", "e.pt"],
                       ["--checkpoint", "x.pt", "--data", ".", "--out", "e.pt",
                        "--batch-size", "big"]),
    "fastswav.plot": ([MISSING], [".", "--x", "sideways"]),
    "fastswav.export": ([f"{MISSING}.pt", "--to", "torchvision"], ["x.pt", "--to", "keras"]),
    "fastswav.data.write": ([MISSING, "out.beton"], [".", "out.beton", "--max-resolution", "big"]),
    "fastswav.info": (["--memory", "--preset", "no_such_preset"],
                      ["--memory", "--processes", "eight"]),
}

JUNK_CHECKPOINT = {
    "fastswav.eval.knn": ["--checkpoint", "{junk}", "--data", "download:cifar10"],
    "fastswav.eval.linear": ["--checkpoint", "{junk}", "--data", "download:cifar10"],
    "fastswav.embed": ["--checkpoint", "{junk}", "--data", "{folder}", "--out", "e.pt"],
    "fastswav.export": ["{junk}", "--to", "torchvision"],
    "fastswav.export ": ["{junk}"],  # --to left out: the library is read from the checkpoint
}


def _main_exit(module: str, argv, capsys):
    """(exit status, stderr lines) of ``python -m module argv`` run in this process."""
    main = importlib.import_module(module.strip()).main
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    _, err = capsys.readouterr()
    return status, [line for line in err.splitlines() if line.strip()]


def _assert_one_error_line(status, lines, what):
    assert status == 2, f"{what}: exit status {status}, stderr {lines}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: stderr {lines}"


@pytest.mark.parametrize("module", sorted(CASES))
@pytest.mark.parametrize("case", ["missing path", "malformed value"])
def test_bad_input_is_one_error_line_and_status_2(module, case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = CASES[module][0 if case == "missing path" else 1]
    status, lines = _main_exit(module, argv, capsys)
    _assert_one_error_line(status, lines, f"{module} {' '.join(argv)}")
    if case == "missing path":
        assert "nonexistent" in lines[0] or "no_such_preset" in lines[0], lines[0]


@pytest.mark.parametrize("module", sorted(JUNK_CHECKPOINT))
def test_a_file_that_is_no_checkpoint_is_one_error_line(module, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    junk = tmp_path / "checkpoint_epoch0001.pt"
    junk.write_bytes(b"not a checkpoint\n" * 10)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.png")
    argv = [a.format(junk=junk, folder=tmp_path / "photos") for a in JUNK_CHECKPOINT[module]]
    status, lines = _main_exit(module, argv, capsys)
    _assert_one_error_line(status, lines, f"{module} {' '.join(argv)}")
    assert str(junk) in lines[0], lines[0]


def test_the_command_as_typed_exits_2_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fastswav.eval.knn", "--checkpoint",
                          f"{MISSING}.pt", "--data", MISSING], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    _assert_one_error_line(run.returncode, lines, "python -m fastswav.eval.knn")
    assert lines[0] == f"error: checkpoint not found: {MISSING}.pt"
