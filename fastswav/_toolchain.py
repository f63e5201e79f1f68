"""Where the compilers are: the one place that finds the CUDA toolkit for fastswav._C.

Used by ``setup.py`` (loaded there by file path, before fastswav or torch can be imported)
and by the first-use build in :mod:`fastswav.ops.ext_build`, so both agree on ``CUDA_HOME``.
Imports nothing outside the standard library.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from typing import Optional

# The extension's sources, relative to the folder that holds them (csrc/ in a checkout,
# fastswav/_csrc/ inside an installed wheel). The .cu has a different stem from the .cpp:
# same-stem objects clash under ninja.
CPU_SOURCES = ("queue_ops.cpp",)
CUDA_SOURCES = ("queue_kernels.cu",)
HEADERS = ("queue_checks.h",)
CXX_FLAGS = ("-O3", "-g0")  # no debug info: a shorter build
NVCC_FLAGS = ("-O3", "-DFASTSWAV_WITH_CUDA")
# Without a GPU to ask, torch would build CUDA code for every arch it knows (slow): build for
# A100 and H100/H200, with PTX for newer cards.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to something other than '' or '0'."""
    return os.environ.get(name, "0").strip() not in ("", "0")


def cxx_compiler() -> Optional[str]:
    """Path of the C++ compiler torch's build would use (``$CXX``, else ``c++``), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def is_cuda_toolkit(folder: Optional[str]) -> bool:
    """A toolkit folder holds bin/nvcc and the CUDA runtime to link against."""
    if not folder or not os.path.isfile(os.path.join(folder, "bin", "nvcc")):
        return False
    runtimes = glob.glob(os.path.join(folder, "lib64", "libcudart.so*")) + glob.glob(
        os.path.join(folder, "lib", "libcudart.so*")) + glob.glob(
        os.path.join(folder, "targets", "*", "lib", "libcudart.so*"))
    return bool(runtimes)


def find_cuda_home() -> Optional[str]:
    """The real CUDA toolkit folder, or None.

    torch guesses CUDA_HOME as the parent of the folder of the ``nvcc`` on PATH, which is
    wrong when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc: the link then fails
    with ``cannot find -lcudart``), so each candidate is checked for bin/nvcc and libcudart.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # A wrapper script still reveals the toolkit: nvcc's dry run prints its own folder.
        try:
            dry_run = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60, check=False)
            here = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
            if here:
                candidates.append(os.path.dirname(here.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for folder in candidates:
        if folder and is_cuda_toolkit(folder):
            return os.path.realpath(folder)
    return None
