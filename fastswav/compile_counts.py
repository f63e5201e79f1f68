"""What torch.compile did with a step, from all of dynamo's counters.

A graph break is only one way for compiled code to lose its graph. When dynamo meets
something it cannot trace in a place it cannot resume from (inside a generator-based
context manager, say), it gives the whole frame up and runs it eagerly: that shows in
``counters["unimplemented"]`` and as ``frames["total"] > frames["ok"]``, while
``counters["graph_break"]`` stays empty. A frame compiled again after the first step (a
guard that fails each step) shows as ``frames["total"]`` growing. :class:`CompileCounts`
reads all of them; :meth:`CompileCounts.problems` names every way a step fell short of
"whole graphs, compiled once", so that tests and benchmarks judge by the same rule.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class CompileCounts:
    """Dynamo's counters since the last ``counters.clear()`` (``torch._dynamo.reset()`` does
    not clear them)."""

    graphs: int  # graphs dynamo captured (before DDPOptimizer splits them at the buckets)
    graph_breaks: int
    frames_total: int  # frames dynamo tried to compile
    frames_ok: int  # ... and compiled
    unimplemented: Tuple[str, ...]  # what made dynamo give up on a frame (first lines)
    break_reasons: Tuple[str, ...]

    @classmethod
    def read(cls) -> "CompileCounts":
        from torch._dynamo.utils import counters

        def first_line(text) -> str:
            return (str(text).strip().splitlines() or [""])[0][:200]

        frames = counters.get("frames", {})
        breaks = counters.get("graph_break", {})
        return cls(graphs=int(counters.get("stats", {}).get("unique_graphs", 0)),
                   graph_breaks=int(sum(breaks.values())),
                   frames_total=int(frames.get("total", 0)), frames_ok=int(frames.get("ok", 0)),
                   unimplemented=tuple(first_line(u) for u in counters.get("unimplemented", {})),
                   break_reasons=tuple(first_line(b) for b in breaks))

    @staticmethod
    def clear() -> None:
        from torch._dynamo.utils import counters

        counters.clear()

    @property
    def frames_eager(self) -> int:
        """Frames dynamo entered and gave up on (they ran eagerly)."""
        return self.frames_total - self.frames_ok

    def recompiles_since(self, earlier: "CompileCounts") -> int:
        """Frames compiled after ``earlier`` was read (after the first step: recompilations)."""
        return self.frames_total - earlier.frames_total

    def problems(self, after_first_step: Optional["CompileCounts"] = None) -> List[str]:
        """Every way the compiled step fell short of whole graphs compiled once; empty when
        none. ``after_first_step``: the counts read after the first step, to find
        recompilations in the later ones."""
        found = []
        if self.graph_breaks:
            found.append(f"{self.graph_breaks} graph break(s): " + "; ".join(self.break_reasons))
        if self.frames_eager or self.unimplemented:
            found.append(f"{self.frames_eager} of {self.frames_total} frame(s) run eagerly: "
                         + "; ".join(self.unimplemented))
        if self.frames_total == 0:
            found.append("nothing was compiled")
        if after_first_step is not None and self.recompiles_since(after_first_step):
            found.append(f"{self.recompiles_since(after_first_step)} frame(s) compiled again "
                         "after the first step")
        return found

    def summary(self) -> str:
        return (f"{self.graphs} graph(s), {self.graph_breaks} break(s), {self.frames_eager} "
                f"frame(s) run eagerly of {self.frames_total}")
