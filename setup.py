"""Build script: the fastswav package, kernels/ installed as fastswav.kernels, and
(when a compiler is present) the csrc/ extension as fastswav._C."""
from setuptools import setup

PACKAGES = ["fastswav", "fastswav.ops", "fastswav.data", "fastswav.eval", "fastswav.kernels"]


def extensions():
    """C++/CUDA extension modules and the build command (empty when none can be built)."""
    return [], {}


ext_modules, cmdclass = extensions()

setup(
    packages=PACKAGES,
    # kernels/ lives at the top level of the repository but is only importable as
    # fastswav.kernels: a top-level `kernels` would collide with an unrelated PyPI package.
    package_dir={"fastswav": "fastswav", "fastswav.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
