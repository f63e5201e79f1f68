"""Build ``fastswav._C`` on first use when the install did not (JIT, into a per-user cache).

``pip install .`` without ``--no-build-isolation`` (and uv, and requirement files) runs
setup.py in an isolated environment without torch, so the wheel has no ``fastswav._C``. The
wheel does carry the C++/CUDA sources (``fastswav/_csrc``); the first time the feature queue
needs the op, :func:`load_or_build` compiles them with ``torch.utils.cpp_extension.load``
into ``$FASTSWAV_EXT_CACHE`` (default ``$XDG_CACHE_HOME/fastswav/ext``, else
``~/.cache/fastswav/ext``), in a folder named after everything the binary depends on (the
sources' hash, Python, torch and its CUDA version, CPU-only or with CUDA), and loads it from
there on every later start. An exclusive file lock (``fcntl``) around the build means that
8 processes started together build it once: one builds, the others wait and then load it.

``FASTSWAV_NO_EXT=1`` skips the build; ``FASTSWAV_NO_CUDA_EXT=1`` builds the CPU part only.
A failed build is logged in one line (the compiler output stays in the cache folder's
``build.log``), is remembered, so later starts do not try again until that file is deleted,
and leaves the queue on the PyTorch reference.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

from .. import _toolchain

log = logging.getLogger("fastswav")

CACHE_ENV = "FASTSWAV_EXT_CACHE"
FAILED_MARKER = "FAILED"
LIBRARY = "_C.so"
_thread_lock = threading.Lock()


def cache_root() -> Path:
    """The per-user folder that holds first-use builds of the extension."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastswav" / "ext"


def source_dir() -> Optional[Path]:
    """The folder holding the extension's sources: ``fastswav/_csrc`` in an installed wheel,
    ``csrc/`` beside the package in a checkout (editable install); None when neither has them."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "_csrc", package.parent / "csrc"):
        if all((folder / name).is_file()
               for name in _toolchain.CPU_SOURCES + _toolchain.CUDA_SOURCES + _toolchain.HEADERS):
            return folder
    return None


def _ninja_path() -> Optional[str]:
    """PATH with the folder of a ``ninja`` in it: as it is when ninja is on PATH, else with
    this Python's bin folder first when the ninja wheel put it there (a venv not activated)."""
    import shutil

    path = os.environ.get("PATH", "")
    if shutil.which("ninja"):
        return path
    scripts = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(scripts, "ninja")):
        return scripts + os.pathsep + path
    return None


def plan() -> Tuple[Optional[dict], str]:
    """What a first-use build would do here: ``({"sources", "with_cuda", "cuda_home"}, why)``,
    or ``(None, why not)``. Cheap apart from looking for the CUDA toolkit; builds nothing."""
    if _toolchain.env_flag("FASTSWAV_NO_EXT"):
        return None, "FASTSWAV_NO_EXT is set"
    folder = source_dir()
    if folder is None:
        return None, "the extension's sources are not installed with the package"
    if _toolchain.cxx_compiler() is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    import torch

    if _ninja_path() is None:
        return None, "ninja is not installed (pip install ninja)"
    cuda_home = None
    if _toolchain.env_flag("FASTSWAV_NO_CUDA_EXT"):
        why = "CPU only: FASTSWAV_NO_CUDA_EXT is set"
    elif not torch.version.cuda:
        why = "CPU only: this torch has no CUDA"
    else:
        cuda_home = _toolchain.find_cuda_home()
        why = (f"with CUDA (CUDA_HOME={cuda_home})" if cuda_home
               else "CPU only: no CUDA toolkit (bin/nvcc and libcudart) found")
    return {"sources": folder, "with_cuda": cuda_home is not None, "cuda_home": cuda_home}, why


def build_key(sources: Path, with_cuda: bool) -> str:
    """Folder name for a build: changes whenever the binary would (sources, Python, torch)."""
    import torch

    digest = hashlib.sha256()
    names = _toolchain.CPU_SOURCES + _toolchain.HEADERS + (_toolchain.CUDA_SOURCES if with_cuda else ())
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + (sources / name).read_bytes() + b"\0")
    for part in (sys.version, torch.__version__, str(torch.version.cuda), repr(with_cuda),
                 os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
                 " ".join(_toolchain.CXX_FLAGS + _toolchain.NVCC_FLAGS)):
        digest.update(part.encode() + b"\0")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_version = torch.__version__.replace("+", "_")
    return f"{python}-torch{torch_version}-{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:16]}"


def _import_library(path: Path):
    """Load the built library as the module ``fastswav._C`` (its init function is PyInit__C)."""
    spec = importlib.util.spec_from_file_location("fastswav._C", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["fastswav._C"] = module
    import fastswav

    fastswav._C = module
    return module


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``fcntl`` lock on ``path`` for the duration (blocks until free)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _environment(**values):
    """Set environment variables for the duration (None: leave as is)."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is not None:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _compile(sources: Path, folder: Path, with_cuda: bool, cuda_home: Optional[str]) -> Path:
    """Run torch's JIT build into ``folder``; returns the library. Compiler output goes to
    ``folder/build.log``; raises on failure."""
    import torch

    # torch guesses CUDA_HOME when cpp_extension is first imported (and warns when it
    # guesses from a wrapper nvcc): import it with the real toolkit in the environment.
    with _environment(CUDA_HOME=cuda_home if with_cuda else None):
        from torch.utils import cpp_extension

    files = [str(sources / n) for n in _toolchain.CPU_SOURCES]
    cflags = list(_toolchain.CXX_FLAGS)
    arch = None
    if with_cuda:
        files += [str(sources / n) for n in _toolchain.CUDA_SOURCES]
        cflags.append("-DFASTSWAV_WITH_CUDA")
        cpp_extension.CUDA_HOME = cuda_home  # read when cpp_extension was first imported
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            arch = _toolchain.DEFAULT_ARCH_LIST
    folder.mkdir(parents=True, exist_ok=True)
    output = io.StringIO()
    # verbose=False: ninja's output is captured by torch and put in the exception on failure.
    with _environment(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=arch, PATH=_ninja_path()), \
            contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            cpp_extension.load(
                name="_C", sources=files, extra_cflags=cflags,
                extra_cuda_cflags=list(_toolchain.NVCC_FLAGS) if with_cuda else None,
                build_directory=str(folder), with_cuda=with_cuda, is_python_module=False,
                verbose=False)
        except Exception as exc:
            output.write(f"\n{type(exc).__name__}: {exc}\n")
            raise
        finally:
            (folder / "build.log").write_text(output.getvalue())
    library = folder / LIBRARY
    if not library.is_file():
        raise RuntimeError(f"the build finished without {library}")
    return library


def _build_one(sources: Path, with_cuda: bool, cuda_home: Optional[str]):
    """Load the cached build for this configuration, or build it under the file lock.
    Returns ``(module or None, what happened)``."""
    root = cache_root()
    folder = root / build_key(sources, with_cuda)
    kind = "with CUDA" if with_cuda else "CPU only"
    with _file_lock(root / (folder.name + ".lock")):
        library = folder / LIBRARY
        if (folder / FAILED_MARKER).is_file():
            return None, (f"an earlier first-use build failed ({folder / 'build.log'}; delete "
                          f"{folder / FAILED_MARKER} to try again)")
        if library.is_file():
            return _import_library(library), f"built on first use ({kind}), cached in {folder}"
        log.warning("fastswav._C was not built at install time: building it now (%s) into %s, "
                    "once per machine (about a minute or two)", kind, folder)
        start = time.perf_counter()
        try:
            library = _compile(sources, folder, with_cuda, cuda_home)
            module = _import_library(library)
        except Exception as exc:  # noqa: BLE001 (any build error leaves the reference path)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / FAILED_MARKER).write_text(f"{type(exc).__name__}: {exc}\n")
            return None, (f"the first-use build ({kind}) failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''} (log: {folder / 'build.log'})")
        return module, (f"built on first use ({kind}) in {time.perf_counter() - start:.0f} s, "
                        f"cached in {folder}")


def load_or_build():
    """The first-use build of ``fastswav._C``: ``(module, how)`` or ``(None, why not)``.

    Tries CUDA and CPU where the CUDA toolkit is found, and falls back to a CPU-only build
    when the CUDA part fails (the fragile one: toolkit vs torch versions)."""
    with _thread_lock:
        if sys.modules.get("fastswav._C") is not None:
            return sys.modules["fastswav._C"], "already loaded"
        what, why = plan()
        if what is None:
            return None, why
        module, how = _build_one(what["sources"], what["with_cuda"], what["cuda_home"])
        if module is None and what["with_cuda"]:
            log.warning("fastswav._C: %s; trying the CPU-only build", how)
            module, how = _build_one(what["sources"], False, None)
        return module, how
