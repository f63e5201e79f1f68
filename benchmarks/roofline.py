"""Roofline of the fused SwAV loss: bytes, FLOPs and exponentials of every launch.

    python benchmarks/roofline.py                     # official shapes, H100 and H200
    python benchmarks/roofline.py --batch 64 --queue 0

Each launch's predicted time is the largest of its three roofs: DRAM bytes at the card's
bandwidth, matmul FLOPs at the tensor-core peak of the precision used, and exponentials at
the SFU rate (ex2: 16 per clock per SM). Bytes count every tensor a launch reads or writes
once (re-reads of a tile by the other programs of a launch are assumed to hit L2: prototypes,
statistics); the small torch ops between launches (sums of partials, the loss) are listed as
one "glue" line. ``bench_loss.py`` prints each kernel's measured time beside these on a GPU.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List

from fastswav.kernels.tiles import loss_tiles

# Cards: DRAM GB/s, dense tensor-core TFLOP/s (bf16/fp16, tf32), fp32 FMA TFLOP/s, SMs, GHz.
CARDS = {
    "H100 SXM": dict(bandwidth_gbs=3350.0, tc16=989.0, tf32=495.0, fp32=67.0, sms=132, ghz=1.83),
    "H200": dict(bandwidth_gbs=4800.0, tc16=989.0, tf32=495.0, fp32=67.0, sms=132, ghz=1.83),
}
# Peak memory bandwidth (GB/s) by a substring of torch's device name.
CARD_BANDWIDTH_GBS = {
    "H200": 4800.0,
    "H100 80GB HBM3": 3350.0,  # SXM
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100-SXM4-40GB": 1555.0,
    "L40S": 864.0,
}
SFU_PER_CLOCK_PER_SM = 16


@dataclass
class LaunchCost:
    kernel: str        # kernel name as the profiler shows it (or a label)
    count: int         # launches per fwd+bwd
    bytes: float       # per launch
    flops: float = 0.0
    exps: float = 0.0
    matmul: str = ""   # "tf32", "tc16", "fp32" or "" (no matmul)

    def seconds(self, card: dict) -> float:
        t_bytes = self.bytes / (card["bandwidth_gbs"] * 1e9)
        t_flops = self.flops / (card[self.matmul] * 1e12) if self.matmul else 0.0
        t_exps = self.exps / (SFU_PER_CLOCK_PER_SM * card["sms"] * card["ghz"] * 1e9)
        return max(t_bytes, t_flops, t_exps)

    def bound(self, card: dict) -> str:
        t = {"bytes": self.bytes / (card["bandwidth_gbs"] * 1e9),
             "flops": self.flops / (card[self.matmul] * 1e12) if self.matmul else 0.0,
             "exp": self.exps / (SFU_PER_CLOCK_PER_SM * card["sms"] * card["ghz"] * 1e9)}
        return max(t, key=t.get)


def loss_launches(batch=256, n_protos=3000, dim=128, n_crops=8, n_assign=2, queue_len=3840,
                  iterations=3, precision="tf32", emb_bytes=2) -> List[LaunchCost]:
    """The launches of one fused fwd+bwd (``fastswav.ops.fused_loss``) and their costs."""
    B, K, D, V, A, L = batch, n_protos, dim, n_crops, n_assign, queue_len
    score_mm = "fp32" if precision == "ieee" else "tf32" if precision in ("tf32", "tf32x3") else "tc16"
    passes = 3 if precision == "tf32x3" else 1
    mm_flops = lambda m, n, k: 2.0 * m * n * k * passes  # noqa: E731
    n_kb64, n_kb128 = -(-K // 64), -(-K // 128)
    out = [
        # scores of every crop + column statistics of the assigned ones + row log-sum-exp pieces
        LaunchCost("_scores_kernel", 1, V * B * D * emb_bytes + K * D * 4 + V * B * K * 4
                   + 2 * A * (-(-B // 64)) * K * 4 + 2 * V * B * n_kb64 * 4,
                   mm_flops(V * B, K, D), (A + V) * B * K, score_mm),
    ]
    if L:
        out.append(LaunchCost("_scores_kernel (queue)", 1, A * L * D * 4 + K * D * 4 + A * L * K * 4
                              + 2 * A * (-(-L // 64)) * K * 4, mm_flops(A * L, K, D), A * L * K,
                              score_mm))
    seg = A * (L + B) * K
    tiles = loss_tiles(True, batch=B, n_protos=K, dim=D, n_crops=V, n_assign=A, queue_len=L,
                       precision=precision)
    if iterations > 1 and tiles.one_launch_rounds:
        # one DRAM read of the segment (the second sweep hits L2) + the partial sums
        n_rb = -(-(L + B) // tiles.pass_tile.rows)
        out.append(LaunchCost("_pass_kernel", iterations - 1, seg * 4 + A * n_rb * K * 4,
                              exps=2 * seg))
    elif iterations > 1:
        out.append(LaunchCost("_row_sums_kernel", iterations - 1, seg * 4 + A * n_kb128 * (L + B) * 4,
                              exps=seg))
        out.append(LaunchCost("_col_sums_kernel", iterations - 1, seg * 4, exps=seg))
    if iterations > 0:
        out.append(LaunchCost("_row_sums_kernel (last)", 1, A * B * K * 4, exps=A * B * K))
    out += [
        LaunchCost("_swapped_ce_fwd_kernel", 1, V * B * K * 4 + A * B * K * 4, exps=A * B * K),
        LaunchCost("_swapped_ce_bwd_kernel", 1, V * B * K * 4 + A * B * K * 4
                   + V * B * K * (4 if precision in ("ieee", "tf32x3") else 2), exps=V * B * K),
    ]
    ds_bytes = 4 if precision in ("ieee", "tf32x3") else 2
    bwd_mm = "fp32" if precision in ("ieee", "tf32x3") else "tc16"
    out += [
        LaunchCost("gemm dS.C", 1, V * B * K * ds_bytes + K * D * 4 + V * B * D * 4,
                   2.0 * V * B * K * D, matmul=bwd_mm),
        LaunchCost("gemm dS^T.Z", 1, V * B * K * ds_bytes + V * B * D * 4 + K * D * 4,
                   2.0 * V * B * K * D, matmul=bwd_mm),
        # sums of partials, lse, the loss, the normalisation backward: small tensors
        LaunchCost("glue (torch ops)", 1, 4.0 * (4 * V * B * n_kb64 + 6 * A * K + 4 * A * (L + B)
                                                 + 6 * V * B * D)),
    ]
    return out


def predicted_ms(launches: List[LaunchCost], card: dict) -> float:
    return sum(lc.count * lc.seconds(card) for lc in launches) * 1e3


def print_roofline(launches: List[LaunchCost], title: str) -> None:
    print(title)
    names = list(CARDS)
    head = f"{'launch':26s} {'n':>2s} {'MB':>8s} {'GFLOP':>7s} {'M exp':>7s} " + " ".join(
        f"{n + ' us':>12s}" for n in names) + "  bound"
    print(head)
    print("-" * len(head))
    for lc in launches:
        times = " ".join(f"{lc.count * lc.seconds(CARDS[n]) * 1e6:12.1f}" for n in names)
        print(f"{lc.kernel:26s} {lc.count:2d} {lc.bytes / 1e6:8.2f} {lc.flops / 1e9:7.2f} "
              f"{lc.exps / 1e6:7.2f} {times}  {lc.bound(CARDS[names[0]])}")
    totals = " ".join(f"{predicted_ms(launches, CARDS[n]) * 1e3:12.1f}" for n in names)
    print(f"{'total fwd+bwd':26s} {'':2s} {sum(lc.count * lc.bytes for lc in launches) / 1e6:8.2f} "
          f"{sum(lc.count * lc.flops for lc in launches) / 1e9:7.2f} "
          f"{sum(lc.count * lc.exps for lc in launches) / 1e6:7.2f} {totals}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="*", default=[64, 256])
    parser.add_argument("--queue", type=int, nargs="*", default=[0, 3840])
    parser.add_argument("--precision", default="tf32")
    args = parser.parse_args(argv)
    for batch in args.batch:
        for q in args.queue:
            print_roofline(loss_launches(batch=batch, queue_len=q, precision=args.precision),
                           f"\nB={batch} K=3000 D=128 crops=8 queue={q} precision={args.precision}")


if __name__ == "__main__":
    main()
