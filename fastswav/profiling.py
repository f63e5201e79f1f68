"""NVTX ranges around the phases of a training step, and the Nsight capture window.

``--profile=START:STOP`` calls ``cudaProfilerStart`` before iteration START and
``cudaProfilerStop`` before iteration STOP, so ::

    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop \\
        python -m fastswav.train ... --profile=100:120
    ncu --profile-from-start off python -m fastswav.train ... --profile=100:102

record only those iterations. NVTX ranges (``data``, ``h2d``, ``augment``, ``forward``,
``forward/group<i>``, ``loss``, ``sinkhorn``, ``backward``, ``optimizer``) come from the
``nvtx`` package when it is installed, else from ``torch.cuda.nvtx`` on CUDA; they are
emitted only when enabled (``--nvtx=true``, or any ``--profile`` window), so a normal run
pays nothing. Inside torch.compile'd code ranges are skipped (a Python call there would
break the graph): a compiled forward shows as one ``forward`` range, the compiled loss as
one ``loss`` range.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional, Tuple

import torch

log = logging.getLogger("fastswav")

_push: Optional[Callable[[str], object]] = None
_pop: Optional[Callable[[], object]] = None


def parse_window(text: str) -> Optional[Tuple[int, int]]:
    """``"START:STOP"`` -> (START, STOP) with 0 <= START < STOP; ``""`` -> None."""
    if not text:
        return None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        window = int(start), int(stop)
    except ValueError:
        raise ValueError(f"profile={text!r}: expected START:STOP iterations, e.g. 100:120") from None
    if not 0 <= window[0] < window[1]:
        raise ValueError(f"profile={text!r}: need 0 <= START < STOP")
    return window


def _nvtx_functions():
    """(push, pop) from the nvtx package, else torch.cuda.nvtx on CUDA, else None."""
    try:
        import nvtx  # the package the project depends on; a no-op without a profiler attached

        return nvtx.push_range, nvtx.pop_range
    except ImportError:
        pass
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    return None


def enable_nvtx(enabled: bool = True) -> bool:
    """Turn NVTX ranges on or off for this process; returns whether they are on."""
    global _push, _pop
    functions = _nvtx_functions() if enabled else None
    if enabled and functions is None:
        log.warning("NVTX ranges requested but neither the nvtx package nor CUDA is available")
    _push, _pop = functions if functions else (None, None)
    return _push is not None


def nvtx_enabled() -> bool:
    return _push is not None


class _Range:
    """One pushed NVTX range (a class, not a generator: dynamo cannot resume a frame broken
    inside a generator-based context manager, and would run the whole frame eagerly)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _push(self.name)

    def __exit__(self, *exc):
        _pop()
        return False


def nvtx_range(name: str):
    """A context manager: an NVTX range named ``name`` around the block, or nothing when
    ranges are off or the code is being compiled (a ``nullcontext``, which dynamo traces
    away: the compiled region shows as the range around its call)."""
    if _push is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _Range(name)


class ProfileWindow:
    """Starts and stops the CUDA profiler at the iterations of a ``START:STOP`` window.

    Call :meth:`before_iteration` with the global iteration index before each step and
    :meth:`close` at the end (stops a window still open). Without CUDA the window is logged
    once and ignored.
    """

    def __init__(self, window: Optional[Tuple[int, int]], device: torch.device,
                 start_fn: Optional[Callable[[], None]] = None,
                 stop_fn: Optional[Callable[[], None]] = None):
        self.window = window
        self.active = False
        self._start = start_fn or torch.cuda.profiler.start
        self._stop = stop_fn or torch.cuda.profiler.stop
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if window is not None and device.type != "cuda" and start_fn is None:
            log.warning("--profile=%d:%d ignored: the CUDA profiler needs a CUDA device", *window)
            self.window = None

    def before_iteration(self, iteration: int) -> None:
        if self.window is None:
            return
        start, stop = self.window
        if not self.active and start <= iteration < stop:
            self._sync()  # the capture starts on an idle device: earlier steps stay out
            self._start()
            self.active = True
            log.info("profiler window open at iteration %d", iteration)
        elif self.active and iteration >= stop:
            self.close()

    def close(self) -> None:
        if self.active:
            self._sync()
            self._stop()
            self.active = False
            log.info("profiler window closed")
