"""What the evaluation CLIs (kNN, linear probe) share: their data and checkpoint arguments,
and opening those with one-line errors."""
from __future__ import annotations

import argparse
import os

import torch

from fastswav.cli import fail

DATA_KINDS = ("auto", "folder", "zip", "torchvision-cifar10", "beton")
SPLITS = ("train", "val", "test")


def add_probe_arguments(parser: argparse.ArgumentParser, train_split_help: str,
                        test_split_help: str) -> None:
    """--checkpoint, --data, --kind, --train-split and --test-split."""
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint written by fastswav.train (its trunk is evaluated), or its "
                             "run folder (the latest checkpoint)")
    parser.add_argument("--data", default=None,
                        help="image folder, zip of images, torchvision CIFAR-10 folder, "
                             "download:cifar10 (torchvision's CIFAR-10 in the download cache), "
                             "or an FFCV .beton of the training split (the test split's file is "
                             "found by its name: imagenet_train.beton -> imagenet_val.beton); "
                             "default: the data the checkpoint trained on, as its run recorded "
                             "it (after `make demo`, the demo's CIFAR-10)")
    parser.add_argument("--kind", default="auto", choices=DATA_KINDS,
                        help="how to read --data (default: auto, from the path)")
    parser.add_argument("--train-split", default="train", choices=SPLITS, help=train_split_help)
    parser.add_argument("--test-split", default="test", choices=SPLITS, help=test_split_help)


def open_probe_inputs(args: argparse.Namespace, what: str):
    """(train source, test source, trunk on the chosen device, image size, device) from the
    parsed arguments; exits with a one-line ``error:`` for a missing or unusable input.
    ``what`` names the evaluation in the message about unlabelled data."""
    from fastswav.data.sources import open_source, resolve_download
    from fastswav.embed import load_trunk  # lazy: the model module is heavier

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        trunk, image_size = load_trunk(args.checkpoint)
        if args.data is None:
            data, kind = trained_data(args.checkpoint)
        else:
            # download:cifar10, the demo's data, is torchvision's copy in the cache, as in training.
            data, kind = resolve_download(args.data, args.kind)
        train_source = open_source(data, args.train_split, kind)
        test_source = open_source(data, args.test_split, kind)
        for name, source in (("training", train_source), ("test", test_source)):
            if len(source.classes) == 0 or int(source.labels.min()) < 0:
                raise ValueError(f"{what} needs labelled images; the {name} images "
                                 f"in {source.path} have no labels")
    except (FileNotFoundError, ValueError) as err:
        fail(err)
    return train_source, test_source, trunk.to(device), image_size, device


def trained_data(checkpoint):
    """``(path, kind)`` of the data the run of ``checkpoint`` (a file or its run folder)
    trained on, as its config recorded it; FileNotFoundError naming --data when that path is
    not here (a relative path is read from the current folder, as the run read it)."""
    from fastswav.checkpoint import load_checkpoint
    from fastswav.embed import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    config = load_checkpoint(path, map_location="cpu")["config"]
    data, kind = config.get("data") or "", config.get("data_kind", "auto")
    if not data or (kind != "torchvision-cifar10" and not os.path.exists(data)):
        raise FileNotFoundError(f"{path} trained on {data or 'no recorded data'}, which is not "
                                "here: pass --data PATH")
    return data, kind
