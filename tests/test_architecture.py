"""The package's shape, enforced: the import-linter layers in pyproject.toml, no cycles, a light import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(src: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT), "--config", str(config), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=config.parent,
        timeout=300,
    )


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package and its contract, to break on purpose."""
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: install the dev extra (scripts/test.sh does)")
    root = tmp_path_factory.mktemp("arch")
    shutil.copytree(
        ROOT / "src" / "rolevec", root / "src" / "rolevec", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_layers_contract_holds(copy: Path) -> None:
    result = _lint(copy / "src", copy / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "wrong"),
    [
        ("model/loading.py", "from ..study import pipeline"),  # the model layer reaching up to the study
        ("steering/interventions.py", "from ..evaluation import conditions"),  # steering importing its caller
        ("analysis/tables.py", "from ..evaluation import sweep"),  # siblings in one layer stay independent
    ],
)
def test_a_wrong_way_import_breaks_the_contract(copy: Path, module: str, wrong: str) -> None:
    path = copy / "src" / "rolevec" / module
    original = path.read_text()
    lines = original.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(("from .", "import ")))
    path.write_text("".join([*lines[:at], wrong + "  # noqa\n", *lines[at:]]))
    try:
        result = _lint(copy / "src", copy / "pyproject.toml")
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and f"rolevec.{module[:-3].replace('/', '.')}" in result.stdout, (
        result.stdout
    )


def test_no_import_cycles() -> None:
    import grimp

    graph = grimp.build_graph("rolevec")
    modules = sorted(graph.modules)
    cycles = [
        (a, b)
        for a in modules
        for b in graph.find_modules_directly_imported_by(a)
        if a != "rolevec" and graph.chain_exists(importer=b, imported=a)
    ]
    assert cycles == []


def test_importing_rolevec_and_its_help_do_not_import_torch() -> None:
    code = (
        "import sys, rolevec\n"
        "from rolevec.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert rolevec.Steering.__name__ == 'Steering' and 'torch' in sys.modules  # lazy, then real\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
