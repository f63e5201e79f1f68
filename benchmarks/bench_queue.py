"""Feature-queue update: the fastswav._C op vs the pure-PyTorch ring vs the official
shift-by-copy queue.

    python benchmarks/bench_queue.py                 # CUDA if present, else the CPU
    python benchmarks/bench_queue.py --device cpu --threads 1
    python benchmarks/bench_queue.py --dry-run       # quick smoke run, no CSV rows

Each variant pushes a batch of B new embeddings for each of the A=2 assigned crops into a
queue of length L (D=128). Rows go to benchmarks/results/bench_queue.csv: variants ``ext``,
``ring_torch``, ``shift``; metrics ``us`` (per push) and ``speedup_vs_shift``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultWriter, shape_key

from fastswav.ops.queue import ring_push_

LENGTHS = (3840, 65536)
BATCHES = (64, 256)
DIM = 128
N_ASSIGN = 2


def shift_push_(queue: torch.Tensor, new: torch.Tensor) -> None:
    """The official SwAV update: move the whole queue back by a batch, newest rows first
    (one crop at a time, as the official loop over crops_for_assign does)."""
    batch = new.shape[1]
    for crop in range(queue.shape[0]):
        queue[crop, batch:] = queue[crop, :-batch].clone()
        queue[crop, :batch] = new[crop]


def time_us(fn, device: torch.device, min_seconds: float, repeats: int) -> float:
    """Median microseconds per call over ``repeats`` timed loops of about ``min_seconds``."""
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds / 4 or calls < 2:  # size the loop
        fn()
        calls += 1
        sync()
    per_call = (time.perf_counter() - start) / calls
    loop = max(2, int(min_seconds / max(per_call, 1e-7)))
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(loop):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) * 1e3 / loop)
        else:
            begin = time.perf_counter()
            for _ in range(loop):
                fn()
            samples.append((time.perf_counter() - begin) * 1e6 / loop)
    return statistics.median(samples)


def extension_op(device: torch.device):
    """torch.ops.fastswav.queue_push_ if fastswav._C is built for ``device``, else None."""
    try:
        from fastswav import _C
    except ImportError as exc:
        print(f"fastswav._C not built ({exc}): no `ext` rows", file=sys.stderr)
        return None
    if device.type == "cuda" and not _C.WITH_CUDA:
        print("fastswav._C was built without CUDA: no `ext` rows", file=sys.stderr)
        return None
    return torch.ops.fastswav.queue_push_


def measure_shape(ext, device, dtype, length, batch, gen, seconds, repeats) -> dict:
    """Microseconds per push of each variant for one queue length and batch."""
    new = torch.randn(N_ASSIGN, batch, DIM, device=device, generator=gen).to(dtype)

    def ring_state():
        buffer = torch.randn(N_ASSIGN, length, DIM, device=device, generator=gen).to(dtype)
        position = torch.zeros((), dtype=torch.int64, device=device)
        return buffer, position, position.clone()

    results = {}
    if ext is not None:
        ext_state = ring_state()
        results["ext"] = time_us(lambda: ext(*ext_state, new), device, seconds, repeats)
    ring = ring_state()
    results["ring_torch"] = time_us(lambda: ring_push_(*ring, new), device, seconds, repeats)
    queue = ring_state()[0]
    results["shift"] = time_us(lambda: shift_push_(queue, new), device, seconds, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seconds", type=float, default=0.2, help="time per timed loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default). On the 2-vCPU dev VM, 2 threads "
                             "showed ms-long stalls in parallel copies; 1 thread was steady")
    parser.add_argument("--dry-run", action="store_true",
                        help="a few calls per variant, print the table, write no CSV rows")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    seconds, repeats = (0.005, 1) if args.dry_run else (args.seconds, args.repeats)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ext = extension_op(device)
    writer = ResultWriter("bench_queue", device)
    print(f"device={writer.common['device']} torch={torch.__version__} dtype={args.dtype} "
          f"threads={torch.get_num_threads()}")
    print(f"{'L':>6} {'B':>4} {'ext us':>10} {'ring us':>10} {'shift us':>10} "
          f"{'ext x':>7} {'ring x':>7}")
    gen = torch.Generator(device=device).manual_seed(0)
    for length in LENGTHS:
        for batch in BATCHES:
            dims = {"A": N_ASSIGN, "L": length, "B": batch, "D": DIM, "dtype": args.dtype}
            if device.type == "cpu":
                dims["threads"] = torch.get_num_threads()
            results = measure_shape(ext, device, dtype, length, batch, gen, seconds, repeats)
            shape = shape_key(**dims)
            for variant, us in results.items():
                writer.add(variant, shape, "us", us, "us")
                if variant != "shift":
                    writer.add(variant, shape, "speedup_vs_shift", results["shift"] / us, "x")
            ext_us = results.get("ext", float("nan"))
            print(f"{length:>6} {batch:>4} {ext_us:>10.2f} {results['ring_torch']:>10.2f} "
                  f"{results['shift']:>10.2f} {results['shift'] / ext_us:>7.2f} "
                  f"{results['shift'] / results['ring_torch']:>7.2f}")
    if args.dry_run:
        print("dry run: no rows written")
    else:
        print(f"wrote {len(writer.rows)} rows to {writer.write()}")


if __name__ == "__main__":
    main()
