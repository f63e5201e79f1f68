"""Weighted k-nearest-neighbour evaluation of trunk features (InstDisc / DINO style).

Features of the training split are the memory, features of the test split the queries; both
are L2-normalised, so a dot product is the cosine similarity. Each query's k most similar
memory images vote for their labels with weight exp(similarity / T); the class with the most
weight is the prediction. k=20 and T=0.07 are the usual settings.

Command line (prints ``kNN top-1: X%``)::

    python -m fastswav.eval.knn --checkpoint path/to/checkpoint.pt \\
        --data download:cifar10 --max-train 10000 --max-test 2000
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fastswav.cli import UsageParser, fail
from fastswav.data.sources import ImageSource, UnreadableImageError
from fastswav.eval.common import add_probe_arguments, open_probe_inputs

log = logging.getLogger("fastswav")

# Queries per similarity chunk are chosen so a chunk's [queries, memory] matrix stays near this
# many elements (128 MiB in fp32): 50,000 memory images -> 671 queries at a time.
_CHUNK_ELEMENTS = 2**25


class _EvalImages(Dataset):
    """(transformed image, label, readable) for the chosen indices of a source or dataset."""

    def __init__(self, data, transform: Optional[Callable], indices: Optional[Sequence[int]]):
        self.data = data
        self.transform = transform
        self.indices = list(range(len(data))) if indices is None else [int(i) for i in indices]
        self._placeholder = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            if isinstance(self.data, ImageSource):
                image, label = self.data.load(index)
            else:
                image, label = self.data[index]
        except UnreadableImageError as err:
            log.warning("kNN: skipping unreadable image %s", err)
            return None, -1, False
        tensor = self.transform(image) if self.transform is not None else image
        return tensor, int(label), True


def _collate_readable(batch):
    """Drops unreadable images; None when the whole batch was unreadable."""
    kept = [(x, y) for x, y, ok in batch if ok]
    if not kept:
        return None
    return torch.stack([x for x, _ in kept]), torch.tensor([y for _, y in kept])


@torch.no_grad()
def extract_features(trunk: torch.nn.Module, data, transform: Optional[Callable],
                     batch_size: int = 256, device="cpu", num_workers: int = 0,
                     indices: Optional[Sequence[int]] = None):
    """Trunk features of the images of ``data``, L2-normalised, and their labels.

    data: an image source (``load(i) -> (PIL image, label)``) or a dataset whose items are
    ``(image, label)``; transform: applied to each image (None when items are tensors already);
    trunk outputs [B, D] (or [B, C, H, W], which is average-pooled);
    indices: which images (all by default). Unreadable images are skipped.
    Returns (features float32 [N, D] on ``device``, labels int64 [N] on ``device``). The trunk
    runs in eval mode and is put back in its previous mode afterwards.
    """
    device = torch.device(device)
    loader = DataLoader(_EvalImages(data, transform, indices), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=_collate_readable)
    was_training = trunk.training
    trunk.eval()
    features, labels = [], []
    try:
        for batch in loader:
            if batch is None:
                continue
            images, batch_labels = batch
            output = trunk(images.to(device, non_blocking=True))
            if output.dim() == 4:  # a trunk that stops before global pooling
                output = output.mean(dim=(2, 3))
            features.append(F.normalize(output.flatten(1).float(), dim=1))
            labels.append(batch_labels.to(device))
    finally:
        trunk.train(was_training)
    if not features:
        raise ValueError("no readable image to extract features from")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                test_features: torch.Tensor, k: int = 20, temperature: float = 0.07,
                n_classes: Optional[int] = None, chunk_size: Optional[int] = None):
    """Predicted class of each query by weighted kNN.

    train_features [N, D], test_features [M, D]: L2-normalised rows; train_labels [N] in
    [0, n_classes). Queries are processed ``chunk_size`` at a time (by default sized so the
    similarity block has about 2**25 elements). Ties in the vote go to the lower class index.
    Returns int64 [M].
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels have different lengths")
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training image")
    if int(train_labels.min()) < 0:
        raise ValueError("kNN needs labelled training images (found label -1)")
    if n_classes is None:
        n_classes = int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    if chunk_size is None:
        chunk_size = max(1, min(4096, _CHUNK_ELEMENTS // train_features.shape[0]))
    train_labels = train_labels.to(train_features.device)
    predictions = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = test_features[start:start + chunk_size].to(train_features)
        similarity = queries @ train_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(queries.shape[0], n_classes, dtype=weights.dtype,
                            device=weights.device)
        votes.scatter_add_(1, train_labels[top_index], weights)
        predictions.append(votes.argmax(dim=1))
    if not predictions:
        return torch.empty(0, dtype=torch.int64, device=train_features.device)
    return torch.cat(predictions)


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor,
             test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
             temperature: float = 0.07, n_classes: Optional[int] = None,
             chunk_size: Optional[int] = None) -> float:
    """Top-1 accuracy (percent) of weighted kNN; see :func:`knn_predict`."""
    if test_features.shape[0] != test_labels.shape[0]:
        raise ValueError("test_features and test_labels have different lengths")
    if test_features.shape[0] == 0:
        raise ValueError("kNN needs at least one test image")
    predictions = knn_predict(train_features, train_labels, test_features, k, temperature,
                              n_classes, chunk_size)
    correct = (predictions.cpu() == test_labels.cpu()).sum().item()
    return 100.0 * correct / test_features.shape[0]


def balanced_subset(labels, max_count: Optional[int]) -> list:
    """Indices of at most ``max_count`` images, as class-balanced as the data allows.

    Deterministic: classes are visited in label order, round-robin, each contributing its
    images in their order in the source (the first image of every class, then the second, ...),
    and the first ``max_count`` picks are kept, returned in source order. None keeps all.
    """
    labels = np.asarray(labels)
    if max_count is None or max_count >= len(labels):
        return list(range(len(labels)))
    if max_count < 1:
        raise ValueError(f"subset size must be >= 1, got {max_count}")
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    # Rank of each image inside its class; sorting by (rank, class) is the round-robin order.
    rank = np.empty(len(labels), dtype=np.int64)
    class_position = np.empty(len(labels), dtype=np.int64)
    for position, members in enumerate(per_class):
        rank[members] = np.arange(len(members))
        class_position[members] = position
    order = np.lexsort((class_position, rank))
    return sorted(order[:max_count].tolist())


def _test_labels_in_train_classes(train_source, test_source, test_labels: torch.Tensor):
    """Test labels re-expressed in the training source's class numbering (matched by name);
    test classes missing from the training split become -1, which never matches."""
    if list(train_source.classes) == list(test_source.classes):
        return test_labels
    index = {name: i for i, name in enumerate(train_source.classes)}
    mapping = torch.tensor([index.get(name, -1) for name in test_source.classes],
                           device=test_labels.device)
    return mapping[test_labels]


def knn_eval(trunk: torch.nn.Module, train_source: ImageSource, test_source: ImageSource,
             image_size: int, k: int = 20, temperature: float = 0.07, batch_size: int = 256,
             device="cpu", max_train: Optional[int] = None, max_test: Optional[int] = None,
             num_workers: int = 0, transform: Optional[Callable] = None) -> float:
    """kNN top-1 (percent) of ``trunk``: train split as memory, test split as queries.

    max_train / max_test: use a deterministic, class-balanced subset of that many images
    (:func:`balanced_subset`), so repeated evaluations (before and after training) see the
    same images. transform: defaults to ``eval_transform(image_size)`` (ImageNet
    normalisation); pass the one matching the pretraining normalisation if it differs.
    """
    from fastswav.data.multicrop import eval_transform

    for name, source in (("training", train_source), ("test", test_source)):
        if len(source.classes) == 0 or int(np.min(source.labels)) < 0:
            raise ValueError(f"kNN needs labelled images; the {name} images in {source.path} "
                             "have no labels")
    if (train_source.path == test_source.path and train_source.split == test_source.split):
        log.warning("kNN: %s has no separate test split; queries are training images",
                    test_source.path)
    if transform is None:
        transform = eval_transform(image_size)
    train_features, train_labels = extract_features(
        trunk, train_source, transform, batch_size, device, num_workers,
        balanced_subset(train_source.labels, max_train))
    test_features, test_labels = extract_features(
        trunk, test_source, transform, batch_size, device, num_workers,
        balanced_subset(test_source.labels, max_test))
    test_labels = _test_labels_in_train_classes(train_source, test_source, test_labels)
    return knn_top1(train_features, train_labels, test_features, test_labels, k, temperature,
                    n_classes=len(train_source.classes))


def _parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python -m fastswav.eval.knn",
        description=(
            "Weighted kNN top-1 of a pretrained trunk: features of the training images are "
            "the memory, each test image is classified by its k most cosine-similar memory "
            "images, each voting for its label with weight exp(similarity / temperature). "
            "Prints 'kNN top-1: X%'."),
        epilog=(
            "Data layouts: an image folder root/<class>/<image> (with train/ and test/ or val/ "
            "subfolders for the two splits), a zip laid out the same way, a torchvision "
            "CIFAR-10 folder, or download:cifar10 (torchvision's CIFAR-10 in the download "
            "cache). Example: "
            "python -m fastswav.eval.knn --checkpoint path/to/checkpoint.pt "
            "--data download:cifar10 --max-train 10000 --max-test 2000"),
    )
    add_probe_arguments(parser, "split used as the kNN memory (default: train)",
                        "split used as queries (default: test; val where there is no test)")
    parser.add_argument("--k", type=int, default=20, help="neighbours per query (default: 20)")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="vote weight is exp(similarity / temperature) (default: 0.07)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per feature-extraction batch (default: 256)")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use a fixed class-balanced subset of this many memory images")
    parser.add_argument("--max-test", type=int, default=None,
                        help="use a fixed class-balanced subset of this many test images")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader worker processes for decoding (default: 0)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("k", "batch_size", "max_train", "max_test"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.temperature <= 0:
        fail(f"--temperature must be > 0, got {args.temperature}")
    if args.num_workers < 0:
        fail(f"--num-workers must be >= 0, got {args.num_workers}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_source, test_source, trunk, image_size, device = open_probe_inputs(args, "kNN")
    try:
        top1 = knn_eval(trunk, train_source, test_source, image_size, k=args.k,
                        temperature=args.temperature, batch_size=args.batch_size, device=device,
                        max_train=args.max_train, max_test=args.max_test,
                        num_workers=args.num_workers)
    except ValueError as err:  # no readable image, no shared class
        fail(err)
    print(f"kNN top-1: {top1:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
