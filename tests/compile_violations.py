"""Injected violations of the compiled step's guards, for the tests that must see each guard
fail once: a module that wraps the model's head and breaks the compiled graph in one of the
ways the guards look for."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def _generator_context():
    yield


class ViolatingHead(nn.Module):
    """``head`` followed by one violation:

    - ``graph_break``: ``torch._dynamo.graph_break()`` (a plain break: dynamo splits the frame);
    - ``break_in_context_manager``: the same break inside a generator-based context manager,
      where dynamo cannot resume, so it runs the whole frame eagerly and counts no break;
    - ``recompile``: a Python int read in the graph that changes every call (a guard that
      fails every step).
    """

    KINDS = ("graph_break", "break_in_context_manager", "recompile")

    def __init__(self, head: nn.Module, kind: str):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(kind)
        self.head, self.kind, self.calls = head, kind, 0

    def forward(self, x):
        x = self.head(x)
        if self.kind == "graph_break":
            torch._dynamo.graph_break()
        elif self.kind == "break_in_context_manager":
            with _generator_context():
                torch._dynamo.graph_break()
        else:
            self.calls += 1
            x = x * (1 + 0 * self.calls)
        return x
