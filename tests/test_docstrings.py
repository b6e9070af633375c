"""Every public name documents its arguments and shows an example (issue 15, item 5).

The docstrings are Google style (mkdocstrings renders them): an ``Args:`` section naming every parameter
(for a class, of its constructor; ``Attributes:`` also counts), and an ``Example:`` section whose
fenced ``python`` blocks at least compile. The examples need a model, so they are not run here.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap

import pytest

import rolevec

NAMES = sorted(n for n in rolevec.__all__ if n not in ("__version__", "RolevecError"))
SECTION = re.compile(r"^(\w[\w ]*):\s*$", re.M)
PYTHON_BLOCK = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.S | re.M)


def docstring(name: str) -> str:
    doc = inspect.getdoc(getattr(rolevec, name))
    assert doc, f"rolevec.{name} has no docstring"
    return doc


def parameters(name: str) -> list[str]:
    """The parameters a user passes: a function's, a dataclass's init fields, or a class's __init__'s."""
    obj = getattr(rolevec, name)
    if inspect.isclass(obj):
        if dataclasses.is_dataclass(obj):
            return [f.name for f in dataclasses.fields(obj) if f.init]
        target = obj.__init__
    else:
        target = obj
    sig = inspect.signature(target)
    return [
        p.name
        for p in sig.parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def section(doc: str, titles: tuple[str, ...]) -> str | None:
    """The body of the first section called one of ``titles``, up to the next section heading."""
    heads = list(SECTION.finditer(doc))
    for i, head in enumerate(heads):
        if head.group(1) in titles:
            end = heads[i + 1].start() if i + 1 < len(heads) else len(doc)
            return doc[head.end() : end]
    return None


def documented(body: str) -> set[str]:
    """Names documented in an Args/Attributes body: lines ``name: text`` or ``name (type): text``."""
    return set(re.findall(r"^\s+\*{0,2}(\w+)(?:\s*\([^)]*\))?:", body, re.M))


@pytest.mark.parametrize("name", NAMES)
def test_has_an_example(name: str) -> None:
    doc = docstring(name)
    assert section(doc, ("Example", "Examples")) is not None, f"rolevec.{name}: no Example: section"


@pytest.mark.parametrize("name", NAMES)
def test_documents_every_parameter(name: str) -> None:
    params = parameters(name)
    if not params:
        return
    doc = docstring(name)
    titles = ("Args", "Attributes") if inspect.isclass(getattr(rolevec, name)) else ("Args",)
    body = section(doc, titles)
    assert body is not None, f"rolevec.{name}: no {' or '.join(t + ':' for t in titles)} section"
    missing = [p for p in params if p not in documented(body)]
    assert not missing, f"rolevec.{name}: parameters not documented: {', '.join(missing)}"


@pytest.mark.parametrize("name", NAMES)
def test_python_examples_compile(name: str) -> None:
    for n, match in enumerate(PYTHON_BLOCK.finditer(docstring(name))):
        code = textwrap.dedent(match.group(2))
        compile(code, f"<rolevec.{name} example {n}>", "exec")


def test_the_block_pattern_finds_blocks() -> None:
    """The checks above would pass vacuously if no example block were ever found."""
    blocks = sum(len(PYTHON_BLOCK.findall(docstring(name))) for name in NAMES)
    assert blocks >= len(NAMES) - 1  # Steering's example is a doctest
