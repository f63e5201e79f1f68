"""Training-step throughput on one card: an official-SwAV-style eager step vs fastswav's step
(eager and torch.compile'd) vs the ``100ep_fast`` preset's configuration.

    python benchmarks/bench_train.py                    # CUDA, defaults: ~5 min on an H100/H200
    python benchmarks/bench_train.py --variants official_eager,100ep_fast   # the headline pair
    python benchmarks/bench_train.py --variants official_eager,fastswav_eager --steps 50
    python benchmarks/bench_train.py --modes max-autotune --variants fastswav_compiled
    python benchmarks/bench_train.py --data /path/to/train.zip   # also time 100ep_fast on real data
    python benchmarks/bench_train.py --cpu-smoke        # tiny CPU dry run (writes no rows)

Inputs are synthetic crops already on the device (batch ``--batch`` per GPU, by default the
preset's per-GPU batch; 2x224 + 6x96, fp32, channels_last on CUDA), ResNet-50 trunk, MLP head 2048-2048-128, K=3000 prototypes.
Variants, each measured with its own fresh model and optimizer:

- ``official_eager``: a step written here from the facts of the official SwAV code (not a
  copy of it): the model runs the trunk once per run of same-resolution crops, the head, L2
  normalisation and the prototypes as an ``nn.Linear`` (scores are the model's output); the
  prototypes are renormalised by clone / normalize / copy_; the loss is the per-(assigned
  crop, other crop) Python loop with ``distributed_sinkhorn`` (exp(out / eps).t(), 3 rounds)
  and its queue handling; the optimizer is ``torch.optim.SGD`` wrapped in a per-parameter
  Python LARC loop (trust 0.001, clip=False, one host sync per parameter, as apex's LARC
  does); ``loss.item()`` every step, as the official logging does.
- ``fastswav_eager``: :class:`fastswav.step.TrainStep` with :class:`fastswav.model.SwAVModel`,
  :class:`fastswav.loss.SwAVLoss` (the fused Triton loss on CUDA), :class:`fastswav.optim.LARS`.
- ``fastswav_compiled_<mode>``: the same step with ``compile_mode=<mode>`` for each of
  ``--modes``; ``compile_s`` is the warm-up's time beyond ``--warmup`` steady steps.
- ``100ep_fast``: the step ``python -m fastswav.train --preset 100ep_fast`` runs per GPU:
  its model, optimizer, loss and BatchNorm (read from ``fastswav.config.preset``) in
  :class:`fastswav.step.TrainStep`, wrapped in DistributedDataParallel over a one-process
  group (NCCL on CUDA, gloo in the CPU dry run), every timed step one whole optimizer step of
  the preset's ``grad_accum`` micro-batches (``no_sync`` on all but the last, DDP's
  all-reduce, the optimizer); ``img_per_s`` counts batch x grad_accum images per step. Compiled
  in each mode of ``--preset-modes`` (default the preset's own ``compile`` mode, then
  ``reduce-overhead`` where the preset does not accumulate: the step refuses that pair), at
  each batch of ``--batches`` (default the preset's per-GPU batch; a row's ``B`` is one
  micro-batch). Where the preset sets ``sync_bn`` the BatchNorm layers are SyncBatchNorm (on
  CUDA). Each compiled row also records what dynamo did (fastswav.compile_counts):
  ``compiled_graphs``, ``graph_breaks``, ``frames_run_eagerly`` and
  ``recompiles_after_first_step``; any of the last three above 0 is printed as a PROBLEM.
- ``100ep_fast_data`` (only with ``--data``): the same step fed by fastswav's own loader
  (``fastswav.train.build_data``) instead of synthetic tensors.

All variants run under bf16 autocast and channels_last on CUDA (the official code used apex
O1 fp16; here every variant gets the same precision and layout, so the comparison isolates
the code), on one card; only the preset's variants run under DDP (at one process: its hooks
and bucketing, not the cost of a multi-GPU all-reduce). Per variant: ``step_ms`` (median of the timed steps, CUDA events between
consecutive steps, so host-side waits count), ``img_per_s`` (batch / median step),
``peak_mem_gb`` (``torch.cuda.max_memory_allocated``, reset between variants), ``mfu``
(model FLOPs counted with ``FlopCounterMode`` for the actual crop sizes, fwd+bwd, over the
card's dense bf16 peak), ``speedup_vs_official_eager`` (img/s ratio, same run), ``wall_s``
(the variant's whole time in this process: model build, compilation, all steps), and
``projected_hours_<E>ep_<G>gpu`` for E in 100/200/400/800 ImageNet epochs (1,281,167
images) on G = 1 and 8 GPUs, assuming linear scaling and a loader that keeps up. A variant
that fails (an exception, out of memory) gets a row with metric ``error`` (unit: the
exception's type) and the run goes on.

``--budget-s`` skips a variant whose expected time (compile estimates per mode) would take
the run past it; the preset's own mode at its own batch is never skipped for the budget.

Rows go to benchmarks/results/bench_train.csv, appended after each variant so a run cut
short keeps what it measured; ``--out PATH`` writes elsewhere. A ``--cpu-smoke`` run writes
no rows unless ``--out`` is given (then labelled with the CPU). The process ends with
``os._exit`` once its rows are written and its output flushed: with torch 2.11, a process
that compiled at several sites could wait minutes at exit for inductor's compile workers.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from bench_loss import official_distributed_sinkhorn, official_swapped_prediction  # noqa: E402  (once)
from common import ResultWriter, device_name, shape_key, run_then_exit  # noqa: E402

from fastswav.compile_counts import CompileCounts  # noqa: E402
from fastswav.config import preset  # noqa: E402
from fastswav.loss import SwAVLoss, swav_loss  # noqa: E402
from fastswav.model import SwAVModel, build_model, build_trunk  # noqa: E402
from fastswav.optim import LARS, lars_param_groups  # noqa: E402
from fastswav.queue import FeatureQueue  # noqa: E402
from fastswav.step import COMPILE_MODES, TrainStep, check_compile_mode  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = (100, 200, 400, 800)
GPU_COUNTS = (1, 8)
DEFAULT_MODES = "default,reduce-overhead,max-autotune-no-cudagraphs"
PRESET = "100ep_fast"
# Dense bf16 tensor-core peak (TFLOP/s) by a substring of torch's device name; first match wins.
CARD_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
]
# Expected compile time of one ResNet-50 SwAV step (forward + loss + backward) per mode on
# a 16-core host with inductor's parallel compile workers: 60-120 s for the first mode;
# these are the upper ends, for --budget-s. A later mode in the same process reuses the
# Triton kernels already built (on-disk cache): REPEAT_COMPILE_FRACTION of its estimate.
COMPILE_ESTIMATE_S = {"default": 120, "reduce-overhead": 120, "max-autotune": 360,
                      "max-autotune-no-cudagraphs": 300}
REPEAT_COMPILE_FRACTION = 0.6


# ============================================================ official-style SwAV (eager)

class OfficialSwAVModel(nn.Module):
    """The official SwAV ResNet: trunk, projection head, L2 norm, prototypes as a Linear.

    ``forward(list of crops) -> (embedding, output)`` with ``output`` the prototype scores,
    crop-major. The trunk runs once per run of consecutive crops that share a resolution
    (``unique_consecutive`` of the widths, then ``cumsum`` of the counts, as the official
    forward finds them).
    """

    def __init__(self, arch: str, width: int, hidden_dim: int, out_dim: int, n_prototypes: int):
        super().__init__()
        self.trunk, feat_dim = build_trunk(arch, False, width)
        self.projection_head = nn.Sequential(
            nn.Linear(feat_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim))
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)

    def forward_head(self, x):
        x = self.projection_head(x)
        x = F.normalize(x, dim=1, p=2)
        return x, self.prototypes(x)

    def forward(self, inputs):
        if not isinstance(inputs, list):
            inputs = [inputs]
        widths = torch.tensor([inp.shape[-1] for inp in inputs])
        ends = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0)
        start, output = 0, None
        for end in ends.tolist():
            feats = self.trunk(torch.cat(inputs[start:end]).to(self.prototypes.weight.device,
                                                               non_blocking=True))
            output = feats if output is None else torch.cat((output, feats))
            start = end
        return self.forward_head(output)


def official_loss(output: torch.Tensor, embedding: torch.Tensor, prototype_weight: torch.Tensor,
                  queue: Optional[torch.Tensor], state: dict, *, n_crops: int,
                  crops_for_assign=(0, 1), temperature: float = 0.1, epsilon: float = 0.05,
                  sinkhorn_iterations: int = 3) -> torch.Tensor:
    """The official training-loop loss over the model's scores ``output``.

    ``queue`` ([A, L, D], newest first) is used once its last row is non-zero (a host
    sync, as in the official loop; ``state["use_the_queue"]`` remembers it) and is shifted
    by one batch with the assigned crops' embeddings written at its head.
    """
    bs = output.shape[0] // n_crops
    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if queue is not None:
                if state.get("use_the_queue") or not torch.all(queue[i, -1, :] == 0):
                    state["use_the_queue"] = True
                    out = torch.cat((torch.mm(queue[i], prototype_weight.t()), out))
                queue[i, bs:] = queue[i, :-bs].clone()
                queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]
            q = official_distributed_sinkhorn(out, epsilon, sinkhorn_iterations)[-bs:]
        loss += official_swapped_prediction(output, q, crop_id, n_crops, temperature)
    return loss / len(crops_for_assign)


class OfficialLARC:
    """apex's LARC(clip=False) around an optimizer, written plainly: per parameter, two
    norms, a host-side test that both are non-zero, then the gradient gets the weight decay
    and the adaptive rate; the wrapped optimizer steps with its own decay switched off."""

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.001,
                 eps: float = 1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps

    @property
    def param_groups(self):
        return self.optim.param_groups

    def zero_grad(self):
        self.optim.zero_grad()

    def step(self):
        with torch.no_grad():
            decays = []
            for group in self.optim.param_groups:
                weight_decay = group.get("weight_decay", 0)
                decays.append(weight_decay)
                group["weight_decay"] = 0
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    param_norm = torch.norm(p.data)
                    grad_norm = torch.norm(p.grad.data)
                    if param_norm != 0 and grad_norm != 0:
                        rate = self.trust_coefficient * param_norm / (
                            grad_norm + param_norm * weight_decay + self.eps)
                        p.grad.data += weight_decay * p.data
                        p.grad.data *= rate
        self.optim.step()
        for group, weight_decay in zip(self.optim.param_groups, decays):
            group["weight_decay"] = weight_decay


class OfficialStep:
    """One official-style training iteration; ``__call__(crops, lr)`` returns the loss."""

    def __init__(self, model: OfficialSwAVModel, optimizer: OfficialLARC, autocast, n_crops: int,
                 queue: Optional[torch.Tensor], crops_for_assign=(0, 1)):
        self.model, self.optimizer, self.autocast = model, optimizer, autocast
        self.n_crops, self.queue, self.crops_for_assign = n_crops, queue, crops_for_assign
        self.state: dict = {}
        self.losses: List[float] = []

    def __call__(self, crops: List[torch.Tensor], lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            w = self.model.prototypes.weight.data.clone()
            w = F.normalize(w, dim=1, p=2)
            self.model.prototypes.weight.copy_(w)
        with self.autocast():
            embedding, output = self.model(crops)
            embedding = embedding.detach()
            loss = official_loss(output, embedding, self.model.prototypes.weight, self.queue,
                                 self.state, n_crops=self.n_crops,
                                 crops_for_assign=self.crops_for_assign)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())  # the official loop's per-step logging (a host sync)
        return loss.detach()


def check_official_loss_matches(device: torch.device) -> None:
    """fp32: the official-style loss and fastswav's loss give the same value and gradients
    on the same embeddings and prototypes, with and without a full queue."""
    g = torch.Generator().manual_seed(0)
    n_crops, batch, dim, n_protos, q_len = 8, 8, 128, 3000, 32
    raw = torch.randn(n_crops * batch, dim, generator=g)
    weight = F.normalize(torch.randn(n_protos, dim, generator=g), dim=1)
    queue = F.normalize(torch.randn(2, q_len, dim, generator=g), dim=2)
    worst = 0.0
    for q in (None, queue):
        z1 = raw.clone().to(device).requires_grad_()
        w1 = weight.clone().to(device).requires_grad_()
        emb = F.normalize(z1, dim=1)
        output = emb @ w1.t()  # the prototypes Linear on the normalised embedding
        official = official_loss(output, emb.detach(), w1.detach(),
                                 None if q is None else q.clone().to(device), {}, n_crops=n_crops)
        official.backward()
        z2 = raw.clone().to(device).requires_grad_()
        w2 = weight.clone().to(device).requires_grad_()
        ours = swav_loss(z2, w2, n_crops=n_crops,
                         queue=None if q is None else q.clone().to(device),
                         queue_valid=None if q is None else torch.ones((), device=device))
        ours.backward()
        for name, a, b in (("loss", official.detach(), ours.detach()), ("grad z", z1.grad, z2.grad),
                           ("grad prototypes", w1.grad, w2.grad)):
            rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
            worst = max(worst, rel)
            if rel > 1e-4:
                raise RuntimeError(f"official-style and fastswav losses disagree ({name}, "
                                   f"queue={'on' if q is not None else 'off'}): relative "
                                   f"difference {rel:.3g} > 1e-4")
    print(f"sanity: official-style loss == fastswav loss (fp32, value and gradients, with and "
          f"without a queue): worst relative difference {worst:.2g} <= 1e-4")


# ============================================================ measurement helpers

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn: Callable[[], torch.Tensor], warmup: int, steps: int,
               device: torch.device, after_first: Optional[Callable[[], None]] = None):
    """(warm-up step seconds, timed step ms, final loss). Warm-up steps are synchronised one
    by one; timed steps run back to back between CUDA events (perf_counter on the CPU).
    ``after_first`` is called once the first step is done."""
    warm, loss = [], None
    for i in range(max(warmup, 1 if after_first else 0)):
        start = time.perf_counter()
        loss = step_fn()
        synchronize(device)
        warm.append(time.perf_counter() - start)
        if i == 0 and after_first is not None:
            after_first()
    times = []
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            loss = step_fn()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    else:
        for _ in range(steps):
            start = time.perf_counter()
            loss = step_fn()
            times.append((time.perf_counter() - start) * 1e3)
    return warm, times, float(loss)


def synthetic_crops(batch: int, n_crops, sizes, device, channels_last: bool, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    crops = []
    for n, size in zip(n_crops, sizes):
        for _ in range(n):
            c = torch.randn(batch, 3, size, size, generator=g).to(device)
            crops.append(c.contiguous(memory_format=torch.channels_last) if channels_last else c)
    return crops


def filled_queue(n_assign: int, length: int, dim: int, batch: int, device) -> FeatureQueue:
    """A FeatureQueue already full of random unit vectors (the state after it started)."""
    queue = FeatureQueue(n_assign, length, dim, device=device)
    g = torch.Generator(device="cpu").manual_seed(1)
    for _ in range(length // batch):
        queue.push(F.normalize(torch.randn(n_assign, batch, dim, generator=g), dim=2).to(device))
    return queue


def count_flops_per_sample(arch: str, width: int, hidden: int, out_dim: int, n_protos: int,
                           n_crops, sizes) -> float:
    """FLOPs of the model's forward + backward for one multi-crop sample (trunk, head and
    prototype scores; convolutions and matmuls as FlopCounterMode counts them), traced on
    the meta device at batch 2, so it costs no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = 2
    with torch.device("meta"):
        model = SwAVModel(arch, hidden, out_dim, n_protos, width=width)
        crops = [torch.empty(batch, 3, s, s) for n, s in zip(n_crops, sizes) for _ in range(n)]
    counter = FlopCounterMode(display=False)
    with counter:
        z = model(crops)
        (z @ model.prototypes.weight.t()).sum().backward()
    return counter.get_total_flops() / batch


def preset_shape(batch: int, mode: Optional[str] = None) -> dict:
    """Shape keys where the preset differs from the other variants: its own queue, its
    gradient accumulation, its BatchNorm, and the compile mode of the row."""
    from fastswav.train import process_queue_length

    cfg = preset(PRESET)
    dims = dict(queue=process_queue_length(cfg.replace(batch_size=batch), 1),
                grad_accum=cfg.grad_accum, ddp=1, bn="sync" if cfg.sync_bn else "plain")
    if mode is not None:
        dims["compile"] = mode
    return dims


@contextlib.contextmanager
def one_process_group(device: torch.device):
    """A world-size-1 process group while the block runs (NCCL on CUDA, gloo on the CPU),
    unless one exists: the preset's step runs under DDP (and SyncBatchNorm, where the preset
    sets it) as in a real run, with their hooks and bucketing, at one process."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def fmt(value, spec):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# ============================================================ the benchmark

class Bench:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        self.channels_last = self.cuda
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.cuda \
            else contextlib.nullcontext
        self.writer = ResultWriter("bench_train", device)
        self.write = self.cuda or args.out is not None
        self.results: List[dict] = []  # one per measured (variant, batch)
        self.errors: List[str] = []
        self.skipped: List[str] = []
        self.baseline_ips: Optional[float] = None
        self.started = time.perf_counter()
        self.flops_per_sample = count_flops_per_sample(
            args.arch, args.width, args.hidden, args.dim, args.prototypes, args.n_crops,
            args.sizes)
        name = device_name(device)
        self.peak_tflops = args.peak_tflops or (
            next((v for key, v in CARD_PEAK_TFLOPS if key in name), None) if self.cuda else None)

    # ---------------------------------------------------------------- bookkeeping
    def shape(self, batch: int, **extra) -> str:
        crops = "+".join(f"{n}x{s}" for n, s in zip(self.args.n_crops, self.args.sizes))
        arch = self.args.arch + (f"w{self.args.width}" if self.args.width else "")
        dims = dict(B=batch, crops=crops, arch=arch, K=self.args.prototypes, D=self.args.dim,
                    queue=self.args.queue_len(batch))
        dims.update(extra)  # e.g. the preset's own queue length
        return shape_key(**dims)

    def flush(self) -> None:
        if self.write and self.writer.rows:
            self.writer.write(self.args.out)
            self.writer.rows.clear()

    def over_budget(self, variant: str, estimate_s: float) -> bool:
        budget = self.args.budget_s
        elapsed = time.perf_counter() - self.started
        if budget and elapsed + estimate_s > budget:
            reason = (f"{variant}: skipped, {elapsed:.0f} s spent + ~{estimate_s:.0f} s expected "
                      f"> --budget-s {budget:.0f} (run it alone, e.g. --variants {variant}, or "
                      f"raise --budget-s)")
            print(reason, flush=True)
            self.skipped.append(reason)
            return True
        return False

    def record_error(self, variant: str, batch: int, exc: BaseException, shape_extra=None) -> None:
        kind = type(exc).__name__
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        reason = f"{variant} B={batch}: {'out of memory' if oom else 'failed'} ({kind}: {first})"
        print(reason, flush=True)
        if not oom and self.args.verbose:
            traceback.print_exc()
        self.errors.append(reason)
        self.writer.add(variant, self.shape(batch, **(shape_extra or {})), "error", 1,
                        "OutOfMemoryError" if oom else kind)
        self.flush()

    def record(self, variant: str, batch: int, warm, times, loss: float, compiled: bool,
               note: str = "", shape_extra=None, wall_s: Optional[float] = None,
               images_per_step: Optional[int] = None) -> None:
        step_ms = statistics.median(times)
        ips = (images_per_step or batch) / (step_ms / 1e3)
        peak = torch.cuda.max_memory_allocated(self.device) / 1e9 if self.cuda else None
        compile_s = max(0.0, sum(warm) - len(warm) * step_ms / 1e3) if compiled else None
        mfu = (self.flops_per_sample * ips / (self.peak_tflops * 1e12) * 100
               if self.peak_tflops else None)
        if variant == "official_eager" and batch == self.args.batch:
            self.baseline_ips = ips
        speedup = ips / self.baseline_ips if self.baseline_ips and variant != "official_eager" \
            else None
        shape = self.shape(batch, **(shape_extra or {}))
        add = self.writer.add
        add(variant, shape, "step_ms", step_ms, "ms")
        add(variant, shape, "img_per_s", ips, "img/s")
        if peak is not None:
            add(variant, shape, "peak_mem_gb", peak, "GB")
        if compile_s is not None:
            add(variant, shape, "compile_s", compile_s, "s")
        if mfu is not None:
            add(variant, shape, "mfu", mfu, "%")
        if speedup is not None:
            add(variant, shape, "speedup_vs_official_eager", speedup, "x")
        if wall_s is not None:
            add(variant, shape, "wall_s", wall_s, "s")
        for epochs in EPOCHS:
            for gpus in GPU_COUNTS:
                hours = epochs * IMAGENET_TRAIN_IMAGES / (ips * gpus) / 3600
                add(variant, shape, f"projected_hours_{epochs}ep_{gpus}gpu", hours, "h")
        self.flush()
        # Judged only with a few warm-up steps (with one, it is the compiling step itself).
        settled = len(warm) < 3 or warm[-1] * 1e3 <= 1.25 * step_ms
        if not settled:
            note = (note + "; " if note else "") + (
                f"last warm-up step {warm[-1] * 1e3:.0f} ms vs median {step_ms:.0f} ms: "
                "not settled, raise --warmup")
        if not math.isfinite(loss):
            note = (note + "; " if note else "") + f"non-finite loss {loss}"
        self.results.append(dict(variant=variant, batch=batch, step_ms=step_ms, ips=ips,
                                 peak=peak, compile_s=compile_s, mfu=mfu, speedup=speedup,
                                 first_s=warm[0] if warm else None, loss=loss, note=note))
        print(f"  {variant} B={batch}: {step_ms:.1f} ms/step, {ips:.0f} img/s"
              + (f", peak {peak:.1f} GB" if peak is not None else "")
              + (f", compile {compile_s:.0f} s" if compile_s is not None else "")
              + f", loss {loss:.4f}" + (f" [{note}]" if note else ""), flush=True)

    # ---------------------------------------------------------------- variants
    def run_official(self, batch: int) -> None:
        a = self.args
        started = time.perf_counter()
        release(self.device)
        torch.manual_seed(0)
        model = OfficialSwAVModel(a.arch, a.width, a.hidden, a.dim, a.prototypes).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        sgd = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=1e-6)
        optimizer = OfficialLARC(sgd, trust_coefficient=0.001)
        q_len = a.queue_len(batch)
        queue = None
        if q_len:  # full, in use: the same vectors as fastswav's queue, in the official order
            queue = filled_queue(2, q_len, a.dim, batch, self.device).in_official_order(batch).clone()
        step = OfficialStep(model, optimizer, self.autocast, sum(a.n_crops), queue)
        crops = synthetic_crops(batch, a.n_crops, a.sizes, self.device, self.channels_last)
        warm, times, loss = time_steps(lambda: step(crops, a.lr), a.warmup, a.steps, self.device)
        self.record("official_eager", batch, warm, times, loss, compiled=False,
                    wall_s=time.perf_counter() - started)

    def _fastswav_parts(self, batch: int):
        a = self.args
        torch.manual_seed(0)
        model = SwAVModel(a.arch, a.hidden, a.dim, a.prototypes, width=a.width).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = LARS(lars_param_groups(model, False), lr=a.lr, momentum=0.9,
                         weight_decay=1e-6, trust_coefficient=0.001)
        criterion = SwAVLoss(sum(a.n_crops), (0, 1))
        q_len = a.queue_len(batch)
        queue = filled_queue(2, q_len, a.dim, batch, self.device) if q_len else None
        return model, optimizer, criterion, queue

    def run_fastswav(self, batch: int, mode: str) -> None:
        a = self.args
        started = time.perf_counter()
        release(self.device)
        torch._dynamo.reset()
        model, optimizer, criterion, queue = self._fastswav_parts(batch)
        step = TrainStep(model, criterion, optimizer, self.autocast, mode, a.compile_backend)
        crops = synthetic_crops(batch, a.n_crops, a.sizes, self.device, self.channels_last)
        warm, times, loss = time_steps(lambda: step(crops, queue, a.lr, False)[0], a.warmup,
                                       a.steps, self.device)
        variant = "fastswav_eager" if mode == "none" else f"fastswav_compiled_{mode}"
        note = f"backend {a.compile_backend}" if mode != "none" and a.compile_backend != "inductor" else ""
        self.record(variant, batch, warm, times, loss, compiled=mode != "none", note=note,
                    wall_s=time.perf_counter() - started)

    def preset_config(self, batch: int, **extra):
        """The 100ep_fast Config at this batch (at the smoke shapes in --cpu-smoke)."""
        a = self.args
        cfg = preset(PRESET).replace(batch_size=batch, **extra)
        if a.cpu_smoke:
            cfg = cfg.replace(arch=a.arch, trunk_width=a.width, size_crops=tuple(a.sizes),
                              n_crops=tuple(a.n_crops), device="cpu")
        return cfg

    def _preset_step(self, cfg):
        """The preset's step as fastswav.train builds it per GPU: its model (SyncBatchNorm
        where it says so), DDP over the current process group, its optimizer, loss, queue and
        compile mode. Call inside :func:`one_process_group`."""
        from fastswav.train import (build_optimizer, process_queue_length, scaled_lr,
                                    use_channels_last, wrap_ddp)

        a = self.args
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(self.device)
        if cfg.sync_bn and self.cuda:  # torch's SyncBatchNorm refuses CPU tensors
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if use_channels_last(cfg, self.device):
            model = model.to(memory_format=torch.channels_last)
        ddp_device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else self.device
        model = wrap_ddp(cfg, model, ddp_device)
        optimizer = build_optimizer(cfg, model, scaled_lr(cfg, 1)[0])
        criterion = SwAVLoss(cfg.total_crops, cfg.crops_for_assign, cfg.temperature, cfg.epsilon,
                             cfg.sinkhorn_iterations)
        q_len = process_queue_length(cfg, 1)
        queue = filled_queue(len(cfg.crops_for_assign), q_len, cfg.out_dim, cfg.batch_size,
                             self.device) if q_len else None
        step = TrainStep(model, criterion, optimizer, self.autocast, cfg.compile, a.compile_backend)
        lr = scaled_lr(cfg, 1)[0]
        return step, queue, lr, use_channels_last(cfg, self.device)

    def _record_compile_counts(self, variant: str, shape: str, first: CompileCounts) -> str:
        """Rows and a printed line for what dynamo did over the run; returns a note."""
        counts = CompileCounts.read()
        problems = counts.problems(first)
        add = self.writer.add
        add(variant, shape, "compiled_graphs", counts.graphs, "count")
        add(variant, shape, "graph_breaks", counts.graph_breaks, "count")
        add(variant, shape, "frames_run_eagerly", counts.frames_eager, "count")
        add(variant, shape, "recompiles_after_first_step", counts.recompiles_since(first), "count")
        print(f"  {variant}: {counts.summary()}, {counts.recompiles_since(first)} recompiled "
              "after the first step" + "".join(f"\n    PROBLEM: {p}" for p in problems),
              flush=True)
        return "; ".join(problems) if problems else "whole graphs, compiled once"

    def _timed_preset(self, variant: str, batch: int, cfg, shape_extra: dict, next_micro_batch,
                      warmup: int, steps: int, note: str, started: float) -> None:
        """Times the preset's whole optimizer step (every micro-batch of ``grad_accum``,
        ``no_sync`` on all but the last, DDP's all-reduce, the optimizer): images/s counts
        ``batch x grad_accum`` images per step."""
        accum = cfg.grad_accum
        CompileCounts.clear()
        first = []
        with one_process_group(self.device):
            step, queue, lr, channels_last = self._preset_step(cfg)

            def one_step():
                micro = [next_micro_batch(channels_last) for _ in range(accum)]
                return step(micro if accum > 1 else micro[0], queue, lr, False)[0]

            warm, times, loss = time_steps(one_step, warmup, steps, self.device,
                                           after_first=lambda: first.append(CompileCounts.read()))
        note = f"compile={cfg.compile}, whole step of {accum} micro-batch(es) under 1-process DDP" \
            + (f", {note}" if note else "")
        if cfg.sync_bn and not self.cuda:
            note += ", plain BatchNorm (SyncBatchNorm needs CUDA)"
        shape = self.shape(batch, **shape_extra)
        if cfg.compile != "none":
            note += "; " + self._record_compile_counts(variant, shape, first[0])
        self.record(variant, batch, warm, times, loss, compiled=cfg.compile != "none", note=note,
                    shape_extra=shape_extra, wall_s=time.perf_counter() - started,
                    images_per_step=batch * accum)

    def run_preset(self, batch: int, mode: str) -> None:
        a = self.args
        started = time.perf_counter()
        release(self.device)
        torch._dynamo.reset()
        cfg = self.preset_config(batch, compile=mode)
        shape_extra = preset_shape(batch, mode)
        if cfg.sync_bn and not self.cuda:
            shape_extra["bn"] = "plain"  # torch's SyncBatchNorm refuses CPU tensors
        # one set of synthetic crops per micro-batch, reused step after step
        sets = [synthetic_crops(batch, cfg.n_crops, cfg.size_crops, self.device, False, seed=i)
                for i in range(cfg.grad_accum)]
        turn = iter(range(10 ** 9))

        def next_micro_batch(channels_last):
            crops = sets[next(turn) % len(sets)]
            return [c.contiguous(memory_format=torch.channels_last) for c in crops] \
                if channels_last else crops

        self._timed_preset(PRESET, batch, cfg, shape_extra, next_micro_batch, a.warmup, a.steps,
                           "", started)

    def run_preset_data(self, batch: int) -> None:
        from fastswav.distributed import DistInfo
        from fastswav.train import build_data

        a = self.args
        started = time.perf_counter()
        release(self.device)
        torch._dynamo.reset()
        extra = dict(data=a.data)
        if a.data_workers is not None:
            extra["workers"] = a.data_workers
        cfg = self.preset_config(batch, **extra)
        source, loader = build_data(cfg, DistInfo(), self.device)
        state = dict(epoch=0, batches=None)

        def next_micro_batch(channels_last):
            while True:
                if state["batches"] is None:
                    loader.set_epoch(state["epoch"])
                    state["batches"] = iter(loader)
                try:
                    crops, _ = next(state["batches"])
                    break
                except StopIteration:
                    state["epoch"] += 1
                    state["batches"] = None
            crops = [c.to(self.device, non_blocking=True) for c in crops]
            if channels_last:
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
            return crops

        self._timed_preset(f"{PRESET}_data", batch, cfg,
                           dict(preset_shape(batch, cfg.compile), data="real"), next_micro_batch,
                           a.data_warmup, a.data_steps,
                           f"{len(source)} images, workers={cfg.workers}, augment={cfg.augment}",
                           started)

    def attempt(self, variant: str, batch: int, fn: Callable[[], None], estimate_s: float,
                shape_extra=None, exempt: bool = False) -> bool:
        """Run one variant unless the budget forbids it (never when ``exempt``); False when
        skipped."""
        if not exempt and self.over_budget(variant, estimate_s):
            return False
        label = f"{variant} B={batch}" + (f" compile={shape_extra['compile']}"
                                           if shape_extra and "compile" in shape_extra else "")
        print(f"{label} ... ({time.perf_counter() - self.started:.0f} s into the run)", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not stop the run
            self.record_error(variant, batch, exc, shape_extra)
        finally:
            if variant != "official_eager":
                torch._dynamo.reset()
            release(self.device)
        return True

    # ---------------------------------------------------------------- report
    def print_tables(self) -> None:
        a = self.args
        print()
        head = (f"{'variant':42s} {'B':>5s} {'step ms':>9s} {'img/s':>8s} {'vs off.':>8s} "
                f"{'MFU %':>6s} {'peak GB':>8s} {'compile s':>9s}  note")
        print(head)
        print("-" * len(head))
        for r in self.results:
            print(f"{r['variant']:42s} {r['batch']:5d} {r['step_ms']:9.1f} {r['ips']:8.0f} "
                  f"{fmt(r['speedup'], '7.2f') + ('x' if r['speedup'] else ''):>8s} "
                  f"{fmt(r['mfu'], '6.1f'):>6s} {fmt(r['peak'], '8.1f'):>8s} "
                  f"{fmt(r['compile_s'], '9.0f'):>9s}  {r['note']}")
        for line in self.errors:
            print(f"ERROR   {line}")
        for line in self.skipped:
            print(f"SKIPPED {line}")
        print()
        cols = [f"{e}ep/{g}gpu" for e in EPOCHS for g in GPU_COUNTS]
        print(f"{'projected hours (ImageNet, 1,281,167 images/epoch)':50s} {'B':>5s} "
              + " ".join(f"{c:>10s}" for c in cols))
        for r in self.results:
            hours = [e * IMAGENET_TRAIN_IMAGES / (r['ips'] * g) / 3600 for e in EPOCHS for g in GPU_COUNTS]
            print(f"{r['variant']:50s} {r['batch']:5d} " + " ".join(f"{h:10.1f}" for h in hours))
        print()
        gflop = self.flops_per_sample / 1e9
        peak = f"{self.peak_tflops:.0f} TFLOP/s dense bf16" if self.peak_tflops else \
            "unknown (pass --peak-tflops): no MFU"
        print(f"notes: model fwd+bwd = {gflop:.2f} GFLOP per sample (FlopCounterMode, "
              f"{'+'.join(f'{n}x{s}' for n, s in zip(a.n_crops, a.sizes))}); card peak {peak}.")
        print("  Every variant runs bf16 autocast + channels_last on CUDA (the official code used "
              "apex O1 fp16), so the comparison isolates the code. One card: the preset's rows run "
              "its whole accumulated step under 1-process DDP (hooks and buckets, no multi-GPU "
              "all-reduce); the others run without DDP.")
        print("  Projections assume linear scaling to 8 GPUs (no communication cost) and a data "
              "loader that keeps up (synthetic on-device inputs, except *_data rows).")
        print(f"  speedup_vs_official_eager: img/s over official_eager at B={a.batch} in this run. "
              f"cudnn.benchmark={torch.backends.cudnn.benchmark}.")
        if self.write:
            print(f"rows appended to {a.out or self.writer_path()}")
        else:
            print("CPU smoke run: timings not written to benchmarks/results (use --out PATH to "
                  "record them, labelled with the CPU).")

    @staticmethod
    def writer_path() -> Path:
        from common import RESULTS_DIR
        return RESULTS_DIR / "bench_train.csv"


# ============================================================ CLI

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny CPU dry run: resnet18 width 8, 2x32 + 6x16 crops, batch 8 "
                             "(and 16 for 100ep_fast), 1 warm-up + 2 timed steps, compile mode "
                             "'default' with the aot_eager backend; checks that the official-style "
                             "loss equals fastswav's; writes no rows unless --out is given")
    parser.add_argument("--variants", default="all",
                        help="comma list of official_eager, fastswav_eager, fastswav_compiled "
                             "(every --modes entry), fastswav_compiled_<mode>, 100ep_fast, "
                             "100ep_fast_data (needs --data); default all")
    parser.add_argument("--modes", default=None,
                        help=f"torch.compile modes for fastswav_compiled (default {DEFAULT_MODES}; "
                             f"--cpu-smoke: default); 'max-autotune' is allowed but autotunes for "
                             f"minutes")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch per GPU of every variant (default the 100ep_fast preset's "
                             "per-GPU batch; --cpu-smoke 8)")
    parser.add_argument("--batches", default=None,
                        help="comma list of batches for the 100ep_fast variant (default the "
                             "preset's per-GPU batch; --cpu-smoke 8); OOM is reported as an "
                             "error row")
    parser.add_argument("--preset-modes", default=None,
                        help="comma list of compile modes for the 100ep_fast variant (default "
                             "the preset's own mode, then reduce-overhead where the preset does "
                             "not accumulate gradients); the preset's own mode at its own batch "
                             "is never skipped for --budget-s")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps before timing, compilation included (default 15; smoke 1)")
    parser.add_argument("--queue", type=int, default=0,
                        help="feature queue length per GPU for official_eager and fastswav_* "
                             "(e.g. 3840; trimmed to a multiple of the batch; kept full); default "
                             "0: no queue. 100ep_fast uses its preset's queue (none)")
    parser.add_argument("--data", default=None,
                        help="training data (image folder, zip, or what fastswav.train accepts): "
                             "adds 100ep_fast_data, the preset's step fed by fastswav's loader")
    parser.add_argument("--data-workers", type=int, default=None,
                        help="loader workers for --data (default the preset's, 8; smoke 0)")
    parser.add_argument("--data-steps", type=int, default=10, help="timed steps with --data")
    parser.add_argument("--data-warmup", type=int, default=3, help="warm-up steps with --data")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak in TFLOP/s for MFU (known: H100 SXM/H200 "
                             "989, H100 PCIe 756, A100 312, ...)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip a variant whose expected time would take the run past this many "
                             "seconds (default 300 on CUDA, 0 = no limit); compile estimates: "
                             + ", ".join(f"{m} {s} s" for m, s in COMPILE_ESTIMATE_S.items())
                             + f" (x{REPEAT_COMPILE_FRACTION} for a later mode in the run); "
                             "the preset's own mode at its own batch always runs")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; --cpu-smoke aot_eager)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark=True for every variant (the official "
                             "code sets it; fastswav.train does not; default off)")
    parser.add_argument("--lr", type=float, default=0.3, help="learning rate of the timed steps")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV to append rows to (default benchmarks/results/bench_train.csv on "
                             "CUDA; --cpu-smoke writes only with --out)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for failed variants")
    args = parser.parse_args(argv)

    smoke = args.cpu_smoke
    cfg = preset(PRESET)
    args.preset_batch = 8 if smoke else cfg.batch_size  # per GPU (one micro-step)
    args.preset_mode = cfg.compile
    args.arch, args.width = ("resnet18", 8) if smoke else ("resnet50", 0)
    args.n_crops, args.sizes = (2, 6), ((32, 16) if smoke else (224, 96))
    args.hidden, args.dim, args.prototypes = 2048, 128, 3000
    args.batch = args.batch or args.preset_batch
    args.steps = args.steps or (2 if smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 15)
    args.modes = [m for m in (args.modes or ("default" if smoke else DEFAULT_MODES)).split(",") if m]
    args.compile_backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    if args.budget_s is None:
        args.budget_s = 0 if smoke else 300
    if args.data_workers is None and smoke:
        args.data_workers = 0
    if args.batches is None:
        args.batches = [args.preset_batch]
    else:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    args.batches = list(dict.fromkeys(args.batches))
    if args.preset_modes is None:
        # reduce-overhead cannot accumulate gradients: tried only where the preset does not
        args.preset_modes = [args.preset_mode] + (
            [] if smoke or args.preset_mode == "reduce-overhead" or cfg.grad_accum > 1
            else ["reduce-overhead"])
    else:
        args.preset_modes = list(dict.fromkeys(m for m in args.preset_modes.split(",") if m))
    for mode in args.preset_modes:
        try:
            check_compile_mode(mode, cfg.grad_accum)
        except ValueError as exc:
            parser.error(f"--preset-modes: {exc}")
    for mode in args.modes:
        if mode not in COMPILE_MODES or mode == "none":
            parser.error(f"--modes: {mode!r} is not a torch.compile mode "
                         f"({', '.join(m for m in COMPILE_MODES if m != 'none')})")
    if min([args.batch, args.steps] + args.batches) < 1 or args.warmup < 0 or args.queue < 0:
        parser.error("--batch, --batches and --steps must be >= 1; --warmup and --queue >= 0")

    # Run order: the baseline first, then the cheap and headline variants, the long compiles last.
    known = ["official_eager", "fastswav_eager", PRESET, "fastswav_compiled", f"{PRESET}_data"]
    wanted = known if args.variants == "all" else [v for v in args.variants.split(",") if v]
    variants = []
    for v in wanted:
        if v == "fastswav_compiled":
            variants += [f"fastswav_compiled_{m}" for m in args.modes]
        elif v in known or (v.startswith("fastswav_compiled_")
                            and v[len("fastswav_compiled_"):] in COMPILE_MODES[1:]):
            variants.append(v)
        else:
            parser.error(f"--variants: unknown variant {v!r} (known: {', '.join(known)}, "
                         f"fastswav_compiled_<mode>)")
    args.variant_list = list(dict.fromkeys(variants))
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu-smoke for a dry run on the CPU")

    def queue_len(batch):
        return args.queue - args.queue % batch

    args.queue_len = queue_len
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    print(f"device: {device_name(device)}; torch {torch.__version__}; "
          f"B={args.batch}, warm-up {args.warmup} + {args.steps} timed steps; "
          f"variants: {', '.join(args.variant_list)}", flush=True)
    if args.cpu_smoke:
        check_official_loss_matches(device)
    bench = Bench(args, device)
    print(f"model fwd+bwd: {bench.flops_per_sample / 1e9:.2f} GFLOP per sample", flush=True)
    crops = "+".join(f"{n}x{s}" for n, s in zip(args.n_crops, args.sizes))
    bench.writer.add("model", shape_key(crops=crops, arch=args.arch + (f"w{args.width}" if args.width else "")),
                     "gflop_per_sample_fwd_bwd", bench.flops_per_sample / 1e9, "GFLOP")

    eager_s = 30.0 if not args.cpu_smoke else 0.0
    compiled_before = set()  # (mode, batch): a second compile of the same graphs mostly hits
                             # inductor's on-disk caches

    def estimate(mode: str, batch: int) -> float:
        if args.cpu_smoke or mode == "none":
            return eager_s
        if (mode, batch) in compiled_before:
            return eager_s
        first = COMPILE_ESTIMATE_S.get(mode, 120)
        return eager_s + (first * REPEAT_COMPILE_FRACTION if compiled_before else first)

    for variant in args.variant_list:
        if variant == "official_eager":
            bench.attempt(variant, args.batch, lambda: bench.run_official(args.batch), eager_s)
        elif variant == "fastswav_eager":
            bench.attempt(variant, args.batch, lambda: bench.run_fastswav(args.batch, "none"), eager_s)
        elif variant.startswith("fastswav_compiled_"):
            mode = variant[len("fastswav_compiled_"):]
            if bench.attempt(variant, args.batch, lambda m=mode: bench.run_fastswav(args.batch, m),
                             estimate(mode, args.batch)):
                compiled_before.add((mode, args.batch))
        elif variant == PRESET:
            for batch in args.batches:
                for mode in args.preset_modes:
                    headline = mode == args.preset_mode and batch == args.preset_batch
                    if bench.attempt(variant, batch, lambda b=batch, m=mode: bench.run_preset(b, m),
                                     estimate(mode, batch), shape_extra=preset_shape(batch, mode),
                                     exempt=headline):
                        compiled_before.add((mode, batch))
        elif variant == f"{PRESET}_data":
            if not args.data:
                print(f"{variant}: skipped, no --data PATH given (the loader needs real images)",
                      flush=True)
                continue
            bench.attempt(variant, args.batch, lambda: bench.run_preset_data(args.batch),
                          estimate(args.preset_mode, args.batch),
                          shape_extra=dict(preset_shape(args.batch, args.preset_mode), data="real"))
    bench.flush()
    bench.print_tables()
    return 1 if bench.errors else 0


if __name__ == "__main__":
    run_then_exit(main)
