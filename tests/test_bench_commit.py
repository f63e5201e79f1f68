"""The commit column of benchmarks/results/: the checkout as the benchmark started."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Imports common (the benchmark starts), then edits the checkout as a person might during a
# long run, then makes the writer that stamps the rows.
SCRIPT = """
import sys, pathlib
sys.path.insert(0, "benchmarks")
import torch, common
pathlib.Path(sys.argv[1]).write_text("edited during the run\\n")
print(common.ResultWriter("x", torch.device("cpu")).common["commit"])
"""


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "common.py", tmp_path / "benchmarks" / "common.py")
    (tmp_path / "README.md").write_text("readme\n")
    (tmp_path / "benchmarks" / "results" / "x.csv").write_text("header\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    return tmp_path, _git(tmp_path, "rev-parse", "--short", "HEAD")


def _stamp(cwd, edit):
    return subprocess.run([sys.executable, "-c", SCRIPT, edit], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_an_edit_during_the_run_leaves_its_rows_clean(checkout):
    root, sha = checkout
    assert _stamp(root, "README.md") == sha


def test_a_dirty_start_is_marked_and_results_do_not_count(checkout):
    root, sha = checkout
    (root / "benchmarks" / "results" / "x.csv").write_text("header\nrow\n")
    assert _stamp(root, "README.md") == sha  # appended results alone: clean
    assert _stamp(root, "README.md") == sha + "+dirty"  # README edited before this start
