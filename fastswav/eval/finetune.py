"""Semi-supervised fine-tuning: the whole network trained on 1 % or 10 % of the labels.

The recipe of the SwAV paper's semi-supervised table (the official ``eval_semisup.py``), the
defaults here: a new linear layer on the pooled trunk features, the whole network trained
with cross-entropy for 20 epochs, batch 32 per process (256 over 8 GPUs), SGD momentum 0.9,
no weight decay, learning rate 0.01 for the trunk and 0.2 for the new layer, both multiplied
by 0.2 at epochs 12 and 16; training images RandomResizedCrop + horizontal flip, test images
Resize(256) + CenterCrop(224) (for 224-pixel crops; smaller images scale alike), ImageNet
normalisation; SyncBatchNorm across CUDA processes. Every epoch ends with top-1/top-5 on the
test split; the best epoch's pair is the result (paper, 800 epochs of pretraining: 53.9 %
top-1 with 1 % of ImageNet's labels, 70.2 % with 10 %).

The labelled subset: on ImageNet-named data (files ``n01440764_10026.JPEG``) the list of
SimCLR (``1percent.txt`` / ``10percent.txt``, one file name a line; pass its path with
``--subset-file``, nothing is downloaded); elsewhere a seeded class-balanced draw of that
share of every class. Either way the names used are written to ``subset.txt`` in the run
folder, which ``--subset-file`` takes back to repeat the run.

The run folder holds ``log.jsonl`` (one record per epoch: loss, top-1, top-5, learning
rates; a last record with the best), ``results.json``, the checkpoint of the last finished
epoch (a rerun of the same command resumes from it) and ``finetuned_torchvision.pt``: the
fine-tuned network's state dict under torchvision's key names, the new layer as ``fc``.

Command line::

    python -m fastswav.eval.finetune --checkpoint swav_800ep_pretrain.pth.tar \\
        --data /data/imagenet --labels-percent 10 --subset-file 10percent.txt
    torchrun --nproc_per_node=8 -m fastswav.eval.finetune ...      # 8 GPUs, batch 256
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from fastswav.cli import UsageParser, fail

log = logging.getLogger("fastswav")

SUBSET_NAME = "subset.txt"
MODEL_NAME = "finetuned_torchvision.pt"
RESULTS_NAME = "results.json"
LOG_NAME = "log.jsonl"
# An ImageNet training file name, as the SimCLR subset lists hold them.
_IMAGENET_NAME = re.compile(r"^n\d{8}_\d+\.JPEG$")


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning recipe; every field is a command-line option (``--name value``)."""

    checkpoint: str = field(default="", metadata={"help": "pretrained weights: a fastswav checkpoint or run folder, an official SwAV checkpoint (swav_800ep_pretrain.pth.tar), or a torchvision ResNet state dict"})
    data: str = field(default="", metadata={"help": "labelled images: image folder or zip (root/<split>/<class>/<image>), torchvision CIFAR-10 folder, download:cifar10, or an FFCV .beton of the training split (the test split's file found by name)"})
    labels_percent: float = field(default=10.0, metadata={"help": "share of the training labels used, in percent (the paper: 1 or 10)"})
    subset_file: str = field(default="", metadata={"help": "file of image names to train on, one a line: SimCLR's 1percent.txt / 10percent.txt on ImageNet (required there), or a run's subset.txt to repeat it"})
    output_dir: str = field(default="", metadata={"help": "run folder (default runs/finetune_<percent>pct)"})
    kind: str = field(default="auto", metadata={"help": "how to read --data: auto | folder | zip | beton | torchvision-cifar10"})
    train_split: str = field(default="train", metadata={"help": "split the subset is drawn from"})
    test_split: str = field(default="val", metadata={"help": "split scored every epoch (val, or test where there is no val)"})
    epochs: int = field(default=20, metadata={"help": "epochs"})
    batch_size: int = field(default=32, metadata={"help": "images per process per step (official: 32 on each of 8 GPUs)"})
    lr: float = field(default=0.01, metadata={"help": "learning rate of the trunk"})
    lr_head: float = field(default=0.2, metadata={"help": "learning rate of the new linear layer"})
    decay_epochs: Tuple[int, ...] = field(default=(12, 16), metadata={"help": "epochs after which both learning rates are multiplied by gamma (comma-separated)"})
    gamma: float = field(default=0.2, metadata={"help": "learning-rate decay factor"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay"})
    image_size: int = field(default=0, metadata={"help": "crop size (0: the size the trunk was pretrained at: 224 for official weights)"})
    sync_bn: bool = field(default=True, metadata={"help": "SyncBatchNorm across CUDA processes"})
    seed: int = field(default=31, metadata={"help": "seed of the subset draw, the new layer's initialisation and the augmentations"})
    workers: int = field(default=4, metadata={"help": "data loader worker processes per process"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    steps_per_epoch: int = field(default=0, metadata={"help": "cap on steps per epoch (0: the whole subset; for smoke runs)"})
    max_test: int = field(default=0, metadata={"help": "score a fixed class-balanced subset of this many test images (0: all)"})
    log_every: int = field(default=50, metadata={"help": "steps between progress lines"})

    def __post_init__(self):
        if not self.checkpoint or not self.data:
            raise ValueError("fine-tuning needs --checkpoint and --data")
        if not 0 < self.labels_percent <= 100:
            raise ValueError(f"labels_percent must lie in (0, 100], got {self.labels_percent}")
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("image_size", "workers", "steps_per_epoch", "max_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and self.lr_head > 0 and self.gamma > 0):
            raise ValueError("lr, lr_head and gamma must be > 0")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")
        if any(e < 1 for e in self.decay_epochs) or list(self.decay_epochs) != sorted(self.decay_epochs):
            raise ValueError(f"decay_epochs must be increasing epochs >= 1, got {self.decay_epochs}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}


# Fields a resumed run may change: they alter neither the subset nor the optimisation.
_RESUME_MAY_CHANGE = {"output_dir", "workers", "device", "log_every", "checkpoint", "data", "kind"}


# ---------------------------------------------------------------------------- the subset

def is_imagenet_named(names: Sequence[str], sample: int = 100) -> bool:
    """Whether the images carry ImageNet training file names (``n01440764_10026.JPEG``)."""
    picked = names[:: max(1, len(names) // sample)][:sample]
    return bool(picked) and all(_IMAGENET_NAME.match(os.path.basename(n)) for n in picked)


def read_subset_file(path, names: Sequence[str]) -> List[int]:
    """Indices of the images a subset file lists (one name a line: a file name, as in the
    SimCLR lists, or a name as ``subset.txt`` writes it). ValueError when a listed image is
    not in the data, or when the file lists nothing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file not found: {path}")
    wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wanted:
        raise ValueError(f"subset file {path} lists no image")
    by_name = {n: i for i, n in enumerate(names)}
    by_base: Dict[str, int] = {}
    for i, n in enumerate(names):
        by_base.setdefault(os.path.basename(n), i)
    indices, missing = [], []
    for name in wanted:
        index = by_name.get(name, by_base.get(os.path.basename(name)))
        (missing.append(name) if index is None else indices.append(index))
    if missing:
        raise ValueError(f"subset file {path}: {len(missing)} of its {len(wanted)} images are "
                         f"not in the training data (first: {missing[0]})")
    return sorted(set(indices))


def draw_subset(labels, percent: float, seed: int) -> List[int]:
    """A seeded class-balanced draw: ``percent`` % of every class's images (at least one),
    chosen at random without replacement; the same seed gives the same indices."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = max(1, int(round(len(members) * percent / 100)))
        picked.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return sorted(np.concatenate(picked).tolist())


def choose_subset(source, cfg: FinetuneConfig) -> Tuple[List[int], str]:
    """(training indices, how they were chosen) for ``cfg``; see the module docstring."""
    names = [source.name(i) for i in range(len(source))]
    if cfg.subset_file:
        return read_subset_file(cfg.subset_file, names), f"listed in {cfg.subset_file}"
    if is_imagenet_named(names):
        raise ValueError(
            f"{source.path} holds ImageNet-named images: pass --subset-file with SimCLR's "
            f"{cfg.labels_percent:g}percent.txt (google-research/simclr, imagenet_subsets/) so "
            "that the run trains on the paper's subset")
    return (draw_subset(source.labels, cfg.labels_percent, cfg.seed),
            f"a class-balanced draw of {cfg.labels_percent:g} % with seed {cfg.seed}")


# ----------------------------------------------------------------------------- the model

class FinetuneNet(nn.Module):
    """The pretrained trunk and a new linear layer on its pooled features."""

    def __init__(self, trunk: nn.Module, feat_dim: int, n_classes: int):
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(feat_dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.trunk(images)
        if features.dim() == 4:  # a trunk that stops before global pooling
            features = features.mean(dim=(2, 3))
        return self.fc(features.flatten(1))


def torchvision_layout(net: FinetuneNet) -> Dict[str, torch.Tensor]:
    """The fine-tuned network's state dict under torchvision's key names: the trunk's own
    (a built-in ResNet's are torchvision's) and the new layer as ``fc.weight``/``fc.bias``,
    which ``torchvision.models.resnet50(num_classes=C)`` loads strictly."""
    state = {k: v.detach().cpu().clone() for k, v in net.trunk.state_dict().items()}
    state.update({f"fc.{k}": v.detach().cpu().clone() for k, v in net.fc.state_dict().items()})
    return state


@torch.no_grad()
def _feature_width(trunk: nn.Module, image_size: int) -> int:
    was_training = trunk.training
    trunk.eval()
    try:
        out = trunk(torch.zeros(1, 3, image_size, image_size))
    finally:
        trunk.train(was_training)
    return int(out.flatten(1).shape[1]) if out.dim() != 4 else int(out.shape[1])


# ---------------------------------------------------------------------------- the run

def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


def _all_sum(values: List[float], device, enabled: bool) -> List[float]:
    if not enabled:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(net: nn.Module, loader, device, distributed: bool, train_source,
             test_source) -> Tuple[float, float]:
    """(top-1, top-5) in percent over the loader's images, summed over all processes (test
    labels matched to the training classes by name)."""
    from fastswav.eval.knn import _test_labels_in_train_classes

    net.eval()
    correct1 = correct5 = total = 0
    for batch in loader:
        if batch is None:
            continue
        images, labels = batch
        labels = _test_labels_in_train_classes(train_source, test_source, labels)
        logits = net(images.to(device, non_blocking=True)).float().cpu()
        correct1 += _topk_correct(logits, labels, 1)
        correct5 += _topk_correct(logits, labels, 5)
        total += labels.shape[0]
    correct1, correct5, total = _all_sum([correct1, correct5, total], device, distributed)
    if total == 0:
        raise RuntimeError("no readable test image")
    return 100.0 * correct1 / total, 100.0 * correct5 / total


def _open_data(cfg: FinetuneConfig):
    from fastswav.data.sources import open_source, resolve_download

    data, kind = resolve_download(cfg.data, cfg.kind)
    train_source = open_source(data, cfg.train_split, kind)
    test_source = open_source(data, cfg.test_split, kind)
    for name, source in (("training", train_source), ("test", test_source)):
        if len(source.classes) == 0 or int(np.min(source.labels)) < 0:
            raise ValueError(f"fine-tuning needs labelled images; the {name} images in "
                             f"{source.path} have no labels")
    return train_source, test_source


def _write_json_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _resume_state(run_dir: Path, cfg: FinetuneConfig, main: bool):
    """The checkpoint to continue from, or None; ValueError when it was written by a run
    with another recipe."""
    from fastswav.checkpoint import find_resumable, latest_checkpoint

    if main:
        path, state = find_resumable(run_dir)
    else:
        path = latest_checkpoint(run_dir)
        state = None if path is None else torch.load(path, map_location="cpu", weights_only=True)
    if state is None:
        return None
    saved = state.get("config", {})
    changed = sorted(k for k, v in cfg.to_dict().items()
                     if k not in _RESUME_MAY_CHANGE and saved.get(k) != v)
    if changed:
        raise ValueError(f"{path} was written with other {', '.join(changed)}: use a new "
                         "--output-dir, or --no-resume to start over")
    return state


def finetune(checkpoint: str, data: str, labels_percent: float = 10.0, *,
             resume: bool = True, **fields) -> dict:
    """Fine-tune the trunk of ``checkpoint`` (any layout fastswav reads) on ``labels_percent``
    % of the labels of ``data``; see the module docstring. Keyword arguments are the
    fields of :class:`FinetuneConfig`. Returns the run's results (``best_top1``,
    ``best_top5``, ``best_epoch``, ``history``, the paths written). Raises
    FileNotFoundError/ValueError for bad input."""
    cfg = FinetuneConfig(checkpoint=str(checkpoint), data=str(data),
                         labels_percent=float(labels_percent), **fields)
    return run(cfg, resume)


def run(cfg: FinetuneConfig, resume: bool = True) -> dict:
    """Fine-tune as ``cfg`` says (see :func:`finetune`); joins the process group of
    torchrun where there is one."""
    from fastswav.distributed import init_distributed, shutdown
    from fastswav.embed import resolve_checkpoint
    from fastswav.official import read_pretrained, trunk_from

    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but no CUDA device is available")
    pretrained = read_pretrained(resolve_checkpoint(cfg.checkpoint))
    train_source, test_source = _open_data(cfg)
    subset, how = choose_subset(train_source, cfg)
    dist_info = init_distributed(device_type)
    try:
        device = torch.device(f"cuda:{dist_info.local_rank}" if device_type == "cuda" else "cpu")
        return _run(cfg, resume, pretrained, trunk_from(pretrained), train_source, test_source,
                    subset, how, dist_info, device)
    finally:
        shutdown(dist_info)


def _run(cfg, resume, pretrained, trunk, train_source, test_source, subset, how, dist_info,
         device) -> dict:
    from fastswav.checkpoint import checkpoint_path, prune_checkpoints, save_checkpoint
    from fastswav.data.multicrop import eval_transform
    from fastswav.distributed import barrier
    from fastswav.eval.knn import _collate_readable, _EvalImages, balanced_subset
    from fastswav.eval.linear import official_train_transform

    main = dist_info.is_main
    run_dir = Path(cfg.output_dir or f"runs/finetune_{cfg.labels_percent:g}pct")
    image_size = cfg.image_size or pretrained.image_size
    n_classes = len(train_source.classes)
    subset_names = [train_source.name(i) for i in subset]

    state = _resume_state(run_dir, cfg, main) if resume and run_dir.is_dir() else None
    if state is not None and state["subset"] != subset_names:
        raise ValueError(f"the checkpoint in {run_dir} trained on another subset than "
                         f"{how}: use a new --output-dir, or --no-resume to start over")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            (run_dir / LOG_NAME).unlink(missing_ok=True)
        (run_dir / SUBSET_NAME).write_text("".join(n + "\n" for n in subset_names))
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        print(f"fine-tuning {pretrained.path} ({pretrained.layout} layout, {pretrained.config.arch}) "
              f"on {len(subset)} of {len(train_source)} training images ({how}; names in "
              f"{run_dir / SUBSET_NAME}), {n_classes} classes, {cfg.epochs} epochs, "
              f"{dist_info.world_size} process(es) on {device}", flush=True)
    barrier(dist_info)

    torch.manual_seed(cfg.seed)  # the new layer's initialisation
    net = FinetuneNet(trunk, _feature_width(trunk, image_size), n_classes).to(device)
    if device.type == "cuda" and cfg.sync_bn and dist_info.enabled:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = torch.optim.SGD(
        [{"params": list(net.trunk.parameters())},
         {"params": list(net.fc.parameters()), "lr": cfg.lr_head}],
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.decay_epochs), cfg.gamma)
    start_epoch, best, history = 0, {"top1": -1.0, "top5": 0.0, "epoch": 0}, []
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        if main:
            print(f"resumed from {run_dir} ({start_epoch} epochs done)", flush=True)
        state = None
    model = net
    if dist_info.enabled:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    train_set = _EvalImages(train_source, official_train_transform(image_size), subset)
    sampler = DistributedSampler(train_set, num_replicas=dist_info.world_size,
                                 rank=dist_info.rank, shuffle=True, seed=cfg.seed)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                              num_workers=cfg.workers, collate_fn=_collate_readable,
                              pin_memory=pin, persistent_workers=False)
    test_indices = balanced_subset(test_source.labels, cfg.max_test or None)
    test_set = _EvalImages(test_source, eval_transform(image_size),
                           test_indices[dist_info.rank::dist_info.world_size])
    test_loader = DataLoader(test_set, batch_size=cfg.batch_size * 2, shuffle=False,
                             num_workers=cfg.workers, collate_fn=_collate_readable, pin_memory=pin)
    steps = len(train_loader)
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        # Augmentations drawn from a seed per epoch and process: a resumed run repeats them.
        torch.manual_seed(cfg.seed + 1000 * (epoch + 1) + dist_info.rank)
        model.train()
        tick = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        lrs = [group["lr"] for group in optimizer.param_groups]
        for step, batch in enumerate(train_loader):
            if step >= steps:
                break
            if batch is None:
                continue
            images, labels = batch
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Summed on the device: no host sync per step, only at the progress lines.
            loss_sum = loss_sum + loss.detach() * labels.shape[0]
            correct = correct + (logits.detach().argmax(dim=1) == labels).sum()
            seen += labels.shape[0]
            if main and (step + 1) % cfg.log_every == 0:
                print(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps}: loss "
                      f"{float(loss_sum) / seen:.4f}, {seen / (time.perf_counter() - tick):.1f} "
                      "images/s per process", flush=True)
        loss_sum, correct, seen = _all_sum([float(loss_sum), float(correct), seen], device,
                                           dist_info.enabled)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"the loss diverged in epoch {epoch + 1}: lower --lr/--lr-head")
        train_seconds = time.perf_counter() - tick
        top1, top5 = evaluate(net, test_loader, device, dist_info.enabled, train_source,
                              test_source)
        scheduler.step()
        if top1 > best["top1"]:
            best = {"top1": top1, "top5": top5, "epoch": epoch + 1}
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                  "train_top1": 100.0 * correct / max(seen, 1), "top1": top1, "top5": top5,
                  "lr_trunk": lrs[0], "lr_head": lrs[1], "train_images": int(seen),
                  "train_seconds": round(train_seconds, 2)}
        history.append(record)
        if main:
            _write_json_line(run_dir / LOG_NAME, record)
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}, test top-1 "
                  f"{top1:.2f}%, top-5 {top5:.2f}% (best top-1 {best['top1']:.2f}%)", flush=True)
            save_checkpoint({"epoch": epoch + 1, "model": net.state_dict(),
                             "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "best": best,
                             "history": history, "subset": subset_names,
                             "config": cfg.to_dict()},
                            checkpoint_path(run_dir, epoch + 1))
            prune_checkpoints(run_dir, keep=1, rank=0)
        barrier(dist_info)

    results = {"best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
               "labels_percent": cfg.labels_percent, "subset": how,
               "subset_images": len(subset), "train_images": len(train_source),
               "classes": list(train_source.classes), "checkpoint": str(pretrained.path),
               "layout": pretrained.layout, "image_size": image_size,
               "run_dir": str(run_dir), "subset_file": str(run_dir / SUBSET_NAME),
               "model": str(run_dir / MODEL_NAME), "history": history}
    if main:
        torch.save(torchvision_layout(net), run_dir / MODEL_NAME)
        _write_json_line(run_dir / LOG_NAME, {"event": "best", "epoch": best["epoch"],
                                              "top1": best["top1"], "top5": best["top5"]})
        (run_dir / RESULTS_NAME).write_text(
            json.dumps({k: v for k, v in results.items() if k != "history"}, indent=2) + "\n")
        print(f"fine-tuning with {cfg.labels_percent:g}% of the labels: best top-1 "
              f"{best['top1']:.2f}%, top-5 {best['top5']:.2f}% (epoch {best['epoch']}); "
              f"model in {run_dir / MODEL_NAME}", flush=True)
    return results


# --------------------------------------------------------------------------- command line

def _parse_value(f: dataclasses.Field, text: str):
    if f.type in ("bool", bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if "Tuple" in str(f.type):
        try:
            return tuple(int(p) for p in text.replace(" ", ",").split(",") if p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    kind = {"int": int, "float": float}.get(str(f.type), str)
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python -m fastswav.eval.finetune",
        description=(
            "Fine-tune a pretrained trunk and a new linear layer on 1 % or 10 % of the "
            "training labels, with the SwAV paper's semi-supervised recipe as defaults "
            "(20 epochs, batch 32 per process, SGD momentum 0.9, no weight decay, lr 0.01 "
            "trunk / 0.2 new layer, x0.2 after epochs 12 and 16, RandomResizedCrop + flip, "
            "test Resize + CenterCrop). Prints top-1/top-5 on the test split every epoch "
            "and the best at the end; writes log.jsonl, results.json, subset.txt and the "
            "fine-tuned network in torchvision layout (finetuned_torchvision.pt) to the run "
            "folder. A rerun of the same command resumes."),
        epilog=(
            "Checkpoints: fastswav's, the official SwAV ones (swav_800ep_pretrain.pth.tar, "
            "module.-prefixed, bare or under state_dict) and torchvision ResNet state dicts. "
            "On ImageNet pass SimCLR's list: --subset-file 10percent.txt. Several GPUs: "
            "torchrun --nproc_per_node=8 -m fastswav.eval.finetune ... Example: python -m "
            "fastswav.eval.finetune --checkpoint runs/demo --data download:cifar10 "
            "--labels-percent 10"),
    )
    for f in fields(FinetuneConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(*flags, dest=f.name, default=default, metavar=f.name.upper(),
                            type=lambda text, f=f: _parse_value(f, text),
                            help=f"{f.metadata['help']} (default: {shown!s})"
                            .replace("%", "%%"))
    parser.add_argument("--no-resume", action="store_true",
                        help="start over even where the run folder holds a checkpoint")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = vars(_parser().parse_args(argv))
    resume = not args.pop("no_resume")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = FinetuneConfig(**args)
        run(cfg, resume)
    except (FileNotFoundError, ValueError) as err:
        fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
