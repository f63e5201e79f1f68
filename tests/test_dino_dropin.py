"""fastswav.dino against DINOv2's and DINOv3's published loss formulas, method by method.

The "original" side is written here, in float64, from the published code's semantics:
Sinkhorn-Knopp with a plain exp (no shift) and B from the sample count, DINOv3's einsum
loss with its ``ignore_diagonal`` count, DINOv2's sum over crop pairs, iBOT's masked mean
and its ``forward_masked`` weights, and the softmax-centering state machine (an EMA of the
teacher's batch mean applied at the next centering). Both backends run: the PyTorch
reference and the fused Triton kernels (under TRITON_INTERPRET=1 on the CPU).

Tolerances: targets atol 1e-6 + rtol 1e-4 (float32 exp of x / T amplifies the rounding of
the input by 1/T); losses rtol 1e-5 (fp32 inputs) or 1e-4 (bf16 inputs, against the formula
on the same rounded values: only the float32 arithmetic differs); gradients max |got - want|
<= 1e-5 (fp32) or 1e-2 (bf16: rounded once to bf16) times max |want|; centering 1e-6.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastswav.dino import DINOLoss, SinkhornKnoppTeacher, iBOTPatchLoss

pytest.importorskip("triton")

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
BACKENDS = pytest.mark.parametrize("backend", ["reference", "fused"])
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def use_backend(monkeypatch):
    def use(name):
        monkeypatch.setenv("FASTSWAV_BACKEND", name)
    return use


def _randn(*shape, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _max_rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


# ------------------------------------------------------------------ the published formulas

def published_sinkhorn(logits, temp, n_iterations, n_samples=None):
    """Q = exp(x / T)^T normalised to mass 1, then n_iterations of (each prototype row to
    mass 1/K, each sample column to mass 1/B), finally times B; transposed back. B is the
    row count unless given (iBOT: the masked-patch count)."""
    q = torch.exp(logits.double() / temp).t()
    k = q.shape[0]
    b = q.shape[1] if n_samples is None else float(n_samples)
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def published_dinov3_loss(student, teacher, student_temp, ignore_diagonal):
    """Mean over (s, t, b) terms of -sum_k t log_softmax(s / T); the s == t pairs are left
    out of both the sum and the count with ignore_diagonal."""
    lsm = F.log_softmax(student.double() / student_temp, dim=-1)
    per_pair = -torch.einsum("sbk,tbk->st", lsm, teacher.double())
    n_s, batch, _ = student.shape
    n_t = teacher.shape[0]
    if not ignore_diagonal:
        return per_pair.sum() / (batch * n_s * n_t)
    diag = min(n_s, n_t)
    per_pair = per_pair * (1 - torch.eye(n_s, n_t, dtype=per_pair.dtype))
    return per_pair.sum() / (batch * n_s * n_t - batch * diag)


def published_dinov2_loss(student_list, teacher_list, student_temp):
    """Sum over every (student, teacher) pair of the batch mean of -sum t log_softmax."""
    total = 0
    for s in student_list:
        lsm = F.log_softmax(s.double() / student_temp, dim=-1)
        for t in teacher_list:
            total = total - (t.double() * lsm).sum(-1).mean()
    return total


def published_ibot_forward(student, teacher, masks, student_temp):
    per_patch = (teacher.double() * F.log_softmax(student.double() / student_temp, -1)).sum(-1)
    per_image = (per_patch * masks.double()).sum(-1) / masks.sum(-1).clamp(min=1.0)
    return -per_image.mean()


def published_ibot_forward_masked(student, teacher, masks, student_temp, n_masked_patches=None,
                                  masks_weight=None):
    per_patch = (teacher.double() * F.log_softmax(student.double() / student_temp, -1)).sum(-1)
    if masks_weight is None:
        masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    if n_masked_patches is not None:
        per_patch = per_patch[:n_masked_patches]
    return -(per_patch * masks_weight.double()).sum() / masks.shape[0]


class PublishedCentering:
    """The softmax-centering state machine: update_center records the batch sum (and its
    length); the next softmax_center_teacher (or apply_center_update) folds the batch mean
    into the EMA center once, then centers and sharpens."""

    def __init__(self, center, momentum, patch):
        self.center, self.momentum, self.patch = center.double().clone(), momentum, patch
        self.pending = None

    def update_center(self, out):
        out = out.double()
        total = out.mean(1).sum(0, keepdim=True) if self.patch else out.sum(0, keepdim=True)
        self.pending = (total, len(out))

    def apply_center_update(self):
        if self.pending is not None:
            total, n = self.pending
            self.center = self.center * self.momentum + total / n * (1 - self.momentum)
            self.pending = None

    def softmax_center_teacher(self, out, temp, update_centers=True):
        if update_centers:
            self.apply_center_update()
        return F.softmax((out.double() - self.center) / temp, dim=-1)


# ------------------------------------------------------------------ Sinkhorn-Knopp teachers

@BACKENDS
@DTYPES
@pytest.mark.parametrize("flavor", ["dinov2", "dinov3"])
@pytest.mark.parametrize("n_iterations", [0, 3])
def test_dino_sinkhorn_knopp_teacher(use_backend, backend, dtype, flavor, n_iterations):
    use_backend(backend)
    x = _randn(2 * 13, 67, seed=1, dtype=dtype)  # 2 global crops of 13 images, odd K
    got = DINOLoss(67, flavor=flavor).sinkhorn_knopp_teacher(x, teacher_temp=0.07,
                                                             n_iterations=n_iterations)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.allclose(got.double(), published_sinkhorn(x, 0.07, n_iterations),
                          atol=1e-6, rtol=1e-4)


@BACKENDS
@DTYPES
@pytest.mark.parametrize("flavor", ["dinov2", "dinov3"])
@pytest.mark.parametrize("n_iterations", [0, 3])
def test_ibot_sinkhorn_knopp_teacher_with_the_masked_patch_count(use_backend, backend, dtype,
                                                                 flavor, n_iterations):
    use_backend(backend)
    rows, k = 29, 45
    x = _randn(rows, k, seed=2, dtype=dtype)
    loss = iBOTPatchLoss(k, flavor=flavor)
    assert isinstance(loss.sinkhorn_knopp_teacher, SinkhornKnoppTeacher)
    count = torch.tensor(rows)  # the collate's n_masked_patches: every row is a masked patch
    got = loss.sinkhorn_knopp_teacher(x, teacher_temp=0.05, n_masked_patches_tensor=count,
                                      n_iterations=n_iterations)
    want = published_sinkhorn(x, 0.05, n_iterations, n_samples=rows)
    assert torch.allclose(got.double(), want, atol=1e-6, rtol=1e-4)
    assert int(count) == rows  # one process: nothing to all_reduce
    # B = the count, not the row count: it scales the targets at 0 iterations, and cancels
    # after a column normalisation, as in the published code
    other = SinkhornKnoppTeacher()(x, 0.05, torch.tensor(rows + 6), n_iterations)
    assert torch.allclose(other.double(), published_sinkhorn(x, 0.05, n_iterations, rows + 6),
                          atol=1e-6, rtol=1e-4)


def test_sinkhorn_knopp_teacher_module_compiles_in_one_graph():
    """DINOv3 compiles the module: the fused op and the scaling stay in one graph."""
    mod = SinkhornKnoppTeacher()
    x = _randn(11, 40, seed=3)
    compiled = torch.compile(mod, backend="eager", fullgraph=True)
    got = compiled(x, 0.07, torch.tensor(11))
    assert torch.allclose(got, mod(x, 0.07, torch.tensor(11)), atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------ cross-entropies

def _check_grads(got_loss, student, want_loss, student64, dtype):
    assert torch.allclose(got_loss.double(), want_loss, rtol=LOSS_RTOL[dtype])
    got_loss.backward()
    want_loss.backward()
    assert student.grad.dtype == student.dtype
    assert _max_rel(student.grad, student64.grad) <= GRAD_RTOL[dtype]


@BACKENDS
@DTYPES
@pytest.mark.parametrize("ignore_diagonal", [False, True])
@pytest.mark.parametrize("n_student", [2, 5])
def test_dinov3_forward(use_backend, backend, dtype, ignore_diagonal, n_student):
    use_backend(backend)
    batch, k = 7, 53
    student = _randn(n_student, batch, k, seed=4, dtype=dtype).requires_grad_()
    teacher = published_sinkhorn(_randn(2 * batch, k, seed=5), 0.07, 3).float().view(2, batch, k)
    got = DINOLoss(k)(student, teacher, ignore_diagonal=ignore_diagonal)
    s64 = student.detach().double().requires_grad_()
    want = published_dinov3_loss(s64, teacher, 0.1, ignore_diagonal)
    _check_grads(got, student, want, s64, dtype)


@BACKENDS
@DTYPES
def test_dinov2_forward_sums_over_the_pairs(use_backend, backend, dtype):
    use_backend(backend)
    n_local, batch, k = 4, 6, 50
    student = _randn(n_local * batch, k, seed=6, dtype=dtype).requires_grad_()
    teacher = published_sinkhorn(_randn(2 * batch, k, seed=7), 0.04, 3).float()
    loss_fn = DINOLoss(k, flavor="dinov2")
    got = loss_fn(student.chunk(n_local), teacher.chunk(2))  # chunks: no copy
    s64 = student.detach().double().requires_grad_()
    want = published_dinov2_loss(s64.chunk(n_local), teacher.chunk(2), 0.1)
    _check_grads(got, student, want, s64, dtype)
    apart = [c.detach().clone() for c in student.chunk(n_local)]  # not one buffer: concatenated
    assert torch.allclose(loss_fn(apart, list(teacher.chunk(2))), got, rtol=1e-6)


@BACKENDS
@DTYPES
@pytest.mark.parametrize("flavor", ["dinov2", "dinov3"])
def test_ibot_forward(use_backend, backend, dtype, flavor):
    use_backend(backend)
    n_img, n_patch, k = 3, 10, 37
    masks = torch.rand(n_img, n_patch, generator=torch.Generator().manual_seed(8)) < 0.4
    masks[2] = False  # an image without masked patches: clamp(min=1) keeps it finite
    student = _randn(n_img, n_patch, k, seed=9, dtype=dtype).requires_grad_()
    teacher = F.softmax(_randn(n_img, n_patch, k, seed=10), dim=-1)
    got = iBOTPatchLoss(k, flavor=flavor)(student, teacher, masks)
    s64 = student.detach().double().requires_grad_()
    _check_grads(got, student, published_ibot_forward(s64, teacher, masks, 0.1), s64, dtype)


@BACKENDS
@DTYPES
@pytest.mark.parametrize("weights", ["given", "from_masks"])
@pytest.mark.parametrize("limit", [None, "count"])
def test_ibot_forward_masked(use_backend, backend, dtype, weights, limit):
    use_backend(backend)
    n_img, n_patch, k = 4, 9, 41
    masks = torch.rand(n_img, n_patch, generator=torch.Generator().manual_seed(11)) < 0.5
    masks[:, 0] = True
    n_masked = int(masks.sum())
    masks_weight = None
    if weights == "given":  # as DINOv3's collate: 1 / the image's masked count, per patch
        masks_weight = (1 / masks.sum(-1).float()).unsqueeze(-1).expand_as(masks)[masks]
    n_masked_patches = n_masked if limit == "count" else None
    student = _randn(n_masked, k, seed=12, dtype=dtype).requires_grad_()
    teacher = published_sinkhorn(_randn(n_masked, k, seed=13), 0.07, 3).float()
    got = iBOTPatchLoss(k).forward_masked(student, teacher, masks,
                                          n_masked_patches=n_masked_patches,
                                          masks_weight=masks_weight)
    s64 = student.detach().double().requires_grad_()
    want = published_ibot_forward_masked(s64, teacher, masks, 0.1, n_masked_patches,
                                         masks_weight)
    _check_grads(got, student, want, s64, dtype)


def test_ibot_forward_masked_counts_only_the_first_n_masked_patches():
    """Rows past n_masked_patches (DINOv2 pads to an upper bound) add nothing, even NaN."""
    masks = torch.tensor([[True, False, True], [False, True, False]])
    student = _randn(5, 16, seed=14).requires_grad_()
    teacher = F.softmax(_randn(5, 16, seed=15), -1)
    weight = torch.tensor([0.5, 0.5, 1.0])
    got = iBOTPatchLoss(16).forward_masked(student, teacher, masks, n_masked_patches=3,
                                           masks_weight=weight)
    want = published_ibot_forward_masked(student[:3].detach(), teacher[:3], masks, 0.1,
                                         3, weight)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    got.backward()
    assert (student.grad[3:] == 0).all()


# ------------------------------------------------------------------ softmax centering

@pytest.mark.parametrize("cls,shape,patch", [(DINOLoss, (1, 24), False),
                                             (iBOTPatchLoss, (1, 1, 24), True)],
                         ids=["dino", "ibot"])
@pytest.mark.parametrize("flavor", ["dinov2", "dinov3"])
def test_centering_state_across_steps(cls, shape, patch, flavor):
    loss = cls(24, center_momentum=0.8, flavor=flavor)
    if flavor == "dinov3":
        assert torch.isnan(loss.center).all()  # NaN until init_weights, as DINOv3
        loss.init_weights()
    assert loss.center.shape == shape and (loss.center == 0).all()
    published = PublishedCentering(loss.center, 0.8, patch)
    for step in range(4):
        out = _randn(*((5, 6, 24) if patch else (5, 24)), seed=20 + step)
        got = loss.softmax_center_teacher(out, teacher_temp=0.07)
        want = published.softmax_center_teacher(out, 0.07)
        assert torch.allclose(got.double(), want, atol=1e-6), step
        assert torch.allclose(loss.center.double(), published.center, atol=1e-6), step
        loss.update_center(out)
        published.update_center(out)
        assert loss.updated is False
        # update_centers=False (DINOv3) centers with the old center, applies nothing
        got = loss.softmax_center_teacher(out, 0.07, update_centers=False)
        assert torch.allclose(got.double(), published.softmax_center_teacher(out, 0.07, False),
                              atol=1e-6)
        assert loss.updated is False
    loss.apply_center_update()
    published.apply_center_update()
    assert loss.updated is True
    assert torch.allclose(loss.center.double(), published.center, atol=1e-6)
    before = loss.center.clone()
    loss.apply_center_update()  # applied once only
    assert torch.equal(loss.center, before)
    assert list(dict(loss.named_buffers())) == ["center"]  # still the registered buffer


def test_reduce_center_update_records_the_batch():
    loss = DINOLoss(8)
    out = _randn(6, 8, seed=30)
    loss.reduce_center_update(out)
    assert loss.len_teacher_output == 6 and loss.reduce_handle is None
    assert torch.allclose(loss.async_batch_center, out.sum(0, keepdim=True))
    ibot = iBOTPatchLoss(8)
    patches = _randn(1, 9, 8, seed=31)
    ibot.reduce_center_update(patches)
    assert ibot.len_teacher_patch_tokens == 1
    assert torch.allclose(ibot.async_batch_center, patches.mean(1).sum(0, keepdim=True))


# ------------------------------------------------------------------ state dict, API

class _MetaArch(nn.Module):
    def __init__(self, cls_k, patch_k, flavor):
        super().__init__()
        self.dino_loss = DINOLoss(cls_k, flavor=flavor)
        self.ibot_patch_loss = iBOTPatchLoss(patch_k, flavor=flavor)


@pytest.mark.parametrize("flavor", ["dinov2", "dinov3"])
def test_state_dict_keys_equal_the_originals(flavor):
    arch = _MetaArch(32, 48, flavor)
    state = arch.state_dict()
    assert list(state) == ["dino_loss.center", "ibot_patch_loss.center"]
    assert state["dino_loss.center"].shape == (1, 32)
    assert state["ibot_patch_loss.center"].shape == (1, 1, 48)
    # a checkpoint of the originals (same keys, same shapes) loads strictly, and back
    original = {"dino_loss.center": torch.randn(1, 32),
                "ibot_patch_loss.center": torch.randn(1, 1, 48)}
    arch.load_state_dict(original, strict=True)
    for key, value in arch.state_dict().items():
        assert torch.equal(value, original[key])


def test_constructor_and_method_signatures_match_the_originals():
    import inspect

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
                if p.kind is not p.KEYWORD_ONLY]

    empty = inspect.Parameter.empty
    assert params(DINOLoss.__init__)[1:] == [("out_dim", empty), ("student_temp", 0.1),
                                             ("center_momentum", 0.9)]
    assert params(iBOTPatchLoss.__init__)[1:] == [("patch_out_dim", empty),
                                                  ("student_temp", 0.1),
                                                  ("center_momentum", 0.9)]
    assert params(DINOLoss.sinkhorn_knopp_teacher)[1:] == [
        ("teacher_output", empty), ("teacher_temp", empty), ("n_iterations", 3)]
    assert params(SinkhornKnoppTeacher.forward)[1:] == [
        ("teacher_output", empty), ("teacher_temp", empty), ("n_masked_patches_tensor", empty),
        ("n_iterations", 3)]
    assert params(DINOLoss._forward_dinov3)[1:] == [
        ("student_logits", empty), ("teacher_probs", empty), ("ignore_diagonal", False)]
    assert params(DINOLoss._forward_dinov2)[1:] == [
        ("student_output_list", empty), ("teacher_out_softmaxed_centered_list", empty)]
    assert params(iBOTPatchLoss.forward_masked)[1:] == [
        ("student_patch_tokens_masked", empty), ("teacher_patch_tokens_masked", empty),
        ("student_masks_flat", empty), ("n_masked_patches", None), ("masks_weight", None)]
    # keyword names reach the right flavor
    s, t = _randn(2, 3, 8, seed=40), F.softmax(_randn(2, 3, 8, seed=41), -1)
    v3 = DINOLoss(8)(student_logits=s, teacher_probs=t, ignore_diagonal=True)
    v2 = DINOLoss(8, flavor="dinov2")(student_output_list=s,
                                     teacher_out_softmaxed_centered_list=t)
    assert math.isfinite(v3.item()) and math.isfinite(v2.item())
    with pytest.raises(ValueError, match="flavor"):
        DINOLoss(8, flavor="dinov1")


def test_group_is_settable_and_may_be_a_callable():
    calls = []

    def subgroup():
        calls.append(1)
        return None  # the world

    ibot = iBOTPatchLoss(16, group=subgroup)
    assert ibot.sinkhorn_knopp_teacher.group is subgroup
    ibot.group = None
    assert ibot.sinkhorn_knopp_teacher.group is None
    ibot.group = subgroup
    ibot.sinkhorn_knopp_teacher(_randn(4, 16, seed=42), 0.1, torch.tensor(4))
    dino = DINOLoss(16, group=subgroup)
    dino.sinkhorn_knopp_teacher(_randn(4, 16, seed=43), 0.1)
    assert len(calls) == 2  # resolved at each call, as DINOv3's get_process_subgroup()


# ------------------------------------------------------------------ process subgroups

def _subgroup_worker(rank, world, store, cls_logits, patch_logits, result):
    import os

    import torch.distributed as dist

    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # every rank creates every group, as dinov3.distributed.new_subgroups does
        singles = [dist.new_group([r]) for r in range(world)]
        pair = dist.new_group(list(range(world)))
        out = {}
        for size, group in ((1, singles[rank]), (2, pair)):
            for backend in ("reference", "fused"):
                os.environ["FASTSWAV_BACKEND"] = backend
                key = f"{size}/{backend}"
                dino = DINOLoss(cls_logits[rank].shape[1], group=lambda g=group: g)
                out[key + "/cls"] = dino.sinkhorn_knopp_teacher(cls_logits[rank], 0.07)
                ibot = iBOTPatchLoss(patch_logits[rank].shape[1], group=group)
                for iters in (0, 3):
                    count = torch.tensor(patch_logits[rank].shape[0])
                    out[f"{key}/patch{iters}"] = ibot.sinkhorn_knopp_teacher(
                        patch_logits[rank], 0.05, n_masked_patches_tensor=count,
                        n_iterations=iters)
                    out[f"{key}/count{iters}"] = int(count)  # all_reduced in place
            dino.init_weights()
            dino.update_center(cls_logits[rank])
            dino.softmax_center_teacher(cls_logits[rank], 0.07)
            out[f"{size}/center"] = dino.center.clone()
            ibot.init_weights()
            ibot.update_center(patch_logits[rank].unsqueeze(0))
            ibot.apply_center_update()
            out[f"{size}/patch_center"] = ibot.center.clone()
        result[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~30 s on 2 cores: two processes start torch and the interpreter
def test_process_subgroups_of_one_and_two_equal_one_process(tmp_path):
    """2 gloo processes, DINOv3-style subgroups: a subgroup of 2 gives the single-process
    result on the concatenated rows (B the summed masked-patch count), a subgroup of 1 the
    result on each process's own rows."""
    import torch.multiprocessing as mp

    world, k_cls, k_patch = 2, 37, 29
    cls_logits = [_randn(2 * 5, k_cls, seed=50 + r) for r in range(world)]
    patch_logits = [_randn(n, k_patch, seed=60 + r) for r, n in enumerate((7, 12))]
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_subgroup_worker, nprocs=world,
                 args=(world, str(tmp_path / "store"), cls_logits, patch_logits, result))
        result = dict(result)

    def close(got, want):
        return torch.allclose(got.double(), want.double(), atol=1e-6, rtol=1e-5)

    for backend in ("reference", "fused"):
        both = torch.cat([result[r][f"2/{backend}/cls"] for r in range(world)])
        assert close(both, published_sinkhorn(torch.cat(cls_logits), 0.07, 3)), backend
        for iters in (0, 3):
            both = torch.cat([result[r][f"2/{backend}/patch{iters}"] for r in range(world)])
            assert close(both, published_sinkhorn(torch.cat(patch_logits), 0.05, iters, 19))
        for r in range(world):
            assert close(result[r][f"1/{backend}/cls"], published_sinkhorn(cls_logits[r], 0.07, 3))
            n = patch_logits[r].shape[0]
            for iters in (0, 3):
                assert close(result[r][f"1/{backend}/patch{iters}"],
                             published_sinkhorn(patch_logits[r], 0.05, iters, n))
                assert result[r][f"1/{backend}/count{iters}"] == n
                assert result[r][f"2/{backend}/count{iters}"] == 19
    mean_all = torch.cat(cls_logits).mean(0, keepdim=True) * 0.1  # from a zero center
    for r in range(world):
        assert close(result[r]["2/center"], mean_all)
        assert close(result[r]["1/center"], cls_logits[r].mean(0, keepdim=True) * 0.1)
        assert close(result[r]["1/patch_center"], patch_logits[r].mean(0) * 0.1)
    # the patch centre over 2 processes: each sums its image's patch mean; / (1 image * 2)
    want = (patch_logits[0].mean(0) + patch_logits[1].mean(0)) / 2 * 0.1
    assert close(result[0]["2/patch_center"], want) and close(result[1]["2/patch_center"], want)


def test_the_docs_snippet_runs():
    """docs/loss.md's "In a DINOv2 or DINOv3 training loop" code, on small inputs."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "loss.md").read_text()
    section = text[text.index("### In a DINOv2 or DINOv3 training loop"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    k, batch, n_img, n_patch = 32, 3, 2, 6
    masks = torch.zeros(n_img, n_patch, dtype=torch.bool)
    masks[0, :4] = masks[1, :2] = True
    n = int(masks.sum())
    namespace = dict(
        K=k, B=batch, teacher_cls=_randn(2 * batch, k, seed=70),
        teacher_masked_patches=_randn(n, k, seed=71), n_masked_patches=torch.tensor(n),
        student_local_cls=_randn(8, batch, k, seed=72), student_global_cls=_randn(2, batch, k,
                                                                               seed=73),
        student_masked_patches=_randn(n, k, seed=74), masks=masks, n=n,
        masks_weight=(1 / masks.sum(-1).float()).unsqueeze(-1).expand_as(masks)[masks])
    exec(compile(code, "docs/loss.md", "exec"), namespace)
    for name in ("local_loss", "global_loss", "ibot_loss"):
        assert math.isfinite(namespace[name].item()), name
