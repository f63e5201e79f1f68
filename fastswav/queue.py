"""FeatureQueue: past embeddings of the assigned crops, kept as a device-side ring buffer."""
from __future__ import annotations

import torch
from torch import nn

from .ops.queue import ring_in_official_order
from .ops.queue_ext import ensure_extension, queue_push_


class FeatureQueue(nn.Module):
    """A queue of ``length`` past embeddings for each of ``n_assign`` assigned crops.

    The write position and fill count are device tensors, so pushing never syncs with the
    host. The queue takes part in Sinkhorn only once full (the official rule); ``valid()``
    returns that as a 0-dim 0/1 tensor, again without a sync. All state is in buffers, so
    it is saved and restored with ``state_dict``.
    """

    def __init__(self, n_assign: int, length: int, dim: int, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if n_assign < 1 or length < 1 or dim < 1:
            raise ValueError(f"bad queue shape: n_assign={n_assign}, length={length}, dim={dim}")
        ensure_extension()  # the compiled op, built on first use where the install did not
        self.register_buffer("embeddings", torch.zeros(n_assign, length, dim, dtype=dtype, device=device))
        self.register_buffer("write_pos", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    @torch.no_grad()
    def push(self, new: torch.Tensor) -> None:
        """Append ``new`` ([n_assign, B, dim]) as the newest rows, overwriting the oldest."""
        # The compiled fastswav._C op where it is built, else the PyTorch reference ring.
        queue_push_(self.embeddings, self.write_pos, self.filled, new.detach())

    def valid(self) -> torch.Tensor:
        """0-dim float tensor: 1 once the queue is full, else 0 (stays on the device)."""
        return (self.filled == self.length).to(torch.float32)

    def is_full(self) -> bool:
        """Host-side view of :meth:`valid` (synchronises; for logs and tests)."""
        return bool(self.filled.item() == self.length)

    def in_official_order(self, batch: int) -> torch.Tensor:
        """Contents ordered like the official shift-by-copy queue (newest batch first)."""
        return ring_in_official_order(self.embeddings, self.write_pos, batch)

    def extra_repr(self) -> str:
        a, n, d = self.embeddings.shape
        return f"n_assign={a}, length={n}, dim={d}"
