"""A minimal DINOv3-style training loop with fastswav's drop-in teacher losses.

    python examples/dino_style_loop.py --steps 5

Student and teacher: a torchvision ResNet-18 trunk and a DINO head (MLP, L2-normalised
bottleneck, weight-normalised prototypes), the teacher an EMA of the student. Each step
takes 2 global crops (32 px) and 4 local crops (16 px) of random images (no data needed),
and uses the drop-ins exactly where a DINOv3 loop uses ``dinov3.loss``:

- ``DINOLoss.sinkhorn_knopp_teacher`` on the teacher's global-crop outputs, then
  ``DINOLoss.forward(student_logits, teacher_probs)`` for the local crops against both
  teacher crops and with ``ignore_diagonal=True`` for the global crops, weighted by their
  numbers of terms as DINOv3 does;
- ``iBOTPatchLoss.sinkhorn_knopp_teacher`` with ``n_masked_patches_tensor`` on the masked
  "patch tokens" (here the positions of the trunk's last feature map), and
  ``forward_masked`` with ``n_masked_patches`` and ``masks_weight``.

On CUDA both run the fused Triton kernels; on the CPU the exact PyTorch reference.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from fastswav.dino import DINOLoss, iBOTPatchLoss


class Net(nn.Module):
    """ResNet-18 trunk; a DINO head on the pooled feature and on every spatial position."""

    def __init__(self, n_prototypes: int, hidden: int = 128, bottleneck: int = 64):
        super().__init__()
        trunk = torchvision.models.resnet18(weights=None)
        self.trunk = nn.Sequential(*list(trunk.children())[:-2])  # [B, 512, h, w]
        self.mlp = nn.Sequential(nn.Linear(512, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck, n_prototypes, bias=False))

    def head(self, feats):
        return self.prototypes(F.normalize(self.mlp(feats), dim=-1))

    def forward(self, images):
        fmap = self.trunk(images)
        cls = self.head(fmap.mean(dim=(2, 3)))
        patches = self.head(fmap.flatten(2).transpose(1, 2))  # [B, h*w, K]
        return cls, patches


def crops(images, size, n, generator):
    """n random square crops (half to full side) of every image, resized to ``size``."""
    out = []
    side = images.shape[-1]
    for _ in range(n):
        c = int(torch.randint(side // 2, side + 1, (1,), generator=generator))
        y, x = (int(v) for v in torch.randint(0, side - c + 1, (2,), generator=generator))
        out.append(F.interpolate(images[..., y:y + c, x:x + c], size=size, mode="bilinear",
                                 align_corners=False))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prototypes", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    device = torch.device(args.device)

    student = Net(args.prototypes).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    dino_loss = DINOLoss(args.prototypes).to(device)
    ibot_loss = iBOTPatchLoss(args.prototypes).to(device)
    dino_loss.init_weights()  # DINOv3's centers start as NaN until init_weights
    ibot_loss.init_weights()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.04)
    n_global, n_local, batch = 2, 4, args.batch_size
    global_terms, local_terms = n_global * (n_global - 1), n_global * n_local

    for step in range(args.steps):
        images = torch.rand(batch, 3, 48, 48, generator=g)
        global_crops = torch.cat(crops(images, 32, n_global, g)).to(device)
        local_crops = torch.cat(crops(images, 16, n_local, g)).to(device)

        # iBOT: mask about half the patch positions of the global crops
        with torch.no_grad():
            t_cls, t_patch = teacher(global_crops)  # [2B, K], [2B, P, K]
        masks = torch.rand(t_patch.shape[:2], generator=g) < 0.5
        masks[:, 0] = True
        idx = masks.flatten().nonzero().squeeze(1).to(device)
        n_masked = idx.numel()
        masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
        with torch.no_grad():
            targets = dino_loss.sinkhorn_knopp_teacher(t_cls, teacher_temp=0.07)
            targets = targets.unflatten(0, (n_global, batch))  # [2, B, K]
            t_targets = ibot_loss.sinkhorn_knopp_teacher(
                t_patch.flatten(0, 1)[idx], teacher_temp=0.07,
                n_masked_patches_tensor=torch.tensor(n_masked, device=device))

        s_cls_global, s_patch = student(global_crops)
        s_cls_local, _ = student(local_crops)

        loss_local = dino_loss(student_logits=s_cls_local.unflatten(0, (n_local, batch)),
                               teacher_probs=targets)
        loss_global = dino_loss(student_logits=s_cls_global.unflatten(0, (n_global, batch)),
                                teacher_probs=targets, ignore_diagonal=True)
        loss_dino = ((global_terms * loss_global + local_terms * loss_local)
                     / (global_terms + local_terms))
        loss_ibot = ibot_loss.forward_masked(s_patch.flatten(0, 1)[idx], t_targets,
                                             student_masks_flat=masks.to(device),
                                             n_masked_patches=n_masked,
                                             masks_weight=masks_weight.to(device))

        loss = loss_dino + loss_ibot
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # EMA teacher
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(0.99).add_(ps.detach(), alpha=0.01)
        print(f"step {step} loss {loss.item():.4f} (dino {loss_dino.item():.4f}, "
              f"ibot {loss_ibot.item():.4f})", flush=True)
    print("done")


if __name__ == "__main__":
    main()
