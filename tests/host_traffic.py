"""Tools of the host-traffic tests: a dispatch-mode trace of host reads, tensors made from
host data and cross-device copies, Triton launches replaced by no-ops, and the set of live
tensors (to see what a call leaves behind)."""
from __future__ import annotations

import contextlib
import gc

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

HOST_READS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero}
HOST_DATA = {aten.lift_fresh, aten.lift_fresh_copy}


class HostTrafficTrace(TorchDispatchMode):
    """Records host reads, tensors from host data and cross-device copies. A Python custom
    op of fastswav is traced through: its implementation runs under the trace too."""

    def __init__(self):
        super().__init__()
        self.found = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import OPDEFS

        kwargs = kwargs or {}
        self.ops += 1
        op = OPDEFS.get(func._schema.name) if func.namespace == "fastswav" else None
        if op is not None:
            with self:
                return op._init_fn(*args, **kwargs)
        packet = func.overloadpacket
        if packet in HOST_READS:
            self.found.append(f"host read: {func}")
        elif packet in HOST_DATA:
            self.found.append(f"tensor from host data: {func}")
        elif packet in (aten._to_copy, aten.copy_):
            src = args[1] if packet is aten.copy_ else args[0]
            dst_device = args[0].device if packet is aten.copy_ else kwargs.get("device", src.device)
            if torch.device(dst_device) != src.device:
                self.found.append(f"copy {src.device} -> {dst_device}: {func}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def launches_stubbed():
    """Triton launches record their kernel's name and do nothing."""
    from triton.runtime.jit import KernelInterface

    names = []
    previous = KernelInterface.__getitem__

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            names.append(getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)))
        return launch

    KernelInterface.__getitem__ = getitem
    try:
        yield names
    finally:
        KernelInterface.__getitem__ = previous


def live_tensors() -> dict:
    """id -> shape of every tensor object alive in this process (after a collection)."""
    gc.collect()
    # type(), not isinstance(): isinstance on a dead weakref.proxy in the heap raises
    # ReferenceError, and proxies are not tensors anyway.
    return {id(o): tuple(o.shape) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}


def probe_first_call(call) -> dict:
    """Run ``call`` once with launches stubbed, traced for host traffic: the kernels it
    launched, what the trace found, how many ops it saw, and the shapes of the tensors the
    call left alive (made during it, still referenced once it returned)."""
    with launches_stubbed() as kernels:
        before = live_tensors()
        trace = HostTrafficTrace()
        with trace:
            call()
        after = live_tensors()
    kept = [f"{shape}" for key, shape in after.items() if key not in before]
    return {"kernels": sorted(set(kernels)), "host": trace.found, "ops": trace.ops, "kept": kept}
