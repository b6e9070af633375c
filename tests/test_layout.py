"""The subpackage layout: every subpackage in the layers contract and saying what it may import, the old
flat module paths importing for one release with a warning, and data lookups that survived the move."""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

import rolevec
from rolevec._moved import MOVED
from rolevec.data.mcq import builtin_mcq_dir, default_mcq_dir, load_mcq
from rolevec.data.sources import builtin_dir, load_role_prompts

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "rolevec"
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def test_the_top_folder_holds_subpackages_and_the_root_modules_only() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "_moved.py", "_version.py", "errors.py"]
    expected = ["analysis", "cli", "core", "data", "evaluation", "model", "steering", "study", "vectors"]
    assert expected == SUBPACKAGES


def test_every_subpackage_is_a_layer_of_the_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    named = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    assert set(SUBPACKAGES) <= named


@pytest.mark.parametrize("name", [n for n in SUBPACKAGES if n != "cli"])
def test_each_subpackage_says_what_it_owns_and_may_import(name: str) -> None:
    doc = importlib.import_module(f"rolevec.{name}").__doc__ or ""
    assert "import" in doc and len(doc.split()) > 30, doc


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_an_old_module_path_imports_with_a_warning_naming_the_new_one(old: str, new: str) -> None:
    sys.modules.pop(f"rolevec.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = importlib.import_module(f"rolevec.{old}")
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(f"rolevec.{new}" in m for m in messages), messages
    current = importlib.import_module(f"rolevec.{new}")
    public = [n for n in dir(current) if not n.startswith("_")]
    assert public and all(getattr(legacy, n) is getattr(current, n) for n in public)


def test_old_from_imports_give_the_same_objects() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from rolevec.interventions import Steering as OldSteering
        from rolevec.scoring import LetterScorer as OldScorer

    assert OldSteering is rolevec.Steering and OldScorer is rolevec.LetterScorer


@pytest.mark.parametrize(
    ("package", "name", "home"),
    [
        ("model", "load_model", "model.loading"),
        ("data", "load_prompts", "data.sources"),
        ("vectors", "RoleVectors", "vectors.role_vectors"),
        ("evaluation", "evaluate_conditions", "evaluation.conditions"),
        ("analysis", "analyse", "analysis.tables"),
    ],
)
def test_a_module_that_became_a_package_keeps_its_names(package: str, name: str, home: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # these paths are current, not deprecated
        value = getattr(importlib.import_module(f"rolevec.{package}"), name)
    assert value is getattr(importlib.import_module(f"rolevec.{home}"), name)


def test_names_the_old_evaluation_module_re_exported_still_import_with_a_warning() -> None:
    from rolevec.model.batching import plan_batches

    vars(rolevec.evaluation).pop("plan_batches", None)  # a first read caches it (and warns once)
    with pytest.warns(DeprecationWarning, match=r"rolevec\.model\.batching\.plan_batches"):
        from rolevec.evaluation import plan_batches as old

    assert old is plan_batches
    with pytest.raises(AttributeError):
        _ = rolevec.evaluation.no_such_name  # type: ignore[attr-defined]


def test_no_module_of_the_package_imports_an_old_path() -> None:
    names = [m.name for m in pkgutil.walk_packages(rolevec.__path__, "rolevec.") if "__main__" not in m.name]
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(names) > 40


def test_the_finder_is_installed_once() -> None:
    from rolevec._moved import MovedFinder, install

    install()
    install()
    assert sum(isinstance(f, MovedFinder) for f in sys.meta_path) == 1


def test_with_the_shared_data_present_the_default_questions_are_the_papers_mmlu(
    paper_data: Path, tmp_path: Path
) -> None:
    path, kind = default_mcq_dir(tmp_path, env={})
    assert kind == "shared" and path.resolve() == (paper_data / "mmlu_domains").resolve()
    mcq = load_mcq(None, ["law"], cwd=tmp_path, env={})
    assert mcq.kind == "shared" and len(mcq.items["law"]) > 24  # the built-in sample has 24


def test_the_built_in_data_moved_with_its_module_and_ships_in_the_wheel() -> None:
    assert builtin_dir() == PACKAGE / "data" / "builtin"
    assert builtin_mcq_dir() == PACKAGE / "data" / "builtin" / "mcq"
    assert len(load_role_prompts("doctor")) > 0
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["rolevec.data"]
    files = [p.relative_to(PACKAGE / "data").as_posix() for p in builtin_dir().rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files
