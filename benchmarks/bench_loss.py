"""SwAV loss: fused Triton kernels vs the official-style eager loss vs torch.compile of it.

    python benchmarks/bench_loss.py                 # official shapes + sweep, on CUDA
    python benchmarks/bench_loss.py --shapes 256:3000:3840   # chosen shapes (B:K:queue)
    python benchmarks/bench_loss.py --cpu-smoke     # tiny shapes on the CPU (dry run)

"eager" is a faithful transcription of the official SwAV training-loop loss: one
log_softmax per (assigned crop, other crop) pair, torch.cat of the queue scores, and the
official ``distributed_sinkhorn`` (exp(out / eps) without a max shift). "compiled" is
torch.compile of that function; "fused" is ``fastswav.ops.fused_loss.swav_loss_fused``
(default precision, tf32), "fused_exact" the same with ``precision="ieee"``, and
"fused_graph" the fused forward+backward captured once in a CUDA graph and replayed (what
``--compile=reduce-overhead`` does to the step; fwd+bwd only).
Inputs are bf16 embeddings (the head's output under autocast), fp32 prototypes and an
fp32 queue of normalised embeddings, as in mixed-precision training.

Each configuration prints ms forward and forward+backward, speed-ups against eager and
compiled measured in the same run, and the effective bandwidth of reading the fp32 scores
(batch and queue) once, against the card's bandwidth. On CUDA, the official shapes are also
profiled kernel by kernel: each kernel's measured time per fwd+bwd beside the roofline's
prediction (``benchmarks/roofline.py``). Rows go to ``benchmarks/results/bench_loss.csv``
(see DESIGN.md) after each configuration, so a run cut short keeps what it measured; a CPU
smoke run writes no rows unless ``--write-cpu`` is given (then labelled with the CPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CPU_SMOKE = "--cpu-smoke" in sys.argv
if CPU_SMOKE:
    # Triton kernels run under the interpreter on the CPU; must be set before they import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultWriter, device_name, shape_key, run_then_exit  # noqa: E402
from roofline import CARD_BANDWIDTH_GBS, CARDS, loss_launches  # noqa: E402

# ------------------------------------------------------------------ official-style eager loss

@torch.no_grad()
def official_distributed_sinkhorn(out, epsilon, iterations):
    """The official SwAV ``distributed_sinkhorn`` (main_swav.py), unchanged in substance."""
    Q = torch.exp(out / epsilon).t()  # Q is K-by-B for consistency with notations from the paper
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    B = Q.shape[1] * world  # number of samples to assign
    K = Q.shape[0]  # how many prototypes
    sum_Q = torch.sum(Q)
    if world > 1:
        dist.all_reduce(sum_Q)
    Q /= sum_Q
    for _ in range(iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        if world > 1:
            dist.all_reduce(sum_of_rows)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B  # the columns must sum to 1 so that Q is an assignment
    return Q.t()


def official_swapped_prediction(output, q, crop_id, n_crops, temperature):
    """The official loop's term for one assigned crop: its codes ``q`` [B, K] predicted from
    every other crop's scores (rows of ``output``, crop-major), averaged over those crops."""
    bs = q.shape[0]
    subloss = 0
    for v in np.delete(np.arange(n_crops), crop_id):
        x = output[bs * v: bs * (v + 1)] / temperature
        subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
    return subloss / (n_crops - 1)


def official_loss(embedding, prototypes, queue, *, n_crops, crops_for_assign=(0, 1),
                  temperature=0.1, epsilon=0.05, sinkhorn_iterations=3):
    """The official training-loop loss from the model output (embedding, prototype weights).

    The official code normalises the prototype weights in place before the step; here the
    same normalisation is taken with a straight-through gradient so the function is pure.
    """
    w = prototypes + (F.normalize(prototypes.detach(), dim=1) - prototypes.detach())
    embedding = F.normalize(embedding.float(), dim=1)
    output = embedding @ w.t()
    bs = embedding.shape[0] // n_crops
    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if queue is not None:
                out = torch.cat((torch.mm(queue[i], w.t()), out))
            q = official_distributed_sinkhorn(out, epsilon, sinkhorn_iterations)[-bs:]
        loss += official_swapped_prediction(output, q, crop_id, n_crops, temperature)
    return loss / len(crops_for_assign)


# ------------------------------------------------------------------ timing

def bench_ms(fn, device, reps):
    """Median ms of fn(); triton.testing.do_bench on CUDA, wall clock on the CPU."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=reps)
    fn()  # warm-up
    times = []
    for _ in range(max(3, reps // 100)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def make_inputs(batch, n_protos, dim, n_crops, q_len, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    emb = torch.randn(n_crops * batch, dim, generator=g).to(device=device, dtype=torch.bfloat16)
    protos = F.normalize(torch.randn(n_protos, dim, generator=g), dim=1).to(device)
    queue = None
    if q_len:
        queue = F.normalize(torch.randn(2, q_len, dim, generator=g), dim=2).to(device)
    return emb.requires_grad_(), protos.requires_grad_(), queue


def score_bytes(batch, n_protos, n_crops, q_len, n_assign=2):
    """Bytes of the fp32 scores of all crops and of the queues, read once."""
    return 4 * n_protos * (n_crops * batch + n_assign * q_len)


def graphed_fwd_bwd(fn, emb, protos, queue, valid):
    """fn's forward+backward captured in one CUDA graph; returns its replay. Capturing fails
    if anything in it syncs with the host or copies from it (the fused op must not)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compile, autotune
            emb.grad = protos.grad = None
            fn(emb, protos, queue, valid).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    emb.grad = protos.grad = None
    with torch.cuda.graph(graph):
        fn(emb, protos, queue, valid).backward()
    return graph.replay


def run_config(variants, batch, n_protos, dim, n_crops, q_len, device, reps, bandwidth_gbs,
               writer, table):
    emb, protos, queue = make_inputs(batch, n_protos, dim, n_crops, q_len, device)
    valid = torch.tensor(1.0, device=device) if queue is not None else None
    shape = shape_key(B=batch, K=n_protos, D=dim, crops=n_crops, queue=q_len)
    with torch.no_grad():  # the variants compute the same loss
        values = {name: fn(emb, protos, queue, valid).item() for name, fn in variants.items()}
    if max(values.values()) - min(values.values()) > 1e-3 * abs(values["eager"]):
        raise RuntimeError(f"variants disagree at {shape}: {values}")
    results = {}
    for name, fn in variants.items():
        def fwd():
            with torch.no_grad():
                return fn(emb, protos, queue, valid)

        def fwd_bwd():
            emb.grad = None
            protos.grad = None
            fn(emb, protos, queue, valid).backward()

        fwd_bwd()  # compile / autotune outside the timed region
        results[name] = (bench_ms(fwd, device, reps), bench_ms(fwd_bwd, device, reps))
    if device.type == "cuda" and "fused" in variants:
        replay = graphed_fwd_bwd(variants["fused"], emb, protos, queue, valid)
        results["fused_graph"] = (float("nan"), bench_ms(replay, device, reps))
    nbytes = score_bytes(batch, n_protos, n_crops, q_len)
    floor_ms = nbytes / (bandwidth_gbs * 1e9) * 1e3 if bandwidth_gbs else float("nan")
    for name, (ms_fwd, ms_fb) in results.items():
        row = dict(variant=name, shape=shape, ms_fwd=ms_fwd, ms_fwd_bwd=ms_fb,
                   gbs=nbytes / (ms_fb * 1e-3) / 1e9, x_floor=ms_fb / floor_ms)
        if ms_fwd == ms_fwd:  # not NaN
            writer.add(name, shape, "ms_fwd", ms_fwd, "ms")
        writer.add(name, shape, "ms_fwd_bwd", ms_fb, "ms")
        for base in ("eager", "compiled"):
            if base in results and name.startswith("fused"):
                speed = results[base][1] / ms_fb
                row[f"vs_{base}"] = speed
                writer.add(name, shape, f"speedup_vs_{base}", speed, "x")
                if ms_fwd == ms_fwd:
                    writer.add(name, shape, f"speedup_vs_{base}_fwd", results[base][0] / ms_fwd, "x")
        table.append(row)
    return emb, protos, queue, valid


def _card_for(name: str) -> dict:
    """Roofline constants of the card torch names (H200, else H100 SXM figures)."""
    return CARDS["H200"] if "H200" in name else CARDS["H100 SXM"]


def _kernel_group(name: str) -> str:
    for known in ("_scores_kernel", "_pass_kernel", "_row_sums_kernel", "_col_sums_kernel",
                  "_swapped_ce_fwd_kernel", "_swapped_ce_bwd_kernel"):
        if known in name:
            return known
    return "other (cuBLAS gemms, torch ops)"


def profile_kernels(fn, emb, protos, queue, valid, steps=20):
    """Device microseconds per fwd+bwd of each kernel group, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    def fwd_bwd():
        emb.grad = protos.grad = None
        fn(emb, protos, queue, valid).backward()

    fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fwd_bwd()
        torch.cuda.synchronize()
    per_group: dict = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None)
        if total is None:
            total = getattr(evt, "cuda_time_total", 0.0)
        if not total or evt.key.startswith("ProfilerStep"):
            continue
        group = _kernel_group(evt.key)
        per_group[group] = per_group.get(group, 0.0) + total / steps
    return per_group


def kernel_table(fn, emb, protos, queue, valid, *, batch, n_protos, dim, n_crops, q_len,
                 card_name, writer):
    """Measured vs predicted time of each kernel of the fused fwd+bwd at one shape."""
    measured = profile_kernels(fn, emb, protos, queue, valid)
    card = _card_for(card_name)
    predicted: dict = {}
    for lc in loss_launches(batch=batch, n_protos=n_protos, dim=dim, n_crops=n_crops,
                            queue_len=q_len):
        group = _kernel_group(lc.kernel)
        predicted[group] = predicted.get(group, 0.0) + lc.count * lc.seconds(card) * 1e6
    shape = shape_key(B=batch, K=n_protos, D=dim, crops=n_crops, queue=q_len)
    print(f"\nfused fwd+bwd by kernel at {shape} (us per step; roofline for {card_name})")
    print(f"{'kernel':34s} {'measured':>9s} {'predicted':>9s} {'ratio':>6s}")
    for group in sorted(set(measured) | set(predicted)):
        got, want = measured.get(group, 0.0), predicted.get(group, 0.0)
        ratio = got / want if want else float("nan")
        print(f"{group:34s} {got:9.1f} {want:9.1f} {ratio:6.2f}")
        writer.add(f"fused:{group}", shape, "us_measured", got, "us")
        writer.add(f"fused:{group}", shape, "us_predicted", want, "us")
    print(f"{'total':34s} {sum(measured.values()):9.1f} {sum(predicted.values()):9.1f}")


def print_table(table, bandwidth_gbs):
    head = (f"{'variant':11s} {'shape':40s} {'ms fwd':>9s} {'ms f+b':>9s} {'vs eager':>9s} "
            f"{'vs comp':>8s} {'GB/s':>8s} {'x floor':>8s}")
    print(head)
    print("-" * len(head))
    for r in table:
        ve = f"{r['vs_eager']:.2f}x" if "vs_eager" in r else ""
        vc = f"{r['vs_compiled']:.2f}x" if "vs_compiled" in r else ""
        print(f"{r['variant']:11s} {r['shape']:40s} {r['ms_fwd']:9.3f} {r['ms_fwd_bwd']:9.3f} "
              f"{ve:>9s} {vc:>8s} {r['gbs']:8.1f} {r['x_floor']:8.1f}")
    print(f"GB/s: fp32 scores of batch + queue read once per fwd+bwd time; card bandwidth "
          f"{bandwidth_gbs or 'unknown'} GB/s; 'x floor' = fwd+bwd time / that read time.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU (kernels under the Triton interpreter)")
    parser.add_argument("--compile", action="store_true",
                        help="with --cpu-smoke: also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--no-sweep", action="store_true", help="official shapes only")
    parser.add_argument("--shapes", default=None,
                        help="comma list of B:K:queue shapes to run instead (e.g. "
                             "256:3000:3840,64:3000:0); the official ones also get the "
                             "kernel-by-kernel table")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="card memory bandwidth, when the card is not in the table")
    parser.add_argument("--write-cpu", action="store_true",
                        help="with --cpu-smoke: append the (CPU) measurements to the CSV")
    parser.add_argument("--reps", type=int, default=200, help="ms of timing per measurement (CUDA)")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu-smoke for a dry run")
    from fastswav.ops.fused_loss import swav_loss_fused

    name = device_name(device)
    bandwidth = args.bandwidth_gbs or next(
        (bw for key, bw in CARD_BANDWIDTH_GBS.items() if key in name), None)

    def fused(e, c, q, v):
        return swav_loss_fused(e, c, n_crops=n_crops, queue=q, queue_valid=v)

    def fused_exact(e, c, q, v):
        return swav_loss_fused(e, c, n_crops=n_crops, queue=q, queue_valid=v, precision="ieee")

    def eager(e, c, q, v):
        return official_loss(e, c, q, n_crops=n_crops)

    compiled_loss = torch.compile(official_loss)

    def compiled(e, c, q, v):
        return compiled_loss(e, c, q, n_crops=n_crops)

    variants = {"eager": eager, "fused": fused, "fused_exact": fused_exact}
    if device.type == "cuda" or args.compile:
        variants["compiled"] = compiled

    n_crops, dim = 8, 128
    official = [(b, 3000, q) for b in (256, 64) for q in (3840, 0)]
    if args.shapes:
        try:
            configs = [tuple(int(v) for v in item.split(":")) for item in args.shapes.split(",")]
        except ValueError:
            configs = []
        if not configs or any(len(c) != 3 or min(c[:2]) < 1 or c[2] < 0 for c in configs):
            parser.error(f"--shapes {args.shapes!r}: expected B:K:queue[,B:K:queue...], "
                         f"B and K >= 1, queue >= 0")
        if args.cpu_smoke:
            n_crops, dim = 4, 32
    elif args.cpu_smoke:
        n_crops, dim = 4, 32
        configs = [(8, 96, 0), (8, 96, 40)]
    else:
        configs = list(official)
        if not args.no_sweep:
            configs += [(256, k, 3840) for k in (1000, 10000, 30000)]
            configs += [(b, 3000, 0) for b in (32, 128, 512)]
    writer = ResultWriter("bench_loss", device)
    write = device.type == "cuda" or args.write_cpu
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    for batch, n_protos, q_len in configs:
        table = []
        inputs = run_config(variants, batch, n_protos, dim, n_crops, q_len, device, args.reps,
                            bandwidth, writer, table)
        print_table(table, bandwidth)
        if device.type == "cuda" and (batch, n_protos, q_len) in official:  # kernel by kernel
            kernel_table(fused, *inputs, batch=batch, n_protos=n_protos, dim=dim,
                         n_crops=n_crops, q_len=q_len, card_name=name, writer=writer)
        if write:
            writer.write()
            writer.rows.clear()
        sys.stdout.flush()
    if write:
        print("rows appended to benchmarks/results/bench_loss.csv")
    else:
        print("CPU smoke run: interpreter timings, not written to benchmarks/results "
              "(use --write-cpu to record them labelled with the CPU).")


if __name__ == "__main__":
    run_then_exit(main)
