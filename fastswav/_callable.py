"""Modules that are also functions: ``fastswav.train(...)`` and ``fastswav.embed(...)``.

``fastswav.train`` is both the module ``python -m fastswav.train`` runs and, once imported,
the package attribute of that name (Python sets it to the submodule on import). Giving the
module object a class with ``__call__`` makes ``fastswav.train(...)`` run the module's
function of the same name whichever way it was imported.
"""
from __future__ import annotations

import sys
import types


class CallableModule(types.ModuleType):
    """A module whose call runs its function named like the module (``train.train``)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Make the already-imported module ``module_name`` callable (see the module docstring)."""
    module = sys.modules[module_name]
    if module_name != "__main__" and not isinstance(module, CallableModule):
        module.__class__ = CallableModule
