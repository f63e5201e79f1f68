"""Trunk export: the state dict loads into torchvision's (and timm's) ResNet with only fc
missing and gives the fastswav trunk's features; trunks that cannot map are refused."""
import pytest
import torch
import torchvision
from conftest import randomise_batchnorm_

from fastswav.checkpoint import save_checkpoint
from fastswav.config import Config
from fastswav.export import ExportError, export_trunk
from fastswav.export import main as export_main
from fastswav.model import build_model


def _checkpoint(tmp_path, **overrides):
    """A small training checkpoint with randomised weights and BN statistics (so the
    comparison also covers the running buffers), and the model it came from."""
    cfg = Config(hidden_dim=16, out_dim=8, n_prototypes=10, **overrides)
    torch.manual_seed(0)
    model = randomise_batchnorm_(build_model(cfg))
    path = save_checkpoint({"epoch": 1, "model": model.state_dict(), "optimizer": {},
                            "config": cfg.to_dict(), "knn_init": None},
                           tmp_path / f"checkpoint_{cfg.arch}.pt")
    return path, model.eval()


def _assert_same_features(net, fastswav_trunk):
    net.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = fastswav_trunk(images)
        got = net(images)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_export_gives_the_same_features(tmp_path, arch):
    path, model = _checkpoint(tmp_path, arch=arch)
    state = export_trunk(path, "torchvision")
    assert not any(k.startswith(("trunk.", "head.", "prototypes.", "fc.")) for k in state)
    net = getattr(torchvision.models, arch)()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    net.fc = torch.nn.Identity()
    _assert_same_features(net, model.trunk)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_timm_export_gives_the_same_features(tmp_path, arch):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    path, model = _checkpoint(tmp_path, arch=arch)
    state = export_trunk(path, "timm")
    net = timm.create_model(arch, pretrained=False, num_classes=0)  # fc -> Identity
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_features(net, model.trunk)


@pytest.mark.parametrize("overrides, message", [
    (dict(arch="resnet18", small_images=True), "small-image stem"),
    (dict(arch="resnet18", trunk_width=16), "trunk_width=16"),
    (dict(arch="resnet50w2", trunk_width=8), "no torchvision equivalent"),
])
def test_unmappable_trunks_are_refused(tmp_path, overrides, message):
    path, _ = _checkpoint(tmp_path, **overrides)
    with pytest.raises(ExportError, match=message):
        export_trunk(path, "torchvision")


def test_standard_width_written_out_is_accepted(tmp_path):
    path, model = _checkpoint(tmp_path, arch="resnet18", trunk_width=64)
    net = torchvision.models.resnet18()
    net.load_state_dict(export_trunk(path, "torchvision"), strict=False)
    net.fc = torch.nn.Identity()
    _assert_same_features(net, model.trunk)


def test_cli_writes_the_state_dict_and_refuses_in_one_line(tmp_path, capsys, usage_error):
    path, _ = _checkpoint(tmp_path, arch="resnet18")
    output = tmp_path / "out" / "trunk.pt"
    assert export_main([str(path), "--to", "torchvision", "--output", str(output)]) == 0
    state = torch.load(output, weights_only=True)
    result = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]

    small, _ = _checkpoint(tmp_path / "small", arch="resnet18", small_images=True)
    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"not a torch file")
    for args in ([str(small), "--to", "torchvision"], [str(tmp_path / "missing.pt"), "--to", "timm"],
                 [str(not_a_checkpoint), "--to", "torchvision"]):
        usage_error(export_main, args)


def test_timm_export_without_timm_skips_only_the_load_check(tmp_path, monkeypatch):
    import sys

    path, _ = _checkpoint(tmp_path, arch="resnet18")
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    state = export_trunk(path, "timm")
    assert state.keys() == export_trunk(path, "torchvision").keys()
