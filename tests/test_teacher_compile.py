"""The teacher kernels compiled for sm_90 (H100/H200) and sm_80 at the DINOv2 shapes
(K = 65,536; B = 64, 256, 1,024 per GPU; 2 teacher + 10 student crops), without a GPU.

Every launch of ``fastswav.kernels.teacher.compile_cases()`` is compiled (not run) through
the launch interceptor of ``../shared/tools/triton_aot_report.py`` (set
``FASTSWAV_AOT_TOOLS`` to its folder elsewhere) with ``kernels._common._aot_arch`` set, so
the launchers pick their GPU tiles. Checked: it compiles, spills no register (0 bytes of
spill stores and loads), and the grid has at least 132 programs (an H100's SMs). These
kernels hold no matmul (no ``tl.dot``), so there is no tensor-core use to check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

TOOLS = os.environ.get("FASTSWAV_AOT_TOOLS", os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "tools"))


_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import triton_aot_report as aot
from fastswav.kernels import _common, teacher
arch = int(sys.argv[1])
out = []
for name, thunk in teacher.compile_cases():
    _common._aot_arch = arch
    try:
        with aot.aot_launches(arch=arch) as recs:
            thunk()
    finally:
        _common._aot_arch = None
    out += [dict(case=name, describe=aot.describe(r), **r) for r in recs]
print(json.dumps(out))
"""


@pytest.mark.slow  # ~40 s on 2 cores (ptxas per distinct kernel)
@pytest.mark.parametrize("arch", [90, 80])
def test_teacher_launches_compile_without_spills(arch):
    if not os.path.isfile(os.path.join(TOOLS, "triton_aot_report.py")):
        pytest.skip(f"triton_aot_report.py not found in {TOOLS} (set FASTSWAV_AOT_TOOLS)")
    # A process of its own: kernels imported under TRITON_INTERPRET=1 (as the test session
    # sets it) are interpreter functions and cannot be compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(arch), os.path.abspath(TOOLS)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_sk_colsum_kernel", "_sk_rowsum_kernel", "_sk_finalize_kernel",
                       "_ce_fwd_kernel", "_ce_bwd_kernel"}
    for r in records:
        assert r["ok"], f"{r['case']}: {r['describe']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['case']}: {r['describe']}"
        programs = 1
        for g in r["grid"]:
            programs *= g
        assert programs >= 132, f"{r['case']}: {r['describe']}"
