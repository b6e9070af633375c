"""The README's Python example: it uses only public names, and it runs as written on the embedded model."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

import rolevec
from rolevec.model.loading import ModelAdapter

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first ```python block of README.md, as a reader would copy it.

    It is preceded by blank lines, one per README line above it, so tracebacks name README lines."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^```python\n(.*?)^```\s*$", text, re.S | re.M)
    assert match is not None, "README.md has no ```python block"
    return "\n" * text.count("\n", 0, match.start(1)) + match.group(1)


def test_readme_example_imports_only_public_names() -> None:
    tree = ast.parse(readme_example(), filename=str(README))
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    assert imports, "the README example imports nothing from rolevec"
    for node in imports:
        assert isinstance(node, ast.ImportFrom) and node.module == "rolevec", (
            f"README example line {node.lineno}: import names with `from rolevec import ...` only"
        )
        private = [alias.name for alias in node.names if alias.name not in rolevec.__all__]
        assert not private, f"README example imports {private}, which rolevec.__all__ does not list"


@pytest.mark.e2e
def test_readme_example_runs(
    embedded: ModelAdapter, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exec the block in a fresh namespace and check what it made.

    ``load_model()`` without arguments is what the session's ``embedded`` fixture loads (the embedded
    default, on the CPU), so the example gets that adapter instead of loading the model a second time;
    the stand-in checks that the example calls it with no arguments.
    """
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def load_model(*args: Any, **kwargs: Any) -> ModelAdapter:
        calls.append((args, kwargs))
        return embedded

    monkeypatch.setattr(rolevec, "load_model", load_model)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)

    assert calls == [((), {})], "the README example should load the embedded model with load_model()"
    vectors = namespace["vectors"]
    assert tuple(vectors.diff("mathematician").shape) == (
        len(vectors.positions),
        embedded.n_layers + 1,
        embedded.hidden_size,
    )
    plain, steered = namespace["plain"].text.strip(), namespace["steered"].text.strip()
    assert plain and steered, "the README example generated an empty answer"
    assert steered != plain, "steering by the README example changed nothing in the answer"
    out = capsys.readouterr().out
    assert f"unsteered: {namespace['plain'].text}" in out
    assert f"steered:   {namespace['steered'].text}" in out
