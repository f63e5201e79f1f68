"""Checkpoints of the official SwAV code and torchvision ResNet state dicts, read by every
command that takes a checkpoint: the trunk computes exactly what torchvision's ResNet-50 with
the same weights computes; a file of no known layout is one ``error:`` line.

The official files are built here from the key names and shapes of the official code
(``src/resnet50.py``: torchvision's trunk names, ``projection_head`` Linear 2048-2048, BN,
ReLU, Linear 2048-128, ``prototypes`` 3000 x 128; ``module.`` from DistributedDataParallel;
``main_swav.py`` saves ``{"epoch", "state_dict", "optimizer"}``, the published pretraining
files are the bare state dict) with random values."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from conftest import randomise_batchnorm_
from PIL import Image

from fastswav.model import SwAVModel, load_trunk_from_checkpoint
from fastswav.official import EXPECTED_KEYS, init_model_from, read_pretrained

HIDDEN, OUT, PROTOTYPES = 2048, 128, 3000


@pytest.fixture(scope="module")
def reference():
    """A torchvision ResNet-50 with random weights and BatchNorm statistics (so the running
    buffers count in the comparison), in eval mode."""
    torch.manual_seed(0)
    return randomise_batchnorm_(torchvision.models.resnet50()).eval()


def _official_weights(net, head=True, prototypes=True):
    """The official pretraining state dict of ``net``'s trunk: ``module.``-prefixed, with
    the projection head and prototypes of the official shapes."""
    state = {f"module.{k}": v.clone() for k, v in net.state_dict().items()
             if not k.startswith("fc.")}
    g = torch.Generator().manual_seed(1)
    if head:
        state["module.projection_head.0.weight"] = torch.randn(HIDDEN, 2048, generator=g) * 0.01
        state["module.projection_head.0.bias"] = torch.randn(HIDDEN, generator=g)
        state["module.projection_head.1.weight"] = torch.rand(HIDDEN, generator=g) + 0.5
        state["module.projection_head.1.bias"] = torch.randn(HIDDEN, generator=g)
        state["module.projection_head.1.running_mean"] = torch.randn(HIDDEN, generator=g)
        state["module.projection_head.1.running_var"] = torch.rand(HIDDEN, generator=g) + 0.5
        state["module.projection_head.1.num_batches_tracked"] = torch.tensor(100)
        state["module.projection_head.3.weight"] = torch.randn(OUT, HIDDEN, generator=g) * 0.01
        state["module.projection_head.3.bias"] = torch.randn(OUT, generator=g)
    if prototypes:
        state["module.prototypes.weight"] = torch.randn(PROTOTYPES, OUT, generator=g)
    return state


# name -> how the file is laid out
LAYOUTS = {
    # main_swav.py's checkpoint.pth.tar: the DDP model's state dict and the run's state
    "official-run-checkpoint": lambda net: {
        "epoch": 800, "state_dict": _official_weights(net),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0048, "params": [0, 1]}]}},
    # swav_800ep_pretrain.pth.tar: the bare state dict
    "official-pretrained": lambda net: _official_weights(net),
    "official-trunk-only": lambda net: _official_weights(net, head=False, prototypes=False),
    # the torch.hub entry's model: torchvision's ResNet-50, fc included
    "torchvision": lambda net: {k: v.clone() for k, v in net.state_dict().items()},
}


@pytest.fixture(scope="module")
def checkpoints(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    paths = {}
    for name, build in LAYOUTS.items():
        paths[name] = folder / f"{name}.pth.tar"
        torch.save(build(reference), paths[name])
    return paths


def _features(net, images):
    with torch.no_grad():
        return net(images)


def _torchvision_features(reference, images):
    fc, reference.fc = reference.fc, torch.nn.Identity()
    try:
        return _features(reference, images)
    finally:
        reference.fc = fc


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loaded_trunk_computes_what_torchvision_computes(reference, checkpoints, layout):
    pretrained = read_pretrained(checkpoints[layout])
    assert pretrained.layout == ("torchvision" if layout == "torchvision" else "official")
    assert pretrained.config.arch == "resnet50" and pretrained.image_size == 224
    assert not pretrained.config.small_images and pretrained.config.trunk_width == 0
    has_head = layout in ("official-run-checkpoint", "official-pretrained")
    assert bool(pretrained.part("head")) == has_head
    assert bool(pretrained.part("prototypes")) == has_head
    assert pretrained.unused == (["fc.weight", "fc.bias"] if layout == "torchvision" else [])
    trunk, image_size = load_trunk_from_checkpoint(checkpoints[layout])
    assert image_size == 224
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    # The same convolutions in the same order: equal to the bit.
    assert torch.equal(_features(trunk.eval(), images), _torchvision_features(reference, images))


def test_depth_and_stem_are_read_off_the_shapes(tmp_path):
    torch.manual_seed(0)
    net = randomise_batchnorm_(torchvision.models.resnet18()).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    pretrained = read_pretrained(path)
    assert (pretrained.layout, pretrained.config.arch) == ("torchvision", "resnet18")
    trunk, _ = load_trunk_from_checkpoint(path)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    net.fc = torch.nn.Identity()
    assert torch.equal(_features(trunk.eval(), images), _features(net, images))

    # A ResNet of no known depth, and weights of another shape, are refused in one line.
    cut = {k: v for k, v in net.state_dict().items() if not k.startswith("layer4.1.")}
    torch.save(cut, path)
    with pytest.raises(ValueError, match=r"a ResNet with \[2, 2, 2, 1\] blocks per stage"):
        read_pretrained(path)
    wrong = dict(net.state_dict(), **{"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)})
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"layer2.0.conv1.weight is \(128, 64, 1, 1\), "
                                         r"\(128, 64, 3, 3\) expected"):
        read_pretrained(path)


def test_init_from_loads_trunk_head_and_prototypes_where_shaped_alike(reference, checkpoints):
    model = SwAVModel("resnet50", HIDDEN, OUT, PROTOTYPES)
    lines = init_model_from(model, checkpoints["official-run-checkpoint"])
    assert len(lines) == 1 and "official layout" in lines[0]
    assert "trunk (318 tensors), head (9 tensors), prototypes (1 tensor)" in lines[0]
    official = _official_weights(reference)
    own = model.state_dict()
    assert torch.equal(own["prototypes.weight"], official["module.prototypes.weight"])
    assert torch.equal(own["head.3.weight"], official["module.projection_head.3.weight"])
    assert torch.equal(own["head.1.running_var"], official["module.projection_head.1.running_var"])
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_features(model.trunk.eval(), images),
                       _torchvision_features(reference, images))

    # Another number of prototypes: the trunk and head load, the prototypes stay fresh.
    other = SwAVModel("resnet50", HIDDEN, OUT, 100)
    fresh = other.prototypes.weight.detach().clone()
    lines = init_model_from(other, checkpoints["official-pretrained"])
    assert len(lines) == 2
    assert "head (" in lines[0] and "prototypes" not in lines[0]
    assert "prototypes (prototypes.weight is 3000x128 there, 100x128 here)" in lines[1]
    assert torch.equal(other.prototypes.weight, fresh)

    # A trunk of another shape is refused.
    with pytest.raises(ValueError, match="does not fit this run's trunk"):
        init_model_from(SwAVModel("resnet18", 16, 8, 10), checkpoints["torchvision"])


def test_export_writes_the_torchvision_weights_back(reference, checkpoints):
    from fastswav.export import export_trunk

    for layout in ("official-pretrained", "torchvision"):
        exported = export_trunk(checkpoints[layout], "torchvision")
        expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
        assert list(exported) == list(expected)
        assert all(torch.equal(exported[k], expected[k]) for k in expected)


def _image_folder(root, classes=("a", "b"), per_class=1, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("images"))


def test_embed_gives_torchvision_features(reference, checkpoints, images):
    from fastswav.data.multicrop import eval_transform
    from fastswav.embed import embed

    result = embed(checkpoints["official-pretrained"], images, split="test", batch_size=4)
    transform = eval_transform(224)
    batch = torch.stack([transform(Image.open(images / name).convert("RGB"))
                         for name in result["names"]])
    expected = _torchvision_features(reference, batch)
    torch.testing.assert_close(result["embeddings"], expected, rtol=1e-5, atol=1e-5)


def test_knn_and_linear_read_the_official_and_torchvision_layouts(checkpoints, images, capsys):
    from fastswav.eval import knn, linear

    def common(layout):
        return ["--checkpoint", str(checkpoints[layout]), "--data", str(images),
                "--batch-size", "4"]

    assert knn.main(common("official-run-checkpoint") + ["--k", "1"]) == 0
    assert "kNN top-1:" in capsys.readouterr().out
    assert linear.main(common("torchvision") + ["--mode", "fast", "--weight-decays", "1e-4",
                                                "--steps", "5"]) == 0
    assert "linear top-1:" in capsys.readouterr().out


def test_finetune_reads_both_layouts(checkpoints, images, tmp_path):
    from fastswav.eval.finetune import finetune

    for layout in ("official-pretrained", "torchvision"):
        result = finetune(checkpoints[layout], images, 50, output_dir=str(tmp_path / layout),
                          epochs=1, batch_size=2, image_size=32, workers=0)
        assert result["layout"] == ("official" if layout != "torchvision" else "torchvision")
        assert result["subset_images"] == 2  # at least one image of each class
        state = torch.load(result["model"], weights_only=True)
        net = torchvision.models.resnet50(num_classes=2)
        net.load_state_dict(state)  # strict: the torchvision layout, fc included


def test_train_init_from_an_official_checkpoint(checkpoints, images, tmp_path, capsys):
    from conftest import tiny_config
    from fastswav import train as train_module

    cfg = tiny_config(images, tmp_path / "run", arch="resnet50", trunk_width=0,
                      small_images=False, zero_init_residual=False, hidden_dim=HIDDEN,
                      out_dim=OUT, n_prototypes=10, epochs=1, steps_per_epoch=1,
                      warmup_epochs=0, batch_size=2, size_crops=(32, 16))
    argv = [f"--{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
            for k, v in cfg.to_dict().items()]
    code = train_module.main(argv + [f"--init_from={checkpoints['official-pretrained']}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(official layout): loaded trunk (318 tensors), head (9 tensors)" in out
    assert "not loaded (freshly initialised): prototypes (prototypes.weight is 3000x128 there" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init_from"]


# ------------------------------------------------------------------ files of no known layout

@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    path = tmp_path_factory.mktemp("foreign") / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2), "encoder.bias": torch.zeros(2)}, path)
    return path


def test_unknown_layout_names_the_expected_keys(foreign):
    with pytest.raises(ValueError) as err:
        read_pretrained(foreign)
    message = str(err.value)
    assert "\n" not in message and EXPECTED_KEYS in message
    assert "found encoder.bias, encoder.weight" in message


def _one_error_line(run, capsys):
    """Exit status and stderr of a CLI main() given a file of no known layout."""
    try:
        code = run()
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # sys.exit("error: ..."): the message is the exit's
        err, code = code + "\n", 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "conv1.weight" in lines[0] and "projection_head" in lines[0]
    return code


def test_every_command_refuses_an_unknown_layout_in_one_line(foreign, images, tmp_path, capsys):
    from fastswav import embed as embed_module
    from fastswav import export
    from fastswav import train as train_module
    from fastswav.eval import finetune, knn, linear

    data = ["--data", str(images)]
    assert _one_error_line(lambda: finetune.main(["--checkpoint", str(foreign), *data,
                                                  "--output-dir", str(tmp_path / "f")]),
                           capsys) == 2
    assert _one_error_line(lambda: train_module.main(
        [*data, "--batch_size=2", "--workers=0", f"--output_dir={tmp_path / 't'}",
         f"--init_from={foreign}"]), capsys) == 2
    assert _one_error_line(lambda: knn.main(["--checkpoint", str(foreign), *data]), capsys) == 2
    assert _one_error_line(lambda: linear.main(["--checkpoint", str(foreign), *data]),
                           capsys) == 2
    assert _one_error_line(lambda: embed_module.main(["--checkpoint", str(foreign), *data,
                                                      "--out", str(tmp_path / "e.pt")]),
                           capsys) == 2
    assert _one_error_line(lambda: export.main([str(foreign), "--to", "torchvision"]),
                           capsys) == 2
    assert not os.path.exists(tmp_path / "e.pt")
