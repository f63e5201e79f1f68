"""Export a pretrained trunk as a plain torchvision or timm state dict.

A fastswav checkpoint holds the whole SwAV model (trunk, projection head, prototypes) plus
the optimizer and the run's config. Downstream code usually wants only the trunk, under the
key names of a standard ResNet, so that::

    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(torch.load("trunk.pt"), strict=False)
    # missing == ["fc.weight", "fc.bias"], unexpected == []

The trunk of :class:`fastswav.model.SwAVModel` is a torchvision ``ResNet`` whose ``fc`` is an
``Identity``, so its keys already are torchvision's; timm's plain ResNets
(``resnet18/34/50/101/152``) use the same key names and shapes. Export therefore strips the
``trunk.`` prefix, drops the head and prototypes, and checks that the result loads into the
target constructor with only ``fc.*`` missing.

Trunks that a standard constructor cannot hold are refused: the small-image stem (3x3
stride-1 conv, no max-pool), a non-standard ``trunk_width`` and the SwAV wide nets
(``resnet50w2/w4/w5`` widen every stage, unlike torchvision's ``wide_resnet50_2``).

A ``torchvision/<name>`` or ``timm/<name>`` trunk (see :func:`fastswav.model.build_trunk`)
is already that library's model, less its classifier: it exports to its own library alone,
as a state dict that ``torchvision.models.get_model(name)`` loads with ``strict=False``
(only the classifier missing) and ``timm.create_model(name, num_classes=0)`` loads strictly
(constructor keywords of the arch, ``timm/vit_tiny_patch16_224:patch_size=8``, passed to
either again).

Command line::

    python -m fastswav.export runs/100ep/checkpoint_epoch0100.pt --to torchvision
    python -m fastswav.export runs/vit/checkpoint_epoch0006.pt      # a timm/ trunk: to timm
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from .cli import UsageParser, fail, load_error_detail

log = logging.getLogger("fastswav")

TARGETS = ("torchvision", "timm")
# Depths with a standard constructor of the same name in both torchvision and timm.
STANDARD_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_STANDARD_WIDTH = 64  # channels of the stem and first stage of every standard ResNet
_TRUNK_PREFIX = "trunk."
# State-dict keys of a classifier that the trunk does not have (fastswav.model drops it).
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "heads.", "head.", "aux1.", "aux2.", "AuxLogits.")


class ExportError(ValueError):
    """The checkpoint's trunk cannot be expressed as the requested target network."""


def _check_exportable(cfg, target: str) -> None:
    from .model import parse_arch

    library = parse_arch(cfg.arch)[0]
    if library:  # a torchvision or timm trunk: its own library's layout, nothing else
        if target != library:
            raise ExportError(f"arch {cfg.arch!r} is a {library} model: export it --to {library}")
        return
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}: expected one of {', '.join(TARGETS)}")
    if cfg.arch not in STANDARD_ARCHS:
        raise ExportError(
            f"arch {cfg.arch!r} has no {target} equivalent (the SwAV wide nets widen the stem "
            f"and every stage); exportable: {', '.join(STANDARD_ARCHS)}")
    if cfg.small_images:
        raise ExportError(
            f"the checkpoint's trunk has the small-image stem (3x3 stride-1 conv, no max-pool), "
            f"which {target} {cfg.arch} cannot hold")
    if cfg.trunk_width not in (0, _STANDARD_WIDTH):
        raise ExportError(
            f"the checkpoint's trunk has trunk_width={cfg.trunk_width}; {target} {cfg.arch} "
            f"needs the standard width {_STANDARD_WIDTH} (trunk_width 0)")


def target_constructor(arch: str, target: str):
    """A no-argument callable building ``arch`` (no pretrained weights) in ``target``'s
    library. Raises ImportError when timm is asked for and not installed.

    For a ``torchvision/<name>`` or ``timm/<name>`` arch: ``get_model(name, weights=None,
    **keywords)`` (with its classifier), ``timm.create_model(name, pretrained=False,
    num_classes=0, **keywords)`` (without)."""
    from .model import parse_arch

    library, name, kwargs = parse_arch(arch)
    if library == "torchvision":
        import torchvision.models

        return lambda: torchvision.models.get_model(name, weights=None, **kwargs)
    if library == "timm":
        import timm

        return lambda: timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if target == "torchvision":
        import torchvision.models

        return getattr(torchvision.models, arch)
    if target == "timm":
        import timm  # optional dependency

        return lambda: timm.create_model(arch, pretrained=False)
    raise ExportError(f"unknown export target {target!r}: expected one of {', '.join(TARGETS)}")


def trunk_state_dict(model_state: Dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The ``trunk.*`` entries of a SwAVModel state dict, prefix removed, tensors cloned
    (so the export does not keep the whole checkpoint alive through shared storage)."""
    trunk = OrderedDict((k[len(_TRUNK_PREFIX):], v.detach().clone().contiguous())
                        for k, v in model_state.items() if k.startswith(_TRUNK_PREFIX))
    if not trunk:
        raise ExportError("the checkpoint's model holds no trunk.* weights")
    return trunk


def check_loads_into(state: Dict[str, torch.Tensor], net: torch.nn.Module) -> None:
    """Load ``state`` into ``net`` with strict=False and insist that only the classifier
    (``fc.*``; for other torchvision models their ``classifier.*``, ``heads.*``, ``head.*`` or
    auxiliary heads) is missing and nothing is left over; shape mismatches raise from torch."""
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_CLASSIFIER_PREFIXES)]
    if missing or result.unexpected_keys:
        raise ExportError(f"exported weights do not match {type(net).__name__}: missing "
                          f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")


def export_trunk(checkpoint_path, target: str = "torchvision",
                 verify: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """The trunk of a fastswav checkpoint as a state dict for ``target`` ('torchvision' or
    'timm'), every key but ``fc.*``.

    verify: load the result into a freshly built target network to prove it fits (for
    'timm', only where timm is installed; the key names are the same as torchvision's
    either way). Raises FileNotFoundError for a missing checkpoint and
    :class:`ExportError` (a ValueError) when the trunk cannot map onto the target.
    """
    from .official import read_pretrained

    pretrained = read_pretrained(checkpoint_path)  # any layout; one-line ValueError otherwise
    cfg = pretrained.config
    _check_exportable(cfg, target)
    exported = trunk_state_dict(pretrained.model_state)
    if verify:
        try:
            build = target_constructor(cfg.arch, target)
        except ImportError:
            log.warning("timm is not installed: exported without a load check")
        else:
            check_loads_into(exported, build())
    return exported


def _read_checkpoint(checkpoint_path) -> dict:
    """A fastswav training checkpoint's contents; FileNotFoundError or :class:`ExportError`
    with one line for a missing, junk, truncated or foreign file."""
    from .checkpoint import load_checkpoint

    try:
        state = load_checkpoint(checkpoint_path, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as err:  # junk, truncated or foreign files
        raise ExportError(f"{checkpoint_path} could not be read as a checkpoint "
                          f"({load_error_detail(err)})") from err
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ExportError(f"{checkpoint_path} is not a fastswav training checkpoint "
                          "(no 'config' and 'model' entries)")
    return state


def _own_library(checkpoint_path) -> str:
    """The library of the checkpoint's trunk; ExportError for a built-in ResNet (which both
    libraries can hold, so --to must say)."""
    from .model import parse_arch
    from .official import read_pretrained

    arch = read_pretrained(checkpoint_path).config.arch
    library = parse_arch(arch)[0] if arch else ""
    if not library:
        raise ExportError("--to torchvision or --to timm: the built-in ResNets load into either")
    return library


def default_output_path(checkpoint_path, target: str) -> Path:
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_trunk_{target}.pt")


def _parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="python -m fastswav.export",
        description=(
            "Write the trunk of a fastswav checkpoint as a state dict that loads into a "
            "standard ResNet: torchvision.models.<arch>() or timm.create_model('<arch>'), "
            "with load_state_dict(..., strict=False) leaving only fc.weight and fc.bias "
            "missing. The projection head, prototypes and optimizer are left out."),
        epilog=(
            "Exportable trunks: resnet18/34/50/101/152 with the standard stem and width. "
            "Refused: the small-image stem (small_images=true), trunk_width other than 0, "
            "and the SwAV wide nets resnet50w2/w4/w5. Example: python -m fastswav.export "
            "runs/100ep/checkpoint_epoch0100.pt --to torchvision --output rn50_swav.pt"),
    )
    parser.add_argument("checkpoint", help="checkpoint written by fastswav.train")
    parser.add_argument("--to", dest="target", default=None, choices=TARGETS,
                        help="library whose model the weights are laid out for (needed for the "
                             "built-in ResNets; a torchvision/ or timm/ trunk goes to its own "
                             "library, the default)")
    parser.add_argument("--output", default=None,
                        help="where to write the state dict (default: next to the checkpoint, "
                             "<checkpoint>_trunk_<target>.pt)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.target is None:
            args.target = _own_library(args.checkpoint)
        state = export_trunk(args.checkpoint, args.target)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # RuntimeError: a shape
        fail(err)                                                      # mismatch in the load check
    output = Path(args.output) if args.output else default_output_path(args.checkpoint, args.target)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    print(f"wrote {len(state)} trunk tensors for {args.target} to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
