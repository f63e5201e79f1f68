"""SwAV network: a trunk (a built-in ResNet, or any torchvision or timm classification model
without its classifier), the MLP projection head and the prototypes."""
from __future__ import annotations

import ast
import functools
import re
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

from .profiling import nvtx_range

# name -> (block, layers); a "w<N>" suffix widens every stage N times (SwAV's RN50w2/w4/w5).
_DEPTHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}
ARCHS = tuple(_DEPTHS) + ("resnet50w2", "resnet50w4", "resnet50w5")


def _resnet_with_width(block, layers: List[int], width: int) -> resnet.ResNet:
    """torchvision's ResNet whose stem and first stage have ``width`` channels (64 in the
    standard nets), every later stage doubling it.

    torchvision's ``width_per_group`` widens only the bottleneck's inner conv, whereas the
    SwAV wide models widen the stem and all stage outputs too (RN50w2: 4096-d features);
    widths under 64 give the small nets that train on a CPU.
    """
    net = resnet.ResNet(block, layers)
    if width == 64:
        return net
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, layers[0])
    net.layer2 = net._make_layer(block, width * 2, layers[1], stride=2)
    net.layer3 = net._make_layer(block, width * 4, layers[2], stride=2)
    net.layer4 = net._make_layer(block, width * 8, layers[3], stride=2)
    for m in net.modules():  # the same initialisation torchvision gives its own layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return net


def _builtin_resnet(arch: str, small_images: bool, width: int,
                    zero_init_residual: bool) -> Tuple[nn.Module, int]:
    match = re.fullmatch(r"(resnet\d+)(?:w(\d+))?", arch)
    if not match or match.group(1) not in _DEPTHS or arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}, "
                         "torchvision/<name> or timm/<name>")
    block, layers = _DEPTHS[match.group(1)]
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    width = width or 64 * int(match.group(2) or 1)
    net = _resnet_with_width(block, layers, width)
    if small_images:
        width = net.conv1.out_channels
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    if zero_init_residual:
        for m in net.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.bn2.weight if isinstance(m, BasicBlock) else m.bn3.weight)
    feat_dim = width * 8 * block.expansion
    net.fc = nn.Identity()
    return net, feat_dim


def checkpoint_units(trunk: nn.Module) -> List[nn.Module]:
    """The blocks whose activations :func:`checkpoint_activations_` recomputes in backward
    (timm models checkpoint their own blocks; this list is then what the memory estimate
    counts): the residual blocks of a ResNet (``layer1..4``), else the children of a
    ``features`` sequence (MobileNets, EfficientNets, ConvNeXt), else the longest sequence
    of blocks (transformers), else the trunk's children that hold parameters."""
    stages = [getattr(trunk, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(s, nn.Sequential) for s in stages):
        return [block for stage in stages for block in stage]
    features = getattr(trunk, "features", None)
    if isinstance(features, nn.Sequential):
        return list(features)
    # A transformer's blocks (torchvision ViT's encoder.layers, timm's blocks): the longest
    # sequence of modules with parameters.
    sequences = [list(m) for m in trunk.modules() if isinstance(m, (nn.Sequential, nn.ModuleList))]
    sequences = [[b for b in seq if any(True for _ in b.parameters())] for seq in sequences]
    longest = max(sequences, key=len, default=[])
    if len(longest) >= 2:
        return longest
    return [m for m in trunk.children() if any(True for _ in m.parameters())]


_CHECKPOINTED_CLASSES: dict = {}


def _checkpointed_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward keeps only its inputs for backward and runs
    again there (non-reentrant ``torch.utils.checkpoint``, which torch.compile and DDP
    support); plain forward in eval mode or without grad. Same parameters and state dict."""
    if cls not in _CHECKPOINTED_CLASSES:
        def forward(self, *args, **kwargs):
            plain = super(sub, self).forward
            if self.training and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(plain, *args, use_reentrant=False,
                                                         **kwargs)
            return plain(*args, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})
        _CHECKPOINTED_CLASSES[cls] = sub
    return _CHECKPOINTED_CLASSES[cls]


def checkpoint_activations_(trunk: nn.Module) -> nn.Module:
    """Recompute the trunk's block activations in backward instead of keeping them: the
    memory for activations falls to the block inputs plus one block's, for about a third
    more trunk compute. BatchNorm running statistics are updated by the recomputation too
    (their momentum acts twice per step; the training loss is unchanged)."""
    if hasattr(trunk, "set_grad_checkpointing"):  # timm's own, per block
        trunk.set_grad_checkpointing(True)
        return trunk
    for block in checkpoint_units(trunk):
        block.__class__ = _checkpointed_class(type(block))
    return trunk


LIBRARIES = ("torchvision", "timm")


def _top_level_split(text: str) -> List[str]:
    """``text`` split at the commas outside brackets: ``a=1,b=(1,2)`` -> ``a=1``, ``b=(1,2)``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_arch(arch: str) -> Tuple[str, str, Dict[str, Any]]:
    """``(library, model name, constructor keywords)`` of an arch string.

    ``resnet50`` -> ``("", "resnet50", {})`` (a built-in ResNet);
    ``torchvision/<name>`` and ``timm/<name>`` name a model of that library, optionally
    followed by constructor keywords: ``timm/vit_tiny_patch16_224:patch_size=8,depth=6``,
    ``timm/convnext_atto:depths=(1,1,1,1)`` (values are Python literals, anything else a
    string).
    """
    library, slash, rest = arch.partition("/")
    if not slash:
        return "", arch, {}
    if library not in LIBRARIES:
        raise ValueError(f"unknown arch {arch!r}: a library prefix is torchvision/ or timm/")
    name, _, args = rest.partition(":")
    if not name:
        raise ValueError(f"arch {arch!r} names no model after {library}/")
    kwargs: Dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in _top_level_split(args))):
        key, eq, text = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"arch {arch!r}: constructor keywords take the form key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = text.strip()
    return library, name, kwargs


def _classifier_removed(net: nn.Module) -> int:
    """Replace the classifier of a torchvision classification model by the identity (in
    place); returns the width of the features it read, or 0 where that is not visible.

    The classifier is the module under ``fc`` (ResNets, RegNets, GoogLeNet, ...), ``heads``
    (ViT), ``head`` (Swin) or ``classifier`` (MobileNets, EfficientNets, ConvNeXt, DenseNet,
    VGG, ...). Of a ``classifier`` Sequential only the layers from its first Linear on are
    dropped, so that ConvNeXt keeps its final LayerNorm and Flatten; a convolutional
    classifier (SqueezeNet) is replaced by global average pooling.
    """
    if getattr(net, "aux_logits", False):  # GoogLeNet, Inception v3: no auxiliary heads
        net.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(net, name):
                setattr(net, name, None)
    for attr in ("fc", "heads", "head", "classifier"):
        head = getattr(net, attr, None)
        if not isinstance(head, nn.Module):
            continue
        layers = list(head) if isinstance(head, nn.Sequential) else [head]
        first_linear = next((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), None)
        if first_linear is None:
            first_conv = next((i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)), None)
            if first_conv is None:
                continue
            # A convolutional classifier (SqueezeNet): keep what precedes it, pool.
            kept = [m for m in layers[:first_conv] if not isinstance(m, nn.Dropout)]
            setattr(net, attr, nn.Sequential(*kept, nn.AdaptiveAvgPool2d(1)))
            return layers[first_conv].in_channels
        width = layers[first_linear].in_features
        kept = [m for m in layers[:first_linear] if not isinstance(m, nn.Dropout)]
        setattr(net, attr, nn.Sequential(*kept) if kept and isinstance(head, nn.Sequential)
                else nn.Identity())
        return width
    return 0


def _torchvision_trunk(name: str, kwargs: Dict[str, Any]) -> Tuple[nn.Module, int]:
    import torchvision.models

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(f"unknown torchvision classification model {name!r}; list them with "
                         "torchvision.models.list_models(torchvision.models)")
    try:
        net = torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as err:  # a keyword the constructor does not take
        raise ValueError(f"torchvision/{name}: {err}") from None
    width = _classifier_removed(net)
    if not width:
        width = _width_by_forward(net)
    return net, width


def _timm_trunk(name: str, kwargs: Dict[str, Any]) -> Tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise ValueError(f"arch timm/{name} needs timm: pip install 'fastswav[timm]'") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; list them with timm.list_models()")
    kwargs = dict(pretrained=False, num_classes=0, **kwargs)
    try:
        # Vision transformers take every crop size (their position embeddings are
        # interpolated per input size); other models do not know the keyword.
        net = timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError:
        try:
            net = timm.create_model(name, **kwargs)
        except TypeError as err:  # a keyword the constructor does not take
            raise ValueError(f"timm/{name}: {err}") from None
    width = getattr(net, "head_hidden_size", None) or getattr(net, "num_features", 0)
    return net, int(width) or _width_by_forward(net)


@torch.no_grad()
def _width_by_forward(net: nn.Module) -> int:
    was_training = net.training
    net.eval()
    try:
        out = net(torch.zeros(1, 3, 224, 224))
    finally:
        net.train(was_training)
    return int(out.flatten(1).shape[1])


def build_trunk(arch: str, small_images: bool = False, width: int = 0,
                zero_init_residual: bool = False) -> Tuple[nn.Module, int]:
    """A trunk returning pooled features ``[B, D]``, and its feature width ``D``.

    ``arch``: a built-in ResNet (:data:`ARCHS`), ``torchvision/<name>`` (any torchvision
    classification model, no pretrained weights, classifier removed) or ``timm/<name>`` (any
    timm model, ``timm.create_model(name, pretrained=False, num_classes=0)``; vision
    transformers with ``dynamic_img_size=True`` so that every crop size runs), either with
    optional constructor keywords (see :func:`parse_arch`).

    For the built-in ResNets only: ``width`` (0: the arch's own) sets the channels of the stem
    and first stage; ``small_images`` swaps the 7x7/stride-2 stem and max-pool for a
    3x3/stride-1 stem, the usual change for 32x32 inputs such as CIFAR-10;
    ``zero_init_residual`` starts the last BatchNorm of every residual block at zero, so that
    each block begins as the identity (torchvision's option of the same name; Goyal et al.,
    2017). Other trunks refuse them (ValueError).
    """
    library, name, kwargs = parse_arch(arch)
    if not library:
        return _builtin_resnet(arch, small_images, width, zero_init_residual)
    used = [n for n, v in (("small_images", small_images), ("trunk_width", width),
                           ("zero_init_residual", zero_init_residual)) if v]
    if used:
        raise ValueError(f"{', '.join(used)} apply to the built-in ResNets only, not to {arch}; "
                         "set them to false/0 (constructor keywords go after the name: "
                         f"{library}/{name}:key=value)")
    if library == "torchvision":
        return _torchvision_trunk(name, kwargs)
    return _timm_trunk(name, kwargs)


def is_convolutional(trunk: nn.Module) -> bool:
    """Whether the trunk's work is convolutions (more than a patch-embedding Conv2d)."""
    return sum(isinstance(m, nn.Conv2d) for m in trunk.modules()) > 1


@functools.lru_cache(maxsize=16)
def arch_prefers_channels_last(arch: str) -> bool:
    """Whether ``arch`` is a convolutional trunk, for which NHWC (channels_last) memory
    helps on GPUs; transformers gain nothing from it."""
    library, _, _ = parse_arch(arch)
    if not library:
        return True
    with torch.device("meta"):  # the layers only, no memory and no initialisation cost
        try:
            trunk, _ = build_trunk(arch)
        except Exception:  # noqa: BLE001 (a model that cannot be built on meta: build it)
            trunk = None
    if trunk is None:
        trunk, _ = build_trunk(arch)
    return is_convolutional(trunk)


class SwAVModel(nn.Module):
    """Trunk -> MLP head (Linear, BN, ReLU, Linear) -> L2-normalised embedding.

    The prototypes are a bias-free ``Linear(out_dim, n_prototypes)``; the loss reads
    ``prototypes.weight`` (see :class:`fastswav.SwAVLoss`).
    """

    def __init__(self, arch: str = "resnet50", hidden_dim: int = 2048, out_dim: int = 128,
                 n_prototypes: int = 3000, small_images: bool = False, width: int = 0,
                 zero_init_residual: bool = False, checkpoint_activations: bool = False):
        super().__init__()
        self.trunk, feat_dim = build_trunk(arch, small_images, width, zero_init_residual)
        if checkpoint_activations:
            checkpoint_activations_(self.trunk)
        if hidden_dim > 0:
            self.head = nn.Sequential(
                nn.Linear(feat_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_dim),
            )
        else:
            self.head = nn.Linear(feat_dim, out_dim)
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)
        self.feat_dim = feat_dim

    def forward_trunk(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Trunk features of all crops, crop-major, running the trunk once per run of
        consecutive crops that share a resolution (as the official code does)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            group = torch.cat(list(crops[start:end])) if end - start > 1 else crops[start]
            with nvtx_range(f"forward/group{len(feats)}"):
                feats.append(self.trunk(group))
            start = end
        return torch.cat(feats) if len(feats) > 1 else feats[0]

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embeddings ``[n_crops * B, out_dim]`` (L2-normalised, crop-major)."""
        return F.normalize(self.head(self.forward_trunk(crops)), dim=1)


def build_model(cfg) -> SwAVModel:
    """The model a :class:`fastswav.config.Config` describes."""
    return SwAVModel(cfg.arch, cfg.hidden_dim, cfg.out_dim, cfg.n_prototypes,
                     cfg.small_images, cfg.trunk_width, cfg.zero_init_residual,
                     cfg.checkpoint_activations)


def load_trunk_from_checkpoint(path, map_location="cpu") -> Tuple[nn.Module, int]:
    """The trunk of a checkpoint of any layout fastswav reads (its own, the official SwAV
    one, a torchvision ResNet state dict; :mod:`fastswav.official`), and the image size it
    was trained at. ``map_location`` is kept for callers; weights load on the CPU."""
    from .official import load_trunk

    return load_trunk(path)
