"""The module paths of rolevec 0.1 that moved into subpackages keep importing for one release.

``import rolevec.scoring`` (or ``from rolevec.scoring import LetterScorer``) still works and warns with
the new path. One finder, appended to ``sys.meta_path`` when ``rolevec`` is imported, answers only for the
old names below, after every real file has been looked for; a stub module per old path would put 26
files back beside the subpackages whose point is to show the data flow.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: Old module (under ``rolevec.``) -> the module that holds its code now.
MOVED: dict[str, str] = {
    "files": "core.files",
    "spec": "core.spec",
    "records": "core.records",
    "outdir": "core.outdir",
    "hooks": "model.hooks",
    "prefix": "model.prefix",
    "manifest": "model.manifest",
    "testing": "model.testing",
    "prompts": "data.prompts",
    "mcq": "data.mcq",
    "activations": "vectors.extraction",
    "interventions": "steering.interventions",
    "generation": "steering.generation",
    "folding": "steering.folding",
    "export": "steering.export",
    "scoring": "evaluation.scoring",
    "resume": "evaluation.scoring",
    "sweep": "evaluation.sweep",
    "selection": "evaluation.selection",
    "stats": "analysis.stats",
    "geometry": "analysis.geometry",
    "interpret": "analysis.interpret",
    "figures": "analysis.figures",
    "report": "analysis.report",
    "pipeline": "study.pipeline",
    "stages": "study.stages",
}


class _Forward(importlib.abc.Loader):
    """Makes the old module a view of the new one: attribute reads go to the new module."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        warnings.warn(
            f"{module.__name__} moved to {self.target}; import it from there (or the name from rolevec)."
            " The old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        target = importlib.import_module(self.target)

        def forward(name: str) -> Any:
            return getattr(target, name)

        module.__getattr__ = forward  # type: ignore[method-assign]
        module.__doc__ = f"Deprecated alias of :mod:`{self.target}`."
        module.__all__ = [n for n in dir(target) if not n.startswith("_")]  # type: ignore[attr-defined]


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths in :data:`MOVED`; every other name is left to the normal finders."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, leaf = fullname.partition(".")
        new = MOVED.get(leaf) if package == "rolevec" else None
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Forward(f"rolevec.{new}"))


def forwarder(package: str, module: str) -> Callable[[str], Any]:
    """A package's ``__getattr__`` that serves the names of the module it replaced (``module``, relative
    to ``package``), imported on first use so the package itself stays light."""

    def forward(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(module, package), name)

    return forward


def install() -> None:
    """Append the finder once (idempotent: re-importing rolevec adds no second one)."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedFinder())
