"""The paper's two interventions as scoped context managers over :mod:`rolevec.hooks`.

* Activation addition: x ← x + α·d at the input of the chosen layer(s), at every position by default.
* Directional ablation: x ← x − d̂d̂ᵀx at every block input, the final norm input, and on every module
  output written into the residual stream, so the direction never re-enters it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .errors import RolevecError
from .hooks import hooked, input_hook, output_hook
from .model import ModelAdapter
from .vectors import check_alpha

WHERE = ("all", "prompt", "generated")


def _as_vector(adapter: ModelAdapter, vector: torch.Tensor) -> torch.Tensor:
    if vector.ndim != 1 or vector.shape[0] != adapter.hidden_size:
        raise RolevecError(
            f"vector has shape {tuple(vector.shape)} but {adapter.name} has hidden size {adapter.hidden_size}"
        )
    if not torch.isfinite(vector).all():
        raise RolevecError("vector contains NaN or infinite values")
    return vector.detach().to(device=adapter.device, dtype=adapter.dtype)


@contextmanager
def add(
    adapter: ModelAdapter,
    vector: torch.Tensor,
    *,
    layers: int | Sequence[int],
    alpha: float = 1.0,
    where: str = "all",
) -> Iterator[None]:
    """Add α·vector to the residual stream at the input of each layer in ``layers``.

    ``where`` restricts steering with a KV cache: ``prompt`` steers only multi-token (prompt) forwards,
    ``generated`` only single-token (decoding) forwards; ``all`` steers every position.
    """
    alpha = check_alpha(alpha)
    if where not in WHERE:
        raise RolevecError(f"where must be one of {', '.join(WHERE)}, not {where!r}")
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    if not layer_list:
        raise RolevecError("add() needs at least one layer")
    shift = alpha * _as_vector(adapter, vector)

    def steer(x: torch.Tensor) -> torch.Tensor | None:
        if where == "prompt" and x.shape[1] == 1:
            return None
        if where == "generated" and x.shape[1] != 1:
            return None
        return x + shift.to(x.dtype)

    sites = [adapter.residual_site(layer) for layer in layer_list]
    with hooked(pre=[(site, input_hook(steer)) for site in sites]):
        yield


def unit(vector: torch.Tensor) -> torch.Tensor:
    norm = vector.norm()
    if not torch.isfinite(norm) or float(norm) == 0.0:
        raise RolevecError("cannot ablate a zero (or non-finite) direction")
    out: torch.Tensor = vector / norm
    return out


@contextmanager
def ablate(adapter: ModelAdapter, direction: torch.Tensor) -> Iterator[None]:
    """Remove the unit direction from the residual stream everywhere it can enter."""
    d = unit(_as_vector(adapter, direction).float()).to(adapter.dtype)

    def project_out(x: torch.Tensor) -> torch.Tensor:
        dd = d.to(x.dtype)
        return x - (x @ dd).unsqueeze(-1) * dd

    n = adapter.n_layers
    pre = [(adapter.residual_site(layer), input_hook(project_out)) for layer in range(n + 1)]
    post = [(w, output_hook(project_out)) for layer in range(n) for w in adapter.writers(layer)]
    with hooked(pre=pre, post=post):
        yield
