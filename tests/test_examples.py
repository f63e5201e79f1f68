"""The examples run as a user would run them."""
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_train_with_swavloss_runs_and_reports_knn():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_with_swavloss.py"), "--steps", "6",
         "--batch-size", "16", "--freeze-prototypes", "2"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^kNN top-1 before training: [0-9.]+%$", done.stdout, re.MULTILINE)
    assert re.search(r"^kNN top-1 after training: [0-9.]+% \(6 steps", done.stdout, re.MULTILINE)
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", done.stdout)]
    assert losses and all(0 < v < 20 for v in losses)
