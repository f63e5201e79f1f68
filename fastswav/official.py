"""Pretrained weights of every layout fastswav reads, detected from the file's keys.

Three layouts:

- ``fastswav``: a checkpoint written by ``fastswav.train`` (``{"config": ..., "model": ...}``,
  the model's keys ``trunk.*``, ``head.*``, ``prototypes.weight``).
- ``official``: a checkpoint of the official SwAV code (the published
  ``swav_800ep_pretrain.pth.tar`` and friends, or a ``checkpoint.pth.tar`` of its
  ``main_swav.py``): a ResNet state dict, bare or under ``"state_dict"``, its keys prefixed
  ``module.`` by DistributedDataParallel, the trunk under torchvision's names (``conv1``,
  ``bn1``, ``layer1`` .. ``layer4``), optionally the projection head (``projection_head.*``:
  Linear, BatchNorm1d, ReLU, Linear, or one Linear) and the prototypes
  (``prototypes.weight``). The official stem pads by 1 and then convolves with padding 2,
  which is torchvision's padding 3: the same weights compute the same features.
- ``torchvision``: a ``torchvision.models.resnet*`` state dict (what the official torch.hub
  entry loads the weights into, and what ``fastswav.export`` and ``fastswav.eval.finetune``
  write), ``fc.*`` optional and never used as a trunk weight.

:func:`read_pretrained` reads any of them into one form (a :class:`fastswav.config.Config`
the weights fit, and a state dict under :class:`fastswav.model.SwAVModel`'s key names);
:func:`load_trunk` builds the trunk the evaluations run; :func:`init_model_from` copies the
weights into a model about to be pretrained (``fastswav.train --init_from``).
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

LAYOUTS = ("fastswav", "official", "torchvision")
# Images the official and torchvision ResNets are trained and evaluated at.
IMAGENET_SIZE = 224
_DDP_PREFIX = "module."
_STAGES = ("layer1", "layer2", "layer3", "layer4")
EXPECTED_KEYS = (
    "expected a fastswav training checkpoint (keys 'config' and 'model'), an official SwAV "
    "checkpoint (a ResNet state dict, bare or under 'state_dict', keys optionally prefixed "
    "'module.': conv1.weight, bn1.*, layer1.* .. layer4.*, with or without projection_head.* "
    "and prototypes.weight) or a torchvision ResNet state dict (conv1.weight, bn1.*, layer1.* "
    ".. layer4.*, fc.* optional)")


@dataclasses.dataclass
class Pretrained:
    """Weights read from a checkpoint of any layout.

    config: a Config the weights fit (for the official and torchvision layouts: the arch,
    width and stem read off the shapes, the head's and prototypes' sizes where present).
    model_state: :class:`fastswav.model.SwAVModel` key names (``trunk.*``, and ``head.*`` and
    ``prototypes.weight`` where the file has them). image_size: the crop size the trunk
    was trained at. unused: keys of the file that are no weight of that model (``fc.*``,
    several prototype sets)."""

    path: Path
    layout: str
    config: "object"
    model_state: Dict[str, torch.Tensor]
    image_size: int
    unused: List[str]

    def part(self, name: str) -> Dict[str, torch.Tensor]:
        """The entries of ``model_state`` under ``name.`` (trunk, head, prototypes)."""
        return {k: v for k, v in self.model_state.items() if k.split(".", 1)[0] == name}


def load_error_detail(err: Exception) -> str:
    """One line out of torch.load's error: the weights-only unpickler's actual complaint,
    not the paragraph of advice around it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if "WeightsUnpickler error" in line:
            return f"torch.load: {lines[i + 1]}"
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _unknown_layout(path, found) -> ValueError:
    keys = sorted(map(str, found))
    shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")
    return ValueError(f"{path} is not a checkpoint of a known layout: {EXPECTED_KEYS}; "
                      f"found {shown or 'no keys'}")


def _resnet_shape(path, state: Dict[str, torch.Tensor]) -> Tuple[str, int, bool]:
    """(arch, trunk_width, small_images) of a ResNet state dict in torchvision's key names."""
    from .model import _DEPTHS

    bottleneck = "layer1.0.conv3.weight" in state
    depths = []
    for stage in _STAGES:
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
    for arch, (block, layers) in _DEPTHS.items():
        if list(layers) == depths and (block.expansion == 4) == bottleneck:
            break
    else:
        raise ValueError(f"{path}: a ResNet with {depths} blocks per stage "
                         f"({'bottleneck' if bottleneck else 'basic'} blocks) is none of "
                         f"{', '.join(_DEPTHS)}")
    stem = state["conv1.weight"]
    width = int(stem.shape[0])
    return arch, (0 if width == 64 else width), int(stem.shape[-1]) == 3


def _check_trunk_fits(path, cfg, trunk_state: Dict[str, torch.Tensor]) -> None:
    """ValueError unless ``trunk_state`` fills the trunk ``cfg`` describes, key for key and
    shape for shape (BatchNorm's ``num_batches_tracked`` may be absent)."""
    from .model import build_trunk

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        trunk, _ = build_trunk(cfg.arch, cfg.small_images, cfg.trunk_width)
    expected = trunk.state_dict()
    missing = [k for k in expected if k not in trunk_state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in trunk_state if k not in expected]
    wrong = [k for k in expected if k in trunk_state and trunk_state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
                  if unexpected else
                  f"{wrong[0]} is {tuple(trunk_state[wrong[0]].shape)}, "
                  f"{tuple(expected[wrong[0]].shape)} expected")
        wide = (" (the official wide nets RN50w2/w4/w5 widen the bottleneck's inner "
                "convolutions too, which fastswav's wide ResNets do not)" if cfg.trunk_width else "")
        raise ValueError(f"{path}: the ResNet weights do not fit fastswav's {cfg.arch}"
                         f"{f' with trunk_width {cfg.trunk_width}' if cfg.trunk_width else ''}: "
                         f"{detail}{wide}")


def _from_resnet_state(path, state: Dict[str, torch.Tensor], wrapped: bool) -> Pretrained:
    from .config import Config

    prefixed = any(k.startswith(_DDP_PREFIX) for k in state)
    state = OrderedDict((k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k, v)
                        for k, v in state.items())
    if "conv1.weight" not in state or not all(any(k.startswith(s + ".") for k in state)
                                              for s in _STAGES):
        raise _unknown_layout(path, state)
    extras = ("projection_head.", "prototypes.")
    official = wrapped or prefixed or any(k.startswith(extras) for k in state)
    arch, width, small = _resnet_shape(path, state)
    trunk = {f"trunk.{k}": v for k, v in state.items()
             if k.startswith(("conv1.", "bn1.")) or k.startswith(tuple(s + "." for s in _STAGES))}
    head = {"head." + k[len("projection_head."):]: v for k, v in state.items()
            if k.startswith("projection_head.")}
    fields = dict(arch=arch, trunk_width=width, small_images=small)
    if "head.0.weight" in head and "head.3.weight" in head:  # the MLP head
        fields.update(hidden_dim=int(head["head.0.weight"].shape[0]),
                      out_dim=int(head["head.3.weight"].shape[0]))
    elif "head.weight" in head:  # one Linear
        fields.update(hidden_dim=0, out_dim=int(head["head.weight"].shape[0]))
    elif head:  # a head of another shape: not a SwAV projection head
        head = {}
    prototypes = {}
    if isinstance(state.get("prototypes.weight"), torch.Tensor):
        prototypes = {"prototypes.weight": state["prototypes.weight"]}
        fields.update(n_prototypes=int(prototypes["prototypes.weight"].shape[0]))
        fields.setdefault("out_dim", int(prototypes["prototypes.weight"].shape[1]))
        if prototypes["prototypes.weight"].shape[1] != fields["out_dim"]:
            prototypes = {}  # they do not take this head's output
    cfg = Config(**fields)
    trunk_only = {k[len("trunk."):]: v for k, v in trunk.items()}
    _check_trunk_fits(path, cfg, trunk_only)
    used = {k[len("trunk."):] for k in trunk}
    used |= {"projection_head." + k[len("head."):] for k in head}
    used |= set(prototypes)
    unused = [k for k in state if k not in used]
    model_state = OrderedDict(trunk)
    model_state.update(head)
    model_state.update(prototypes)
    # The small-image stem is what fastswav gives 32x32 data (CIFAR-10).
    return Pretrained(Path(path), "official" if official else "torchvision", cfg, model_state,
                      32 if small else IMAGENET_SIZE, unused)


def read_pretrained(path) -> Pretrained:
    """The weights in ``path``, whatever its layout (see the module docstring).

    Raises FileNotFoundError for a missing file, ValueError (one line) for a file that does
    not load with ``torch.load(weights_only=True)``, one of no known layout (the message
    names the keys expected) and ResNet weights that fit no fastswav trunk.
    """
    from .checkpoint import load_checkpoint
    from .config import Config

    path = Path(path)
    try:
        state = load_checkpoint(path, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 (junk, truncated or foreign files)
        raise ValueError(f"{path} could not be read as a checkpoint "
                         f"({load_error_detail(err)})") from None
    if not isinstance(state, dict):
        raise _unknown_layout(path, [])
    if "config" in state and "model" in state:
        try:
            cfg = Config.from_dict(state["config"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: its fastswav config does not load ({err})") from None
        return Pretrained(path, "fastswav", cfg, state["model"], max(cfg.size_crops), [])
    wrapped = isinstance(state.get("state_dict"), dict)
    weights = state["state_dict"] if wrapped else state
    if not all(isinstance(k, str) for k in weights) or not any(
            isinstance(v, torch.Tensor) for v in weights.values()):
        raise _unknown_layout(path, weights)
    return _from_resnet_state(path, {k: v for k, v in weights.items()
                                     if isinstance(v, torch.Tensor)}, wrapped)


def trunk_from(pretrained: Pretrained) -> nn.Module:
    """The trunk the weights describe, with them loaded (pooled features ``[B, D]``)."""
    from .model import build_model, build_trunk

    cfg = pretrained.config
    if pretrained.layout == "fastswav":
        model = build_model(cfg)
        model.load_state_dict(pretrained.model_state)
        return model.trunk
    trunk, _ = build_trunk(cfg.arch, cfg.small_images, cfg.trunk_width)
    state = {k[len("trunk."):]: v for k, v in pretrained.part("trunk").items()}
    trunk.load_state_dict(state, strict=False)  # fit checked key by key in read_pretrained
    return trunk


def load_trunk(path) -> Tuple[nn.Module, int]:
    """The trunk of a checkpoint of any layout, and the image size it was trained at."""
    pretrained = read_pretrained(path)
    return trunk_from(pretrained), pretrained.image_size


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape))


def init_model_from(model: nn.Module, path) -> List[str]:
    """Copy the weights of ``path`` (any layout) into ``model``, a
    :class:`fastswav.model.SwAVModel` about to be pretrained: the trunk (which must fit key
    for key and shape for shape, else ValueError), and the projection head and the
    prototypes where the file has them and they are shaped alike. Returns the lines that
    say what was loaded and what was not (one each)."""
    pretrained = read_pretrained(path)
    own = model.state_dict()
    loaded, not_loaded = [], []
    to_load: Dict[str, torch.Tensor] = {}
    for part in ("trunk", "head", "prototypes"):
        theirs = pretrained.part(part)
        mine = {k: v for k, v in own.items() if k.split(".", 1)[0] == part}
        if not theirs:
            not_loaded.append(f"{part} (not in the checkpoint)")
            continue
        absent = [k for k in mine if k not in theirs and not k.endswith("num_batches_tracked")]
        foreign = [k for k in theirs if k not in mine]
        wrong = [k for k in theirs if k in mine and theirs[k].shape != mine[k].shape]
        if absent or foreign or wrong:
            why = (f"{wrong[0]} is {_shape(theirs[wrong[0]])} there, {_shape(mine[wrong[0]])} here"
                   if wrong else f"keys differ: {(absent or foreign)[:2]}")
            if part == "trunk":
                raise ValueError(f"{path}: its trunk ({pretrained.config.arch}) "
                                 f"does not fit this run's trunk ({why})")
            not_loaded.append(f"{part} ({why})")
            continue
        to_load.update(theirs)
        loaded.append(f"{part} ({len(theirs)} tensor{'s' if len(theirs) > 1 else ''})")
    model.load_state_dict(to_load, strict=False)  # every key checked above
    lines = [f"init_from {path} ({pretrained.layout} layout): loaded {', '.join(loaded)}"]
    if not_loaded:
        lines.append(f"init_from: not loaded (freshly initialised): {', '.join(not_loaded)}")
    return lines
