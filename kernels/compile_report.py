"""What the compiler makes of every fused-loss launch, for a GPU target, without a GPU.

    python -m fastswav.kernels.compile_report --arch 90          # H100 / H200
    python -m fastswav.kernels.compile_report --arch 80 --json   # A100, one JSON object a line

The fused loss's forward and backward run on CPU tensors at each case's shape with the
tiles and dot precisions the launchers pick for a GPU; every ``kernel[grid](...)`` launch is
compiled for ``sm_<arch>`` instead of run (outputs stay unwritten: the host code between
launches has no data-dependent control flow). Each distinct launch is printed once per
case: registers, spill bytes (ptxas -v), shared memory, whether tensor-core instructions
(wgmma / mma) are present, and how many blocks fit on one SM. Needs Triton's bundled ptxas
and cuobjdump; run it in a process without ``TRITON_INTERPRET=1`` (kernels decorated under
the interpreter cannot be compiled).

Performance engineers: change a tile in ``kernels/tiles.py``, run this, and read the
columns; ``tests/test_compile_report.py`` fails on a compile error, a spill, fewer than 2
blocks per SM, or the training path's score matmul without tensor cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction, KernelInterface

from . import _common

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Per-SM limits: registers, shared memory (bytes), threads, resident blocks.
SM_LIMITS = {80: (65536, 164 * 1024, 2048, 32), 90: (65536, 228 * 1024, 2048, 32)}


@dataclass
class Launch:
    kernel: str
    case: str
    grid: tuple
    constexprs: dict
    num_warps: int
    ok: bool = False
    error: str = ""
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    tensor_cores: Optional[str] = None  # "wgmma", "mma" or "" (none)
    blocks_per_sm: Optional[int] = None
    # i32 multiplies by the row-stride argument ``K`` in the kernel's TTIR: 0 means every
    # row offset (row * K) is computed in 64 bits; None when the kernel has no ``K``
    i32_stride_products: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out["grid"] = list(self.grid)
        out["programs"] = self.programs
        out["tensor_cores"] = bool(self.tensor_cores)
        out["tensor_core_instr"] = self.tensor_cores or ""
        return out

    @property
    def programs(self) -> int:
        total = 1
        for g in self.grid:
            total *= int(g)
        return total

    def describe(self) -> str:
        grid = "x".join(str(g) for g in self.grid)
        if not self.ok:
            return f"{self.kernel:24s} {self.case:44s} grid={grid:14s} FAILED: {self.error[:300]}"
        tc = self.tensor_cores or "no"
        return (f"{self.kernel:24s} {self.case:44s} grid={grid:14s} ({self.programs:6d}) "
                f"warps={self.num_warps} regs={self.regs:3d} spill={self.spill_bytes}B "
                f"smem={self.shared_bytes:6d}B tc={tc:5s} blocks/SM={self.blocks_per_sm}")


def tools_present() -> bool:
    return all(os.path.isfile(os.path.join(NVIDIA_BIN, t)) for t in ("ptxas", "cuobjdump"))


def _ptxas(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ptxas -v (what the driver would load)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([os.path.join(NVIDIA_BIN, "ptxas"), "-v", f"-arch={arch_name}", src,
                               "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[:1000]}")
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(regs=int(regs[1]) if regs else None,
                spill_bytes=int(spills[1]) + int(spills[2]) if spills else 0)


def _blocks_per_sm(arch: int, regs: int, shared: int, warps: int) -> int:
    max_regs, max_shared, max_threads, max_blocks = SM_LIMITS.get(arch, SM_LIMITS[90])
    threads = warps * 32
    # registers are allocated per warp in units of 256 (8 per thread, rounded up)
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = max_regs // (regs_per_warp * warps)
    by_shared = max_shared // (shared + 1024) if shared else max_blocks  # +1 KB reserved per block
    return int(min(by_regs, by_shared, max_threads // threads, max_blocks))


def narrow_stride_products(ttir: str, stride: str = "K") -> Optional[int]:
    """How many 32-bit multiplies in ``ttir`` take the i32 argument ``stride`` (or a splat
    or broadcast of it) as an operand: each is a row offset that wraps once rows * stride
    passes 2^31. None when the kernel has no such argument."""
    if not re.search(rf"%{stride}: i32\b", ttir):
        return None
    derived = {f"%{stride}"}
    count = 0
    for line in ttir.splitlines():
        line = re.sub(r" \{[^{}]*\}", "", line)  # attributes ({axis = 1 : i32}) aside
        m = re.match(r"\s*(%[\w.]+) = (tt\.splat|tt\.broadcast|tt\.expand_dims|arith\.muli)"
                     r" ([^:]*?) : (.*)", line)
        if not m:
            continue
        name, op, operands, types = m.groups()
        uses = {o.strip() for o in operands.split(",")}
        if not uses & derived:
            continue
        narrow = re.search(r"(?<![\w])i32\b|xi32>", types.split("->")[-1]) is not None
        if op == "arith.muli":
            count += narrow
        elif narrow:
            derived.add(name)
    return count


class _CompileOnlyDriver:
    """Stands in for the CUDA driver: a target to compile for, no device behind it."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compiling_for(arch: int, case: str, launches: List[Launch]):
    """Within the block, kernel launches are compiled for sm_<arch> and recorded, not run;
    launchers pick the tiles and precisions of a GPU (``_common.targets_gpu``)."""
    seen = set()
    previous_getitem = KernelInterface.__getitem__

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            if not isinstance(kernel, JITFunction):
                raise RuntimeError(f"{kernel} is not compilable (imported under TRITON_INTERPRET=1?): "
                                   "run the report in a fresh process")
            name = kernel.fn.__name__
            grid_t = tuple(int(g) for g in (grid(kwargs) if callable(grid) else grid))
            constexprs = {k: v if isinstance(v, (int, bool, str, float)) else str(v)
                          for k, v in kwargs.items() if k.isupper()}
            # one line per distinct launch: the same kernel, constexprs, grid and dtypes
            key = (name, grid_t, tuple(sorted(constexprs.items())),
                   tuple(str(getattr(a, "dtype", type(a).__name__)) for a in args))
            if key in seen:
                return
            seen.add(key)
            rec = Launch(kernel=name, case=case, grid=grid_t, constexprs=constexprs,
                         num_warps=int(kwargs.get("num_warps", 4)))
            try:
                compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
                ptx = compiled.asm["ptx"]
                rec.i32_stride_products = narrow_stride_products(compiled.asm.get("ttir", ""))
                rec.shared_bytes = int(compiled.metadata.shared)
                rec.tensor_cores = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else ""
                rec.__dict__.update(_ptxas(ptx, arch))
                rec.blocks_per_sm = _blocks_per_sm(arch, rec.regs or 0, rec.shared_bytes,
                                                   rec.num_warps)
                rec.ok = True
            except Exception as exc:  # noqa: BLE001 (a compile error is the finding)
                rec.error = f"{type(exc).__name__}: {exc}"[:2000]
            launches.append(rec)
        return launch

    previous_driver = driver._active
    previous_arch = _common._aot_arch
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    KernelInterface.__getitem__ = getitem
    _common._aot_arch = arch
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = previous_getitem
        driver._active = previous_driver
        _common._aot_arch = previous_arch


# ----------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class LossCase:
    name: str
    batch: int
    n_protos: int = 3000
    dim: int = 128
    n_crops: int = 8
    queue_len: int = 0
    emb_dtype: torch.dtype = torch.bfloat16
    proto_dtype: torch.dtype = torch.float32
    precision: str = _common.DEFAULT_PRECISION

    @property
    def training_path(self) -> bool:
        """What the trainer runs by default: bf16 embeddings (autocast), fp32 prototypes,
        the default precision (the exact mode, ieee, multiplies on the FMA pipes)."""
        return (self.emb_dtype == torch.bfloat16 and self.proto_dtype == torch.float32
                and self.precision == _common.DEFAULT_PRECISION)

    def label(self) -> str:
        short = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
        return (f"{self.name} B={self.batch} K={self.n_protos} D={self.dim} V={self.n_crops} "
                f"L={self.queue_len} {short[self.emb_dtype]}/{short[self.proto_dtype]} "
                f"{self.precision}")


def loss_cases() -> List[LossCase]:
    """The official shapes (B = 64, 256, 512 per GPU; queue 0 and 3840), the training dtypes
    and the other dtype mixes, every precision at one shape, the demo's and the speedrun's."""
    cases = [LossCase("official", b, queue_len=q) for b in (64, 256, 512) for q in (0, 3840)]
    cases += [LossCase("official", 256, queue_len=3840, emb_dtype=e, proto_dtype=p)
              for e, p in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16))]
    cases += [LossCase("official", 256, queue_len=3840, precision=p)
              for p in _common.PRECISIONS if p != _common.DEFAULT_PRECISION]
    cases += [LossCase("demo", 64, n_protos=100, dim=64, n_crops=6),
              LossCase("speedrun", 512, n_protos=300, dim=128, n_crops=6)]
    return cases


def run_loss_case(case: LossCase) -> None:
    """The fused loss's forward and backward launches at ``case`` (CPU tensors)."""
    from fastswav.ops import fused_loss

    emb = torch.randn(case.n_crops * case.batch, case.dim).to(case.emb_dtype)
    protos = torch.randn(case.n_protos, case.dim).to(case.proto_dtype)
    queue = torch.randn(2, case.queue_len, case.dim) if case.queue_len else None
    valid = torch.ones(()) if queue is not None else None
    crops = [0, 1]
    loss, scores, codes, code_sum, lse, inv_x, inv_w = fused_loss._forward_impl(
        emb, protos, queue, valid, case.n_crops, crops, 0.1, 0.05, 3, 0, case.precision)
    fused_loss._backward_impl(torch.ones(()), emb, protos, scores, codes, code_sum, lse,
                              inv_x, inv_w, case.n_crops, crops, 0.1, case.precision)


def extra_cases() -> List[tuple]:
    """(label, thunk) pairs of other fused ops that register compile cases."""
    out = []
    for module_name in ("fastswav.kernels.teacher",):
        try:
            module = __import__(module_name, fromlist=["compile_cases"])
        except ImportError:
            continue
        out.extend(module.compile_cases())
    return out


def report(arch: int, only: Optional[str] = None) -> List[Launch]:
    launches: List[Launch] = []
    jobs: List[tuple] = [(c.label(), (lambda c=c: run_loss_case(c)), c.training_path)
                         for c in loss_cases()]
    jobs += [(label, thunk, False) for label, thunk in extra_cases()]
    for label, thunk, training in jobs:
        if only and not re.search(only, label):
            continue
        start = len(launches)
        with torch.no_grad(), compiling_for(arch, label, launches):
            try:
                thunk()
            except Exception as exc:  # noqa: BLE001 (host code failing is a finding too)
                launches.append(Launch(kernel="<host>", case=label, grid=(), constexprs={},
                                       num_warps=0, error=f"{type(exc).__name__}: {exc}"))
        for rec in launches[start:]:
            rec.extra["training_path"] = training
    return launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Compile every fused-loss launch for an NVIDIA GPU target without a GPU "
                    "and report registers, spills, shared memory and tensor-core use.")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                        help="compute capability x10: 90 = H100/H200 (default), 80 = A100")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per launch (keys kernel, case, grid, regs, "
                             "spill_bytes, shared_bytes, tensor_cores, ok, error, ...)")
    parser.add_argument("--case", default=None, metavar="REGEX",
                        help="only cases whose label matches this regular expression "
                             "(labels: 'official B=256 K=3000 D=128 V=8 L=3840 bf16/fp32 tf32', "
                             "'demo ...', 'speedrun ...', 'teacher_...')")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # kernels decorated under the interpreter cannot be compiled
        print("compile_report: unset TRITON_INTERPRET (kernels would be interpreted, not compiled)",
              file=sys.stderr)
        return 2
    if not tools_present():
        print(f"compile_report: Triton's ptxas/cuobjdump not found under {NVIDIA_BIN}",
              file=sys.stderr)
        return 2
    launches = report(args.arch, args.case)
    for rec in launches:
        if args.json:
            out = rec.as_json()
            out["training_path"] = rec.extra.get("training_path", False)
            print(json.dumps(out), flush=True)
        else:
            print(rec.describe(), flush=True)
    failed = [r for r in launches if not r.ok]
    if not args.json:
        spills = sum(1 for r in launches if r.ok and r.spill_bytes)
        print(f"sm_{args.arch}: {len(launches)} launches, {len(failed)} failed to compile, "
              f"{spills} spill")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
