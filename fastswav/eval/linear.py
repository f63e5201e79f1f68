"""Linear probe: a linear classifier trained on frozen trunk features.

Two modes:

- ``fast`` (small data such as CIFAR-10): the trunk runs once over every image (deterministic
  eval transform, :func:`fastswav.eval.knn.extract_features`), the cached features are
  standardised with the training split's mean and std, and a linear softmax classifier is
  fitted to them full-batch with L-BFGS (a convex problem, so a few hundred iterations reach
  the optimum, deterministically). With several weight decays, each is scored on a held-out
  part of the training split and the best one is refitted on all of it. Minutes on a CPU for
  CIFAR-10; not the published protocol, so figures are close to but not the same as it.
- ``official`` (ImageNet-scale data): the SwAV ``eval_linear.py`` recipe. Frozen trunk in eval
  mode, a BN-free ``Linear`` on its average-pooled features (weights N(0, 0.01), bias 0),
  cross-entropy, SGD lr 0.3 momentum 0.9 weight decay 1e-6, cosine to 0 over 100 epochs
  (stepped per epoch), batch 256; train images RandomResizedCrop(size) + horizontal flip,
  test images Resize(256) + CenterCrop(224) (for size 224), ImageNet normalisation. Every
  epoch runs the trunk over augmented images again, so it is slow: a GPU job.

Command line (prints ``linear top-1: X%``)::

    python -m fastswav.eval.linear --checkpoint runs/demo/checkpoint_epoch0006.pt \\
        --data download:cifar10
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fastswav.cli import UsageParser, fail
from fastswav.data.sources import ImageSource
from fastswav.eval.common import add_probe_arguments, open_probe_inputs
from fastswav.eval.knn import (_collate_readable, _EvalImages, _test_labels_in_train_classes,
                               balanced_subset, extract_features)

log = logging.getLogger("fastswav")

MODES = ("auto", "fast", "official")
# auto picks the fast mode up to this many training images: CIFAR-10 (50,000) and similar fit
# their cached features in memory many times over; ImageNet (1.28 M) gets the official recipe.
FAST_MODE_MAX_IMAGES = 200_000
DEFAULT_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3)


# ----------------------------------------------------------------------------- fast mode

def standardize(train_features: torch.Tensor, *others: torch.Tensor):
    """Features shifted and scaled per dimension by the training split's mean and std.

    A fixed affine map: the best linear classifier is the same up to reparametrisation, but
    L-BFGS converges much faster on unit-scale inputs. Constant dimensions are left at 0.
    """
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0).clamp_min(1e-6)
    return tuple((f - mean) / std for f in (train_features, *others))


def train_linear_classifier(features: torch.Tensor, labels: torch.Tensor, n_classes: int,
                            weight_decay: float = 1e-4, steps: int = 300) -> nn.Linear:
    """Multinomial logistic regression on ``features`` [N, D] fitted full-batch by L-BFGS.

    Minimises mean cross-entropy + weight_decay / 2 * ||W||^2 (the bias is not decayed), for at
    most ``steps`` L-BFGS iterations with a strong-Wolfe line search. Deterministic: starts
    from zero weights. Returns the classifier (float32, on the features' device).
    """
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError("features must be [N, D] with one label per row")
    if features.shape[0] == 0:
        raise ValueError("the linear probe needs at least one training feature")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    features = features.float()
    labels = labels.to(features.device)
    classifier = nn.Linear(features.shape[1], n_classes).to(features.device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1.0, max_iter=steps,
                                  history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(features), labels)
        loss = loss + 0.5 * weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # one call runs up to max_iter iterations
    return classifier.requires_grad_(False)


@torch.no_grad()
def top1_accuracy(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 65536) -> float:
    """Percent of rows whose argmax logit is their label (labels of -1 never match)."""
    if features.shape[0] == 0:
        raise ValueError("accuracy needs at least one test feature")
    correct = 0
    for start in range(0, features.shape[0], batch_size):
        logits = classifier(features[start:start + batch_size].float())
        correct += (logits.argmax(dim=1).cpu() == labels[start:start + batch_size].cpu()).sum().item()
    return 100.0 * correct / features.shape[0]


def fast_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor,
                      test_features: torch.Tensor, test_labels: torch.Tensor, n_classes: int,
                      weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, steps: int = 300,
                      val_fraction: float = 0.1, seed: int = 0) -> Dict[str, object]:
    """Linear probe on cached features; see the module docstring ("fast").

    With more than one weight decay, a seeded random ``val_fraction`` of the training
    features is held out, each decay is fitted on the rest and scored on it, and the best
    (ties: the larger decay) is refitted on all training features.
    Returns {"top1": test accuracy in percent, "weight_decay": the decay used,
    "val_top1": {decay: held-out accuracy} (empty without a sweep)}.
    """
    weight_decays = sorted(set(float(w) for w in weight_decays))
    if not weight_decays:
        raise ValueError("weight_decays is empty")
    train_features, test_features = standardize(train_features.float(), test_features.float())
    val_scores: Dict[float, float] = {}
    chosen = weight_decays[0]
    if len(weight_decays) > 1:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        n = train_features.shape[0]
        n_val = max(1, int(round(n * val_fraction)))
        if n - n_val < 1:
            raise ValueError(f"too few training features ({n}) for a held-out split")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        order = order.to(train_features.device)
        val_idx, fit_idx = order[:n_val], order[n_val:]
        for decay in weight_decays:
            classifier = train_linear_classifier(train_features[fit_idx], train_labels[fit_idx],
                                                 n_classes, decay, steps)
            val_scores[decay] = top1_accuracy(classifier, train_features[val_idx],
                                              train_labels[val_idx])
            log.info("linear probe: weight decay %g -> held-out top-1 %.2f%%", decay,
                     val_scores[decay])
        best = max(val_scores.values())
        chosen = max(d for d, score in val_scores.items() if score == best)
    classifier = train_linear_classifier(train_features, train_labels, n_classes, chosen, steps)
    return {"top1": top1_accuracy(classifier, test_features, test_labels),
            "weight_decay": chosen, "val_top1": val_scores}


# ------------------------------------------------------------------------- official mode

def official_train_transform(image_size: int, mean=None, std=None):
    """RandomResizedCrop(image_size) + horizontal flip + ToTensor + Normalize (ImageNet
    statistics by default), the official linear-evaluation training augmentation."""
    from torchvision import transforms

    from fastswav.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean or IMAGENET_MEAN, std or IMAGENET_STD),
    ])


def _pooled(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    output = trunk(images)
    if output.dim() == 4:  # a trunk that stops before global pooling
        output = output.mean(dim=(2, 3))
    return output.flatten(1).float()


def official_linear_eval(trunk: nn.Module, train_source: ImageSource, test_source: ImageSource,
                         image_size: int, epochs: int = 100, batch_size: int = 256,
                         lr: float = 0.3, momentum: float = 0.9, weight_decay: float = 1e-6,
                         final_lr: float = 0.0, device="cpu", num_workers: int = 0,
                         max_train: Optional[int] = None, max_test: Optional[int] = None,
                         seed: int = 0, train_transform: Optional[Callable] = None,
                         test_transform: Optional[Callable] = None) -> float:
    """Top-1 (percent) of the official SwAV linear evaluation; see the module docstring.

    The trunk stays frozen in eval mode (its BN statistics are not updated); only the linear
    layer trains. max_train / max_test: fixed class-balanced subsets (for smoke runs).
    """
    from fastswav.data.multicrop import eval_transform

    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    device = torch.device(device)
    train_transform = train_transform or official_train_transform(image_size)
    test_transform = test_transform or eval_transform(image_size)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        _EvalImages(train_source, train_transform, balanced_subset(train_source.labels, max_train)),
        batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers,
        collate_fn=_collate_readable, pin_memory=device.type == "cuda", drop_last=False)
    test_loader = DataLoader(
        _EvalImages(test_source, test_transform, balanced_subset(test_source.labels, max_test)),
        batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_collate_readable, pin_memory=device.type == "cuda")

    was_training = trunk.training
    trunk.eval()  # frozen: BN statistics stay, and features are computed under no_grad
    with torch.no_grad():
        feat_dim = _pooled(trunk, torch.zeros(1, 3, image_size, image_size, device=device)).shape[1]
    n_classes = len(train_source.classes)
    classifier = nn.Linear(feat_dim, n_classes).to(device)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
    # Stepped once per epoch, as the official script's CosineAnnealingLR.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=final_lr)
    try:
        for epoch in range(epochs):
            classifier.train()
            tick, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
            for batch in train_loader:
                if batch is None:
                    continue
                images, labels = batch
                with torch.no_grad():
                    features = _pooled(trunk, images.to(device, non_blocking=True))
                loss = F.cross_entropy(classifier(features), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += labels.shape[0]
                loss_sum += loss.item()
                steps += 1
            scheduler.step()
            log.info("linear epoch %d/%d: loss %.4f, %.1f images/s", epoch + 1, epochs,
                     loss_sum / max(steps, 1), seen / (time.perf_counter() - tick))
        classifier.eval()
        correct, total = 0, 0
        with torch.no_grad():
            for batch in test_loader:
                if batch is None:
                    continue
                images, labels = batch
                labels = _test_labels_in_train_classes(train_source, test_source, labels)
                logits = classifier(_pooled(trunk, images.to(device, non_blocking=True)))
                correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
                total += labels.shape[0]
    finally:
        trunk.train(was_training)
    if total == 0:
        raise ValueError("no readable test image")
    return 100.0 * correct / total


def fast_linear_eval(trunk: nn.Module, train_source: ImageSource, test_source: ImageSource,
                     image_size: int, weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
                     steps: int = 300, val_fraction: float = 0.1, batch_size: int = 256,
                     device="cpu", num_workers: int = 0, max_train: Optional[int] = None,
                     max_test: Optional[int] = None, seed: int = 0,
                     transform: Optional[Callable] = None) -> Dict[str, object]:
    """Fast-mode linear probe of ``trunk`` on two image sources (features extracted once with
    ``eval_transform(image_size)``); returns :func:`fast_linear_probe`'s dict."""
    from fastswav.data.multicrop import eval_transform

    transform = transform or eval_transform(image_size)
    train_features, train_labels = extract_features(
        trunk, train_source, transform, batch_size, device, num_workers,
        balanced_subset(train_source.labels, max_train))
    test_features, test_labels = extract_features(
        trunk, test_source, transform, batch_size, device, num_workers,
        balanced_subset(test_source.labels, max_test))
    test_labels = _test_labels_in_train_classes(train_source, test_source, test_labels)
    return fast_linear_probe(train_features, train_labels, test_features, test_labels,
                             len(train_source.classes), weight_decays, steps, val_fraction, seed)


# --------------------------------------------------------------------------- command line

def _float_list(text: str):
    try:
        values = tuple(float(p) for p in text.replace(" ", ",").split(",") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 or not math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python -m fastswav.eval.linear",
        description=(
            "Linear probe of a pretrained trunk: a linear classifier on frozen trunk features, "
            "trained on the training split and scored on the test split. Prints "
            "'linear top-1: X%%'. Mode 'fast' extracts features once and fits a logistic "
            "regression on them with L-BFGS (weight decay picked on a held-out tenth of the "
            "training split); mode 'official' runs the SwAV eval_linear recipe (SGD lr 0.3, "
            "momentum 0.9, weight decay 1e-6, cosine over 100 epochs, batch 256, "
            "RandomResizedCrop + flip, test Resize 256 + CenterCrop 224), which is a GPU job "
            "at ImageNet scale. 'auto' picks fast up to %d training images." % FAST_MODE_MAX_IMAGES),
        epilog=(
            "Data: an image folder root/<class>/<image> (with train/ and test/ or val/ "
            "subfolders), a zip laid out the same way, a torchvision CIFAR-10 folder, "
            "download:cifar10 (torchvision's CIFAR-10 in the download cache), or an FFCV .beton "
            "of the training split (the test split's file found by name; its images decoded "
            "with numpy and PIL, no FFCV loader needed). Example: python -m fastswav.eval.linear "
            "--checkpoint runs/demo/checkpoint_epoch0006.pt --data download:cifar10"),
    )
    add_probe_arguments(parser, "split the classifier trains on (default: train)",
                        "split it is scored on (default: test; val where there is no test)")
    parser.add_argument("--mode", default="auto", choices=MODES,
                        help="fast, official, or auto (fast for small data; default)")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use a fixed class-balanced subset of this many training images")
    parser.add_argument("--max-test", type=int, default=None,
                        help="use a fixed class-balanced subset of this many test images")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per batch: feature extraction (fast) or SGD (official); "
                             "default 256")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader worker processes for decoding (default: 0)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the held-out split (fast) or the shuffling (official)")
    fast = parser.add_argument_group("fast mode")
    fast.add_argument("--steps", type=int, default=300,
                      help="L-BFGS iterations per fit (default: 300)")
    fast.add_argument("--weight-decays", type=_float_list, default=DEFAULT_WEIGHT_DECAYS,
                      help="comma-separated L2 penalties to choose from on held-out data; one "
                           "value skips the sweep (default: %s)"
                           % ",".join(map(str, DEFAULT_WEIGHT_DECAYS)))
    fast.add_argument("--val-fraction", type=float, default=0.1,
                      help="share of the training split held out for the sweep (default: 0.1)")
    official = parser.add_argument_group("official mode")
    official.add_argument("--epochs", type=int, default=100, help="epochs (default: 100)")
    official.add_argument("--lr", type=float, default=0.3, help="SGD learning rate (default: 0.3)")
    official.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    official.add_argument("--weight-decay", type=float, default=1e-6,
                          help="SGD weight decay (default: 1e-6)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("batch_size", "max_train", "max_test", "steps", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_workers < 0:
        fail(f"--num-workers must be >= 0, got {args.num_workers}")
    if not 0 < args.val_fraction < 1:
        fail(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    if args.lr <= 0 or args.weight_decay < 0:
        fail("--lr must be > 0 and --weight-decay >= 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_source, test_source, trunk, image_size, device = open_probe_inputs(
        args, "the linear probe")
    n_train = min(len(train_source), args.max_train or len(train_source))
    mode = args.mode
    if mode == "auto":
        mode = "fast" if n_train <= FAST_MODE_MAX_IMAGES else "official"
    log.info("linear probe: %s mode, %d training images, image size %d", mode, n_train, image_size)
    try:
        if mode == "fast":
            result = fast_linear_eval(
                trunk, train_source, test_source, image_size, weight_decays=args.weight_decays,
                steps=args.steps, val_fraction=args.val_fraction, batch_size=args.batch_size,
                device=device, num_workers=args.num_workers, max_train=args.max_train,
                max_test=args.max_test, seed=args.seed)
            top1 = result["top1"]
            log.info("linear probe: weight decay %g", result["weight_decay"])
        else:
            top1 = official_linear_eval(
                trunk, train_source, test_source, image_size, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                weight_decay=args.weight_decay, device=device, num_workers=args.num_workers,
                max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    except ValueError as err:  # no readable image, no shared class
        fail(err)
    print(f"linear top-1: {top1:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
