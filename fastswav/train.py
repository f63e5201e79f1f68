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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._callable import make_callable
from .autograd_engine import start_autograd_engine
from .cli import UsageParser
from .checkpoint import (NoReadableCheckpoint, check_room, checkpoint_path, find_resumable,
                         free_bytes, load_checkpoint, prune_checkpoints,
                         queue_path, remove_stale_temporaries, save_checkpoint,
                         set_aside_previous, state_nbytes)
from .config import (DEFAULT_PRESET, PRESETS, Config, field_help, parse_value, preset,
                     resume_differences)
from .data.sources import resolve_download
from .distributed import (DistInfo, PeerFailed, agree_on_error, decided_by_main,
                          init_distributed, is_collective_failure, peer_failure, set_phase,
                          shutdown, sync_bn_group)
from .faults import (EXIT_DISK_FULL, EXIT_DIVERGED, EXIT_PEER_FAILED, EXIT_PREEMPTED, DiskFull,
                     Diverged, NonFiniteTracker, PreemptionHandler, Preempted, code_entropy_ratio,
                     looks_collapsed, said_before)
from .loss import SwAVLoss
from .model import arch_prefers_channels_last, build_model, parse_arch
from .official import init_model_from
from .ops.sinkhorn import swav_codes
from .optim import LARS, lars_param_groups, learning_rate
from .profiling import ProfileWindow, enable_nvtx, nvtx_range, parse_window
from .queue import FeatureQueue
from .step import TrainStep, unwrap

log = logging.getLogger("fastswav")


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------- CLI

def _preset_in(argv: Optional[Sequence[str]]) -> str:
    """The --preset of a command line (the default when absent or unknown), read before the
    full parser is built so that --help can show that preset's values."""
    pre = UsageParser(add_help=False)
    pre.add_argument("--preset", default=DEFAULT_PRESET)
    name = pre.parse_known_args(argv)[0].preset
    return name if name in PRESETS else DEFAULT_PRESET


def _parser(preset_name: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:<17} {desc}" for name, (desc, _) in PRESETS.items())
    parser = UsageParser(
        prog="python -m fastswav.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SwAV self-supervised pretraining. Without --preset, runs the CPU demo "
                    "on CIFAR-10. Any config field can be overridden as --field=value "
                    "(lists comma-separated, booleans true/false).",
        epilog=(
            f"presets:\n{presets}\n\n"
            f"config fields (--field=value), defaults of preset {preset_name} "
            f"(--preset NAME --help shows another's):\n"
            f"{field_help(preset(preset_name))}\n\n"
            "resume:\n"
            "  Resumes automatically from the latest checkpoint in the output folder;\n"
            "  --no-resume starts over (the old checkpoints are moved aside).\n\n"
            "multi-GPU (a lost worker restarts the group, which resumes; docs/fault_tolerance.md):\n"
            "  torchrun --standalone --nproc_per_node=8 --max-restarts=3 -m fastswav.train "
            "--preset 100ep_fast --data PATH\n\n"
            "memory per GPU before a run:\n"
            "  python -m fastswav.info --memory --preset NAME [--field=value ...]\n\n"
            "profiling:\n"
            "  nsys profile --capture-range=cudaProfilerApi python -m fastswav.train ... "
            "--profile=100:120\n\n"
            "exit status:\n"
            "  0   done\n"
            "  2   bad command line, no readable checkpoint, another recipe in the output\n"
            "      folder, or a memory estimate over the GPU's memory\n"
            "  3   the loss became non-finite (earlier checkpoints untouched)\n"
            "  69  another process died or stopped responding for dist_timeout_s\n"
            "  74  a checkpoint could not be written (disk full; earlier checkpoints untouched)\n"
            "  75  stopped by SIGTERM/SIGUSR1 after writing a checkpoint (run the same command\n"
            "      again to resume)\n\n"
            "from Python: fastswav.train(data=..., preset=..., output_dir=..., **fields)"),
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"recipe to start from (default {DEFAULT_PRESET})")
    parser.add_argument("--data", help="training data (overrides the preset's)")
    parser.add_argument("--output-dir", dest="output_dir", help="run folder (default runs/<preset>)")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in the output folder")
    return parser


_RESNET_ONLY_FIELDS = {"small_images": False, "trunk_width": 0, "zero_init_residual": False}


def _resnet_fields_off(cfg: Config, overrides: dict, preset_name: str) -> Config:
    """``cfg`` with the preset's built-in-ResNet options turned off when the arch is a
    torchvision or timm trunk (the demo's small-image stem means nothing there); the same
    options given on the command line are refused."""
    if not parse_arch(cfg.arch)[0]:
        return cfg
    inherited = {name: off for name, off in _RESNET_ONLY_FIELDS.items()
                 if name not in overrides and getattr(cfg, name) != off}
    if inherited:
        print(f"fastswav: {', '.join(inherited)} of preset {preset_name} apply to the built-in "
              f"ResNets only: off for {cfg.arch}", flush=True)
        cfg = cfg.replace(**inherited)
    given = [name for name, off in _RESNET_ONLY_FIELDS.items() if getattr(cfg, name) != off]
    if given:
        raise UsageError(f"{', '.join(given)} apply to the built-in ResNets only, not to "
                         f"{cfg.arch}")
    return cfg


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[Config, str, bool]:
    """Config, preset name and whether to resume, from the command line.

    Raises :class:`UsageError` with a one-line message for bad input.
    """
    parser = _parser(_preset_in(argv))
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
    cfg = _resnet_fields_off(cfg, overrides, args.preset)
    if not cfg.output_dir:
        cfg = cfg.replace(output_dir=os.path.join("runs", args.preset))
    if not cfg.data:
        raise UsageError(f"preset {args.preset!r} needs --data PATH (image folder, zip of JPEGs, or .beton)")
    data, kind = resolve_download(cfg.data, cfg.data_kind)
    if (data, kind) != (cfg.data, cfg.data_kind):
        print(f"fastswav: reading torchvision's CIFAR-10 from {data} "
              "(downloaded on first use; --data PATH to read another copy)", flush=True)
        cfg = cfg.replace(data=data, data_kind=kind)
    if cfg.data_kind != "torchvision-cifar10" and not os.path.exists(cfg.data):
        raise UsageError(f"data path not found: {cfg.data}")
    try:
        arch_prefers_channels_last(cfg.arch)  # builds the trunk's layers once: a bad name stops here
    except ValueError as exc:
        raise UsageError(str(exc)) from None
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
        factor = cfg.global_batch(world_size) / cfg.lr_reference_batch
    return cfg.base_lr * factor, cfg.final_lr * factor, cfg.start_warmup * factor


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    # CPU stays NCHW: with torch 2.14, oneDNN's NHWC convolutions on small channel counts
    # gave different weights for two identical CPU runs (seen in tests/test_train.py).
    # Transformer trunks gain nothing from NHWC, so only convolutional ones get it.
    return cfg.channels_last and device.type == "cuda" and arch_prefers_channels_last(cfg.arch)


class RunLog:
    """The run's records: JSON lines in RUN/log.jsonl, and TensorBoard scalars in
    RUN/tensorboard when enabled and the tensorboard package is installed (main process)."""

    def __init__(self, run_dir: Path, main: bool, tensorboard: bool):
        self.path = run_dir / "log.jsonl" if main else None
        self.tb = None
        if main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard not installed: logging to %s only", self.path)
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, **record) -> None:
        if self.path is None:
            return
        record.setdefault("time", time.time())
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a log line is not worth the run: the checkpoints decide
            if not getattr(self, "_write_failed", False):
                log.warning("cannot append to %s (%s): log records are skipped from here on",
                            self.path, exc.strerror or exc)
                self._write_failed = True
            return
        if self.tb is not None:
            event = record.get("event")
            if event == "step":
                for key in ("loss", "lr", "img_per_s", "code_entropy"):
                    if record.get(key) is not None:
                        self.tb.add_scalar(f"train/{key}", record[key], record["iteration"])
            elif event == "epoch":
                self.tb.add_scalar("epoch/loss", record["loss"], record["epoch"])
            elif event == "knn":
                self.tb.add_scalar("eval/knn_top1", record["knn_top1"], record["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# ---------------------------------------------------------------------------- data

def _is_beton(cfg: Config) -> bool:
    return cfg.data_kind == "beton" or (cfg.data_kind == "auto" and cfg.data.endswith(".beton"))


def data_workers(cfg: Config) -> int:
    """Loader workers per process: ``--workers``, or for -1 (the default) the cores this
    process may use shared among the processes of this machine."""
    from .data.decode_once import default_workers

    return cfg.workers if cfg.workers >= 0 else default_workers()


def build_data(cfg: Config, dist_info: DistInfo, device: torch.device):
    """The training source and its loader (call ``set_epoch`` on the loader every epoch)."""
    from .data.sources import open_source

    try:
        source = open_source(cfg.data, split="train", kind=cfg.data_kind,
                             preload=cfg.in_memory and cfg.augment == "pil" and not _is_beton(cfg))
    except FileNotFoundError as exc:
        if cfg.data_kind == "torchvision-cifar10":
            raise UsageError(f"{exc}. Either pass --data PATH (a CIFAR-10 zip of JPEGs, an "
                             "image folder or a .beton), or run once on a machine with internet "
                             "access so torchvision can download CIFAR-10") from None
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # no images, an unknown layout
        raise UsageError(str(exc)) from None
    need = cfg.global_batch(dist_info.world_size)
    if len(source) < need:
        raise UsageError(
            f"batch size {cfg.batch_size} x {dist_info.world_size} process(es) x {cfg.grad_accum} "
            f"accumulated needs at least {need} images, {cfg.data} has {len(source)}"
        )
    crop_args = dict(size_crops=cfg.size_crops, n_crops=cfg.n_crops, min_scale=cfg.min_scale_crops,
                     max_scale=cfg.max_scale_crops, blur_prob=cfg.blur_prob,
                     jitter_strength=cfg.jitter_strength)
    from .data.batched_multicrop import training_crop_dtype

    workers = data_workers(cfg)
    if dist_info.is_main:
        log.info("data loader: %d workers per process (%s)", workers,
                 f"--workers={cfg.workers}" if cfg.workers >= 0 else
                 "the cores per process of this machine; set with --workers")
    if _is_beton(cfg):
        from .data.ffcv_loader import build_ffcv_multicrop_loader

        loader = build_ffcv_multicrop_loader(  # logs which decoder runs
            source.path, cfg.batch_size, **crop_args, channels_last=use_channels_last(cfg, device),
            out_dtype=training_crop_dtype(device.type), rank=dist_info.rank,
            world_size=dist_info.world_size, seed=cfg.seed, device=device,
            num_workers=max(workers, 1))
        return source, loader
    if cfg.augment == "batched":
        from .data.batched_multicrop import BatchedMultiCrop
        from .data.resident import ResidentImages, ResidentMultiCropLoader

        try:
            images = ResidentImages.from_source(source, device=device)
        except ValueError as exc:  # not one readable image
            raise UsageError(str(exc)) from None
        augment = BatchedMultiCrop(**crop_args, channels_last=use_channels_last(cfg, device),
                                   out_dtype=training_crop_dtype(device.type))
        loader = ResidentMultiCropLoader(images, augment, cfg.batch_size, seed=cfg.seed,
                                         rank=dist_info.rank, world_size=dist_info.world_size,
                                         device=device)
        return source, loader

    from .data.loader import MultiCropDataset, build_pretrain_loader
    from .data.multicrop import MultiCropTransform

    dataset = MultiCropDataset(source, MultiCropTransform(**crop_args))
    loader = build_pretrain_loader(
        dataset, batch_size=cfg.batch_size, num_workers=workers, seed=cfg.seed,
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
        return knn_eval(
            unwrap(model).trunk, train, test, image_size=max(cfg.size_crops), k=cfg.knn_k,
            temperature=cfg.knn_temperature, batch_size=256, device=device,
            max_train=cfg.knn_max_train or None, max_test=cfg.knn_max_test or None,
            num_workers=min(data_workers(cfg), 4),
        )
    except (ValueError, FileNotFoundError) as exc:  # unlabelled images, say: train anyway
        log.warning("kNN evaluation skipped: %s", exc)
        return None


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


def wrap_ddp(cfg: Config, model: nn.Module, device: torch.device) -> nn.Module:
    kwargs = dict(bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=True)
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def run(cfg: Config, preset_name: str = DEFAULT_PRESET, resume: bool = True) -> dict:
    """Train as ``cfg`` says; returns a summary (final loss, kNN figures, run folder).

    Raises :class:`fastswav.faults.Preempted` after saving a checkpoint on SIGTERM/SIGUSR1,
    and :class:`fastswav.faults.Diverged` when the loss becomes non-finite.
    """
    start_autograd_engine()  # before the memory estimate: see fastswav/autograd_engine.py
    device = select_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    set_phase("the join of the process group")
    try:
        dist_info = init_distributed(device.type, cfg.dist_timeout_s)
    except (RuntimeError, TimeoutError) as exc:
        if not is_collective_failure(exc) and not isinstance(exc, TimeoutError):
            raise
        rank = int(os.environ.get("RANK", 0))
        raise PeerFailed(f"rank {rank} could not join the process group within "
                         f"{cfg.dist_timeout_s:g} s (dist_timeout_s): "
                         f"{(str(exc).strip().splitlines() or [''])[0][:240]}", report=True) from None
    failed = False
    try:
        return _run(cfg, preset_name, resume, device, dist_info)
    except Exception as exc:
        if dist_info.enabled and is_collective_failure(exc):
            failed = True  # the group is broken: tearing it down could wait on the lost peer
            raise peer_failure(dist_info, exc) from None
        raise
    finally:
        if not failed:
            shutdown(dist_info)


@dataclass
class _Loop:
    """What the epoch loop needs, built once by :func:`_run`."""
    cfg: Config
    model: nn.Module
    step: TrainStep
    criterion: SwAVLoss
    loader: object
    iters_per_epoch: int
    lrs: Tuple[float, float, float]
    device: torch.device
    dist_info: DistInfo
    log: RunLog
    nonfinite: NonFiniteTracker
    preemption: PreemptionHandler
    window: ProfileWindow
    queue: Optional[FeatureQueue] = None
    collapse_from: int = 0  # first iteration at which collapse is looked for
    first_step_seconds: Optional[float] = None
    warned_room: bool = False  # the run folder's free space was found short once
    progress_lines: Optional[bool] = None  # plain lines instead of a bar (None: decide)
    iterations_timed: int = 0  # steps this launch has run, for the ETA
    started: float = 0.0  # perf_counter when this launch's first step began


def _free_text(folder: Path) -> str:
    try:
        return f"{free_bytes(folder):,} bytes free"
    except OSError:
        return "free space unknown"


def _checkpoint_bytes(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer,
                      queue_len: int, world_size: int) -> int:
    """About the bytes one checkpoint takes on disk, with every rank's queue file: weights,
    optimiser state (before the first step: one momentum buffer per parameter)."""
    model_bytes = state_nbytes(model.state_dict())
    optimizer_bytes = state_nbytes(optimizer.state_dict()["state"]) or sum(
        p.numel() * p.element_size() for p in model.parameters())
    queue_bytes = len(cfg.crops_for_assign) * queue_len * cfg.out_dim * 4 * world_size
    return model_bytes + optimizer_bytes + queue_bytes


def find_resume_state(cfg: Config, run_dir: Path, dist_info: DistInfo, device: torch.device):
    """The checkpoint to resume from and its contents, ``(None, None)`` for a fresh start.

    The main process takes the newest checkpoint that loads, moving damaged ones aside (one
    warning line each); the others then load the same file. Raises :class:`UsageError`
    (one line, exit status 2) when no checkpoint loads, or when ``cfg`` differs from the
    folder's recipe (``config.json``) in a field that changes shapes or the schedule; fields
    that may change on resume are logged.
    """
    # Rank 0 decides (it renames damaged files) and tells the others: the same checkpoint
    # on every rank, or the same one-line error, printed by rank 0 alone.
    decision = None
    if dist_info.is_main:
        remove_stale_temporaries(run_dir)  # of writes cut short by a killed process
        try:
            ckpt, state = find_resumable(run_dir, map_location=device)
            decision = ("resume", ckpt.name if ckpt is not None else None)
        except NoReadableCheckpoint as exc:
            decision = ("error", str(exc))
    set_phase("the choice of the checkpoint to resume from")
    decision = decided_by_main(dist_info, decision)
    if decision[0] == "error":
        raise UsageError(decision[1])
    if not dist_info.is_main:
        ckpt = run_dir / decision[1] if decision[1] is not None else None
        state = load_checkpoint(ckpt, map_location=device) if ckpt is not None else None
    if ckpt is None:
        return None, None
    saved_file = run_dir / "config.json"
    saved = None
    if saved_file.is_file():
        try:
            saved = json.loads(saved_file.read_text())
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): comparing with the checkpoint's own config", saved_file, exc)
    if not isinstance(saved, dict):
        saved = state.get("config") or {}
    blocking, allowed = resume_differences(saved, cfg, int(state.get("world_size") or 0),
                                           dist_info.world_size)
    if blocking:
        raise UsageError(
            f"{run_dir} was trained with a different recipe ({'; '.join(blocking)}), and "
            f"{ckpt.name} cannot continue with these settings: start over with --no-resume, "
            "or use a new --output-dir")
    if allowed and dist_info.is_main:
        log.info("resuming with changed settings: %s", "; ".join(allowed))
    return ckpt, state


def check_memory(cfg: Config, device: torch.device, dist_info: DistInfo) -> None:
    """Log the per-process memory estimate; on a GPU it cannot hold, stop before the first
    step with one line (a UsageError)."""
    from .memory import device_capacity, does_not_fit, estimate, gib

    est = estimate(cfg, dist_info.world_size, device.type)
    capacity = device_capacity(device)
    if dist_info.is_main:
        where = f" of {gib(capacity[1])} on {capacity[0]}" if capacity else ""
        print(f"memory estimate: {gib(est.total)} per process{where} ({gib(est.activations)} "
              f"activations for {est.batch} images per micro-batch)", flush=True)
    refusal = does_not_fit(est, cfg, capacity) if capacity else None
    if refusal:
        raise UsageError(refusal)


def _run(cfg: Config, preset_name: str, resume: bool, device: torch.device, dist_info: DistInfo) -> dict:
    run_dir = Path(cfg.output_dir)
    main = dist_info.is_main
    check_memory(cfg, device, dist_info)  # before anything is written
    # Before config.json is rewritten: it holds the recipe the checkpoints were trained with.
    ckpt, state = find_resume_state(cfg, run_dir, dist_info, device) if resume else (None, None)
    if not resume and main:
        previous = set_aside_previous(run_dir)
        if previous is not None:
            log.warning("--no-resume: the checkpoints already in %s were moved to %s", run_dir, previous)
    failure = None
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        except OSError as exc:
            failure = (f"cannot write {run_dir / 'config.json'} ({exc.strerror or exc}): "
                       f"{_free_text(run_dir)}")
    failure = agree_on_error(dist_info, failure)  # also the barrier after the set-aside
    if failure is not None:
        raise DiskFull(failure)
    if main:
        fields_text = " ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in sorted(cfg.to_dict().items()))
        print(f"fastswav: preset {preset_name}, {dist_info.world_size} process(es) on {device}; "
              f"run folder {run_dir}\nconfig: " + textwrap.fill(fields_text, 100, subsequent_indent="  "),
              flush=True)
    if device.type == "cuda":
        # Fixed multi-crop shapes: let cuDNN time its algorithms once per shape (official too).
        torch.backends.cudnn.benchmark = True
    set_phase("the set-up of the model and data")
    seed_everything(cfg.seed)
    window = parse_window(cfg.profile)
    enable_nvtx(cfg.nvtx or window is not None)

    source, loader = build_data(cfg, dist_info, device)
    iters_per_epoch = len(source) // cfg.global_batch(dist_info.world_size)
    if cfg.steps_per_epoch:
        iters_per_epoch = min(iters_per_epoch, cfg.steps_per_epoch)
    base_lr, final_lr, start_warmup = scaled_lr(cfg, dist_info.world_size)

    model = build_model(cfg).to(device)
    if ckpt is None and cfg.init_from:  # a new run from pretrained weights, not a resume
        try:
            loaded = init_model_from(model, cfg.init_from)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--init_from: {exc}") from None
        if main:
            print("\n".join(loaded), flush=True)
    if use_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and cfg.sync_bn and dist_info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(
            model, process_group=sync_bn_group(dist_info, cfg.sync_bn_group_size))
    optimizer = build_optimizer(cfg, model, base_lr)
    criterion = SwAVLoss(cfg.total_crops, cfg.crops_for_assign, cfg.temperature, cfg.epsilon,
                         cfg.sinkhorn_iterations, precision=cfg.loss_precision)
    queue_len = process_queue_length(cfg, dist_info.world_size)
    queue: Optional[FeatureQueue] = None

    start_epoch, start_step, knn_init = 0, 0, None
    last_loss = float("nan")  # the mean loss of the last epoch trained
    if ckpt is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()
            raise UsageError(
                f"{ckpt} does not fit this model or optimiser ({first[0] if first else exc}"
                f"{' ...' if len(first) > 1 else ''}): start over with --no-resume, or use a "
                "new --output-dir") from None
        start_epoch, start_step = state["epoch"], state.get("step", 0)
        knn_init = state.get("knn_init")
        # Re-running a finished run trains nothing; its summary still gives the loss.
        last_loss = state.get("last_epoch_loss", last_loss)
        queue_file = queue_path(run_dir, start_epoch, dist_info.rank, start_step)
        if queue_len and queue_file.exists():
            queue = FeatureQueue(len(cfg.crops_for_assign), queue_len, cfg.out_dim, device=device)
            try:
                queue.load_state_dict(load_checkpoint(queue_file, map_location=device))
            except Exception as exc:  # noqa: BLE001 (damaged, or another process count)
                log.warning("saved queue %s not used (%s): the queue starts empty and fills "
                            "again", queue_file, str(exc).strip().splitlines()[0][:200])
                queue = FeatureQueue(len(cfg.crops_for_assign), queue_len, cfg.out_dim,
                                     device=device)
        elif queue_len and start_epoch > cfg.epoch_queue_starts:
            log.warning("no saved queue %s: the queue starts empty and fills again", queue_file)
        if main:
            where = f"epoch {start_epoch} done" + (f" and {start_step} steps" if start_step else "")
            print(f"resumed from {ckpt} ({where})", flush=True)
        state = None  # the loaded tensors now live in the model and optimiser
    run_log = RunLog(run_dir, main, cfg.tensorboard)
    if ckpt is None and cfg.knn_at_end:
        knn_init = knn_accuracy(cfg, model, device)
        if main and knn_init is not None:
            print(f"kNN top-1 at initialisation: {knn_init:.2f}%", flush=True)
            run_log.write(event="knn", epoch=0, knn_top1=knn_init)

    checkpoint_bytes = _checkpoint_bytes(cfg, model, optimizer, queue_len, dist_info.world_size)
    if main:
        kept = cfg.keep_checkpoints + 1 if cfg.keep_checkpoints else cfg.epochs - start_epoch + 1
        warning = check_room(run_dir, checkpoint_bytes, kept)
        if warning:
            log.warning(warning)

    if dist_info.enabled:
        model = wrap_ddp(cfg, model, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    if cfg.compile != "none" and main:
        print(f"torch.compile mode {cfg.compile}: the first steps of each shape compile", flush=True)
    loop = _Loop(cfg=cfg, model=model, step=TrainStep(model, criterion, optimizer, autocast, cfg.compile),
                 criterion=criterion, loader=loader, iters_per_epoch=iters_per_epoch,
                 lrs=(base_lr, final_lr, start_warmup), device=device, dist_info=dist_info,
                 log=run_log, nonfinite=NonFiniteTracker(device), preemption=PreemptionHandler(),
                 window=ProfileWindow(window, device), queue=queue,
                 collapse_from=max(cfg.freeze_prototypes_niters, cfg.warmup_epochs * iters_per_epoch))

    def save(epochs_done: int, steps_done: int) -> Path:
        """Checkpoint (and this rank's queue) after ``epochs_done`` epochs + ``steps_done``."""
        loop.nonfinite.check(dist_info.enabled)  # never save a diverged model
        state = {"epoch": epochs_done, "step": steps_done, "model": unwrap(model).state_dict(),
                 "optimizer": optimizer.state_dict(), "config": cfg.to_dict(), "knn_init": knn_init,
                 "last_epoch_loss": last_loss, "world_size": dist_info.world_size}
        path = checkpoint_path(run_dir, epochs_done, steps_done)
        set_phase(f"the write of {path.name}")
        # Queue files first: a checkpoint that exists always has its queues beside it. A
        # failed write (disk full) on any rank stops every rank, reported once.
        failure = None
        if loop.queue is not None:
            try:
                save_checkpoint(loop.queue.state_dict(),
                                queue_path(run_dir, epochs_done, dist_info.rank, steps_done))
            except DiskFull as exc:
                failure = str(exc)
        failure = agree_on_error(dist_info, failure)
        if failure is None and main:
            try:
                save_checkpoint(state, path)
            except DiskFull as exc:
                failure = str(exc)
        failure = agree_on_error(dist_info, failure)
        if failure is not None:
            raise DiskFull(failure)
        prune_checkpoints(run_dir, cfg.keep_checkpoints, dist_info.rank)
        if main and not loop.warned_room:
            size = path.stat().st_size + max(0, checkpoint_bytes - state_nbytes(state))  # + queues
            free = free_bytes(run_dir)
            if free < size:
                loop.warned_room = True
                log.warning("%s has %s bytes free, less than the %s bytes the next checkpoint "
                            "needs: the run will stop with exit status 74 at the next save "
                            "unless space is freed", run_dir, f"{free:,}", f"{size:,}")
        return path

    train_start = time.perf_counter()
    try:
        with loop.preemption:
            for epoch in range(start_epoch, cfg.epochs):
                first = start_step if epoch == start_epoch else 0
                # Reseed per epoch so that a resumed run draws the same augmentations.
                seed_everything(cfg.seed + 1000 * epoch + dist_info.rank)
                if queue_len and epoch >= cfg.epoch_queue_starts and loop.queue is None:
                    loop.queue = FeatureQueue(len(cfg.crops_for_assign), queue_len, cfg.out_dim,
                                              device=device)
                model.train()
                loader.set_epoch(epoch, start_batch=first * cfg.grad_accum)
                last_loss, stopped_at = _train_epoch(loop, epoch, first)
                if stopped_at is not None:
                    raise Preempted(save(epoch, stopped_at), loop.preemption.signal_name)
                path = save(epoch + 1, 0)
                if epoch + 1 < cfg.epochs and loop.preemption.should_stop(dist_info.enabled, device):
                    raise Preempted(path, loop.preemption.signal_name)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # Training alone (this launch): data, steps and checkpoints, no kNN evaluation.
        summary = {"run_dir": str(run_dir), "loss": last_loss, "knn_init": knn_init,
                   "knn_trained": None, "first_step_seconds": loop.first_step_seconds,
                   "train_seconds": time.perf_counter() - train_start}
        if cfg.knn_at_end:
            knn_trained = knn_accuracy(cfg, model, device)
            summary["knn_trained"] = knn_trained
            if main and knn_trained is not None:
                run_log.write(event="knn", epoch=cfg.epochs, knn_top1=knn_trained)
                init_text = f"{knn_init:.2f}%" if knn_init is not None else "n/a"
                print(f"kNN top-1: init {init_text} -> trained {knn_trained:.2f}%", flush=True)
            if main:
                title = f"{run_dir.name}: {cfg.arch}"
                if knn_trained is not None:
                    title += f", kNN top-1 {init_text} -> {knn_trained:.2f}%"
                summary["neighbors_png"] = _neighbor_picture(cfg, model, device, run_dir, title)
        return summary
    finally:
        loop.window.close()
        run_log.close()


def _neighbor_picture(cfg: Config, model: nn.Module, device: torch.device, run_dir: Path,
                      title: str) -> Optional[str]:
    """RUN/neighbors.png (see :func:`fastswav.plot.neighbor_grid`); a failure is a warning."""
    from .plot import NEIGHBORS_NAME, neighbor_grid

    try:
        path = neighbor_grid(cfg, unwrap(model).trunk, run_dir / NEIGHBORS_NAME,
                             max_memory=min(cfg.knn_max_train or 5000, 5000), device=device,
                             title=title)
    except Exception as exc:  # noqa: BLE001 (a picture is never worth the run's result)
        log.warning("neighbour picture not written: %s", str(exc).strip().splitlines()[0][:200])
        return None
    print(f"nearest neighbours by the trained and the untrained trunk: {path}", flush=True)
    return str(path)


def _code_entropy(loop: _Loop, embeddings: torch.Tensor) -> float:
    """Code entropy / ln K of the first assigned crop (a collective under DDP)."""
    cfg = loop.cfg
    batch = embeddings.shape[0] // cfg.total_crops
    crop = cfg.crops_for_assign[0]
    z = F.normalize(embeddings[crop * batch:(crop + 1) * batch].float(), dim=1)
    c = F.normalize(unwrap(loop.model).prototypes.weight.detach().float(), dim=1)
    codes = swav_codes(z @ c.t(), cfg.epsilon, cfg.sinkhorn_iterations)
    return code_entropy_ratio(codes)


def _next_micro_batches(loop: _Loop, batches) -> Optional[list]:
    """The ``grad_accum`` multi-crop batches of one optimizer step, on the device, as
    ``(crops, n_skipped)`` pairs; None when the loader runs out first."""
    cfg, device = loop.cfg, loop.device
    micro_batches = []
    for _ in range(cfg.grad_accum):
        with nvtx_range("data"):
            try:
                crops, n_skipped = next(batches)
            except StopIteration:
                return None
        with nvtx_range("h2d"):
            crops = [c.to(device, non_blocking=True) for c in crops]
            if use_channels_last(cfg, device):
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        micro_batches.append((crops, n_skipped))
    return micro_batches


def _train_epoch(loop: _Loop, epoch: int, first_step: int) -> Tuple[float, Optional[int]]:
    """Steps ``first_step..`` of ``epoch``. Returns (mean logged loss, None), or
    (that, steps done) when a preemption signal asks to stop mid-epoch."""
    from tqdm import tqdm

    cfg, dist_info, device = loop.cfg, loop.dist_info, loop.device
    base_lr, final_lr, start_warmup = loop.lrs
    if loop.progress_lines is None:
        loop.progress_lines = not sys.stdout.isatty()
    # A redrawn bar is for a terminal; a log file (SLURM, nohup, CI) gets one plain line per
    # log step instead of every redraw joined by carriage returns.
    bar = tqdm(total=loop.iters_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               unit="step", disable=not dist_info.is_main or loop.progress_lines,
               dynamic_ncols=True, file=sys.stdout)
    total_iterations = cfg.epochs * loop.iters_per_epoch
    images, skipped, tick, loss_sum, loss_count = 0, 0, time.perf_counter(), 0.0, 0
    warned_collapse = False
    batches = iter(loop.loader)
    for step_in_epoch in range(first_step, loop.iters_per_epoch):
        iteration = epoch * loop.iters_per_epoch + step_in_epoch
        set_phase(f"iteration {iteration + 1} (epoch {epoch + 1}, step {step_in_epoch + 1})")
        loop.window.before_iteration(iteration)
        micro_batches = _next_micro_batches(loop, batches)
        if micro_batches is None:
            break
        lr = learning_rate(iteration, loop.iters_per_epoch, cfg.epochs, base_lr, final_lr,
                           cfg.warmup_epochs, start_warmup)
        step_start = time.perf_counter() if loop.first_step_seconds is None else None
        loss, embeddings = loop.step([crops for crops, _ in micro_batches], loop.queue, lr,
                                     iteration < cfg.freeze_prototypes_niters)
        loop.nonfinite.update(loss, iteration)
        if step_start is not None:  # includes compilation when compiling
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the step's work, not the host's enqueueing
            loop.first_step_seconds = time.perf_counter() - step_start
        images += sum(crops[0].shape[0] for crops, _ in micro_batches) * dist_info.world_size
        skipped += sum(int(n) for _, n in micro_batches)
        bar.update(1)
        if loop.iterations_timed == 0:
            loop.started = time.perf_counter()
        loop.iterations_timed += 1
        log_step = (step_in_epoch + 1) % cfg.log_every == 0 or step_in_epoch + 1 == loop.iters_per_epoch
        if log_step:
            loop.nonfinite.check(dist_info.enabled)  # the host sync, every log_every steps
            value = loss.item()
            loss_sum, loss_count = loss_sum + value, loss_count + 1
            rate = images / (time.perf_counter() - tick)
            entropy = _code_entropy(loop, embeddings)
            if (iteration >= loop.collapse_from and not warned_collapse and dist_info.is_main
                    and looks_collapsed(value, entropy, cfg.n_prototypes)):
                warned_collapse = True
                log.warning("iteration %d: loss %.3f ~ ln K = %.3f with near-uniform codes "
                            "(entropy %.2f of the maximum): training looks collapsed; try a "
                            "lower learning rate, a longer prototype freeze or a smaller epsilon",
                            iteration, value, math.log(cfg.n_prototypes), entropy)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.1f}")
            if loop.progress_lines and dist_info.is_main:
                print(_progress_line(loop, epoch, step_in_epoch, iteration, total_iterations,
                                     value, lr, rate), flush=True)
            loop.log.write(event="step", epoch=epoch, iteration=iteration, loss=value, lr=lr,
                           img_per_s=rate, code_entropy=entropy,
                           queue=None if loop.queue is None else bool(loop.queue.is_full()))
        # Signals are checked every step alone, at log steps (a collective) with several processes.
        if (log_step or not dist_info.enabled) and step_in_epoch + 1 < loop.iters_per_epoch \
                and loop.preemption.should_stop(dist_info.enabled, device):
            bar.close()
            return loss_sum / max(loss_count, 1), step_in_epoch + 1
    bar.close()
    if skipped:
        log.warning("epoch %d: skipped %d unreadable image(s)", epoch + 1, skipped)
    mean = loss_sum / max(loss_count, 1)
    loop.log.write(event="epoch", epoch=epoch + 1, loss=mean, skipped_images=skipped,
                   seconds=time.perf_counter() - tick)
    return mean, None


def _progress_line(loop: _Loop, epoch: int, step_in_epoch: int, iteration: int,
                   total_iterations: int, loss: float, lr: float, rate: float) -> str:
    """One log line: where the run is, how fast, and the time left at this launch's pace
    (the first step, which may compile, is left out of the pace once there are others)."""
    eta = "?"
    timed = loop.iterations_timed - 1
    if timed > 0:
        per_step = (time.perf_counter() - loop.started) / timed
        left = per_step * (total_iterations - iteration - 1)
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 \
            else f"{left / 86400:.1f} d"
    return (f"epoch {epoch + 1}/{loop.cfg.epochs} step {step_in_epoch + 1}/{loop.iters_per_epoch} "
            f"(iteration {iteration + 1}/{total_iterations}): loss {loss:.4f} lr {lr:.4g} "
            f"{rate:.1f} img/s ETA {eta}")


def _reports() -> bool:
    """Whether this process prints the errors every process meets: rank 0 alone."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0


def _as_argument(name: str, value) -> str:
    """``--name=value`` as the command line writes it (lists comma-separated, booleans
    true/false)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = ",".join(map(str, value))
    else:
        text = str(value)
    return f"--{name}={text}"


def train(data: Optional[str] = None, preset: str = DEFAULT_PRESET,
          output_dir: Optional[str] = None, resume: bool = True, **fields) -> dict:
    """Train from Python, as ``python -m fastswav.train`` would with the same arguments.

    ``data``: training data (the preset's when None); ``preset``: the recipe to start from;
    ``output_dir``: the run folder (default ``runs/<preset>``); ``resume``: continue from the
    latest checkpoint in it; ``fields``: any config field (``epochs=2, arch="timm/..."``).
    Returns the run's summary: ``run_dir``, final ``loss``, ``knn_init`` and ``knn_trained``
    (None without kNN), ``train_seconds``, ``first_step_seconds``. Bad input raises
    ValueError (:class:`UsageError`) with the command line's message; a diverged or
    preempted run raises :class:`fastswav.faults.Diverged` / ``Preempted``.
    """
    argv = ["--preset", preset]
    if data is not None:
        argv += ["--data", os.fspath(data)]
    if output_dir is not None:
        argv += ["--output-dir", os.fspath(output_dir)]
    if not resume:
        argv.append("--no-resume")
    argv += [_as_argument(name, value) for name, value in fields.items()]
    cfg, preset_name, resume = parse_args(argv)
    return run(cfg, preset_name, resume)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # With several processes each of these is met by every rank alike and printed once.
    try:
        cfg, preset_name, resume = parse_args(argv)
        run(cfg, preset_name, resume)
    except UsageError as exc:  # the same in every restart: said once per launch
        line = f"error: {exc}"
        _report(line, _reports() and not said_before(line))
        return 2
    except Diverged as exc:
        _report(f"error: {exc}", _reports())
        return EXIT_DIVERGED
    except DiskFull as exc:
        _report(f"error: {exc}", _reports())
        return EXIT_DISK_FULL
    except PeerFailed as exc:
        _report(f"error: {exc}", exc.report)
        return EXIT_PEER_FAILED
    except Preempted as exc:
        _report(f"fastswav: {exc}", _reports())
        return EXIT_PREEMPTED
    return 0


def _report(line: str, reporter: bool) -> None:
    if reporter:
        print(line, file=sys.stderr, flush=True)


make_callable(__name__)  # fastswav.train(...) runs train() above

if __name__ == "__main__":
    sys.exit(main())
