"""What the compiler makes of every fused-loss launch for sm_80 and sm_90, without a GPU.

Runs ``python -m fastswav.kernels.compile_report --json`` (a fresh process: kernels imported
under TRITON_INTERPRET=1 cannot be compiled) for both targets at once and fails on a compile
error, a spill, fewer than 2 blocks per SM, a launch at B >= 64 with fewer programs than an
H100 has SMs, or the training path's score matmul without tensor-core instructions. The
quick test covers the training dtypes (bf16 embeddings, fp32 prototypes) at every official
shape, the demo's and the speedrun's; the slow one every dtype mix and precision, and the
DINO-style teacher ops at K = 65,536 (B = 64 to 1,024; no matmul there, so no tensor cores).
DINOv3's teacher steps (and one with rows * K past 2^31) have a quick test of their own,
which also fails on a row offset multiplied in 32 bits.
Also here: every launch in kernels/ runs under a device guard.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

H100_SMS = 132


def _tools_present() -> bool:
    from fastswav.kernels.compile_report import tools_present

    return tools_present()


def _reports(case_filter):
    """{arch: [launch dicts]}, both archs compiled in parallel processes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for arch in (80, 90):
        cmd = [sys.executable, "-m", "fastswav.kernels.compile_report", "--arch", str(arch), "--json"]
        if case_filter:
            cmd += ["--case", case_filter]
        procs[arch] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    out = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1500)
        launches = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert launches, f"sm_{arch}: no launches reported\n{stderr[-3000:]}"
        out[arch] = launches
    return out


def _check(reports):
    problems = []
    for arch, launches in reports.items():
        for r in launches:
            where = f"sm_{arch} {r['kernel']} [{r['case']}] grid={r['grid']}"
            if not r["ok"]:
                problems.append(f"{where}: compile error {r['error'][:300]}")
                continue
            if r["spill_bytes"]:
                problems.append(f"{where}: {r['spill_bytes']} spill bytes (regs {r['regs']})")
            if r["blocks_per_sm"] < 2:
                problems.append(f"{where}: {r['blocks_per_sm']} block per SM "
                                f"(regs {r['regs']}, smem {r['shared_bytes']})")
            at_scale = r["case"].startswith(("official", "teacher"))
            if at_scale and r["programs"] < H100_SMS:
                problems.append(f"{where}: {r['programs']} programs < {H100_SMS} SMs")
            if r["case"].startswith("teacher") and r["i32_stride_products"]:
                problems.append(f"{where}: {r['i32_stride_products']} row offsets in 32 bits")
            if r["kernel"] == "_scores_kernel" and r["training_path"] and not r["tensor_cores"]:
                problems.append(f"{where}: training-path score matmul without tensor cores")
    return problems


@pytest.fixture(scope="module")
def tools():
    if not _tools_present():
        pytest.skip("Triton's bundled ptxas/cuobjdump are absent: cannot compile for a GPU here")


def test_training_path_compiles_without_spills_on_tensor_cores(tools):
    reports = _reports("bf16/fp32 tf32$")
    for arch, launches in reports.items():
        kernels = {r["kernel"] for r in launches}
        assert {"_scores_kernel", "_row_sums_kernel", "_swapped_ce_fwd_kernel",
                "_swapped_ce_bwd_kernel"} <= kernels, (arch, kernels)
        # the queue cases take one launch per Sinkhorn round, the others two
        assert {"_pass_kernel", "_col_sums_kernel"} <= kernels
        scores = [r for r in launches if r["kernel"] == "_scores_kernel"]
        want = "wgmma" if arch == 90 else "mma"
        assert all(r["tensor_core_instr"] == want for r in scores), (arch, scores)
    assert _check(reports) == []


@pytest.mark.slow
def test_every_dtype_mix_precision_and_fused_op_compiles_without_spills(tools):
    # what the other tests do not cover
    reports = _reports("^(?!.*bf16/fp32 tf32$)(?!teacher_(dinov3|wide))")
    for arch, launches in reports.items():
        kernels = {r["kernel"] for r in launches}
        assert {"_sk_colsum_kernel", "_sk_rowsum_kernel", "_sk_finalize_kernel",
                "_ce_fwd_kernel", "_ce_bwd_kernel"} <= kernels, (arch, kernels)
    assert _check(reports) == []


def test_dinov3_teacher_steps_compile_without_spills_and_with_64_bit_offsets(tools):
    """DINOv3's teacher step (K = 65,536; the ViT-7B's 262,144 CLS and 98,304 patch
    prototypes) and a [8192, 262144] step, where rows * K passes 2^31: every launch
    compiles, spills nothing, and multiplies the row stride K only in 64 bits."""
    reports = _reports("teacher_(dinov3|wide)")
    for arch, launches in reports.items():
        cases = {r["case"].split()[0] for r in launches}
        assert cases == {"teacher_dinov3", "teacher_dinov3_vit7b", "teacher_wide"}, cases
        assert all(r["i32_stride_products"] == 0 for r in launches), arch
    assert _check(reports) == []


_STRIDE_PROBE = """
import json, sys, torch, triton, triton.language as tl
sys.path.insert(0, sys.argv[1])
from fastswav.kernels.compile_report import compiling_for
import probe_kernels as k
launches = []
with compiling_for(90, "probe", launches):
    x, out = torch.empty(64, 256), torch.empty(64, 256)
    for kernel in (k.narrow_rows, k.wide_rows):
        kernel[(4,)](x, out, 256, BLOCK_R=16, BLOCK_K=256)
print(json.dumps({r.kernel: r.i32_stride_products for r in launches}))
"""

_PROBE_KERNELS = """
import triton
import triton.language as tl


@triton.jit
def narrow_rows(x_ptr, out_ptr, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = rows[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))


@triton.jit
def wide_rows(x_ptr, out_ptr, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = rows.to(tl.int64)[:, None] * K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))
"""


def test_the_64_bit_offset_check_flags_a_32_bit_row_offset(tools, tmp_path):
    """The count the report gives is seen to catch ``rows * K`` in 32 bits (and to pass the
    same kernel with the row index widened first)."""
    (tmp_path / "probe_kernels.py").write_text(_PROBE_KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _STRIDE_PROBE, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["narrow_rows"] >= 1 and counts["wide_rows"] == 0, counts


def test_every_launch_is_inside_a_device_guard():
    """Triton launches on the current device: each ``kernel[grid](...)`` in kernels/ sits in
    ``with device_guard(tensor):`` so tensors on cuda:1 never launch on cuda:0."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "kernels"
    launches, unguarded = 0, []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.endswith("_kernel")):
                continue
            launches += 1
            up, guarded = parents.get(node), False
            while up is not None and not guarded:
                guarded = isinstance(up, ast.With) and any(
                    isinstance(item.context_expr, ast.Call)
                    and getattr(item.context_expr.func, "id", "") == "device_guard"
                    for item in up.items)
                up = parents.get(up)
            if not guarded:
                unguarded.append(f"{path.name}:{node.lineno}")
    assert launches >= 11
    assert unguarded == []


@pytest.mark.cuda
def test_fused_loss_on_the_second_gpu_while_the_first_is_current():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from fastswav.ops.fused_loss import swav_loss_fused
    from fastswav.ops.loss import swav_loss_reference

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(8 * 64, 128, generator=g).to("cuda:1")
    protos = torch.randn(3000, 128, generator=g).to("cuda:1")
    with torch.cuda.device(0):
        got = swav_loss_fused(emb, protos, n_crops=8, precision="ieee")
    want = swav_loss_reference(emb, protos, n_crops=8)
    assert got.device == emb.device
    assert torch.allclose(got, want, rtol=1e-4)
