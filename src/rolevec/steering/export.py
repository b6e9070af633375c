"""Steering vectors for other runtimes: llama.cpp control vectors (GGUF) and lm-evaluation-harness (.pt).

Layer conventions differ, so every conversion goes through one mapping:

* rolevec layer L is the residual at the *input* of block L.
* llama.cpp adds ``direction.N`` to the *output* of block N (N ≥ 1; ``direction.0`` is rejected by its
  loader), i.e. the input of block N+1: rolevec layer L ↔ ``direction.(L−1)``, so only layers
  2..n_layers can be exported. Files written by repeng use the same layout and read back the same way.
* lm-evaluation-harness's ``steered`` model hooks module *outputs* named relative to ``base_model``:
  rolevec layer L ↔ the output of block L−1 (e.g. ``layers.{L-1}``), so layer 0 cannot be exported.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write
from ..errors import RolevecError, path_problem
from ..model.loading import ModelAdapter
from .interventions import Steering, not_added

GGUF_ARCH = "controlvector"
PT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- llama.cpp control vectors -------------------------------------------------------------------------


def llama_cpp_index(layer: int) -> int:
    """The ``direction.N`` index that llama.cpp adds at rolevec layer ``layer``."""
    if layer < 2:
        raise RolevecError(
            f"layer {layer} cannot be exported as a llama.cpp control vector: llama.cpp adds direction.N "
            "to the output of block N ≥ 1, which is rolevec layer N+1 ≥ 2; pass `layer` 2 or higher"
        )
    return layer - 1


def write_control_vector(
    path: str | Path,
    directions: Mapping[int, torch.Tensor],
    *,
    model_hint: str,
    provenance: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write ``{rolevec layer: vector already scaled by α}`` as a llama.cpp control-vector GGUF.

    ``provenance`` becomes ``rolevec.<key>`` string fields, which llama.cpp ignores.
    """
    import gguf
    import numpy as np

    if not directions:
        raise RolevecError("no layers to export: pass `layer` L or `layers` a:b")
    sizes = {int(v.numel()) for v in directions.values()}
    if len(sizes) != 1 or any(v.ndim != 1 for v in directions.values()):
        raise RolevecError("control-vector directions must all be 1-D of the same (hidden) size")
    arrays = {}
    for layer in sorted(directions):
        vector = directions[layer].detach().float().cpu()
        if not torch.isfinite(vector).all():
            raise RolevecError(f"the vector for layer {layer} contains NaN or infinite values")
        arrays[f"direction.{llama_cpp_index(layer)}"] = np.ascontiguousarray(vector.numpy(), dtype=np.float32)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(arrays))
        for key, value in (provenance or {}).items():
            writer.add_string(f"rolevec.{key}", str(value))
        for name, array in arrays.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out = Path(path)
    atomic_write(out, write, force=force)
    return out


def _field_value(reader: Any, key: str) -> Any:
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0]


def read_control_vector_file(path: str | Path) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """Metadata and ``{rolevec layer: vector}`` of a llama.cpp/repeng control-vector GGUF."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise RolevecError(f"control vector {p} {path_problem(p)}: pass the path of a .gguf file")
    try:
        reader = GGUFReader(str(p))
    except Exception as exc:
        raise RolevecError(f"{p} is not a readable GGUF file ({exc})") from exc
    arch = _field_value(reader, "general.architecture")
    if arch != GGUF_ARCH:
        raise RolevecError(f"{p} is a GGUF of architecture {arch!r}, not a control vector ({GGUF_ARCH!r})")
    meta = {
        "model_hint": _field_value(reader, f"{GGUF_ARCH}.model_hint"),
        "layer_count": _field_value(reader, f"{GGUF_ARCH}.layer_count"),
    }
    rolevec_keys = sorted(k for k in reader.fields if k.startswith("rolevec."))
    if rolevec_keys:
        meta["rolevec"] = {k.removeprefix("rolevec."): _field_value(reader, k) for k in rolevec_keys}
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise RolevecError(f"{p} holds tensor {tensor.name!r}; a control vector holds only direction.N")
        data = torch.from_numpy(tensor.data.copy()).float().reshape(-1)
        layer = int(index) + 1
        directions[layer] = directions[layer] + data if layer in directions else data
    if not directions:
        raise RolevecError(f"{p} holds no direction tensors")
    if len({int(v.numel()) for v in directions.values()}) != 1:
        raise RolevecError(f"{p} holds direction tensors of different sizes")
    return meta, directions


def read_control_vector(path: str | Path) -> dict[int, torch.Tensor]:
    """``{rolevec layer: vector}`` from a control-vector GGUF (``direction.N`` becomes layer N+1)."""
    return read_control_vector_file(path)[1]


def steering_from_control_vector(path: str | Path, *, scale: float = 1.0) -> Steering:
    """A control vector as rolevec addition at each of its layers, with llama.cpp's strength ``scale``.

    Args:
        path: A llama.cpp (or repeng) control vector ``.gguf`` file.
        scale: The strength, as in llama.cpp's ``--control-vector-scaled FILE SCALE`` (default 1.0).

    Returns:
        An addition :class:`Steering` (α = ``scale``), with its layers mapped to rolevec's convention.

    Example:
        ```python
        steering = steering_from_control_vector("exports/doctor.gguf", scale=0.5)
        answer = generate(adapter, "What causes a fever?", steering=steering)
        ```
    """
    meta, directions = read_control_vector_file(path)
    source = {"control_vector": str(path), "model_hint": meta.get("model_hint")}
    return Steering(mode="add", vectors=directions, alpha=scale, role=Path(path).stem, source=source)


def export_control_vector(
    steering: Steering, path: str | Path, *, model_hint: str, force: bool = False
) -> Path:
    """Write an addition as a control vector with α multiplied in (load it with strength 1).

    Only layers 2..n_layers can be exported (llama.cpp adds to block outputs; see the module docstring).

    Args:
        steering: The addition to export (an ablation is refused).
        path: The ``.gguf`` file to write.
        model_hint: Stored as ``controlvector.model_hint``: the model type (``adapter.config.model_type``).
        force: Overwrite an existing file (default ``False``).

    Returns:
        The written file.

    Example:
        ```python
        steering = resolve_steering(vectors, "doctor", layers=12, alpha=3.0, adapter=adapter)
        export_control_vector(steering, "exports/doctor.gguf", model_hint=adapter.config.model_type)
        ```
    """
    from .._version import __version__

    if steering.mode == "cap":
        raise RolevecError(
            f"a capping steering cannot be exported as a control vector: {not_added(steering)}"
        )
    if steering.mode != "add":
        raise RolevecError("only addition can be exported as a control vector (llama.cpp adds vectors)")
    provenance = {
        "version": __version__,
        "role": steering.role,
        "layers": ",".join(str(layer) for layer in steering.layers),
        "position": str(steering.position),
        "alpha": repr(steering.alpha),
        "layer_convention": "rolevec layer L = input of block L = direction.(L-1)",
        **{k: str(v) for k, v in steering.source.items() if k in ("model", "model_fingerprint")},
    }
    return write_control_vector(
        path, steering.scaled(), model_hint=model_hint, provenance=provenance, force=force
    )


# --- lm-evaluation-harness `steered` model --------------------------------------------------------------


def lm_eval_hookpoint(adapter: ModelAdapter, layer: int) -> str:
    """The module name (relative to ``model.base_model``) whose output is rolevec layer ``layer``."""
    if not 1 <= layer <= adapter.n_layers:
        raise RolevecError(
            f"layer {layer} cannot be exported for lm-evaluation-harness: it steers block outputs, which are "
            f"rolevec layers 1..{adapter.n_layers}"
        )
    base = adapter.model.base_model
    prefix = next((name for name, module in adapter.model.named_modules() if module is base), "")
    blocks = adapter.arch.blocks_path
    if prefix and blocks.startswith(prefix + "."):
        blocks = blocks[len(prefix) + 1 :]
    return f"{blocks}.{layer - 1}"


def lm_eval_config(
    steering: Steering, adapter: ModelAdapter, *, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, Any]]:
    """The dict lm-evaluation-harness's ``steered`` model loads: ``{hookpoint: {action, steering_...}}``."""
    if steering.mode == "cap":
        raise RolevecError(
            f"a capping steering cannot be exported for lm-evaluation-harness: {not_added(steering)}"
        )
    if steering.mode != "add":
        raise RolevecError("only addition can be exported for lm-evaluation-harness")
    steering.check_model(adapter, allow_other_model=True, warn_other_model=False)
    return {
        lm_eval_hookpoint(adapter, layer): {
            "action": "add",
            "steering_coefficient": float(steering.alpha),
            "steering_vector": steering.vectors[layer].detach().to(dtype=dtype, device="cpu").contiguous(),
            "bias": None,
        }
        for layer in steering.layers
    }


def export_lm_eval(
    steering: Steering,
    adapter: ModelAdapter,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """Write the ``steer_path`` file for ``lm_eval --model steered``.

    Args:
        steering: The addition to export (an ablation is refused); layer 0 cannot be exported.
        adapter: The model the steering is for; it names the hooked modules.
        path: The file to write, ending in ``.pt`` or ``.pth``.
        dtype: The dtype the vectors are saved in (default float32).
        force: Overwrite an existing file (default ``False``).

    Returns:
        The written file.

    Example:
        ```python
        steering = resolve_steering(vectors, "doctor", layers=12, alpha=3.0, adapter=adapter)
        export_lm_eval(steering, adapter, "exports/doctor.pt")
        # lm_eval --model steered --model_args pretrained=...,steer_path=exports/doctor.pt
        ```
    """
    config = lm_eval_config(steering, adapter, dtype=dtype)
    out = Path(path)
    if out.suffix not in {".pt", ".pth"}:
        raise RolevecError(
            f"lm-evaluation-harness reads steering files ending in .pt or .pth, not {out.name!r}"
        )
    # The one sanctioned torch.save in rolevec: lm-evaluation-harness loads this file with
    # torch.load(weights_only=True), and it holds only plain tensors, floats, strings and None.
    atomic_write(out, lambda tmp: torch.save(config, tmp), force=force)
    return out
