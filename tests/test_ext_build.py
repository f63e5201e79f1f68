"""fastswav._C built on first use where the install did not build it: into a per-user cache,
once for several processes started together (a file lock), skipped with FASTSWAV_NO_EXT=1,
and, end to end, a fresh venv with a plain (build-isolated) `pip install .`."""
import os
import subprocess
import sys
import time
import venv

import pytest

from fastswav.ops import ext_build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a subprocess: hides the installed fastswav._C (as a wheel without it would), then
# makes a FeatureQueue, which builds the extension on first use, and pushes through it.
_FIRST_USE = r"""
import sys
sys.modules["fastswav._C"] = None  # the install did not build it
import logging
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
import torch
from fastswav import FeatureQueue
from fastswav.ops import backend, queue_ext
q = FeatureQueue(2, 8, 4)
q.push(torch.ones(2, 3, 4))
from fastswav import _C
print("DEVICES", sorted(queue_ext._EXT_DEVICES), "WITH_CUDA", _C.WITH_CUDA)
print("HOW", backend.queue_extension_how())
print("FILLED", q.filled.item())
"""


def _env(cache, **extra):
    env = dict(os.environ, FASTSWAV_EXT_CACHE=str(cache), FASTSWAV_NO_CUDA_EXT="1",
               OMP_NUM_THREADS="1", **extra)
    env.pop("FASTSWAV_NO_EXT", None)
    env.pop("FASTSWAV_BACKEND", None)
    return env


def _needs_build_tools():
    what, why = ext_build.plan()
    if what is None and "FASTSWAV_NO_EXT" not in why:
        pytest.skip(f"no first-use build possible here: {why}")


def test_no_ext_skips_the_first_use_build(monkeypatch):
    monkeypatch.setenv("FASTSWAV_NO_EXT", "1")
    assert ext_build.plan() == (None, "FASTSWAV_NO_EXT is set")
    monkeypatch.setitem(sys.modules, "fastswav._C", None)
    assert ext_build.load_or_build() == (None, "FASTSWAV_NO_EXT is set")


def test_sources_ship_with_the_package_and_the_key_follows_them(tmp_path):
    folder = ext_build.source_dir()
    assert folder is not None and (folder / "queue_ops.cpp").is_file()
    copy = tmp_path / "csrc"
    copy.mkdir()
    for f in folder.iterdir():
        if f.suffix in (".cpp", ".cu", ".h"):
            (copy / f.name).write_bytes(f.read_bytes())
    assert ext_build.build_key(copy, False) == ext_build.build_key(folder, False)
    assert ext_build.build_key(copy, False) != ext_build.build_key(copy, True)
    (copy / "queue_ops.cpp").write_text((copy / "queue_ops.cpp").read_text() + "\n// changed\n")
    assert ext_build.build_key(copy, False) != ext_build.build_key(folder, False)


def test_a_failed_build_is_remembered_and_not_retried(tmp_path, monkeypatch):
    _needs_build_tools()
    monkeypatch.setenv("FASTSWAV_EXT_CACHE", str(tmp_path))
    calls = []

    def failing(sources, folder, with_cuda, cuda_home):
        calls.append(with_cuda)
        raise RuntimeError("Error building extension '_C': compiler said no")

    monkeypatch.setattr(ext_build, "_compile", failing)
    sources = ext_build.source_dir()
    module, how = ext_build._build_one(sources, False, None)
    assert module is None and "failed" in how and "compiler said no" in how
    module, how = ext_build._build_one(sources, False, None)
    assert module is None and "an earlier first-use build failed" in how
    assert calls == [False]  # built (and failed) once
    marker = tmp_path / ext_build.build_key(sources, False) / ext_build.FAILED_MARKER
    assert marker.is_file()


def test_the_file_lock_excludes_a_second_holder(tmp_path):
    """Two holders of the build lock (here two threads, as two processes would) never
    hold it at once."""
    import threading

    lock = tmp_path / "x.lock"
    inside, overlaps = [], []

    def hold():
        with ext_build._file_lock(lock):
            if inside:
                overlaps.append(True)
            inside.append(1)
            time.sleep(0.2)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []


@pytest.mark.slow
def test_first_use_build_runs_once_for_three_processes_then_loads_from_the_cache(tmp_path):
    """Three processes start together without an installed extension: one builds (one log
    line), the others wait on the lock and load the same library; a fourth loads it from
    the cache without building. CPU-only build (FASTSWAV_NO_CUDA_EXT=1) to keep CI short."""
    _needs_build_tools()
    cache = tmp_path / "cache"
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE], cwd=str(tmp_path), env=_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=900) for p in procs]
    build_seconds = time.perf_counter() - start
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert "DEVICES ['cpu'] WITH_CUDA 0" in out and "FILLED 3" in out, out + err
    building = [err for _, err in results if "building it now" in err]
    assert len(building) == 1, [err[-500:] for _, err in results]
    assert sum(err.count("WARNING") for _, err in results) == 1
    libraries = list(cache.glob("*/_C.so"))
    assert len(libraries) == 1
    done = subprocess.run([sys.executable, "-c", _FIRST_USE], cwd=str(tmp_path), env=_env(cache),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "building it now" not in done.stderr, done.stderr[-2000:]
    assert "built on first use (CPU only)" in done.stdout and str(libraries[0].parent) in done.stdout
    print(f"first-use build by 3 processes together: {build_seconds:.0f} s")


@pytest.mark.slow
def test_fresh_venv_plain_pip_install_reports_the_extension(tmp_path):
    """What a new user types: a fresh venv, `pip install .` with pip's build isolation (so
    setup.py sees no torch and builds no extension), then the info command, which builds
    fastswav._C on first use and shows it. torch is the project venv's own (a path entry);
    the extension is built for the CPU only to keep CI short."""
    _needs_build_tools()
    # A copy of the checkout, so the build leaves nothing in it (and takes no built .so).
    import shutil

    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "runs", "__pycache__", "*.so", ".pytest_cache"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    env = _env(tmp_path / "cache")
    env.pop("PYTHONPATH", None)
    import sysconfig

    import torch

    # torch, torchvision and the other dependencies come from this venv's site-packages by a
    # path entry (installing torch again took 190 s of CI); pip sees them as installed. Its
    # .pth files are not run, so this checkout's editable fastswav stays out of the new venv.
    purelib = sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)})
    dev_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(purelib, "dev_site_packages.pth"), "w") as f:
        f.write(dev_site + "\n")
    timings = {}
    start = time.perf_counter()
    install = subprocess.run([python, "-m", "pip", "install", "-v", str(source)], env=env,
                             capture_output=True, text=True, timeout=1200, cwd=str(tmp_path))
    timings["pip install ."] = time.perf_counter() - start
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "not building fastswav._C now" in install.stdout + install.stderr
    start = time.perf_counter()
    done = subprocess.run([python, "-m", "fastswav.info"], env=env, capture_output=True,
                          text=True, timeout=1200, cwd=str(tmp_path))
    timings["info (first-use build)"] = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if "fastswav._C (CPU)" in l)
    assert " yes " in line and "built on first use" in line, done.stdout
    assert str(env_dir) in done.stdout  # the installed copy, not the checkout
    print("fresh venv timings:", {k: f"{v:.0f} s" for k, v in timings.items()})
