"""Train a tiny network with fastswav's SwAVLoss in a plain PyTorch loop.

Only the loss comes from fastswav: the network, the data, the augmentation and the loop are
the user's. The data are synthetic 16x16 images of a few classes (a random template per
class, under heavy per-image noise, shifts and brightness changes), so the script needs no
download and runs in seconds on a CPU:

    python examples/train_with_swavloss.py            # about 20 s on one CPU core
    python examples/train_with_swavloss.py --steps 50 --batch-size 32

The labels are never used for training; at the end a weighted kNN on the trunk's features
shows whether SwAV learned features that separate the classes (it prints the accuracy before
and after training).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from fastswav import SwAVLoss
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fastswav import SwAVLoss
from fastswav.eval.knn import knn_top1


def make_templates(n_classes: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """One smooth random pattern [3, size, size] per class, of zero mean per channel (so
    the classes differ in their spatial structure, not in their average colour, which a
    random network's pooled features already separate)."""
    coarse = torch.randn(n_classes, 3, 4, 4, generator=generator)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return templates - templates.mean(dim=(2, 3), keepdim=True)


def make_dataset(templates: torch.Tensor, n_images: int, generator: torch.Generator):
    """Images [N, 3, size, size] and labels [N]: a class template plus noise, each image
    shifted and scaled in brightness."""
    n_classes = templates.shape[0]
    labels = torch.randint(n_classes, (n_images,), generator=generator)
    images = templates[labels]
    shifts = torch.randint(-2, 3, (n_images, 2), generator=generator)
    images = torch.stack([img.roll(tuple(s.tolist()), dims=(1, 2)) for img, s in zip(images, shifts)])
    brightness = 0.6 + 0.8 * torch.rand(n_images, 1, 1, 1, generator=generator)
    noise = 0.8 * torch.randn(images.shape, generator=generator)
    return images * brightness + noise, labels


def random_view(images: torch.Tensor, crop: int, out: int) -> torch.Tensor:
    """One augmented view per image: random crop of ``crop`` pixels resized to ``out``,
    random horizontal flip, per-image brightness and contrast jitter, fresh noise."""
    n, _, size, _ = images.shape
    top, left = torch.randint(0, size - crop + 1, (2,)).tolist()  # one crop box per batch: cheap
    view = images[:, :, top:top + crop, left:left + crop]
    if crop != out:
        view = F.interpolate(view, size=(out, out), mode="bilinear", align_corners=False)
    flip = torch.rand(n) < 0.5
    view = torch.where(flip.view(n, 1, 1, 1), view.flip(3), view)
    mean = view.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1)
    brightness = 0.3 * torch.randn(n, 1, 1, 1)
    return (view - mean) * contrast + mean + brightness + 0.3 * torch.randn_like(view)


class TinyNet(nn.Module):
    """Conv trunk (any input size, global average pool) -> MLP head -> embedding."""

    def __init__(self, width: int = 32, out_dim: int = 32):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(2 * width, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                  nn.Linear(128, out_dim))

    def forward(self, x):
        return self.head(self.trunk(x))


@torch.no_grad()
def knn_accuracy(net: TinyNet, train_x, train_y, test_x, test_y) -> float:
    net.eval()
    train_f = F.normalize(net.trunk(train_x), dim=1)
    test_f = F.normalize(net.trunk(test_x), dim=1)
    net.train()
    return knn_top1(train_f, train_y, test_f, test_y, k=20, temperature=0.07)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a tiny conv net with fastswav.SwAVLoss on synthetic images in a "
                    "plain PyTorch loop, and print kNN accuracy before and after.")
    parser.add_argument("--steps", type=int, default=120, help="training steps (default: 120)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    parser.add_argument("--n-prototypes", type=int, default=32, help="prototypes K (default: 32)")
    parser.add_argument("--n-classes", type=int, default=8,
                        help="classes of the synthetic data (default: 8)")
    parser.add_argument("--freeze-prototypes", type=int, default=20,
                        help="steps before the prototypes start to learn (default: 20)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default: 1; on tensors this small, more threads "
                             "mostly add synchronisation cost)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2")

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads))
    generator = torch.Generator().manual_seed(args.seed)
    templates = make_templates(args.n_classes, 16, generator)
    train_x, train_y = make_dataset(templates, 2048, generator)
    test_x, test_y = make_dataset(templates, 512, generator)

    net = TinyNet()
    prototypes = nn.Linear(32, args.n_prototypes, bias=False)  # K x D weights, no bias
    # 2 large views (14 px crops at 16) and 2 small ones (8 px crops at 8), large first:
    # crops_for_assign=(0, 1) are the two large views, whose codes the others predict.
    n_large, n_small = 2, 2
    criterion = SwAVLoss(n_crops=n_large + n_small, crops_for_assign=(0, 1))
    optimizer = torch.optim.SGD(list(net.parameters()) + list(prototypes.parameters()),
                                lr=args.lr, momentum=0.9, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)

    print(f"kNN top-1 before training: {knn_accuracy(net, train_x, train_y, test_x, test_y):.1f}%")
    start = time.perf_counter()
    for step in range(args.steps):
        batch = train_x[torch.randint(len(train_x), (args.batch_size,))]
        views = ([random_view(batch, 14, 16) for _ in range(n_large)]
                 + [random_view(batch, 8, 8) for _ in range(n_small)])
        # One trunk pass per resolution; embeddings stacked crop-major: [n_crops * B, D].
        embeddings = torch.cat([net(torch.cat(views[:n_large])), net(torch.cat(views[n_large:]))])
        with torch.no_grad():  # keep prototype rows on the unit sphere, as the official code
            prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))
        loss = criterion(embeddings, prototypes.weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step < args.freeze_prototypes:  # let the embeddings settle before the prototypes move
            prototypes.weight.grad = None
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    seconds = time.perf_counter() - start
    after = knn_accuracy(net, train_x, train_y, test_x, test_y)
    print(f"kNN top-1 after training: {after:.1f}% ({args.steps} steps in {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
