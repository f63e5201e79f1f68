"""The one place that picks a backend for fastswav's ops.

``FASTSWAV_BACKEND`` forces a choice for debugging: ``reference`` (pure PyTorch, runs
anywhere) or ``fused`` (fails loudly where the fused path cannot run; on the CPU it runs
under ``TRITON_INTERPRET=1``, slowly, which is how CI compares the two); unset or ``auto``
picks the fused path on CUDA when it is available, and the reference elsewhere.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("fastswav")

BACKEND_ENV = "FASTSWAV_BACKEND"
_CHOICES = ("auto", "reference", "fused")


def requested_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV}={value!r}: expected one of {', '.join(_CHOICES)}")
    return value


def fused_loss_available(device: torch.device) -> bool:
    """Whether the fused (Triton) SwAV loss can run on ``device``."""
    if device.type != "cuda":
        return False
    try:
        from fastswav.ops import fused_loss  # noqa: F401  (added by the fused-loss work)
    except ImportError:
        return False
    return fused_loss.is_available()


def triton_interpreter_available() -> bool:
    """Whether Triton kernels run here under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_warned = set()


def loss_backend(device: torch.device) -> str:
    """``"fused"`` or ``"reference"`` for a loss computed on ``device``."""
    want = requested_backend()
    if want == "reference":
        return "reference"
    if fused_loss_available(device):
        return "fused"
    if want == "fused":
        if device.type == "cpu" and triton_interpreter_available():
            return "fused"  # forced on the CPU under TRITON_INTERPRET=1: slow, for checks only
        raise RuntimeError(
            f"{BACKEND_ENV}=fused but the fused SwAV loss cannot run on {device} "
            "(needs CUDA and Triton, or TRITON_INTERPRET=1 on the CPU)"
        )
    if device.type == "cuda" and "loss" not in _warned:
        _warned.add("loss")
        log.warning("fused SwAV loss unavailable on %s; using the PyTorch reference", device)
    return "reference"


# How the extension was found: "installed", a first-use build's description, or why not.
_extension_state: dict = {}


def queue_extension(build: bool = True):
    """The compiled ``fastswav._C`` module when it loads and may be used, else None.

    The module installed with the package comes first. Where the install did not build it
    (pip's isolated build has no torch), ``build=True`` builds it from the sources shipped
    in the package into a per-user cache on this first use (one log line; a file lock keeps
    concurrent processes from building it twice; see :mod:`fastswav.ops.ext_build`), and
    later starts load it from there. ``FASTSWAV_NO_EXT=1`` skips that build.
    ``build=False`` only looks (never compiles). Logs one line the first time it falls back
    to the reference ring buffer.
    """
    if requested_backend() == "reference":
        return None
    if "module" in _extension_state:
        return _extension_state["module"]
    try:
        from fastswav import _C  # built from csrc/ by setup.py when a compiler is present
    except ImportError as exc:
        installed_error = exc
    else:
        _extension_state.update(module=_C, how="installed with the package")
        return _C
    if not build:
        return None
    from .ext_build import load_or_build

    module, how = load_or_build()
    _extension_state.update(module=module, how=how)
    if module is None and "queue" not in _warned:
        _warned.add("queue")
        log.info("fastswav._C not available (%s; %s); feature queue uses the PyTorch reference",
                 installed_error, how)
    return module


def queue_extension_how() -> str:
    """How :func:`queue_extension` found the extension, or why it did not (after a call)."""
    if requested_backend() == "reference":
        return f"not used: {BACKEND_ENV}=reference"
    return _extension_state.get("how", "not looked for yet")
