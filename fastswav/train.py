"""SwAV pretraining: ``python -m fastswav.train [--preset NAME] [--data PATH] [--field=value ...]``.

One readable loop: multi-crop batch -> embeddings -> SwAV loss (with the queue once it
starts) -> LARS step, with the official schedule and prototype freezing. Checkpoints at
every epoch end and resumes from the latest one in the output folder.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints,
                         queue_path, save_checkpoint)
from .config import DEFAULT_PRESET, PRESETS, Config, field_help, parse_value, preset
from .distributed import DistInfo, barrier, init_distributed, shutdown
from .loss import SwAVLoss
from .model import SwAVModel, build_model
from .ops.prototypes import normalize_prototypes_
from .optim import LARS, lars_param_groups, learning_rate, set_lr
from .queue import FeatureQueue

log = logging.getLogger("fastswav")


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:<12} {desc}" for name, (desc, _) in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m fastswav.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SwAV self-supervised pretraining. Without --preset, runs the CPU demo "
                    "on CIFAR-10. Any config field can be overridden as --field=value "
                    "(lists comma-separated, booleans true/false).",
        epilog=f"presets:\n{presets}\n\nconfig fields (--field=value):\n{field_help()}\n\n"
               "Resumes automatically from the latest checkpoint in the output folder. "
               "Multi-GPU: torchrun --nproc_per_node=8 -m fastswav.train --preset 100ep_fast ...",
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"recipe to start from (default {DEFAULT_PRESET})")
    parser.add_argument("--data", help="training data (overrides the preset's)")
    parser.add_argument("--output-dir", dest="output_dir", help="run folder (default runs/<preset>)")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in the output folder")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[Config, str, bool]:
    """Config, preset name and whether to resume, from the command line.

    Raises :class:`UsageError` with a one-line message for bad input.
    """
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = preset(args.preset)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    overrides = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument {token!r}; overrides take the form --field=value")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise UsageError(f"--{name} needs a value (--{name}=VALUE)")
            value = rest[i + 1]
            i += 1
        name = name.replace("-", "_")
        try:
            overrides[name] = parse_value(name, value)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        i += 1
    if args.data is not None:
        overrides["data"] = args.data
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    try:
        cfg = cfg.replace(**overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not cfg.output_dir:
        cfg = cfg.replace(output_dir=os.path.join("runs", args.preset))
    if not cfg.data:
        raise UsageError(f"preset {args.preset!r} needs --data PATH (image folder, zip of JPEGs, or .beton)")
    if cfg.data_kind != "torchvision-cifar10" and not os.path.exists(cfg.data):
        raise UsageError(f"data path not found: {cfg.data}")
    return cfg, args.preset, not args.no_resume


# ---------------------------------------------------------------------------- set-up

def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def process_queue_length(cfg: Config, world_size: int) -> int:
    """Per-process queue length: the official rule trims the total to a multiple of the
    global batch, then splits it evenly over processes."""
    global_batch = cfg.batch_size * world_size
    total = cfg.queue_length - cfg.queue_length % global_batch
    return total // world_size


def scaled_lr(cfg: Config, world_size: int) -> Tuple[float, float, float]:
    """(base, final, warm-up start) learning rates for the real global batch."""
    factor = 1.0
    if cfg.lr_reference_batch:
        factor = cfg.batch_size * world_size / cfg.lr_reference_batch
    return cfg.base_lr * factor, cfg.final_lr * factor, cfg.start_warmup * factor


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    # CPU stays NCHW: with torch 2.14, oneDNN's NHWC convolutions on small channel counts
    # gave different weights for two identical CPU runs (seen in tests/test_train.py).
    return cfg.channels_last and device.type == "cuda"


def unwrap(model: nn.Module) -> SwAVModel:
    return model.module if hasattr(model, "module") else model


class JsonLog:
    """Append-only JSON-lines log of the run (main process only)."""

    def __init__(self, path: Optional[Path]):
        self.path = path

    def write(self, **record) -> None:
        if self.path is None:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------- data

def build_data(cfg: Config, dist_info: DistInfo, device: torch.device):
    """The training source and its loader (call ``set_epoch`` on the loader every epoch)."""
    from .data.sources import open_source

    source = open_source(cfg.data, split="train", kind=cfg.data_kind,
                         preload=cfg.in_memory and cfg.augment == "pil")
    need = cfg.batch_size * dist_info.world_size
    if len(source) < need:
        raise UsageError(
            f"batch size {cfg.batch_size} x {dist_info.world_size} process(es) needs at least "
            f"{need} images, {cfg.data} has {len(source)}"
        )
    crop_args = dict(size_crops=cfg.size_crops, n_crops=cfg.n_crops, min_scale=cfg.min_scale_crops,
                     max_scale=cfg.max_scale_crops, blur_prob=cfg.blur_prob,
                     jitter_strength=cfg.jitter_strength)
    if cfg.augment == "batched":
        from .data.batched_multicrop import BatchedMultiCrop
        from .data.resident import ResidentImages, ResidentMultiCropLoader

        images = ResidentImages.from_source(source, device=device)
        augment = BatchedMultiCrop(**crop_args, channels_last=use_channels_last(cfg, device))
        loader = ResidentMultiCropLoader(images, augment, cfg.batch_size, seed=cfg.seed,
                                         rank=dist_info.rank, world_size=dist_info.world_size,
                                         device=device)
        return source, loader

    from .data.loader import MultiCropDataset, build_pretrain_loader
    from .data.multicrop import MultiCropTransform

    dataset = MultiCropDataset(source, MultiCropTransform(**crop_args))
    loader = build_pretrain_loader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, seed=cfg.seed,
        rank=dist_info.rank, world_size=dist_info.world_size, drop_last=True,
        pin_memory=device.type == "cuda",
    )
    return source, loader


def knn_accuracy(cfg: Config, model: nn.Module, device: torch.device) -> Optional[float]:
    """kNN top-1 (%) of the trunk: train split as memory, test split as queries."""
    from .data.sources import open_source
    from .eval.knn import knn_eval

    try:
        # No preload: kNN reads only knn_max_train / knn_max_test of the images.
        train = open_source(cfg.data, split="train", kind=cfg.data_kind)
        test = open_source(cfg.data, split="test", kind=cfg.data_kind)
    except (ValueError, FileNotFoundError) as exc:
        log.warning("kNN evaluation skipped: %s", exc)
        return None
    return knn_eval(
        unwrap(model).trunk, train, test, image_size=max(cfg.size_crops), k=cfg.knn_k,
        temperature=cfg.knn_temperature, batch_size=256, device=device,
        max_train=cfg.knn_max_train or None, max_test=cfg.knn_max_test or None,
        num_workers=min(cfg.workers, 4),
    )


# ---------------------------------------------------------------------------- training

def build_optimizer(cfg: Config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = lars_param_groups(model, cfg.lars_exclude_bn_bias)
    if cfg.optimizer == "sgd":
        # LARS with lars=False groups is exactly SGD with momentum and per-group decay.
        for group in groups:
            group["lars"] = False
            group.setdefault("weight_decay", cfg.weight_decay)
    return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.trust_coefficient)


def train_step(model: nn.Module, criterion: SwAVLoss, optimizer: torch.optim.Optimizer,
               crops: List[torch.Tensor], queue: Optional[FeatureQueue], lr: float,
               freeze_prototypes: bool, autocast) -> torch.Tensor:
    """One SwAV step; returns the loss (not synchronised)."""
    prototypes = unwrap(model).prototypes.weight
    normalize_prototypes_(prototypes)
    set_lr(optimizer, lr)
    with autocast():
        embeddings = model(crops)
    loss = criterion(embeddings, prototypes, queue)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if freeze_prototypes:
        prototypes.grad = None  # the official freeze: no update, no momentum, no decay
    optimizer.step()
    return loss.detach()


def run(cfg: Config, preset_name: str = DEFAULT_PRESET, resume: bool = True) -> dict:
    """Train as ``cfg`` says; returns a summary (final loss, kNN figures, run folder)."""
    device = select_device(cfg.device)
    dist_info = init_distributed(device.type)
    try:
        return _run(cfg, preset_name, resume, device, dist_info)
    finally:
        shutdown(dist_info)


def _run(cfg: Config, preset_name: str, resume: bool, device: torch.device, dist_info: DistInfo) -> dict:
    run_dir = Path(cfg.output_dir)
    main = dist_info.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        fields_text = " ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in sorted(cfg.to_dict().items()))
        print(f"fastswav: preset {preset_name}, {dist_info.world_size} process(es) on {device}; "
              f"run folder {run_dir}\nconfig: " + textwrap.fill(fields_text, 100, subsequent_indent="  "),
              flush=True)
    jlog = JsonLog(run_dir / "log.jsonl" if main else None)
    seed_everything(cfg.seed)

    source, loader = build_data(cfg, dist_info, device)
    iters_per_epoch = len(source) // (cfg.batch_size * dist_info.world_size)
    if cfg.steps_per_epoch:
        iters_per_epoch = min(iters_per_epoch, cfg.steps_per_epoch)
    base_lr, final_lr, start_warmup = scaled_lr(cfg, dist_info.world_size)

    model = build_model(cfg).to(device)
    if use_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and cfg.sync_bn and dist_info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model, base_lr)
    criterion = SwAVLoss(cfg.total_crops, cfg.crops_for_assign, cfg.temperature, cfg.epsilon,
                         cfg.sinkhorn_iterations)
    queue_len = process_queue_length(cfg, dist_info.world_size)
    queue: Optional[FeatureQueue] = None

    start_epoch, knn_init = 0, None
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, knn_init = state["epoch"], state.get("knn_init")
        queue_file = queue_path(run_dir, start_epoch, dist_info.rank)
        if queue_len and queue_file.exists():
            queue = FeatureQueue(len(cfg.crops_for_assign), queue_len, cfg.out_dim, device=device)
            queue.load_state_dict(load_checkpoint(queue_file, map_location=device))
        elif queue_len and start_epoch > cfg.epoch_queue_starts:
            log.warning("no saved queue %s: the queue starts empty and fills again", queue_file)
        if main:
            print(f"resumed from {ckpt} (epoch {start_epoch} done)", flush=True)
    elif cfg.knn_at_end:
        knn_init = knn_accuracy(cfg, model, device)
        if main and knn_init is not None:
            print(f"kNN top-1 at initialisation: {knn_init:.2f}%", flush=True)
            jlog.write(event="knn", epoch=0, knn_top1=knn_init)

    if dist_info.enabled:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext

    last_loss = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        # Reseed per epoch so that a resumed run draws the same augmentations.
        seed_everything(cfg.seed + 1000 * epoch + dist_info.rank)
        if queue_len and epoch >= cfg.epoch_queue_starts and queue is None:
            queue = FeatureQueue(len(cfg.crops_for_assign), queue_len, cfg.out_dim, device=device)
        model.train()
        loader.set_epoch(epoch)
        last_loss = _train_epoch(cfg, model, criterion, optimizer, queue, loader, epoch,
                                 iters_per_epoch, (base_lr, final_lr, start_warmup), device,
                                 dist_info, autocast, jlog)
        state = {"epoch": epoch + 1, "model": unwrap(model).state_dict(),
                 "optimizer": optimizer.state_dict(), "config": cfg.to_dict(), "knn_init": knn_init}
        # Queue files first: a checkpoint that exists always has its queues beside it.
        if queue is not None:
            save_checkpoint(queue.state_dict(), queue_path(run_dir, epoch + 1, dist_info.rank))
        barrier(dist_info)
        if main:
            save_checkpoint(state, checkpoint_path(run_dir, epoch + 1))
        barrier(dist_info)
        prune_checkpoints(run_dir, cfg.keep_checkpoints, dist_info.rank)

    summary = {"run_dir": str(run_dir), "loss": last_loss, "knn_init": knn_init, "knn_trained": None}
    if cfg.knn_at_end:
        knn_trained = knn_accuracy(cfg, model, device)
        summary["knn_trained"] = knn_trained
        if main and knn_trained is not None:
            jlog.write(event="knn", epoch=cfg.epochs, knn_top1=knn_trained)
            init_text = f"{knn_init:.2f}%" if knn_init is not None else "n/a"
            print(f"kNN top-1: init {init_text} -> trained {knn_trained:.2f}%", flush=True)
    return summary


def _train_epoch(cfg, model, criterion, optimizer, queue, loader, epoch, iters_per_epoch,
                 lrs, device, dist_info, autocast, jlog) -> float:
    from tqdm import tqdm

    base_lr, final_lr, start_warmup = lrs
    bar = tqdm(total=iters_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
               disable=not dist_info.is_main, dynamic_ncols=True, file=sys.stdout)
    images, skipped, tick, loss_sum, loss_count = 0, 0, time.perf_counter(), 0.0, 0
    loss = torch.zeros(())
    for step_in_epoch, (crops, n_skipped) in enumerate(loader):
        if step_in_epoch >= iters_per_epoch:
            break
        iteration = epoch * iters_per_epoch + step_in_epoch
        lr = learning_rate(iteration, iters_per_epoch, cfg.epochs, base_lr, final_lr,
                           cfg.warmup_epochs, start_warmup)
        crops = [c.to(device, non_blocking=True) for c in crops]
        if use_channels_last(cfg, device):
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        loss = train_step(model, criterion, optimizer, crops, queue, lr,
                          iteration < cfg.freeze_prototypes_niters, autocast)
        images += crops[0].shape[0] * dist_info.world_size
        skipped += int(n_skipped)
        bar.update(1)
        if (step_in_epoch + 1) % cfg.log_every == 0 or step_in_epoch + 1 == iters_per_epoch:
            value = loss.item()  # the only host sync, every log_every steps
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite loss {value} at iteration {iteration}")
            loss_sum, loss_count = loss_sum + value, loss_count + 1
            rate = images / (time.perf_counter() - tick)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.1f}")
            jlog.write(event="step", epoch=epoch, iteration=iteration, loss=value, lr=lr,
                       img_per_s=rate, queue=None if queue is None else bool(queue.is_full()))
    bar.close()
    if skipped:
        log.warning("epoch %d: skipped %d unreadable image(s)", epoch + 1, skipped)
    mean = loss_sum / max(loss_count, 1)
    jlog.write(event="epoch", epoch=epoch + 1, loss=mean, skipped_images=skipped,
               seconds=time.perf_counter() - tick)
    return mean


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, preset_name, resume = parse_args(argv)
        run(cfg, preset_name, resume)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
