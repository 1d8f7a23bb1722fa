"""A module imported where it is first used, not where it is named.

The grid side of the project (params.yaml's checks, the run grid, Snakemake's parse of the
Snakefile, ``python -m at runs | dvc | download | tracking-init``) reads the registries of
models, data sets and loss terms, whose modules name torch for the training side. Importing
torch costs seconds of CPU in every such process (Snakemake parses the Snakefile once per
invocation, and the test suite starts dozens), so those modules bind torch through
:func:`module` and torch is imported on the first attribute read, i.e. when something trains.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyModule:
    """Stands for the module ``name``; any attribute read imports it (once) and reads from it."""

    def __init__(self, name: str) -> None:
        self.__dict__["_name"] = name

    def __getattr__(self, attribute: str):
        # only reached for names not in __dict__: every read of the module's contents (in a
        # training step, a dict lookup more than a plain module's)
        module = self.__dict__.get("_module")
        if module is None:
            module = self.__dict__["_module"] = importlib.import_module(self.__dict__["_name"])
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_name']!r}>"


def module(name: str) -> ModuleType:
    """``name``, imported on first use (``torch = lazy.module("torch")``)."""
    return _LazyModule(name)  # type: ignore[return-value]
