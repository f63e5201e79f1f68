"""Start torch's autograd engine at set-up instead of at the first training backward.

The engine creates its per-device worker threads at the first ``backward()`` of a process,
one for each device of the device types registered then, and each thread takes the GIL once
to make its Python thread state. Two things make that a hazard at exit in a trainer:

- on the CPU, the memory estimate's fake tensors make the engine count 8 devices (torch
  2.14), so the first backward starts 8 threads that a CPU run never uses;
- in a short run (a test, a resumed run with one epoch left) the first backward comes a
  fraction of a second before the process exits (0.25 s in the two-process resume test), so a
  thread starved of CPU time can still be making its thread state while the interpreter
  finalizes. With that delay injected, the exit waits out the engine's 10 s shutdown wait
  or, later still, crashes; at exit these threads are the only ones beside the main one.

One backward of a constant at set-up, before anything else, fixes the pool while no device
type counts: a CPU run then has no such threads at all, and on a GPU they start minutes
before the end of the run instead of seconds.
"""
from __future__ import annotations

import torch


def start_autograd_engine() -> None:
    """Run the process's first backward now (a no-op one), so that the engine's device
    threads are created at set-up, sized by the devices this process really has."""
    leaf = torch.zeros((), requires_grad=True)
    leaf.backward()
