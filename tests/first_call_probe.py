"""Run as a script in a fresh process: the FIRST call of each fused op (forward and
backward), of the queue push and of the SwAV loss module with its queue, traced for host
traffic, and the tensors each call leaves alive once its results are dropped.

Prints one JSON object: op name -> {"kernels": [...], "host": [...], "kept": [...]}. A
fresh process matters: an op that caches device tensors on its first use (a host copy, and
memory a CUDA graph's pool would reuse) shows it only on that first call.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTSWAV_BACKEND"] = "fused"

import torch  # noqa: E402

from host_traffic import probe_first_call  # noqa: E402


def _swav_loss(precision, with_queue):
    def call():
        from fastswav.ops.fused_loss import swav_loss_fused

        g = torch.Generator().manual_seed(0)
        emb = torch.randn(4 * 6, 16, generator=g).requires_grad_()
        protos = torch.randn(11, 16, generator=g).requires_grad_()
        queue = torch.randn(2, 8, 16, generator=g) if with_queue else None
        valid = torch.ones(()) if with_queue else None
        loss = swav_loss_fused(emb, protos, n_crops=4, crops_for_assign=(0, 1), queue=queue,
                               queue_valid=valid, precision=precision)
        loss.backward()
    return call


def _swav_loss_module_with_queue():
    from fastswav.loss import SwAVLoss
    from fastswav.queue import FeatureQueue

    criterion = SwAVLoss(n_crops=3, crops_for_assign=(0, 1))
    queue = FeatureQueue(2, 8, 16)

    def call():
        emb = torch.randn(3 * 4, 16).requires_grad_()
        protos = torch.randn(7, 16).requires_grad_()
        criterion(emb, protos, queue).backward()
    return call


def _queue_push():
    from fastswav.queue import FeatureQueue

    queue = FeatureQueue(2, 8, 16)
    return lambda: queue.push(torch.randn(2, 4, 16))


def _teacher_sinkhorn(with_n_valid):
    def call():
        from fastswav.ops.teacher import sinkhorn_knopp_fused

        n_valid = torch.full((1,), 5) if with_n_valid else None
        sinkhorn_knopp_fused(torch.randn(9, 13), 0.05, 3, n_valid=n_valid)
    return call


def _teacher_ce():
    def call():
        from fastswav.ops.teacher import teacher_student_cross_entropy

        student = torch.randn(3 * 4, 13).requires_grad_()
        targets = torch.softmax(torch.randn(2 * 4, 13), dim=1)
        teacher_student_cross_entropy(student, targets, n_student_crops=3).backward()
    return call


CASES = {
    "swav_loss tf32 with queue": _swav_loss("tf32", True),
    "swav_loss ieee with queue": _swav_loss("ieee", True),
    "swav_loss bf16 no queue": _swav_loss("bf16", False),
    "teacher sinkhorn_knopp": _teacher_sinkhorn(False),
    "teacher sinkhorn_knopp n_valid": _teacher_sinkhorn(True),
    "teacher cross-entropy": _teacher_ce(),
    "queue push": _queue_push(),
    "SwAVLoss module with queue": _swav_loss_module_with_queue(),
}


def main() -> int:
    # Modules imported first, so what importing makes (constants) is not counted as kept.
    import fastswav.loss, fastswav.ops.fused_loss, fastswav.ops.teacher, fastswav.queue  # noqa: F401,E401
    import fastswav.kernels.scores, fastswav.kernels.sinkhorn  # noqa: F401,E401
    import fastswav.kernels.swapped_ce, fastswav.kernels.teacher  # noqa: F401,E401

    report = {name: probe_first_call(call) for name, call in CASES.items()}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
