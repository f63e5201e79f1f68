"""One SwAV training step, eager or compiled.

The step: renormalise the prototype rows in place -> multi-crop forward (the trunk once per
resolution group) -> SwAV loss (queue read and pushed inside) -> backward -> optimizer.
Nothing in it reads a value back to the host: the loss is returned as a device tensor.
With gradient accumulation the step takes several multi-crop micro-batches: forward, loss
and backward run for each (DDP synchronises the gradients in the last backward only), then
one optimizer step.

``compile_mode`` (``none``, or a ``torch.compile`` mode: ``default``, ``reduce-overhead``,
``max-autotune``, ``max-autotune-no-cudagraphs``) compiles two regions with static shapes:

- the model's forward, compiled in place (``nn.Module.compile``), so that under
  DistributedDataParallel the wrapper's own forward (its reducer bookkeeping, which dynamo
  cannot trace) stays eager and calls the compiled module, the structure torch supports for
  DDP. Dynamo's DDPOptimizer then splits that graph at the gradient buckets (one graph per
  bucket the forward spans, so that each bucket's all-reduce overlaps the backward of the
  rest); without DDP it is one graph. The multi-crop forward unrolls into one trunk call per
  resolution group, each compiled for its own fixed shape;
- the loss (Sinkhorn, the swapped prediction, the queue push): one graph; the fused loss is a
  custom op and stays in it.

No frame that dynamo enters falls back to eager and nothing recompiles after the first step
(tests/test_ddp_compile.py counts this under 2-process DDP with gradient accumulation).
Backward comes from AOTAutograd; the optimizer is a handful of foreach kernels and stays
eager.

``reduce-overhead`` also replays the compiled forward and backward as CUDA graphs: the fused
loss and the queue push run inside them (neither syncs with the host nor copies from it,
and the queue's buffers are marked as static addresses so that its in-place update is
captured rather than making the graph fall back). Each call marks a new step for the graph
trees and returns copies of the loss and embeddings, so they outlive the next replay. It
takes one micro-batch per optimizer step: with gradient accumulation, the next micro-batch's
replay would free the gradients the previous one allocated inside the graph pool, so the
combination is refused (:func:`check_compile_mode`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import torch
from torch import nn

from .ops.prototypes import normalize_prototypes_
from .optim import set_lr
from .profiling import nvtx_range

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(compile_mode: str, grad_accum: int = 1) -> None:
    """ValueError unless ``compile_mode`` is known and works with ``grad_accum`` micro-batches."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile={compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if compile_mode == "reduce-overhead" and grad_accum > 1:
        raise ValueError(
            f"compile=reduce-overhead cannot accumulate gradients (grad_accum={grad_accum}): a "
            "CUDA-graph replay frees the gradients the previous micro-batch allocated in the "
            "graph pool; use compile=default or max-autotune-no-cudagraphs, or grad_accum=1")


def unwrap(model: nn.Module) -> nn.Module:
    """The SwAV model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


class TrainStep:
    """Callable ``step(crops, queue, lr, freeze_prototypes) -> (loss, embeddings)``.

    ``loss`` is the detached scalar loss and ``embeddings`` the detached ``[n_crops * B, D]``
    embeddings (for monitoring); both stay on the device. ``compile_backend`` is for tests
    (``aot_eager`` checks the traced graph without a C++ compiler). A compiled step compiles
    the model (the module inside a DDP wrapper) in place: its state dict is unchanged.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                 compile_mode: str = "none", compile_backend="inductor"):
        check_compile_mode(compile_mode)
        self.model = model
        self.criterion = criterion
        self.optimizer = optimizer
        self.autocast = autocast or contextlib.nullcontext
        self.compile_mode = compile_mode
        self._loss = criterion
        if compile_mode != "none":
            # A mode is an inductor option; other backends (tests) take none.
            options = dict(backend=compile_backend, dynamic=False)
            if compile_backend == "inductor":
                options["mode"] = compile_mode
            unwrap(model).compile(**options)
            self._loss = torch.compile(criterion, **options)

    def _forward_loss(self, crops: List[torch.Tensor], prototypes: torch.Tensor, queue):
        with nvtx_range("forward"), self.autocast():
            embeddings = self.model(crops)
        with nvtx_range("loss"):
            loss = self._loss(embeddings, prototypes, queue)
        return loss, embeddings

    def _prepare_cuda_graphs(self, queue) -> None:
        if queue is not None and not getattr(queue, "_static_for_graphs", False):
            for buffer in queue.buffers():
                torch._dynamo.mark_static_address(buffer)
            queue._static_for_graphs = True
        torch.compiler.cudagraph_mark_step_begin()

    def __call__(self, crops, queue, lr: float, freeze_prototypes: bool):
        """One optimizer step over ``crops``: one multi-crop batch (a list of crop tensors),
        or a list of such micro-batches whose gradients are accumulated (each runs its own
        Sinkhorn and pushes into the queue; the loss of each is divided by their number, so
        the gradient is their mean). Returns the mean loss and the last micro-batch's
        embeddings."""
        micro_batches = [crops] if isinstance(crops[0], torch.Tensor) else list(crops)
        n = len(micro_batches)
        check_compile_mode(self.compile_mode, n)
        graphs = self.compile_mode == "reduce-overhead"
        prototypes = unwrap(self.model).prototypes.weight
        normalize_prototypes_(prototypes)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for i, batch in enumerate(micro_batches):
            if graphs:
                self._prepare_cuda_graphs(queue)
            # DDP all-reduces the gradients in the last micro-batch's backward only.
            no_sync = getattr(self.model, "no_sync", None) if i < n - 1 else None
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                loss, embeddings = self._forward_loss(batch, prototypes, queue)
                with nvtx_range("backward"):
                    (loss / n if n > 1 else loss).backward()
            # graph outputs are overwritten by the next replay: keep copies
            loss = loss.detach().clone() if graphs else loss.detach()
            total = loss if total is None else total + loss
        if freeze_prototypes:
            prototypes.grad = None  # the official freeze: no update, no momentum, no decay
        with nvtx_range("optimizer"):
            self.optimizer.step()
        mean = total / n if n > 1 else total
        return mean, embeddings.detach().clone() if graphs else embeddings.detach()
