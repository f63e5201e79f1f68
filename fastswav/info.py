"""What this machine gives fastswav: ``python -m fastswav.info [--check] [--json] [--memory]``.

Prints the versions that matter (Python, torch, CUDA, Triton, torchvision, numpy, FFCV, ...),
each GPU with its compute capability and memory, and for every fast path whether this
machine takes it and, if not, why: the fused Triton loss, the ``fastswav._C`` queue op (CPU
and CUDA), the decode-once FFCV loader, NVTX ranges. Paste the output into a bug report.

``--check`` also runs a few-second self-test of what runs here: the reference loss against
a float64 computation, the fused loss against the reference on each GPU, the queue op
(extension and reference ring) on the CPU and each GPU, and one decode-once batch from a
tiny .beton when FFCV is installed. Exit status: 0 all good, 1 a check failed (a fast path
that this machine should take is broken), 2 bad command line.

``--memory [--preset NAME] [--processes N] [--field=value ...]`` prints instead the peak
memory per training process of a recipe, by part (:mod:`fastswav.memory`), against each
visible GPU, or an 80 GB card where there is none.

Looking at the extension may build it: where the install did not (pip's isolated build),
the first use compiles it into a per-user cache (see :mod:`fastswav.ops.ext_build`);
``--no-build`` only looks.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional, Sequence

from .cli import UsageParser, fail

log = logging.getLogger("fastswav")

EXIT_OK, EXIT_CHECK_FAILED = 0, 1


def _version(module_name: str) -> Optional[str]:
    """The installed version of a distribution, or None."""
    from importlib import metadata

    try:
        return metadata.version(module_name)
    except metadata.PackageNotFoundError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def versions() -> Dict[str, Optional[str]]:
    import torch

    found = {
        "fastswav": _version("fastswav"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "ffcv": _version("ffcv"),
        "nvtx": _version("nvtx"),
        "ninja": _version("ninja"),
    }
    import fastswav

    found["fastswav location"] = os.path.dirname(os.path.abspath(fastswav.__file__))
    found["fastswav commit"] = _git_commit(os.path.dirname(found["fastswav location"]))
    return found


def _git_commit(folder: str) -> Optional[str]:
    """The checkout's commit (``+changes`` when files differ), when fastswav runs from one."""
    import subprocess

    if not os.path.exists(os.path.join(folder, ".git")):
        return None
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def gpus() -> List[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        found.append({"index": i, "name": props.name,
                      "compute_capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1),
                      "memory_bytes": int(props.total_memory)})
    return found


def _cuda_reason() -> Optional[str]:
    """Why CUDA cannot be used here, or None when it can."""
    import torch

    if not torch.version.cuda:
        return "this torch is a CPU-only build"
    try:
        if not torch.cuda.is_available():
            return "no CUDA device visible to torch"
    except Exception as exc:  # noqa: BLE001 (a broken driver)
        return f"CUDA failed to initialise ({_first_line(exc)})"
    return None


def fast_paths(build: bool = True, import_ffcv_now: bool = False) -> Dict[str, dict]:
    """For each fast path: ``{"taken": bool, "detail": str}``; detail says why not, if not.
    ``import_ffcv_now``: import FFCV to see that it loads (slow), rather than only finding it."""
    import torch

    from .ops import backend

    paths = {}
    want = backend.requested_backend()
    cuda_reason = _cuda_reason()

    # Fused Triton loss.
    if want == "reference":
        fused = (False, f"{backend.BACKEND_ENV}=reference forces the PyTorch reference")
    elif cuda_reason:
        fused = (False, f"{cuda_reason}; the loss takes the exact PyTorch reference (the "
                        "fused kernels run on the CPU only under TRITON_INTERPRET=1, for tests)")
    else:
        try:
            import triton  # noqa: F401
            from fastswav.kernels import scores  # noqa: F401
            ok = backend.fused_loss_available(torch.device("cuda", 0))
            fused = (ok, "on every GPU for float32/bf16/fp16 inputs (float64 takes the "
                         "reference)" if ok else "fastswav.ops.fused_loss says unavailable")
        except Exception as exc:  # noqa: BLE001
            fused = (False, f"Triton does not load ({_first_line(exc)})")
    paths["fused loss"] = {"taken": fused[0], "detail": fused[1]}

    # The queue extension.
    module = backend.queue_extension(build=build)
    how = backend.queue_extension_how()
    if module is None:
        if not build and how == "not looked for yet":
            how = "not installed with the package (--no-build: the first-use build not tried)"
        paths["fastswav._C (CPU)"] = {"taken": False,
                                     "detail": f"{how}; the queue uses the PyTorch ring buffer"}
        paths["fastswav._C (CUDA)"] = {"taken": False, "detail": "no extension"}
    else:
        with_cuda = bool(getattr(module, "WITH_CUDA", 0))
        paths["fastswav._C (CPU)"] = {"taken": True, "detail": how}
        if not with_cuda:
            detail = "the extension was built without CUDA (no toolkit found, or " \
                     "FASTSWAV_NO_CUDA_EXT); CUDA queues use the PyTorch ring buffer"
        elif cuda_reason:
            detail = f"built with CUDA, but {cuda_reason}"
        else:
            detail = "built with CUDA"
        paths["fastswav._C (CUDA)"] = {"taken": with_cuda and cuda_reason is None, "detail": detail}

    # Decode-once FFCV loader. Importing ffcv takes ~20 s on a small machine (numba), so
    # without --check only its presence is looked at; --check imports it and reads a batch.
    on_device = ("on the GPU)" if cuda_reason is None else
                 "as batched tensor work on the CPU here)")
    fallback = "a .beton is read by the reference PIL multi-crop path instead"
    if import_ffcv_now:
        try:
            from .data.beton import import_ffcv

            import_ffcv()
            ffcv_ok, ffcv_detail = True, f"a .beton is read by the decode-once loader (crops cut {on_device}"
        except ImportError as exc:
            ffcv_ok, ffcv_detail = False, f"{str(exc).strip().splitlines()[0]}; {fallback}"
    else:
        import importlib.util

        if importlib.util.find_spec("ffcv") is None:
            from .data.beton import INSTALL_HINT

            ffcv_ok, ffcv_detail = False, f"ffcv is not installed ({INSTALL_HINT}); {fallback}"
        else:
            ffcv_ok, ffcv_detail = True, (f"ffcv is installed: a .beton is read by the decode-once "
                                          f"loader (crops cut {on_device}; --check imports it and "
                                          "reads a batch")
    paths["decode-once FFCV loader"] = {"taken": ffcv_ok, "detail": ffcv_detail}

    # NVTX ranges.
    try:
        import nvtx  # noqa: F401
        nvtx_ok, nvtx_detail = True, "the nvtx package (ranges with --nvtx=true or --profile)"
    except ImportError:
        if cuda_reason is None:
            nvtx_ok, nvtx_detail = True, "torch.cuda.nvtx (the nvtx package is not installed)"
        else:
            nvtx_ok, nvtx_detail = False, f"the nvtx package is not installed and {cuda_reason}"
    paths["NVTX ranges"] = {"taken": nvtx_ok, "detail": nvtx_detail}
    return paths


def environment() -> Dict[str, str]:
    """The environment variables fastswav (and its builds) read, where set."""
    names = ("FASTSWAV_BACKEND", "FASTSWAV_NO_EXT", "FASTSWAV_NO_CUDA_EXT", "FASTSWAV_EXT_CACHE",
             "FASTSWAV_DATA_CACHE", "TRITON_INTERPRET", "CUDA_HOME", "CUDA_VISIBLE_DEVICES",
             "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CXX")
    return {name: os.environ[name] for name in names if name in os.environ}


def toolchain() -> Dict[str, Optional[str]]:
    """What a first-use build of the extension would find."""
    import shutil

    from . import _toolchain
    from .ops.ext_build import _ninja_path

    path = _ninja_path()
    return {"c++ compiler": _toolchain.cxx_compiler(),
            "ninja": shutil.which("ninja", path=path) if path is not None else None,
            "CUDA toolkit": _toolchain.find_cuda_home()}


# ---------------------------------------------------------------------------- --check

def _check_reference_loss() -> str:
    """The reference loss in float32 against the same loss computed in float64."""
    import torch

    from .ops.loss import swav_loss_reference

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4 * 6, 16, generator=gen, dtype=torch.float64)
    c = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    exact = swav_loss_reference(z, c, n_crops=4)
    got = swav_loss_reference(z.float(), c.float(), n_crops=4)
    if not torch.isfinite(got) or abs(got.item() - exact.item()) > 1e-4 * max(1.0, abs(exact.item())):
        raise AssertionError(f"float32 reference {got.item():.6f} vs float64 {exact.item():.6f}")
    return f"float32 {got.item():.6f} vs float64 {exact.item():.6f}"


def _check_fused_loss(device) -> str:
    """The fused loss against the reference, forward and backward, on ``device``."""
    import torch

    from .ops.fused_loss import swav_loss_fused
    from .ops.loss import swav_loss_reference

    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8 * 32, 128, generator=gen).to(device)
    c = torch.randn(300, 128, generator=gen).to(device)
    results = []
    for fn in (swav_loss_reference, swav_loss_fused):
        zz, cc = z.clone().requires_grad_(), c.clone().requires_grad_()
        loss = fn(zz, cc, n_crops=8)
        loss.backward()
        results.append((loss.detach(), zz.grad, cc.grad))
    (ref, ref_gz, ref_gc), (fused, gz, gc) = results
    # The tests' CUDA tolerances are 1e-4 (loss) and 2e-4 (gradients); a broken kernel is
    # off by far more, so the check allows some slack for other cards.
    loss_err = abs(fused.item() - ref.item()) / abs(ref.item())
    grad_err = max(float((g - r).abs().max() / r.abs().max()) for g, r in ((gz, ref_gz), (gc, ref_gc)))
    if not (loss_err <= 1e-3 and grad_err <= 1e-3):
        raise AssertionError(f"fused {fused.item():.6f} vs reference {ref.item():.6f} "
                             f"(relative {loss_err:.1e}), gradients off by {grad_err:.1e}")
    return (f"fused {fused.item():.6f} vs reference {ref.item():.6f} (relative {loss_err:.1e}), "
            f"gradients within {grad_err:.1e}")


def _check_queue(device, use_extension: bool) -> str:
    """One wrapping push through the extension (or the reference ring) against a direct
    computation of where the rows must land."""
    import torch

    from .ops import queue_ext
    from .ops.queue import ring_push_

    buffer = torch.zeros(2, 8, 4, device=device)
    write_pos = torch.tensor(6, device=device)
    filled = torch.tensor(6, device=device)
    new = torch.arange(2 * 3 * 4, dtype=torch.float32, device=device).view(2, 3, 4)
    if use_extension:
        queue_ext.queue_push_extension_(buffer, write_pos, filled, new)
    else:
        ring_push_(buffer, write_pos, filled, new)
    expected = torch.zeros(2, 8, 4)
    for b, row in enumerate((6, 7, 0)):
        expected[:, row] = new[:, b].cpu()
    if not torch.equal(buffer.cpu(), expected) or write_pos.item() != 1 or filled.item() != 8:
        raise AssertionError(f"rows or position wrong after a wrapping push "
                             f"(write_pos {write_pos.item()}, filled {filled.item()})")
    return "wrapping push writes the right rows, position and fill"


def _check_ffcv(device) -> str:
    """Write a 16-image .beton and read one decode-once batch from it."""
    import numpy as np
    import torch
    from PIL import Image

    from .data.ffcv_loader import FFCVMultiCropLoader, build_ffcv_multicrop_loader
    from .data.sources import open_source
    from .data.write import write_beton

    with tempfile.TemporaryDirectory(prefix="fastswav-info-") as tmp:
        rng = np.random.default_rng(0)
        for i in range(16):
            folder = os.path.join(tmp, "images", f"c{i % 2}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                os.path.join(folder, f"{i}.jpg"))
        beton = os.path.join(tmp, "check.beton")
        write_beton(open_source(os.path.join(tmp, "images")), beton, workers=1)
        loader = build_ffcv_multicrop_loader(beton, 8, size_crops=(32, 16), n_crops=(2, 2),
                                             min_scale=(0.3, 0.1), max_scale=(1.0, 0.3),
                                             device=device, num_workers=1)
        if not isinstance(loader, FFCVMultiCropLoader):
            raise AssertionError("FFCV imports but the loader decodes with torchvision "
                                 f"({type(loader).__name__})")
        loader.set_epoch(0)
        crops, _ = next(iter(loader))
        shapes = [tuple(c.shape) for c in crops]
        if shapes != [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2:
            raise AssertionError(f"unexpected crop shapes {shapes}")
        if not all(torch.isfinite(c).all() for c in crops):
            raise AssertionError("non-finite pixels in the decoded crops")
        return f"one batch of {len(crops)} crops on {crops[0].device}"


def checks(paths: Dict[str, dict]) -> List[dict]:
    """Run the self-tests that apply here; each ``{"name", "ok", "seconds", "detail"}``."""
    import torch

    plan: List[tuple] = [("reference loss (CPU)", _check_reference_loss)]
    devices = [torch.device("cuda", g["index"]) for g in gpus()]
    if paths["fused loss"]["taken"]:
        plan += [(f"fused loss vs reference ({d})", lambda d=d: _check_fused_loss(d)) for d in devices]
    plan.append(("queue, PyTorch ring (CPU)", lambda: _check_queue(torch.device("cpu"), False)))
    if paths["fastswav._C (CPU)"]["taken"]:
        plan.append(("queue, fastswav._C (CPU)", lambda: _check_queue(torch.device("cpu"), True)))
    for d in devices:
        plan.append((f"queue, PyTorch ring ({d})", lambda d=d: _check_queue(d, False)))
        if paths["fastswav._C (CUDA)"]["taken"]:
            plan.append((f"queue, fastswav._C ({d})", lambda d=d: _check_queue(d, True)))
    if paths["decode-once FFCV loader"]["taken"]:
        device = devices[0] if devices else torch.device("cpu")
        plan.append((f"decode-once batch ({device})", lambda: _check_ffcv(device)))
    results = []
    for name, fn in plan:
        start = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as exc:  # noqa: BLE001 (a failed check is reported, not raised)
            detail, ok = _first_line(exc), False
            log.debug("check %s failed:\n%s", name, traceback.format_exc())
        results.append({"name": name, "ok": ok, "seconds": round(time.perf_counter() - start, 2),
                        "detail": detail})
    return results


# ---------------------------------------------------------------------------- report

def collect(run_checks: bool = False, build: bool = True) -> dict:
    """Everything the command reports, as plain data (what ``--json`` prints)."""
    report = {"versions": versions(), "gpus": gpus(), "environment": environment(),
              "toolchain": toolchain()}
    report["fast_paths"] = fast_paths(build=build, import_ffcv_now=run_checks)
    if run_checks:
        report["checks"] = checks(report["fast_paths"])
    return report


def format_text(report: dict) -> str:
    lines = ["fastswav environment (python -m fastswav.info)", "", "versions:"]
    width = max(len(k) for k in report["versions"])
    for key, value in report["versions"].items():
        lines.append(f"  {key:<{width}}  {value if value is not None else 'not installed'}")
    lines += ["", "GPUs:"]
    if report["gpus"]:
        for g in report["gpus"]:
            lines.append(f"  cuda:{g['index']}  {g['name']}, compute capability "
                         f"{g['compute_capability']}, {g['memory_gib']} GiB")
    else:
        lines.append(f"  none ({_cuda_reason() or 'no CUDA device'})")
    lines += ["", "fast paths (taken here?):"]
    width = max(len(k) for k in report["fast_paths"])
    for name, path in report["fast_paths"].items():
        lines.append(f"  {name:<{width}}  {'yes' if path['taken'] else 'no '}  {path['detail']}")
    lines += ["", "build tools (for the extension's first-use build):"]
    for key, value in report["toolchain"].items():
        lines.append(f"  {key}: {value or 'not found'}")
    if report["environment"]:
        lines += ["", "environment:"]
        lines += [f"  {k}={v}" for k, v in report["environment"].items()]
    if "checks" in report:
        lines += ["", "checks:"]
        for c in report["checks"]:
            lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['name']} ({c['seconds']} s): {c['detail']}")
        failed = sum(not c["ok"] for c in report["checks"])
        lines.append(f"  {len(report['checks']) - failed} passed, {failed} failed")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python -m fastswav.info",
        description="Versions, GPUs and the fast paths this machine takes (paste into a bug "
                    "report).",
        epilog="exit status: 0 ok; 1 a --check self-test failed; 2 bad command line")
    parser.add_argument("--check", action="store_true",
                        help="also run a few-second self-test of each fast path that runs here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-build", action="store_true",
                        help="do not build fastswav._C on first use; only look for it")
    memory = parser.add_argument_group(
        "memory", "--memory [--preset NAME] [--processes N] [--field=value ...]: the peak "
        "memory per training process of a recipe, by part, against each visible GPU (an 80 GB "
        "card where there is none); the trainer stops before its first step where it does not fit. "
        "With --data=FILE.beton the decode-once data path (canvases on the device, the "
        "augmentation's working set, pinned host buffers) is counted, at the file's canvas size "
        "(512 where the file does not exist yet)")
    memory.add_argument("--memory", action="store_true", help="print the memory estimate of a recipe")
    memory.add_argument("--preset", default=None, help="recipe (default: the demo)")
    memory.add_argument("--processes", type=int, default=1,
                        help="training processes the recipe runs on (the queue is split over them)")
    memory.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the recipe would train (cuda: bf16 autocast)")
    return parser


def memory_report(preset_name: Optional[str], overrides: Sequence[str], processes: int,
                  device_type: str) -> str:
    """The text of ``--memory``: the estimate by part and a verdict per card."""
    from .config import DEFAULT_PRESET, parse_value, preset
    from .memory import CARD_80GB_BYTES, estimate, format_estimate

    name = preset_name or DEFAULT_PRESET
    changes = {}
    for token in overrides:
        field, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if not eq:
            raise ValueError(f"unexpected argument {token!r}; overrides take the form --field=value")
        field = field.replace("-", "_")
        changes[field] = parse_value(field, value)
    cfg = preset(name).replace(**changes)
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    cards = [(f"cuda:{g['index']} {g['name']}", int(g["memory_bytes"])) for g in gpus()] \
        if device_type == "cuda" else []
    label = f"preset {name}" + (f" with {' '.join(overrides)}" if overrides else "") + \
        f", {processes} process(es)"
    return format_estimate(estimate(cfg, processes, device_type), cfg, label,
                           cards or ([("an 80 GB card", CARD_80GB_BYTES)] if device_type == "cuda" else []))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not args.memory:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.memory:
        try:
            print(memory_report(args.preset, rest, args.processes, args.device), flush=True)
        except ValueError as exc:
            fail(exc)
        return EXIT_OK
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    report = collect(run_checks=args.check, build=not args.no_build)
    print(json.dumps(report, indent=2) if args.json else format_text(report), flush=True)
    if args.check and not all(c["ok"] for c in report["checks"]):
        return EXIT_CHECK_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
