"""Tiny-model helpers the tests share: a saved checkpoint folder with a role-vector file (what the CLI tests
load), and a forward that fails inside the model (what the hook-cleanup tests need)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from test_interventions import role_vectors


def save_tiny(root: Path, arch: str = "llama") -> tuple[list[str], ModelAdapter]:
    """``root/model`` and ``root/v.safetensors`` (roles doctor and lawyer), and CLI options naming both."""
    tiny = make_adapter(arch)
    model: Any = tiny.model
    model.save_pretrained(root / "model")
    tiny.tokenizer.save_pretrained(root / "model")
    role_vectors(tiny).save(root / "v.safetensors")
    return ["--model", str(root / "model"), "--device", "cpu", "--vectors", str(root / "v.safetensors")], tiny


def fail_forwards(monkeypatch: pytest.MonkeyPatch, adapter: ModelAdapter) -> None:
    """Make every forward of ``adapter`` fail inside the model: its padded token ids are shifted out of the
    vocabulary, so the embedding raises IndexError after the caller's hooks are registered."""
    real_pad = adapter.pad

    def bad_pad(ids: Any, *, padding_side: str = "right") -> Any:
        batch = real_pad(ids, padding_side=padding_side)
        batch.input_ids = batch.input_ids + 10_000  # out of the vocabulary: the embedding raises
        return batch

    monkeypatch.setattr(adapter, "pad", bad_pad)
