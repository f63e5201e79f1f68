"""Build script: the fastswav package, kernels/ installed as fastswav.kernels, and
(when a compiler is present) the csrc/ extension as fastswav._C."""
import importlib.util
import os
import shutil
import sys

from setuptools import setup

PACKAGES = ["fastswav", "fastswav.ops", "fastswav.data", "fastswav.eval", "fastswav.kernels",
            "fastswav._csrc"]


def _say(message):
    print(f"fastswav setup: {message}", file=sys.stderr, flush=True)


def _load_toolchain():
    """fastswav/_toolchain.py, loaded by path: the CUDA toolkit search shared with the
    first-use build (importing the fastswav package here would need torch)."""
    spec = importlib.util.spec_from_file_location(
        "_fastswav_toolchain", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "fastswav", "_toolchain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_toolchain = _load_toolchain()


def extensions():
    """C++/CUDA extension modules and the build command (empty when none can be built).

    FASTSWAV_NO_EXT=1 skips the extension; FASTSWAV_NO_CUDA_EXT=1 builds its CPU part only.
    TORCH_CUDA_ARCH_LIST and MAX_JOBS are read by torch.utils.cpp_extension as usual. A
    failed build leaves the package installed without fastswav._C (the queue then uses the
    PyTorch reference).
    """
    if _toolchain.env_flag("FASTSWAV_NO_EXT"):
        _say("FASTSWAV_NO_EXT is set: not building fastswav._C")
        return [], {}
    if not os.path.isdir("csrc"):
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _say(f"no C++ compiler ({compiler}) found: not building fastswav._C")
        return [], {}

    with_cuda = False
    if _toolchain.env_flag("FASTSWAV_NO_CUDA_EXT"):
        _say("FASTSWAV_NO_CUDA_EXT is set: building fastswav._C for the CPU only")
    else:
        try:
            import torch
            torch_cuda = torch.version.cuda
        except ImportError:
            torch_cuda = None
        cuda_home = _toolchain.find_cuda_home() if torch_cuda else None
        if torch_cuda and cuda_home:
            # cpp_extension reads CUDA_HOME when first imported; set it before that import,
            # and on the module in case something imported it already.
            os.environ["CUDA_HOME"] = cuda_home
            with_cuda = True
            if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                try:
                    has_gpu = torch.cuda.is_available()
                except Exception:  # noqa: BLE001 (a broken driver must not break the install)
                    has_gpu = False
                if not has_gpu:
                    # Without a GPU to ask, torch would build for every arch it supports
                    # (slow); build for A100 and H100/H200, with PTX for newer cards.
                    os.environ["TORCH_CUDA_ARCH_LIST"] = _toolchain.DEFAULT_ARCH_LIST
                    _say("no GPU and no TORCH_CUDA_ARCH_LIST: building CUDA code for "
                         f"{_toolchain.DEFAULT_ARCH_LIST}")
            _say(f"building fastswav._C with CUDA (CUDA_HOME={cuda_home}, "
                 f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'from the GPU')})")
        elif torch_cuda:
            _say("no CUDA toolkit (bin/nvcc + libcudart) found: "
                 "building fastswav._C for the CPU only")
        else:
            _say("torch has no CUDA: building fastswav._C for the CPU only")

    try:
        from torch.utils import cpp_extension
    except ImportError as exc:
        _say(f"torch is not importable ({exc}): not building fastswav._C now; it is built "
             "on first use into a per-user cache (or install with --no-build-isolation)")
        return [], {}
    if with_cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]

    sources = [f"csrc/{name}" for name in _toolchain.CPU_SOURCES]
    cxx_flags = list(_toolchain.CXX_FLAGS)  # no -g: a shorter build (Python's CFLAGS add it)
    if with_cuda:
        sources += [f"csrc/{name}" for name in _toolchain.CUDA_SOURCES]
        cxx_flags.append("-DFASTSWAV_WITH_CUDA")
        module = cpp_extension.CUDAExtension(
            "fastswav._C", sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": list(_toolchain.NVCC_FLAGS)})
    else:
        module = cpp_extension.CppExtension("fastswav._C", sources,
                                            extra_compile_args={"cxx": cxx_flags})

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Builds the extension, but a failure leaves an installable package without it."""

        def run(self):
            inplace = self.inplace  # setuptools clears it during run() (editable installs)
            try:
                super().run()
                return
            except Exception as exc:  # noqa: BLE001 (any build error is non-fatal here)
                _say(f"building fastswav._C FAILED ({type(exc).__name__}: {exc})")
            if with_cuda:
                # The CUDA part is the fragile one (toolkit vs torch versions): keep the CPU op.
                _say("retrying fastswav._C for the CPU only")
                # Undo what the failed run() left behind: its compiler object, cleared inplace.
                self.compiler, self.inplace = None, inplace
                cpu_only = cpp_extension.CppExtension(
                    "fastswav._C", [f"csrc/{name}" for name in _toolchain.CPU_SOURCES],
                    extra_compile_args={"cxx": [f for f in cxx_flags if "CUDA" not in f]})
                # Reuse the finalized Extension object (setuptools has annotated it) with the
                # CPU-only sources, flags and libraries.
                for field in ("sources", "include_dirs", "library_dirs", "libraries",
                              "extra_compile_args", "extra_link_args", "language"):
                    setattr(self.extensions[0], field, getattr(cpu_only, field))
                try:
                    super().run()
                    return
                except Exception as exc:  # noqa: BLE001
                    _say(f"building fastswav._C for the CPU FAILED ({type(exc).__name__}: {exc})")
            _say("installing without fastswav._C: the feature queue will use the PyTorch reference")

    return [module], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = extensions()


setup(
    packages=PACKAGES,
    # kernels/ lives at the top level of the repository but is only importable as
    # fastswav.kernels: a top-level `kernels` would collide with an unrelated PyPI package.
    # csrc/ also ships inside the package as fastswav._csrc (sources only): where the
    # extension was not built at install time (e.g. pip's isolated build has no torch),
    # fastswav builds it from these on first use (fastswav.ops.ext_build).
    package_dir={"fastswav": "fastswav", "fastswav.kernels": "kernels", "fastswav._csrc": "csrc"},
    package_data={"fastswav._csrc": ["*.cpp", "*.cu", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
