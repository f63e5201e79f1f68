"""The memory estimate (``fastswav.memory``) against measured CPU peaks, and its figures.

    python benchmarks/bench_memory.py              # every row below
    python benchmarks/bench_memory.py --dry-run    # batch 8 / 4 canvases, no CSV rows

Rows go to benchmarks/results/bench_memory.csv (bytes unless the unit says otherwise):

- ``step`` / ``step_checkpointed``: one real float32 training step of a width-32 ResNet-18
  on the demo's crops (2x32 + 4x16) at batch 96 and 192, each in a fresh process: the rise
  of the process's own peak resident memory (``VmHWM``) over the process before the step
  (``measured_bytes``) against the estimate of what a step adds (``estimated_bytes``);
- ``augment``: one batched multi-crop call (2x224 + 6x96, every crop blurred) on 8 and 16
  canvases of 320, measured the same way, against ``augment_peak_bytes``;
- ``resnet50_bf16``: the activations ResNet-50 saves per 2x224 + 6x96 image under bf16
  autocast (``per_image_bytes``, measured on fake tensors);
- ``decode_once_256``: the decode-once data path of ``100ep_fast`` with a ``.beton`` at
  canvas 512 (``device_bytes``) and the loader's pinned host buffers (``host_pinned_bytes``).

Each measured process runs with one thread and a fixed malloc mmap threshold, so that every
large tensor is its own mapping, returned when freed, and the resident peak follows the live
tensors (glibc's adaptive threshold otherwise kept freed memory and moved the peak by up to
50 % between identical runs). Linux only (``/proc/self/status``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultWriter, shape_key  # noqa: E402

# The process's own peak: VmHWM. ru_maxrss is not: Linux carries the parent's peak across
# fork and exec, so under a long pytest run it read the parent's size.
_READ_PEAK = """
def own_peak_and_now():
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak, now
"""

STEP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from fastswav.config import preset
    from fastswav.loss import SwAVLoss
    from fastswav.memory import estimate
    from fastswav.model import build_model
    from fastswav.step import TrainStep
    from fastswav.train import build_optimizer
""") + _READ_PEAK + textwrap.dedent("""
    torch.set_num_threads(1)
    batch, checkpointed = int(sys.argv[1]), sys.argv[2] == "1"
    cfg = preset("demo").replace(batch_size=batch, trunk_width=32,
                                 checkpoint_activations=checkpointed)
    model = build_model(cfg)
    step = TrainStep(model, SwAVLoss(cfg.total_crops, cfg.crops_for_assign),
                     build_optimizer(cfg, model, 0.1))
    shapes = [s for n, s in zip(cfg.n_crops, cfg.size_crops) for _ in range(n)]
    step([torch.randn(2, 3, s, s) for s in shapes], None, 0.1, False)  # lazily made state
    _, before = own_peak_and_now()
    step([torch.randn(batch, 3, s, s) for s in shapes], None, 0.1, False)
    peak, _ = own_peak_and_now()
    est = estimate(cfg, 1, "cpu")
    # what the step adds to a process that holds the model, its gradients and momentum
    added = est.total - est.parameters - est.gradients - est.optimizer_state
    print(json.dumps({"measured": peak - before, "estimated": added}))
""")

AUGMENT_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from fastswav.data.batched_multicrop import BatchedMultiCrop
    from fastswav.memory import augment_peak_bytes
""") + _READ_PEAK + textwrap.dedent("""
    torch.set_num_threads(1)
    batch, canvas = int(sys.argv[1]), int(sys.argv[2])
    augment = BatchedMultiCrop(blur_prob=1.0)  # every crop blurred: the largest working set
    augment(torch.randint(0, 256, (2, 3, canvas, canvas), dtype=torch.uint8),
            torch.Generator().manual_seed(0))
    images = torch.randint(0, 256, (batch, 3, canvas, canvas), dtype=torch.uint8)
    _, before = own_peak_and_now()
    crops = augment(images, torch.Generator().manual_seed(0))
    peak, _ = own_peak_and_now()
    made = sum(c.numel() * c.element_size() for c in crops)  # counted as input crops
    print(json.dumps({"measured": peak - before - made,
                      "estimated": augment_peak_bytes(batch, canvas, (224, 96), (2, 6), "cpu")}))
""")


def _measure(script: str, *args) -> tuple[int, int]:
    env = dict(os.environ, FASTSWAV_BACKEND="reference", OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return figures["measured"], figures["estimated"]


def step_peak(batch: int, checkpointed: bool) -> tuple[int, int]:
    """(measured, estimated) bytes a training step adds; see the module docstring."""
    return _measure(STEP_SCRIPT, batch, int(checkpointed))


def augment_peak(batch: int, canvas: int) -> tuple[int, int]:
    """(measured, estimated) working bytes of one batched multi-crop call."""
    return _measure(AUGMENT_SCRIPT, batch, canvas)


def _report(writer, variant: str, shape: str, measured: int, estimated: int) -> None:
    mib = 2 ** 20
    print(f"{variant:18s} {shape}: measured {measured / mib:7.0f} MiB, "
          f"estimated {estimated / mib:7.0f} MiB ({estimated / measured:.2f}x)", flush=True)
    writer.add(variant, shape, "measured_bytes", measured, "B")
    writer.add(variant, shape, "estimated_bytes", estimated, "B")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="small sizes, print only (no CSV rows)")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("error: bench_memory reads /proc/self/status (Linux only)", file=sys.stderr)
        return 2
    from fastswav import memory
    from fastswav.config import preset

    writer = ResultWriter("bench_memory", torch.device("cpu"))
    mib = 2 ** 20
    for checkpointed in (False, True):
        for batch in (8,) if args.dry_run else (96, 192):
            _report(writer, "step_checkpointed" if checkpointed else "step",
                    shape_key(arch="resnet18", width=32, batch=batch, crops="2x32+4x16"),
                    *step_peak(batch, checkpointed))
    for batch in (4,) if args.dry_run else (8, 16):
        _report(writer, "augment", shape_key(batch=batch, canvas=320, crops="2x224+6x96"),
                *augment_peak(batch, 320))
    (_, per_image), _ = memory.activation_bytes(preset("100ep"), "cuda")
    print(f"ResNet-50, 2x224 + 6x96, bf16: {per_image / mib:.1f} MiB saved per image")
    writer.add("resnet50_bf16", shape_key(crops="2x224+6x96"), "per_image_bytes", per_image, "B")
    fast = preset("100ep_fast")
    with tempfile.TemporaryDirectory() as empty:  # no file yet: the writer's canvas cap, 512
        est = memory.estimate(fast.replace(data=os.path.join(empty, "train.beton")), 8, "cuda")
    print(f"decode-once data path, 256 images at canvas 512: {est.data_path / 2**30:.2f} GiB "
          f"on the device, {est.host_pinned / 2**30:.2f} GiB pinned on the host")
    shape = shape_key(preset="100ep_fast", batch=fast.batch_size, canvas=512)
    writer.add("decode_once_256", shape, "device_bytes", est.data_path, "B")
    writer.add("decode_once_256", shape, "host_pinned_bytes", est.host_pinned, "B")
    if not args.dry_run:
        print(f"rows in {writer.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
