"""Memory known before the first step: the estimate against a measured peak, every preset
on an 80 GB card, the trainer's refusal, gradient accumulation and activation checkpointing."""
import os
import re
import sys

import pytest
import torch

from fastswav import memory
from fastswav.config import PRESETS, preset
from fastswav.info import main as info_main
from fastswav.loss import SwAVLoss
from fastswav.model import SwAVModel
from fastswav.optim import LARS, lars_param_groups
from fastswav.step import TrainStep
from fastswav.train import main as train_main

from conftest import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_memory  # noqa: E402  (the measuring processes, shared with the benchmark)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_fits_an_80gb_card_with_headroom(name):
    cfg = preset(name)
    est = memory.estimate(cfg, world_size=1, device_type="cuda")
    assert est.fits(memory.CARD_80GB_BYTES, memory.PRESET_HEADROOM), \
        f"{name}: {memory.gib(est.total)} on an 80 GB card"


def test_the_official_global_batch_is_kept_and_100ep_fast_runs_256_per_gpu():
    fast = preset("100ep_fast")
    assert fast.global_batch(8) == preset("100ep").global_batch(64) == 4096
    assert fast.batch_size == 256 and fast.grad_accum == 2 and not fast.sync_bn
    assert "256 images per GPU" in PRESETS["100ep_fast"][0]
    # 512 per GPU, the earlier recipe, does not fit: the estimate tells them apart
    too_big = memory.estimate(fast.replace(batch_size=512, grad_accum=1), 8, "cuda")
    assert not too_big.fits(memory.CARD_80GB_BYTES, memory.PRESET_HEADROOM)


def test_resnet50_saves_about_129_mib_per_multicrop_image_under_bf16():
    """The figure measured with saved-tensor hooks on real CPU tensors (bf16, 2x224 + 6x96)."""
    (_, per_image), _ = memory.activation_bytes(preset("100ep"), "cuda")
    assert 120 * 2 ** 20 < per_image < 140 * 2 ** 20


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_estimate_is_within_25_percent_of_a_measured_cpu_peak():
    """A real CPU training step (a width-32 ResNet-18 on the demo's crops, float32) at two
    batch sizes, each in a fresh process: the rise of the peak resident memory over the
    process before the step, against the estimate of what a step adds
    (``benchmarks/bench_memory.py`` records the figures)."""
    for batch in (96, 192):
        measured, estimated = bench_memory.step_peak(batch, checkpointed=False)
        assert abs(estimated - measured) <= 0.25 * measured, (batch, measured, estimated)
    # with activation checkpointing the estimate is an upper bound (every block input and
    # the largest block's activations at once)
    measured, estimated = bench_memory.step_peak(96, checkpointed=True)
    assert measured <= estimated <= 2 * measured, ("checkpointed", measured, estimated)


def test_info_memory_prints_the_estimate_and_the_verdict(capsys, usage_error):
    assert info_main(["--memory", "--preset", "100ep_fast"]) == 0
    out = capsys.readouterr().out
    assert "activations saved for backward" in out and "total (estimate)" in out
    assert re.search(r"an 80 GB card \(74\.5 GiB\): fits, \d+% left", out)
    assert info_main(["--memory", "--preset", "100ep_fast", "--batch_size=640", "--grad_accum=1"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "--checkpoint_activations=true" in out
    line = usage_error(info_main, ["--memory", "--preset", "100ep_fast", "--no_such_field=1"])
    assert "unknown config field" in line


def test_a_run_that_does_not_fit_its_card_stops_before_the_first_step(tiny_folder, tmp_path,
                                                                      monkeypatch, capsys):
    """On a card smaller than the estimate: one error line with the figures and the ways
    out, exit status 2, nothing written."""
    monkeypatch.setattr(memory, "device_capacity", lambda device: ("a 1 MiB test card", 2 ** 20))
    out_dir = tmp_path / "run"
    code = train_main(["--data", str(tiny_folder), "--output-dir", str(out_dir), "--epochs=1",
                       "--batch_size=4", "--workers=0", "--arch=resnet18", "--trunk_width=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: this recipe needs an estimated"), err
    assert "a 1 MiB test card" in err[0] and "--checkpoint_activations=true" in err[0]
    assert "--grad_accum=2" in err[0]
    assert not out_dir.exists()


def _tiny_model(seed=0, checkpointed=False):
    torch.manual_seed(seed)
    return SwAVModel("resnet18", hidden_dim=16, out_dim=8, n_prototypes=7, small_images=True,
                     width=4, checkpoint_activations=checkpointed)


def _crops(seed, batch=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)] + \
           [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(2)]


def test_gradient_accumulation_steps_on_the_mean_of_the_micro_batch_losses():
    """step([b1, b2]) equals a hand-written step on (loss(b1) + loss(b2)) / 2: each
    micro-batch has its own Sinkhorn, one optimizer step follows."""
    crops = [_crops(1), _crops(2)]
    model = _tiny_model()
    optimizer = LARS(lars_param_groups(model, True), lr=0.1, weight_decay=1e-4)
    loss, embeddings = TrainStep(model, SwAVLoss(n_crops=4), optimizer)(crops, None, 0.1, False)

    by_hand = _tiny_model()
    by_hand_opt = LARS(lars_param_groups(by_hand, True), lr=0.1, weight_decay=1e-4)
    criterion = SwAVLoss(n_crops=4)
    with torch.no_grad():
        by_hand.prototypes.weight.copy_(torch.nn.functional.normalize(by_hand.prototypes.weight, dim=1))
    losses = [criterion(by_hand(c), by_hand.prototypes.weight) for c in crops]
    (sum(losses) / 2).backward()
    by_hand_opt.step()
    assert torch.allclose(loss, sum(losses).detach() / 2, atol=1e-6)
    assert embeddings.shape == (4 * 6, 8)
    for (name, a), b in zip(model.state_dict().items(), by_hand.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_activation_checkpointing_gives_the_same_gradients_and_state_dict():
    plain, checkpointed = _tiny_model(), _tiny_model(checkpointed=True)
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    assert any(type(m).__name__.startswith("Checkpointed") for m in checkpointed.modules())
    crops = _crops(3)
    for model in (plain, checkpointed):
        model(crops).square().sum().backward()
    compared = 0
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:  # the prototypes take no part in the forward
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name
            compared += 1
    assert compared > 50
    # The recomputation updates BatchNorm's running statistics a second time (documented);
    # with the same state, eval (the plain forward, nothing recomputed) gives equal outputs.
    bn = "trunk.layer1.0.bn1.running_mean"  # inside a checkpointed block
    assert not torch.allclose(plain.state_dict()[bn], checkpointed.state_dict()[bn])
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(crops), checkpointed(crops), atol=1e-6)


def test_a_run_with_accumulation_and_checkpointing_trains(tiny_folder, tmp_path):
    from fastswav.train import run

    cfg = tiny_config(tiny_folder, tmp_path / "run", epochs=1, steps_per_epoch=2, batch_size=4,
                      grad_accum=2, checkpoint_activations=True)
    summary = run(cfg, resume=False)
    assert summary["loss"] == summary["loss"]  # finite, not NaN
    assert (tmp_path / "run" / "checkpoint_epoch0001.pt").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_augmentation_peak_is_within_25_percent_of_a_measured_cpu_peak():
    """One batched multi-crop call (2x224 + 6x96, float32 on the CPU) in a fresh process
    (``benchmarks/bench_memory.py`` records the figures at 8 and 16 images)."""
    measured, estimated = bench_memory.augment_peak(8, 320)
    assert abs(estimated - measured) <= 0.25 * measured, (measured, estimated)


def test_the_estimate_counts_the_decode_once_data_path(tmp_path, capsys):
    """With a .beton the estimate adds two batches of canvases on the device and the
    augmentation's working set, at the file's canvas side (512, the writer's cap, before the
    file exists); crops count in bf16 on CUDA, float32 on the CPU."""
    fast = preset("100ep_fast")
    without = memory.estimate(fast, 8, "cuda")
    beton = fast.replace(data=str(tmp_path / "train.beton"))
    est = memory.estimate(beton, 8, "cuda")
    canvases = 256 * 3 * 512 * 512
    peak = memory.augment_peak_bytes(256, 512, (224, 96), (2, 6), "cuda")
    assert without.data_path == 0 and est.data_path == 2 * canvases + peak
    assert est.total == without.total + est.data_path
    assert 1.5 * 2 ** 30 < est.data_path < 2.5 * 2 ** 30  # ~1.9 GiB at 256 per GPU
    assert est.host_pinned == 4 * canvases
    pixels = 256 * 3 * (2 * 224 ** 2 + 6 * 96 ** 2)
    assert est.inputs == 2 * pixels * 3  # bf16, two micro-batches and the next
    assert memory.estimate(beton, 8, "cpu").inputs == 4 * pixels * 3
    assert info_main(["--memory", "--preset", "100ep_fast", f"--data={beton.data}"]) == 0
    out = capsys.readouterr().out
    assert "decode-once canvases and augmentation" in out and "pinned host memory" in out
