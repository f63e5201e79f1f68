"""python -m fastswav.info: versions, GPUs, the fast paths this machine takes and why not,
--json, and --check (a few-second self-test that fails non-zero when a fast path is broken)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastswav import info
from fastswav.ops import queue_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _extension_expected():
    return (os.environ.get("FASTSWAV_NO_EXT", "0") in ("", "0")
            and os.environ.get("FASTSWAV_BACKEND", "").strip().lower() != "reference")


def test_text_report_names_versions_and_each_fast_path(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    for needle in ("python", "torch", torchvision_version(), torch.__version__, "triton", "numpy",
                   "ffcv", "fused loss", "fastswav._C (CPU)", "fastswav._C (CUDA)",
                   "decode-once FFCV loader", "NVTX ranges", "GPUs:"):
        assert needle in out, needle
    if not torch.cuda.is_available():
        fused = next(line for line in out.splitlines() if "fused loss" in line)
        assert " no " in fused and ("no CUDA device" in fused or "CPU-only" in fused), fused
        assert "none (" in out  # the GPU section says why there is none
    if _extension_expected():
        ext = next(line for line in out.splitlines() if "fastswav._C (CPU)" in line)
        assert " yes " in ext, ext


def torchvision_version():
    import torchvision

    return torchvision.__version__.split("+")[0]


def test_json_report_has_the_same_facts(capsys):
    assert info.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(report["fast_paths"]) == {"fused loss", "fastswav._C (CPU)", "fastswav._C (CUDA)",
                                         "decode-once FFCV loader", "NVTX ranges"}
    for path in report["fast_paths"].values():
        assert isinstance(path["taken"], bool) and path["detail"]
    assert report["fast_paths"]["fused loss"]["taken"] == torch.cuda.is_available()


def test_check_runs_what_runs_here_and_passes(capsys):
    assert info.main(["--check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in report["checks"]]
    assert "reference loss (CPU)" in names and "queue, PyTorch ring (CPU)" in names
    if _extension_expected():
        assert "queue, fastswav._C (CPU)" in names
    if report["fast_paths"]["decode-once FFCV loader"]["taken"]:
        assert any(n.startswith("decode-once batch") for n in names)
    if not torch.cuda.is_available():
        assert not any(n.startswith("fused loss") for n in names)
    assert all(c["ok"] for c in report["checks"]), report["checks"]


def test_a_broken_fast_path_fails_the_check_with_exit_1(monkeypatch, capsys):
    if not _extension_expected():
        pytest.skip("the extension is not used here")

    def wrong_rows(buffer, write_pos, filled, new):
        buffer.fill_(1.0)  # writes every row: a broken kernel
        write_pos.fill_(1)
        filled.fill_(8)

    monkeypatch.setattr(queue_ext, "queue_push_extension_", wrong_rows)
    assert info.main(["--check"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert len(failed) == 1 and "queue, fastswav._C (CPU)" in failed[0], out
    assert "1 failed" in out


def test_bad_option_is_exit_2():
    done = subprocess.run([sys.executable, "-m", "fastswav.info", "--no-such-option"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    # the one usage-error contract of every command: exit 2, one ``error:`` line naming it
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 1, (done.returncode, done.stderr)
    assert err[0].startswith("error: ") and "--no-such-option" in err[0]


def test_module_runs_as_a_command():
    done = subprocess.run([sys.executable, "-m", "fastswav.info", "--no-build"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fast paths (taken here?):" in done.stdout
