"""Run manifests: what produced an output, so a folder found later can be traced and reproduced.

Generic on purpose (every command that writes a result folder uses it): the arguments, the versions of
everything that changes numbers, the time, and the model's name and fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.files import atomic_write

if TYPE_CHECKING:
    from .loading import ModelAdapter

MANIFEST_NAME = "manifest.json"


def _jsonable(value: Any) -> Any:
    """Paths, tuples, sets and other objects become JSON values (unknown objects by their ``str``)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_jsonable(v) for v in items]
    return str(value)


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .._version import __version__

    return {
        "rolevec": __version__,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(
    args: Mapping[str, Any],
    adapter: ModelAdapter | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-ready record of one run: arguments, versions, UTC time, model identity and ``extra``."""
    manifest: dict[str, Any] = {
        "args": _jsonable(dict(args)),
        "versions": versions(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if adapter is not None:
        manifest["model"] = {
            "name": adapter.name,
            "fingerprint": adapter.fingerprint(),
            "class": type(adapter.model).__name__,
            "n_layers": adapter.n_layers,
            "hidden_size": adapter.hidden_size,
            "source": _jsonable(adapter.source),
        }
    if extra:
        manifest.update(_jsonable(dict(extra)))
    return manifest


def write_manifest(path: str | Path, manifest: Mapping[str, Any], *, force: bool = True) -> Path:
    """Write ``manifest`` as indented JSON, atomically; overwrites by default (callers guard folders)."""
    out = Path(path)
    text = json.dumps(_jsonable(dict(manifest)), indent=2, ensure_ascii=False, sort_keys=False) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)  # the temporary file is private; the manifest is meant to be read

    atomic_write(out, write, force=force)
    return out


def vector_provenance(path: str | Path, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Where a vector file came from: its path, content hash and the metadata it carries."""
    return {"path": str(path), "sha256": file_sha256(path), "metadata": _jsonable(dict(metadata))}
