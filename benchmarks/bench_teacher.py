"""DINO-style teacher step: the plain PyTorch formulas (eager, torch.compile) vs fastswav's
fused Sinkhorn-Knopp teacher and teacher-student cross-entropy.

    python benchmarks/bench_teacher.py                 # DINOv2-like shapes, on CUDA
    python benchmarks/bench_teacher.py --cpu-smoke     # tiny shapes on the CPU (dry run)

One step: teacher logits ``[2B, K]`` -> Sinkhorn-Knopp targets (3 iterations, teacher
temperature 0.07); student logits ``[10B, K]`` (2 global + 8 local crops) -> the mean over
the 18 counted (teacher, student) pairs of -sum(t * log_softmax(s / 0.1)) (a student crop is
not paired with the teacher's view of the same global crop, as DINO and DINOv2's swap do);
backward into the student logits. Logits are bf16 (the head's output under autocast).

- ``eager``: DINOv2's ``sinkhorn_knopp_teacher`` (``exp(teacher.float() / T)``, no shift)
  and the ``DINOLoss.forward`` loop (one float32 log_softmax per student crop);
- ``compiled``: ``torch.compile`` of that same function;
- ``fused``: ``fastswav.ops.teacher`` (Triton kernels; no log-softmax stored).

Figures per shape and variant: ms forward, ms forward+backward, peak memory (MiB, above
the inputs), and the roofline: the time of one read of the student and teacher logits at
the card's bandwidth (``roofline_ms``; ``x_roofline`` = fwd+bwd time over it). Speed-ups of
``fused`` against ``eager`` and ``compiled`` are rows of their own. Rows are appended to
``benchmarks/results/bench_teacher.csv`` as soon as each is measured (CUDA; a CPU smoke run
writes none unless ``--write-cpu``). ``--budget-s`` skips what would start after that many
seconds (torch.compile takes tens of seconds a shape).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CPU_SMOKE = "--cpu-smoke" in sys.argv
if CPU_SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import bench_ms  # noqa: E402
from roofline import CARD_BANDWIDTH_GBS  # noqa: E402
from common import RESULTS_DIR, ResultWriter, device_name, shape_key, run_then_exit  # noqa: E402

N_TEACHER, N_STUDENT, TEACHER_TEMP, STUDENT_TEMP, ITERS = 2, 10, 0.07, 0.1, 3


# ------------------------------------------------------------------ the plain formulas

@torch.no_grad()
def plain_sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2's ``DINOLoss.sinkhorn_knopp_teacher``, one process (all_reduce is a no-op)."""
    teacher_output = teacher_output.float()
    q = torch.exp(teacher_output / teacher_temp).t()
    big_b = q.shape[1]
    k = q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= big_b
    q *= big_b
    return q.t()


def plain_step(student, teacher):
    """Sinkhorn targets, then the DINOLoss-style loop over the counted pairs."""
    targets = plain_sinkhorn_knopp_teacher(teacher, TEACHER_TEMP, ITERS).chunk(N_TEACHER)
    total, terms = 0, 0
    for v, s in enumerate(student.chunk(N_STUDENT)):
        lsm = F.log_softmax(s.float() / STUDENT_TEMP, dim=-1)
        for i, t in enumerate(targets):
            if i == v:
                continue
            total = total - torch.sum(t * lsm, dim=-1).mean()
            terms += 1
    return total / terms


def fused_step(student, teacher):
    from fastswav.ops import teacher as T

    targets = T.sinkhorn_knopp_fused(teacher, TEACHER_TEMP, ITERS)
    rows = T.teacher_student_row_losses(student, targets, n_student_crops=N_STUDENT,
                                        n_teacher_crops=N_TEACHER, student_temp=STUDENT_TEMP,
                                        skip_same_view=True, backend="fused")
    return T._reduce(rows, T.count_pairs(N_STUDENT, N_TEACHER, True), "mean")


# ------------------------------------------------------------------ measuring

def peak_mib(fn, device, baseline):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def measure(name, fn, student, teacher, device, reps):
    def fwd():
        with torch.no_grad():
            return fn(student, teacher)

    def fwd_bwd():
        student.grad = None
        fn(student, teacher).backward()

    fwd_bwd()  # compile / autotune outside the timed region
    student.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    mem = peak_mib(fwd_bwd, device, baseline)
    return dict(ms_fwd=bench_ms(fwd, device, reps), ms_fwd_bwd=bench_ms(fwd_bwd, device, reps),
                peak_mib=mem)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU (kernels under the Triton interpreter)")
    parser.add_argument("--compile", action="store_true",
                        help="with --cpu-smoke: also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--batches", default="128,512", help="B per GPU, comma-separated")
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="card memory bandwidth, when the card is not in the table")
    parser.add_argument("--budget-s", type=float, default=55.0,
                        help="start no measurement after this many seconds")
    parser.add_argument("--reps", type=int, default=100, help="ms of timing per measurement (CUDA)")
    parser.add_argument("--write-cpu", action="store_true",
                        help="with --cpu-smoke: append the (CPU) measurements to the CSV")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu-smoke for a dry run")
    name = device_name(device)
    bandwidth = args.bandwidth_gbs or next(
        (bw for key, bw in CARD_BANDWIDTH_GBS.items() if key in name), None)
    if args.cpu_smoke:
        batches, n_protos = [6], 96
    else:
        batches, n_protos = [int(b) for b in args.batches.split(",")], args.prototypes
    variants = {"eager": plain_step, "fused": fused_step}
    if device.type == "cuda" or args.compile:
        variants["compiled"] = torch.compile(plain_step, dynamic=False)
    write = device.type == "cuda" or args.write_cpu
    writer = ResultWriter("bench_teacher", device)
    print(f"device: {name}; torch {torch.__version__}; bandwidth {bandwidth or 'unknown'} GB/s")
    head = (f"{'variant':9s} {'shape':44s} {'ms fwd':>9s} {'ms f+b':>9s} {'peak MiB':>9s} "
            f"{'vs eager':>9s} {'vs comp':>8s} {'x roofline':>10s}")
    print(head)
    print("-" * len(head))

    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        student = (torch.randn(N_STUDENT * batch, n_protos, generator=g) * 0.5).to(
            device=device, dtype=torch.bfloat16).requires_grad_()
        teacher = (torch.randn(N_TEACHER * batch, n_protos, generator=g) * 0.5).to(
            device=device, dtype=torch.bfloat16)
        shape = shape_key(B=batch, K=n_protos, teacher=N_TEACHER, student=N_STUDENT,
                          dtype="bf16")
        with torch.no_grad():
            values = {k: float(fn(student, teacher)) for k, fn in
                      (("eager", plain_step), ("fused", fused_step))}
        if abs(values["fused"] - values["eager"]) > 1e-3 * abs(values["eager"]):
            raise RuntimeError(f"fused and eager disagree at {shape}: {values}")
        nbytes = (student.numel() + teacher.numel()) * student.element_size()
        roofline_ms = nbytes / (bandwidth * 1e9) * 1e3 if bandwidth else float("nan")
        writer.add("logits_read", shape, "roofline_ms", roofline_ms, "ms")
        writer.add("logits_read", shape, "bytes", nbytes, "B")
        results = {}
        for variant in ("fused", "eager", "compiled"):
            if variant not in variants:
                continue
            if time.perf_counter() - start > args.budget_s:
                print(f"{variant:9s} {shape:44s} skipped: past --budget-s {args.budget_s:.0f}")
                continue
            r = measure(variant, variants[variant], student, teacher, device, args.reps)
            results[variant] = r
            for metric, unit in (("ms_fwd", "ms"), ("ms_fwd_bwd", "ms"), ("peak_mib", "MiB")):
                writer.add(variant, shape, metric, r[metric], unit)
            writer.add(variant, shape, "x_roofline", r["ms_fwd_bwd"] / roofline_ms, "x")
            speed = {}
            if variant != "fused" and "fused" in results:
                f = results["fused"]
                speed[variant] = r["ms_fwd_bwd"] / f["ms_fwd_bwd"]
                writer.add("fused", shape, f"speedup_vs_{variant}", speed[variant], "x")
                writer.add("fused", shape, f"speedup_vs_{variant}_fwd",
                           r["ms_fwd"] / f["ms_fwd"], "x")
            if write:
                writer.write()
            writer.rows.clear()
            ve = f"{speed['eager']:.2f}x" if "eager" in speed else ""
            vc = f"{speed['compiled']:.2f}x" if "compiled" in speed else ""
            print(f"{variant:9s} {shape:44s} {r['ms_fwd']:9.3f} {r['ms_fwd_bwd']:9.3f} "
                  f"{r['peak_mib']:9.1f} {ve:>9s} {vc:>8s} "
                  f"{r['ms_fwd_bwd'] / roofline_ms:10.1f}", flush=True)
        print(f"{'roofline':9s} {shape:44s} one read of the bf16 logits ({nbytes / 2**20:.1f} MiB):"
              f" {roofline_ms:.3f} ms", flush=True)
        del student, teacher
    print("'vs eager'/'vs comp': the baseline's fwd+bwd time over fused's (printed on the "
          "baseline's row); 'x roofline': fwd+bwd time over one read of the logits.")
    if write:
        print(f"rows appended to {RESULTS_DIR / 'bench_teacher.csv'}")
    else:
        print("CPU smoke run: interpreter timings, not written to benchmarks/results "
              "(use --write-cpu to record them labelled with the CPU).")


if __name__ == "__main__":
    run_then_exit(main)
