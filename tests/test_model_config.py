"""Model shapes, presets and the command line's handling of bad input."""
import json

import pytest
import torch

from fastswav.config import PRESETS, Config, parse_value, preset
from fastswav.model import SwAVModel, build_trunk
from fastswav.train import UsageError, main, parse_args


@pytest.mark.parametrize("arch, width, feat", [("resnet18", 0, 512), ("resnet18", 16, 128),
                                               ("resnet50", 8, 256), ("resnet50w2", 0, 4096)])
def test_trunk_feature_width(arch, width, feat):
    if arch == "resnet50w2":  # building is enough: a forward of RN50w2 is slow on the CPU
        trunk, dim = build_trunk(arch)
        assert dim == feat and trunk.conv1.out_channels == 128
        return
    trunk, dim = build_trunk(arch, small_images=True, width=width)
    assert dim == feat
    assert trunk(torch.randn(2, 3, 32, 32)).shape == (2, feat)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'resnet7'"):
        build_trunk("resnet7")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_blocks_start_as_the_identity(arch):
    trunk, _ = build_trunk(arch, small_images=True, width=8, zero_init_residual=True)
    plain, _ = build_trunk(arch, small_images=True, width=8)
    for block, plain_block in ((trunk.layer1[1], plain.layer1[1]), (trunk.layer3[1], plain.layer3[1])):
        block.eval(), plain_block.eval()
        x = torch.relu(torch.randn(2, block.conv1.in_channels, 8, 8))
        # no downsampling in these blocks: relu(x + 0) = x for the non-negative x they receive
        assert torch.equal(block(x), x)
        assert not torch.allclose(plain_block(x), x)  # the default keeps torchvision's init


def test_multicrop_forward_runs_trunk_once_per_resolution():
    model = SwAVModel("resnet18", hidden_dim=32, out_dim=16, n_prototypes=10,
                      small_images=True, width=8)
    calls = []
    model.trunk.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    crops = [torch.randn(3, 3, 32, 32)] * 2 + [torch.randn(3, 3, 16, 16)] * 4
    z = model(crops)
    assert z.shape == (18, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(18), atol=1e-5)
    assert calls == [torch.Size([6, 3, 32, 32]), torch.Size([12, 3, 16, 16])]


def test_presets_are_valid_and_official():
    assert {"demo", "100ep", "200ep", "400ep", "800ep", "200ep_bs256", "400ep_bs256",
            "400ep_2x224", "100ep_fast"} <= set(PRESETS)
    p = preset("100ep")
    assert (p.base_lr, p.final_lr, p.warmup_epochs, p.start_warmup) == (4.8, 0.0048, 10, 0.3)
    assert (p.n_crops, p.size_crops, p.min_scale_crops, p.max_scale_crops) == \
        ((2, 6), (224, 96), (0.14, 0.05), (1.0, 0.14))
    assert (p.n_prototypes, p.out_dim, p.epsilon, p.temperature) == (3000, 128, 0.05, 0.1)
    q = preset("200ep_bs256")
    assert (q.queue_length, q.epoch_queue_starts, q.base_lr, q.freeze_prototypes_niters) == \
        (3840, 15, 0.6, 5005)
    assert preset("400ep_2x224").n_crops == (2,)
    assert preset("100ep_fast").global_batch(8) == 4096


def test_config_round_trip():
    cfg = preset("demo")
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown config field"):
        Config.from_dict({"nope": 1})


def test_parse_value_types():
    assert parse_value("n_crops", "2,6") == (2, 6)
    assert parse_value("min_scale_crops", "0.1,0.2") == (0.1, 0.2)
    assert parse_value("small_images", "false") is False
    assert parse_value("base_lr", "1e-3") == 1e-3


def test_cli_overrides(tmp_path):
    data = tmp_path / "d.zip"
    data.write_bytes(b"")
    cfg, name, resume = parse_args(["--preset", "100ep", "--data", str(data), "--batch-size=32",
                                    "--base_lr", "0.5", "--output-dir", str(tmp_path / "o")])
    assert (name, resume, cfg.batch_size, cfg.base_lr) == ("100ep", True, 32, 0.5)
    assert cfg.output_dir == str(tmp_path / "o")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--data", "/no/such/place"], "data path not found: /no/such/place"),
    (["--no_such_field=3"], "unknown config field 'no_such_field'"),
    (["--batch_size=many"], "--batch_size='many': expected int"),
    (["--n_crops=2,x"], "--n_crops='2,x': expected list of int"),
    (["--epochs"], "--epochs needs a value"),
    (["--warmup_epochs=500"], "warmup_epochs=500 must lie in 0..epochs"),
    (["--preset", "100ep"], "needs --data PATH"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    with pytest.raises(UsageError, match=None) as info:
        parse_args(argv)
    assert message in str(info.value)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_help_lists_presets_and_fields(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "--freeze_prototypes_niters=<int>" in out and "--n_crops=<list>" in out
