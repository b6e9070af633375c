"""A tiny random model saved as a checkpoint folder with a role-vector file: what the CLI tests load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
