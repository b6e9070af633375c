"""The one intervention type: :class:`Steering`, addition, ablation or capping, applied as a scoped context
manager.

* Activation addition: x ← x + α·d at the input of the chosen layer(s), at every position by default
  (or only at given prompt tokens, as patch-scoping does).
* Directional ablation: x ← x − d̂d̂ᵀx at every block input, the final norm input, and on every module
  output written into the residual stream, so the direction never re-enters it.
* Projection capping: x ← x + (clamp(x·d̂, lo, hi) − x·d̂)·d̂ at the input of the chosen layer(s), at every
  position: the projection on d̂ is kept within [lo, hi] and everything orthogonal to d̂ is left alone.
  The change depends on the activation, so capping is never a fixed addition and cannot be folded or
  exported.

A :class:`Steering` is validated once, when it is made (α finite, vectors 1-D and finite); generation,
folding, export, interpretation, the sweep and the test stage all use it, and the resumed scorer adds its
:meth:`Steering.shift`. :func:`resolve_steering` builds one from a vector file and checks it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.spec import check_alpha
from ..errors import RolevecError
from ..model.hooks import hooked, input_hook, output_hook
from ..model.loading import ModelAdapter
from ..vectors.role_vectors import RoleVectors, check_fingerprint

WHERE = ("all", "prompt", "generated")
MODES = ("add", "ablate", "cap")


def check_vector(adapter: ModelAdapter, vector: torch.Tensor) -> torch.Tensor:
    """``vector`` (detached) if it is a finite direction of this model's hidden size."""
    if vector.ndim != 1 or vector.shape[0] != adapter.hidden_size:
        raise RolevecError(
            f"vector has shape {tuple(vector.shape)} but {adapter.name} has hidden size {adapter.hidden_size}"
        )
    if not torch.isfinite(vector).all():
        raise RolevecError("vector contains NaN or infinite values")
    return vector.detach()


def unit(vector: torch.Tensor, *, what: str = "ablate") -> torch.Tensor:
    norm = vector.norm()
    if not torch.isfinite(norm) or float(norm) == 0.0:
        raise RolevecError(f"cannot {what} a zero (or non-finite) direction")
    out: torch.Tensor = vector / norm
    return out


@dataclass(frozen=True)
class Steering:
    """One intervention: α·d added at its layer(s), the direction d̂ removed everywhere, or the
    projection on d̂ capped to [lo, hi] at chosen layers.

    ``vectors`` maps each layer to its (unscaled) vector. For ``add`` every entry is applied at its own
    layer, scaled by ``alpha``; for ``ablate`` there is one entry, the layer the direction was taken from,
    and the direction is removed at every layer; for ``cap`` each entry is a layer whose input is capped,
    along the unit direction of its vector. ``tokens`` (addition only) restricts the addition to those
    token indices of the prompt forward; decoding steps are left alone.

    Build one with :meth:`addition`, :meth:`ablation`, :meth:`capping` or :func:`resolve_steering`, and
    steer with ``with steering.apply(adapter): ...``.

    Args:
        mode: ``add``, ``ablate`` or ``cap``.
        vectors: Layer -> its unscaled vector (one entry for ``ablate``: the layer of the direction).
        alpha: The scale α of an addition (default 0; unused by ``ablate`` and ``cap``).
        role: The role the vector is from; used in descriptions.
        position: The post-instruction position the vector was taken at (default -1); used in descriptions.
        source: The model (and its fingerprint) the vectors come from, checked by ``check_model``.
        tokens: For an addition: only these token indices of the prompt forward are steered (default: all).
        lo: For ``cap``: the lowest projection x·d̂ kept (``-inf`` for no lower bound is refused: pass a
            number).
        hi: For ``cap``: the highest projection x·d̂ kept.

    Example:
        >>> import torch
        >>> s = Steering.addition(torch.ones(4), layer=2, alpha=3.0, role="doctor")
        >>> s.describe()
        "add α=3 (role 'doctor', layer 2, position -1)"
    """

    mode: str
    vectors: Mapping[int, torch.Tensor]
    alpha: float = 0.0
    role: str = ""
    position: int = -1
    source: Mapping[str, Any] = field(default_factory=dict)
    tokens: tuple[int, ...] | None = None
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RolevecError(f"steering mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not self.vectors:
            raise RolevecError("steering needs at least one layer")
        if self.mode == "ablate" and len(self.vectors) != 1:
            raise RolevecError("ablation removes one direction: pass a single `layer`, not a range")
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        for vector in self.vectors.values():
            if vector.ndim != 1:
                raise RolevecError(f"a steering vector must be 1-D, not of shape {tuple(vector.shape)}")
            if not torch.isfinite(vector).all():
                raise RolevecError("steering vector contains NaN or infinite values")
        if self.mode == "cap":
            object.__setattr__(self, "lo", _check_bound(self.lo, "lo"))
            object.__setattr__(self, "hi", _check_bound(self.hi, "hi"))
            if self.lo is not None and self.hi is not None and self.lo > self.hi:
                raise RolevecError(
                    f"capping range has lo {self.lo:g} > hi {self.hi:g}: pass `cap` as LO:HI with LO ≤ HI"
                )
            for vector in self.vectors.values():
                unit(vector.float(), what="cap along")
        elif self.lo is not None or self.hi is not None:
            raise RolevecError(f"only capping takes `lo`/`hi`; a {self.mode} steering takes none")
        if self.tokens is not None:
            if self.mode != "add":
                raise RolevecError(
                    f"{'ablation' if self.mode == 'ablate' else 'capping'} acts on every token: "
                    "pass no tokens"
                )
            if not self.tokens or min(self.tokens) < 0:
                raise RolevecError(f"tokens must be non-negative prompt indices, not {list(self.tokens)}")

    @classmethod
    def addition(
        cls,
        vector: torch.Tensor,
        *,
        layer: int,
        alpha: float,
        role: str = "",
        position: int = -1,
        tokens: Sequence[int] | None = None,
    ) -> Steering:
        """α·vector at the input of ``layer`` (at ``tokens`` of the prompt only, if given)."""
        return cls(
            "add",
            {layer: vector},
            alpha=alpha,
            role=role,
            position=position,
            tokens=None if tokens is None else tuple(int(t) for t in tokens),
        )

    @classmethod
    def ablation(
        cls, direction: torch.Tensor, *, layer: int = 0, role: str = "", position: int = -1
    ) -> Steering:
        """Remove ``direction`` (taken from ``layer``; the layer only labels it) everywhere."""
        return cls("ablate", {layer: direction}, role=role, position=position)

    @classmethod
    def capping(
        cls,
        vector: torch.Tensor,
        *,
        layers: int | Sequence[int],
        lo: float,
        hi: float,
        role: str = "",
        position: int = -1,
    ) -> Steering:
        """Keep the projection on ``vector``'s unit direction within [lo, hi] at the input of ``layers``."""
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        if not layer_list:
            raise RolevecError("capping needs at least one layer: pass `cap_layers` (e.g. 10,11,12)")
        return cls(
            "cap", dict.fromkeys(layer_list, vector), role=role, position=position, lo=float(lo), hi=float(hi)
        )

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def layer(self) -> int:
        """The one layer of a single-layer steering (an ablation, or an addition at one layer)."""
        if len(self.vectors) != 1:
            raise RolevecError(f"this steering acts at layers {self.layers}, not at one layer")
        return self.layers[0]

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def direction(self) -> torch.Tensor:
        """The unit direction an ablation removes (or a capping caps along)."""
        return unit(self.vectors[self.layers[0]].float())

    def scaled(self) -> dict[int, torch.Tensor]:
        """α·d per layer: exactly what addition puts into the residual stream."""
        if self.mode != "add":
            raise RolevecError(f"only addition has scaled vectors, not {self.mode}: {_NOT_ADDED[self.mode]}")
        return {layer: self.alpha * self.vectors[layer].float() for layer in self.layers}

    def shift(self, like: torch.Tensor) -> torch.Tensor:
        """α·d of a one-layer addition in ``like``'s dtype and device, formed as :meth:`apply` forms it."""
        if self.mode != "add" or self.tokens is not None:
            raise RolevecError("only an addition at every position has one shift")
        return self.alpha * self.vectors[self.layer].detach().to(device=like.device, dtype=like.dtype)

    def describe(self) -> str:
        layers = ",".join(str(layer) for layer in self.layers)
        who = f"role {self.role!r}, " if self.role else ""
        if self.mode == "add":
            return f"add α={self.alpha:g} ({who}layer {layers}, position {self.position})"
        if self.mode == "cap":
            bounds = f"[{self.lo:g}, {self.hi:g}]"
            return f"cap projection to {bounds} ({who}layer {layers}, position {self.position})"
        return f"ablate ({who}direction from layer {layers}, position {self.position})"

    def check_model(
        self, adapter: ModelAdapter, *, allow_other_model: bool = False, warn_other_model: bool = True
    ) -> None:
        """Refuse a model of another size, depth or (unless allowed, with a warning) another fingerprint."""
        if self.hidden_size != adapter.hidden_size:
            raise RolevecError(
                f"vectors have hidden size {self.hidden_size} but {adapter.name} has {adapter.hidden_size}: "
                "use vectors extracted from this model (`rolevec extract`)"
            )
        for layer in self.layers:
            if not 0 <= layer <= adapter.n_layers:
                raise RolevecError(
                    f"layer {layer} is out of range: this model has layers 0..{adapter.n_layers}"
                )
        check_fingerprint(
            adapter,
            self.source.get("model_fingerprint"),
            self.source.get("model"),
            "vectors",
            allow_other_model=allow_other_model,
            warn_other_model=warn_other_model,
        )

    @contextmanager
    def apply(self, adapter: ModelAdapter, *, where: str = "all") -> Iterator[None]:
        """Steer ``adapter`` with hooks for the duration of the block.

        ``where`` restricts an addition with a KV cache: ``prompt`` steers only multi-token (prompt)
        forwards, ``generated`` only single-token (decoding) forwards; ``all`` steers every position. The
        split is by the forward's length, so it needs cached decoding and a prompt of two tokens or more.
        """
        if where not in WHERE:
            raise RolevecError(f"where must be one of {', '.join(WHERE)}, not {where!r}")
        for vector in self.vectors.values():
            check_vector(adapter, vector)
        self.check_model(adapter, allow_other_model=True, warn_other_model=False)
        with ExitStack() as stack:
            if self.mode == "add":
                for layer in self.layers:
                    stack.enter_context(self._add_hooks(adapter, layer, where))
            elif self.mode == "cap":
                stack.enter_context(self._cap_hooks(adapter, where))
            else:
                if where != "all":
                    raise RolevecError("ablation acts on every position: pass `where=all`")
                stack.enter_context(self._ablate_hooks(adapter))
            yield

    def _add_hooks(self, adapter: ModelAdapter, layer: int, where: str) -> Any:
        shift = self.alpha * self.vectors[layer].detach().to(device=adapter.device, dtype=adapter.dtype)
        index = None
        if self.tokens is not None:
            index = torch.tensor(list(self.tokens), dtype=torch.long, device=adapter.device)

        # Under a device map a block's input arrives on the device of the block before it, so the vector
        # follows the tensor it touches (no copy when they already agree).
        def steer(x: torch.Tensor) -> torch.Tensor | None:
            if where == "prompt" and x.shape[1] == 1:
                return None
            if where == "generated" and x.shape[1] != 1:
                return None
            if index is None:
                return x + shift.to(x.device, x.dtype)
            if x.shape[1] == 1:  # a decoding step with the KV cache: the prompt is already steered
                return None
            out = x.clone()
            at = index.to(x.device)
            out[:, at] = out[:, at] + shift.to(x.device, x.dtype)
            return out

        return hooked(pre=[(adapter.residual_site(layer), input_hook(steer))])

    def _cap_hooks(self, adapter: ModelAdapter, where: str) -> Any:
        assert self.lo is not None and self.hi is not None  # checked in __post_init__
        lo, hi = self.lo, self.hi
        pre = []
        for layer in self.layers:
            d = unit(self.vectors[layer].detach().float(), what="cap along").to(adapter.device)

            def cap(x: torch.Tensor, d: torch.Tensor = d) -> torch.Tensor | None:
                if where == "prompt" and x.shape[1] == 1:
                    return None
                if where == "generated" and x.shape[1] != 1:
                    return None
                # The projection and its correction in float32 (a bf16 dot product over the hidden size
                # is too coarse to compare with the bounds), added back in the residual's dtype.
                dd = d.to(x.device)
                proj = x.float() @ dd
                delta = proj.clamp(lo, hi) - proj
                return x + (delta.unsqueeze(-1) * dd).to(x.dtype)

            pre.append((adapter.residual_site(layer), input_hook(cap)))
        return hooked(pre=pre)

    def _ablate_hooks(self, adapter: ModelAdapter) -> Any:
        d = unit(self.vectors[self.layers[0]].detach().to(device=adapter.device, dtype=adapter.dtype).float())
        d = d.to(adapter.dtype)

        def project_out(x: torch.Tensor) -> torch.Tensor:
            dd = d.to(x.device, x.dtype)  # each block's own device under a device map
            # x − (x·d)d as one fused pass (addcmul) instead of a product and a difference: these hooks run
            # 3n + 1 times a forward, on every token.
            return torch.addcmul(x, (x @ dd).unsqueeze(-1), dd, value=-1)

        n = adapter.n_layers
        pre = [(adapter.residual_site(layer), input_hook(project_out)) for layer in range(n + 1)]
        post = [(w, output_hook(project_out)) for layer in range(n) for w in adapter.writers(layer)]
        return hooked(pre=pre, post=post)

    def provenance(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "role": self.role,
            "layers": self.layers,
            "position": self.position,
            "alpha": self.alpha if self.mode == "add" else None,
            **({"lo": self.lo, "hi": self.hi} if self.mode == "cap" else {}),
            "vector_norms": {str(k): float(v.float().norm()) for k, v in sorted(self.vectors.items())},
        }


#: Why a steering that is not an addition has no fixed vector to fold or export, per mode.
_NOT_ADDED = {
    "add": "",
    "ablate": "ablation removes a direction",
    "cap": (
        "capping changes each activation by an amount that depends on its projection, so no fixed vector or "
        "weight edit reproduces it; steer with hooks (`Steering.apply`, `rolevec generate --cap`)"
    ),
}


def _check_bound(value: float | None, name: str) -> float:
    """A capping bound as a finite float: an infinite one is no cap, a NaN compares false everywhere."""
    try:
        bound = float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        raise RolevecError(f"capping bound `{name}` must be a number, not {value!r}") from None
    if not math.isfinite(bound):
        raise RolevecError(
            f"capping bound `{name}` must be a finite number, not {value!r}: pass `cap` as LO:HI"
        )
    return bound


def not_added(steering: Steering) -> str | None:
    """Why ``steering`` has no fixed vector (for fold and export), or ``None`` for an addition."""
    return _NOT_ADDED[steering.mode] or None


def add(
    adapter: ModelAdapter,
    vector: torch.Tensor,
    *,
    layers: int | Sequence[int],
    alpha: float = 1.0,
    where: str = "all",
) -> AbstractContextManager[None]:
    """Add α·vector at the input of each layer in ``layers``: a :class:`Steering` applied at once."""
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    if not layer_list:
        raise RolevecError("add() needs at least one layer")
    check_vector(adapter, vector)
    return Steering("add", dict.fromkeys(layer_list, vector), alpha=alpha).apply(adapter, where=where)


def ablate(adapter: ModelAdapter, direction: torch.Tensor) -> AbstractContextManager[None]:
    """Remove the unit direction from the residual stream everywhere it can enter."""
    return Steering.ablation(check_vector(adapter, direction)).apply(adapter)


#: A role vector shorter than this share of its site's mean activation is zero up to rounding.
ZERO_NORM = 1e-6


def zero_layers(vectors: RoleVectors, role: str, layers: Sequence[int], position: int) -> list[int]:
    """The layers among ``layers`` whose role vector at ``position`` is zero (up to rounding)."""
    i = vectors.position_index(position)
    zero = []
    for layer in layers:
        vectors.check_layer(layer)
        mean, base = vectors.role_means[role][i, layer].float(), vectors.base_mean[i, layer].float()
        scale = max(float(mean.norm()), float(base.norm()))
        if float((mean - base).norm()) <= ZERO_NORM * scale:
            zero.append(layer)
    return zero


def _why_zero(role: str, layers: Sequence[int], position: int) -> str:
    """One clause saying which vectors are zero and why, for the ablation error and the addition warning."""
    if list(layers) == [0]:
        return (
            f"the vector of role {role!r} at layer 0, position {position} is zero: layer 0 is the input of "
            "block 0, where the template tokens' embeddings are the same for every prompt, so the role "
            "vector there is zero"
        )
    which = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
    return (
        f"the vector of role {role!r} at {which}, position {position} is zero: its role and base prompts "
        "have the same mean activation there"
    )


def ablation_problem(
    vectors: RoleVectors, role: str, layers: Sequence[int], position: int, *, what: str = "ablate"
) -> str | None:
    """Why ablating (or, with ``what="cap along"``, capping along) ``role``'s direction at these sites
    cannot work (a zero vector has no direction), or None."""
    zero = zero_layers(vectors, role, layers, position)
    if not zero:
        return None
    return (
        f"{_why_zero(role, zero, position)}, and a zero vector has no direction to {what}: pass another "
        f"`layer` (1..{vectors.n_layers})"
    )


def resolve_steering(
    vectors: RoleVectors,
    role: str,
    *,
    layers: int | Sequence[int],
    position: int = -1,
    alpha: float | None = None,
    ablate: bool = False,
    adapter: ModelAdapter | None = None,
    allow_other_model: bool = False,
    warn_zero: bool = True,
    cap: tuple[float, float] | None = None,
    cap_layers: Sequence[int] | None = None,
) -> Steering:
    """Pick role vectors out of a file and check them (and, if given, against the model).

    A zero vector cannot give an ablation direction, so that is refused (before any model is needed);
    adding one changes nothing, which ``warn_zero`` reports as a warning (a caller that resolves the same
    steering again once the model is loaded passes ``warn_zero=False`` the second time).

    Args:
        vectors: The role vectors to pick from.
        role: The role whose vector is used.
        layers: The layer, or layers, the vector is taken from; an addition is applied at each.
        position: The post-instruction position of the vector (default -1, the last token).
        alpha: The scale α of an addition; must be ``None`` with ``ablate``.
        ablate: Remove the (single layer's) direction at every layer instead of adding (default ``False``).
        adapter: The model to check the vectors against (depth, hidden size, fingerprint).
        allow_other_model: Accept vectors from a model with another fingerprint, with a warning.
        warn_zero: Warn when an added vector is zero (default ``True``).
        cap: ``(lo, hi)``: cap the projection on the (single layer's) unit direction to [lo, hi] instead of
            adding; ``alpha`` must be ``None``.
        cap_layers: For ``cap``: the layers whose input is capped (default: the one layer in ``layers``).

    Returns:
        The checked :class:`Steering`.

    Example:
        ```python
        vectors = RoleVectors.load("runs/quick/vectors.safetensors")
        steering = resolve_steering(vectors, "doctor", layers=12, alpha=3.0, adapter=adapter)
        with steering.apply(adapter):
            print(generate(adapter, "What causes a fever?").text)
        ```
    """
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    if cap is not None:
        return _resolve_capping(
            vectors, role, layer_list, position, alpha, ablate, adapter, allow_other_model, cap, cap_layers
        )
    if cap_layers is not None:
        raise RolevecError("`cap_layers` only applies to capping: pass `cap` LO:HI too")
    if ablate and alpha is not None:
        raise RolevecError("ablation takes no alpha: pass either `alpha` A or `ablate`")
    if not ablate and alpha is None:
        raise RolevecError("addition needs a strength: pass `alpha` A (the paper uses 1 or 3)")
    picked = {layer: vectors.vector(role, layer, position).float() for layer in layer_list}
    zero = zero_layers(vectors, role, layer_list, position)
    if zero and ablate:
        raise RolevecError(ablation_problem(vectors, role, zero, position))
    if zero and warn_zero:
        warnings.warn(
            f"{_why_zero(role, zero, position)}, so adding it changes nothing: pass another `layer` "
            f"(1..{vectors.n_layers}) to steer",
            stacklevel=2,
        )
    steering = Steering(
        mode="ablate" if ablate else "add",
        vectors=picked,
        alpha=0.0 if alpha is None else check_alpha(alpha),
        role=role,
        position=position,
        source=_source(vectors),
    )
    return _checked(steering, vectors, adapter, allow_other_model)


def _source(vectors: RoleVectors) -> dict[str, Any]:
    """What a steering keeps of its vector file's origin (checked against the model it is applied to)."""
    return {k: vectors.metadata[k] for k in ("model", "model_fingerprint") if k in vectors.metadata}


def _checked(
    steering: Steering, vectors: RoleVectors, adapter: ModelAdapter | None, allow_other_model: bool
) -> Steering:
    """``steering``, once the vector file is known to fit ``adapter`` (when one is given)."""
    if adapter is not None:
        if vectors.n_layers != adapter.n_layers:
            raise RolevecError(
                f"vectors were extracted from a model with {vectors.n_layers} layers but {adapter.name} has "
                f"{adapter.n_layers}: extract vectors for this model with `rolevec extract`"
            )
        steering.check_model(adapter, allow_other_model=allow_other_model)
    return steering


def _resolve_capping(
    vectors: RoleVectors,
    role: str,
    layer_list: Sequence[int],
    position: int,
    alpha: float | None,
    ablate: bool,
    adapter: ModelAdapter | None,
    allow_other_model: bool,
    cap: tuple[float, float],
    cap_layers: Sequence[int] | None,
) -> Steering:
    """The capping branch of :func:`resolve_steering`: one direction, capped at each of ``cap_layers``."""
    if alpha is not None or ablate:
        raise RolevecError("capping takes no `alpha` and no `ablate`: pass one of `cap`, `alpha` or `ablate`")
    if len(layer_list) != 1:
        raise RolevecError(
            "capping caps along one direction: pass a single `layer` (and `cap_layers` to cap at several)"
        )
    layer = layer_list[0]
    targets = [layer] if cap_layers is None else [int(x) for x in cap_layers]
    if not targets:
        raise RolevecError("capping needs at least one layer: pass `cap_layers` (e.g. 10,11,12)")
    for target in targets:
        vectors.check_layer(target)
    direction = vectors.vector(role, layer, position).float()
    problem = ablation_problem(vectors, role, [layer], position, what="cap along")
    if problem:
        raise RolevecError(problem)
    lo, hi = cap
    steering = Steering(
        "cap",
        dict.fromkeys(targets, direction),
        role=role,
        position=position,
        source=_source(vectors),
        lo=lo,
        hi=hi,
    )
    return _checked(steering, vectors, adapter, allow_other_model)
