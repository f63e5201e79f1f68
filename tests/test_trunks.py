"""Trunks from torchvision and timm: building, every crop size, compile, export."""
import pytest
import torch

from fastswav.loss import SwAVLoss
from fastswav.model import SwAVModel, arch_prefers_channels_last, build_trunk, parse_arch
from fastswav.optim import LARS, lars_param_groups
from fastswav.step import TrainStep

pytest.importorskip("timm")

TINY_VIT = "timm/vit_tiny_patch16_224:patch_size=4,depth=1,embed_dim=32,num_heads=2"
TINY_MOBILENET = "torchvision/mobilenet_v3_small:width_mult=0.25"
TINY_CONVNEXT = "timm/convnext_atto:depths=(1,1,1,1),dims=(8,16,32,64)"


def test_arch_strings_parse():
    assert parse_arch("resnet50") == ("", "resnet50", {})
    assert parse_arch("timm/vit_tiny_patch16_224:patch_size=8,depth=6,act_layer=gelu") == (
        "timm", "vit_tiny_patch16_224", {"patch_size": 8, "depth": 6, "act_layer": "gelu"})
    assert parse_arch("timm/convnext_atto:depths=(1, 1,1,1),dims=[8,16]")[2] == {
        "depths": (1, 1, 1, 1), "dims": [8, 16]}
    with pytest.raises(ValueError, match="torchvision/ or timm/"):
        parse_arch("keras/resnet50")


@pytest.mark.parametrize("arch, width", [
    (TINY_MOBILENET, None),  # width read from the removed classifier
    ("torchvision/convnext_tiny", 768),
    ("torchvision/squeezenet1_1", 512),
    (TINY_VIT, 32),
    ("timm/resnet18", 512),
    # the small-image trunks docs/own_data.md and the README name (dilated: resolution kept)
    ("timm/regnetx_002:output_stride=8", 368),
    ("torchvision/mobilenet_v3_small:dilated=True", 576),
])
def test_library_trunks_give_pooled_features_of_their_width(arch, width):
    trunk, feat_dim = build_trunk(arch)
    if width is not None:
        assert feat_dim == width
    trunk.eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feat_dim)


@pytest.mark.parametrize("arch, message", [
    ("torchvision/resnet_nope", r"torchvision.models.list_models\(torchvision.models\)"),
    ("timm/vit_nope", r"timm.list_models\(\)"),
    ("resnet19", "torchvision/<name> or timm/<name>"),
    ("timm/resnet18:bogus=1", "unexpected keyword argument 'bogus'"),
])
def test_unknown_names_are_one_line_errors(arch, message):
    with pytest.raises(ValueError, match=message) as info:
        build_trunk(arch)
    assert "\n" not in str(info.value)


def test_resnet_options_are_refused_for_library_trunks():
    with pytest.raises(ValueError, match="built-in ResNets only"):
        build_trunk("torchvision/resnet18", small_images=True)
    with pytest.raises(ValueError, match="trunk_width"):
        build_trunk("timm/resnet18", width=32)


def test_channels_last_only_for_convolutional_trunks():
    assert arch_prefers_channels_last("resnet18")
    assert arch_prefers_channels_last(TINY_MOBILENET)
    assert not arch_prefers_channels_last(TINY_VIT)
    assert not arch_prefers_channels_last("torchvision/vit_b_16")


def test_vit_takes_every_crop_size_once_per_resolution_group():
    model = SwAVModel(TINY_VIT, hidden_dim=16, out_dim=8, n_prototypes=5)
    calls = []
    model.trunk.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    crops = [torch.randn(3, 3, 32, 32)] * 2 + [torch.randn(3, 3, 16, 16)] * 3
    out = model(crops)
    assert out.shape == (15, 8)
    assert calls == [(6, 3, 32, 32), (9, 3, 16, 16)]


def _train_steps(arch, compile_mode, backend="aot_eager", n_steps=2, sizes=(32, 16)):
    torch.manual_seed(0)
    model = SwAVModel(arch, hidden_dim=16, out_dim=8, n_prototypes=7)
    optimizer = LARS(lars_param_groups(model, True), lr=0.05, weight_decay=1e-4)
    step = TrainStep(model, SwAVLoss(n_crops=4, crops_for_assign=(0, 1)), optimizer,
                     compile_mode=compile_mode, compile_backend=backend)
    losses = []
    for i in range(n_steps):
        g = torch.Generator().manual_seed(i)
        crops = [torch.randn(4, 3, sizes[0], sizes[0], generator=g) for _ in range(2)] + \
                [torch.randn(4, 3, sizes[1], sizes[1], generator=g) for _ in range(2)]
        losses.append(step(crops, None, lr=0.05, freeze_prototypes=False)[0].detach())
    return torch.stack(losses)


@pytest.mark.slow
@pytest.mark.parametrize("arch, sizes", [(TINY_VIT, (32, 16)), (TINY_CONVNEXT, (64, 32))])
def test_compiled_step_equals_eager_for_library_trunks(arch, sizes):
    """AOTAutograd-traced (aot_eager, no C++ compile) training steps match eager ones (a
    ConvNeXt downsamples 32 times: its crops are 64 and 32 pixels)."""
    eager = _train_steps(arch, "none", sizes=sizes)
    traced = _train_steps(arch, "default", sizes=sizes)
    assert torch.isfinite(eager).all()
    assert torch.allclose(eager, traced, atol=1e-4), (eager, traced)
