"""Shared fixtures: tiny random models (fast, offline) and the real embedded model (loaded once)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import ARCHITECTURES, make_adapter

PAPER_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "role-vectors-paper"


@pytest.fixture(params=ARCHITECTURES)
def tiny(request: pytest.FixtureRequest) -> ModelAdapter:
    """A tiny random model of every supported architecture, in turn."""
    return make_adapter(str(request.param))


@pytest.fixture
def tiny_llama() -> ModelAdapter:
    return make_adapter("llama")


@pytest.fixture
def saved_tiny(tmp_path: Path) -> tuple[list[str], ModelAdapter]:
    """A tiny Llama saved as a checkpoint folder, its vector file, and the CLI options naming both."""
    from tiny_folder import save_tiny

    return save_tiny(tmp_path)


@pytest.fixture(scope="session")
def embedded() -> ModelAdapter:
    """The real embedded SmolLM2-135M-Instruct (about 15 s to load, once per test session)."""
    from rolevec.model.loading import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(None, device="cpu")


@pytest.fixture(scope="session")
def paper_data() -> Path:
    """The paper's released data, read in place from ../shared (never copied into the repo)."""
    if not PAPER_DATA.is_dir():
        pytest.skip(f"paper data not found at {PAPER_DATA}")
    return PAPER_DATA


@pytest.fixture(autouse=True)
def _no_hooks_leak_on_embedded(request: pytest.FixtureRequest) -> Iterator[None]:
    """The embedded model is shared by the whole session: a test that leaves a hook on it fails here."""
    yield
    if "embedded" in request.fixturenames:
        from rolevec.model.hooks import count_hooks

        model = request.getfixturevalue("embedded").model
        assert count_hooks(model) == 0, f"{request.node.name} left hooks on the shared embedded model"
