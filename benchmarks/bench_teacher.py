"""DINO-style teacher step: the plain PyTorch formulas (eager, torch.compile) vs fastswav's
fused Sinkhorn-Knopp teacher and teacher-student cross-entropy.

    python benchmarks/bench_teacher.py                 # DINOv2-like shapes, on CUDA
    python benchmarks/bench_teacher.py --cases dinov3_cls,dinov3_ibot,vit7b_cls,vit7b_ibot
    python benchmarks/bench_teacher.py --cpu-smoke     # tiny shapes on the CPU (dry run)
    python benchmarks/bench_teacher.py --memory        # bytes per shape, no GPU needed

Cases (``--cases``, comma-separated; default ``dino``):

- ``dino``: the step below at ``--batches`` and ``--prototypes``;
- ``dinov3_cls`` / ``vit7b_cls``: DINOv3's CLS step, teacher ``[2 x 64, K]`` with K = 65,536
  / 262,144: Sinkhorn-Knopp, then DINOv3's ``DINOLoss.forward`` for 8 local crops against
  both teacher crops and for the 2 global crops with ``ignore_diagonal``, weighted by their
  numbers of terms; ``fused`` is ``fastswav.dino.DINOLoss``;
- ``dinov3_ibot`` / ``vit7b_ibot``: DINOv3's iBOT step on the masked patch rows, ``[6000,
  65536]`` / ``[8192, 98304]``: ``SinkhornKnoppTeacher`` with the masked-patch count, then
  ``forward_masked`` with ``masks_weight``; ``fused`` is ``fastswav.dino.iBOTPatchLoss``.

``--memory`` prints, for the iBOT step at [8192, 98304], [128, 262144] and [4096, 65536]
(bf16 logits), the peak bytes the plain code and the fused drop-in allocate beyond their
inputs (counted by ``fastswav.ops.allocations`` on meta tensors: exact, no GPU, no memory),
and appends them to ``benchmarks/results/bench_teacher_memory.csv``.

The ``dino`` step: teacher logits ``[2B, K]`` -> Sinkhorn-Knopp targets (3 iterations, teacher
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
import functools
import os
import sys
import time
from pathlib import Path

CPU_SMOKE = "--cpu-smoke" in sys.argv
if CPU_SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    os.environ.setdefault("FASTSWAV_BACKEND", "fused")  # the drop-ins too, interpreted

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


def plain_dinov3_loss(student_logits, teacher_probs, ignore_diagonal=False):
    """DINOv3's ``DINOLoss.forward`` ([S, B, K] logits, [T, B, K] probabilities): one einsum."""
    n_s, batch, _ = student_logits.shape
    n_t = teacher_probs.shape[0]
    lsm = F.log_softmax(student_logits.float() / STUDENT_TEMP, dim=-1)
    if not ignore_diagonal:
        return -torch.einsum("sbk,tbk->", lsm, teacher_probs) / (batch * n_s * n_t)
    loss = -torch.einsum("sbk,tbk->st", lsm, teacher_probs)
    diag = min(n_s, n_t)
    loss = torch.diagonal_scatter(loss, loss.new_zeros(diag))
    return loss.sum() / (batch * n_s * n_t - batch * diag)


def dinov3_cls_step(loss_fn, sinkhorn):
    """DINOv3's CLS loss on ``[2B, K]`` teacher and ``[10B, K]`` student logits (2 global
    crops first, then 8 local), with its global / local weighting."""
    global_terms, local_terms = N_TEACHER * (N_TEACHER - 1), N_TEACHER * (N_STUDENT - N_TEACHER)

    def step(student, teacher):
        batch = teacher.shape[0] // N_TEACHER
        targets = sinkhorn(teacher, TEACHER_TEMP, ITERS).unflatten(0, (N_TEACHER, batch))
        crops = student.unflatten(0, (N_STUDENT, batch))
        local = loss_fn(crops[N_TEACHER:], targets)
        global_ = loss_fn(crops[:N_TEACHER], targets, ignore_diagonal=True)
        return (global_terms * global_ + local_terms * local) / (global_terms + local_terms)
    return step


def plain_ibot_loss(student, teacher, masks, masks_weight):
    """DINOv3's ``iBOTPatchLoss.forward_masked`` with the collate's ``masks_weight``."""
    loss = torch.sum(teacher.float() * F.log_softmax(student.float() / STUDENT_TEMP, dim=-1),
                     dim=-1)
    return -(loss * masks_weight).sum() / masks.shape[0]


@functools.lru_cache(maxsize=4)
def ibot_masks(rows, device, patches=256):
    """Student masks over ``ceil(rows / patches)`` images with ``rows`` masked patches in all,
    and DINOv3's ``masks_weight`` (1 / the image's masked count, per masked patch)."""
    n_img = -(-rows // patches)
    masks = (torch.arange(n_img * patches) < rows).view(n_img, patches)
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return masks.to(device), weight.to(device)


def dinov3_ibot_step(loss_fn, sinkhorn):
    def step(student, teacher):
        masks, weight = ibot_masks(teacher.shape[0], teacher.device)
        count = torch.tensor(teacher.shape[0], device=teacher.device)
        targets = sinkhorn(teacher, TEACHER_TEMP, count, ITERS)
        return loss_fn(student, targets, masks, weight)
    return step


def dinov3_variants(kind):
    """(plain, fused) step functions of a DINOv3 case kind (``cls`` or ``ibot``)."""
    from fastswav.dino import DINOLoss, SinkhornKnoppTeacher, iBOTPatchLoss

    if kind == "cls":
        dino = DINOLoss(1)
        plain = dinov3_cls_step(plain_dinov3_loss, plain_sinkhorn_knopp_teacher)
        return plain, dinov3_cls_step(dino, dino.sinkhorn_knopp_teacher)
    ibot = iBOTPatchLoss(1)

    def plain_patch_sinkhorn(teacher, temp, count, iters):
        return plain_sinkhorn_knopp_teacher(teacher, temp, iters)  # B cancels at 3 iterations

    def fused_masked(student, targets, masks, weight):
        return ibot.forward_masked(student, targets, masks, n_masked_patches=student.shape[0],
                                   masks_weight=weight)
    return (dinov3_ibot_step(plain_ibot_loss, plain_patch_sinkhorn),
            dinov3_ibot_step(fused_masked, SinkhornKnoppTeacher()))


# name: (kind, teacher rows, student rows, K); CLS rows are crops x B (B = 64 per GPU)
DINOV3_CASES = {
    "dinov3_cls": ("cls", N_TEACHER * 64, N_STUDENT * 64, 65536),
    "vit7b_cls": ("cls", N_TEACHER * 64, N_STUDENT * 64, 262144),
    "dinov3_ibot": ("ibot", 6000, 6000, 65536),
    "vit7b_ibot": ("ibot", 8192, 8192, 98304),
}
CPU_SMOKE_SIZES = {"cls": (N_TEACHER * 6, N_STUDENT * 6, 96), "ibot": (50, 50, 96)}
MEMORY_SHAPES = ((8192, 98304), (128, 262144), (4096, 65536))


def memory_table():
    """Rows (shape, plain peak bytes, fused peak bytes) of the iBOT step, bf16 logits."""
    from fastswav.ops.allocations import AllocationLog, skipped_launches

    plain, fused = dinov3_variants("ibot")
    out = []
    for rows, k in MEMORY_SHAPES:
        peaks = []
        for fn in (plain, fused):
            teacher = torch.empty(rows, k, dtype=torch.bfloat16, device="meta")
            student = torch.empty(rows, k, dtype=torch.bfloat16, device="meta",
                                  requires_grad=True)
            with skipped_launches(), AllocationLog() as log:
                fn(student, teacher).backward()
            peaks.append(log.peak_bytes)
        out.append(((rows, k), *peaks))
    return out


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


def _jobs(args, device):
    """(shape label, student, teacher, {variant: step}) for each case asked for."""
    jobs = []
    for case in args.cases:
        if case == "dino":
            batches = [6] if args.cpu_smoke else args.batches
            n_protos = 96 if args.cpu_smoke else args.prototypes
            for batch in batches:
                shape = shape_key(case="dino", B=batch, K=n_protos, teacher=N_TEACHER,
                                  student=N_STUDENT, dtype="bf16")
                jobs.append((shape, N_STUDENT * batch, N_TEACHER * batch, n_protos,
                             plain_step, fused_step))
            continue
        kind, t_rows, s_rows, n_protos = DINOV3_CASES[case]
        if args.cpu_smoke:
            t_rows, s_rows, n_protos = CPU_SMOKE_SIZES[kind]
        plain, fused = dinov3_variants(kind)
        shape = shape_key(case=case, teacher_rows=t_rows, student_rows=s_rows, K=n_protos,
                          dtype="bf16")
        jobs.append((shape, s_rows, t_rows, n_protos, plain, fused))
    return jobs


def _memory_table_rows() -> Path:
    """Print the plain vs fused bytes table and append it to
    ``benchmarks/results/bench_teacher_memory.csv`` (counted on meta tensors: no device)."""
    writer = ResultWriter("bench_teacher_memory", torch.device("meta"))
    writer.common["device"] = "meta (bytes counted with a GPU's launch grids, no device)"
    print("iBOT teacher step (Sinkhorn-Knopp targets, masked cross-entropy, backward), bf16 "
          "logits: peak bytes allocated beyond the inputs")
    print(f"{'rows x K':>16s} {'plain (DINOv3)':>16s} {'fused':>12s} {'plain/fused':>12s}")
    for (rows, k), plain, fused in memory_table():
        print(f"{rows:>7d} x {k:<6d} {plain / 2**30:13.2f} GiB {fused / 2**30:9.2f} GiB "
              f"{plain / fused:11.2f}x")
        shape = shape_key(rows=rows, K=k, dtype="bf16")
        writer.add("plain_dinov3", shape, "peak_bytes_beyond_inputs", plain, "B")
        writer.add("fused", shape, "peak_bytes_beyond_inputs", fused, "B")
    path = writer.write()
    print(f"rows in {path}")
    return path


def _cases(text):
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c != "dino" and c not in DINOV3_CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {unknown or text!r}; choose from dino, {', '.join(DINOV3_CASES)}")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="cases: dino (DINOv2-like, --batches x --prototypes); dinov3_cls [2x64, 65536]; "
               "vit7b_cls [2x64, 262144]; dinov3_ibot [6000, 65536]; vit7b_ibot [8192, 98304] "
               "(teacher rows x K; CLS students 10 crops x 64). --memory: the plain vs fused "
               "bytes of the iBOT step at [8192, 98304], [128, 262144], [4096, 65536].")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU (kernels under the Triton interpreter)")
    parser.add_argument("--compile", action="store_true",
                        help="with --cpu-smoke: also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--cases", type=_cases, default=["dino"],
                        help="comma-separated: dino, " + ", ".join(DINOV3_CASES)
                        + " (default: dino)")
    parser.add_argument("--memory", action="store_true",
                        help="print the plain vs fused bytes table (no GPU needed), append it to "
                        "benchmarks/results/bench_teacher_memory.csv and exit")
    parser.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")],
                        default=[128, 512], help="dino case: B per GPU, comma-separated")
    parser.add_argument("--prototypes", type=int, default=65536, help="dino case: K")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="card memory bandwidth, when the card is not in the table")
    parser.add_argument("--budget-s", type=float, default=55.0,
                        help="start no measurement after this many seconds")
    parser.add_argument("--reps", type=int, default=100, help="ms of timing per measurement (CUDA)")
    parser.add_argument("--write-cpu", action="store_true",
                        help="with --cpu-smoke: append the (CPU) measurements to the CSV")
    args = parser.parse_args(argv)
    if args.memory:
        _memory_table_rows()
        return 0
    start = time.perf_counter()

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu-smoke for a dry run (or --memory)")
    name = device_name(device)
    bandwidth = args.bandwidth_gbs or next(
        (bw for key, bw in CARD_BANDWIDTH_GBS.items() if key in name), None)
    write = device.type == "cuda" or args.write_cpu
    compile_too = device.type == "cuda" or args.compile
    writer = ResultWriter("bench_teacher", device)
    print(f"device: {name}; torch {torch.__version__}; bandwidth {bandwidth or 'unknown'} GB/s")
    head = (f"{'variant':9s} {'shape':60s} {'ms fwd':>9s} {'ms f+b':>9s} {'peak MiB':>9s} "
            f"{'vs eager':>9s} {'vs comp':>8s} {'x roofline':>10s}")
    print(head)
    print("-" * len(head))

    for shape, s_rows, t_rows, n_protos, plain, fused in _jobs(args, device):
        if time.perf_counter() - start > args.budget_s:
            print(f"{'':9s} {shape:60s} skipped: past --budget-s {args.budget_s:.0f}")
            continue
        g = torch.Generator().manual_seed(s_rows + n_protos)
        student = (torch.randn(s_rows, n_protos, generator=g) * 0.5).to(
            device=device, dtype=torch.bfloat16).requires_grad_()
        teacher = (torch.randn(t_rows, n_protos, generator=g) * 0.5).to(
            device=device, dtype=torch.bfloat16)
        variants = {"fused": fused, "eager": plain}
        if compile_too:
            variants["compiled"] = torch.compile(plain, dynamic=False)
        with torch.no_grad():
            values = {k: float(variants[k](student, teacher)) for k in ("eager", "fused")}
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
                print(f"{variant:9s} {shape:60s} skipped: past --budget-s {args.budget_s:.0f}")
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
            print(f"{variant:9s} {shape:60s} {r['ms_fwd']:9.3f} {r['ms_fwd_bwd']:9.3f} "
                  f"{r['peak_mib']:9.1f} {ve:>9s} {vc:>8s} "
                  f"{r['ms_fwd_bwd'] / roofline_ms:10.1f}", flush=True)
        print(f"{'roofline':9s} {shape:60s} one read of the bf16 logits ({nbytes / 2**20:.1f} MiB):"
              f" {roofline_ms:.3f} ms", flush=True)
        del student, teacher
    print("'vs eager'/'vs comp': the baseline's fwd+bwd time over fused's (printed on the "
          "baseline's row); 'x roofline': fwd+bwd time over one read of the logits.")
    if write:
        print(f"rows appended to {RESULTS_DIR / 'bench_teacher.csv'}")
    else:
        print("CPU smoke run: interpreter timings, not written to benchmarks/results "
              "(use --write-cpu to record them labelled with the CPU).")
    return 0


if __name__ == "__main__":
    run_then_exit(main)
