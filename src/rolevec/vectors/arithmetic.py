"""Arithmetic on role vectors: weighted sums, differences, scaling and projections, with provenance.

Every operation works on the role vectors d_r = μ_r − ν (role mean minus base mean) at every layer and
position at once, and returns a new :class:`RoleVectors` holding one role: its mean is the first file's
base mean ν plus the result, so ``vector(name, layer, position)`` is the combined direction and the file
steers, saves and loads like any other. The metadata records how it was made (``arithmetic``: the
operation, and per term the role, weight, digest and the file's model and creation stamp, nested when a
term was itself made by arithmetic), so ``RoleVectors.save``/``load`` keep it.

Terms must come from the same model (fingerprint), with the same shape and positions; the base means may
differ (each d_r is taken against its own file's base).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import RolevecError
from .role_vectors import RoleVectors

#: Combination modes: a plain weighted sum, or each direction with the earlier ones projected out first.
COMBINE_MODES = ("sum", "orthogonal")
#: Metadata a result keeps from its first term's file: what identifies the model and the extraction.
KEPT_METADATA = (
    "model",
    "model_fingerprint",
    "model_source",
    "hidden_size",
    "n_layers",
    "dtype",
    "base",
    "seed",
)
#: Relative norm below which a (position, layer) vector counts as zero: it has no direction to project on.
ZERO = 1e-12

Term = tuple[RoleVectors, str, float]


def _check_same(first: RoleVectors, other: RoleVectors, role: str) -> None:
    """Refuse a term from another model, shape or set of positions: its vectors do not add up."""
    mine, theirs = first.metadata.get("model_fingerprint"), other.metadata.get("model_fingerprint")
    if mine and theirs and mine != theirs:
        raise RolevecError(
            f"role {role!r} comes from another model (fingerprint {theirs}, not {mine}): combine vectors "
            "extracted from one model"
        )
    if tuple(other.base_mean.shape) != tuple(first.base_mean.shape):
        raise RolevecError(
            f"role {role!r} has vectors of shape {tuple(other.base_mean.shape)}, not "
            f"{tuple(first.base_mean.shape)}: combine vectors extracted from one model"
        )
    if other.positions != first.positions:
        raise RolevecError(
            f"role {role!r} has positions {list(other.positions)}, not {list(first.positions)}: extract "
            "every file with the same positions"
        )


def _term_record(
    vectors: RoleVectors, role: str, weight: float | None, file: str | Path | None
) -> dict[str, Any]:
    record: dict[str, Any] = {"role": role} if weight is None else {"role": role, "weight": weight}
    record |= {
        "digest": vectors.digest(role),
        "model": vectors.metadata.get("model"),
        "created": vectors.metadata.get("created"),
    }
    if file is not None:
        record["file"] = str(file)
    parent = vectors.metadata.get("arithmetic")
    if isinstance(parent, dict) and parent.get("name") == role:
        record["from"] = parent  # the term was itself made by arithmetic: keep its recipe
    return record


def _result(first: RoleVectors, name: str, diff: torch.Tensor, arithmetic: dict[str, Any]) -> RoleVectors:
    if not name:
        raise RolevecError("the combined role needs a `name`")
    metadata = {k: first.metadata[k] for k in KEPT_METADATA if k in first.metadata}
    metadata["arithmetic"] = {"name": name, **arithmetic}
    mean = (first.base_mean.double() + diff).float()
    return RoleVectors({name: mean}, first.base_mean, first.positions, first.position_tokens, metadata)


def _project_out(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """v minus its component along u, for every (position, layer) row; rows where u is zero are kept."""
    norm2 = (u * u).sum(-1, keepdim=True)
    scale = torch.maximum((v * v).sum(-1, keepdim=True), norm2)
    live = norm2 > ZERO * scale.clamp_min(torch.finfo(torch.float64).tiny)
    coef = torch.where(live, (v * u).sum(-1, keepdim=True) / torch.where(live, norm2, 1.0), 0.0)
    return v - coef * u


def combine(
    terms: Sequence[Term],
    name: str,
    *,
    mode: str = "sum",
    files: Sequence[str | Path | None] | None = None,
) -> RoleVectors:
    """The weighted sum Σ wᵢ·dᵢ of role vectors, as one new role ``name``.

    With ``mode="orthogonal"`` each dᵢ first has the earlier terms' directions projected out
    (Gram–Schmidt, per layer and position), so a later role adds only what the earlier ones lack.

    Args:
        terms: ``(vectors, role, weight)`` per term, in order.
        name: The role name of the result.
        mode: ``sum`` (default) or ``orthogonal``.
        files: The file each term was read from, recorded in the provenance (default: not recorded).

    Returns:
        A :class:`RoleVectors` with the single role ``name``, relative to the first term's base mean.

    Example:
        ```python
        a, b = RoleVectors.load("doctor.safetensors"), RoleVectors.load("lawyer.safetensors")
        both = combine([(a, "doctor", 1.0), (b, "lawyer", -0.5)], "doctor-lawyer")
        both.save("doctor-lawyer.safetensors")
        ```
    """
    if mode not in COMBINE_MODES:
        raise RolevecError(f"combination mode must be one of {', '.join(COMBINE_MODES)}, not {mode!r}")
    if not terms:
        raise RolevecError("a combination needs at least one term: pass `terms` as (vectors, role, weight)")
    if files is not None and len(files) != len(terms):
        raise RolevecError(f"`files` names {len(files)} files for {len(terms)} terms: pass one per term")
    first = terms[0][0]
    total = torch.zeros(first.base_mean.shape, dtype=torch.float64)
    done: list[torch.Tensor] = []
    records = []
    for i, (vectors, role, weight) in enumerate(terms):
        w = float(weight)
        if not math.isfinite(w):
            raise RolevecError(f"the weight of role {role!r} must be a finite number, not {weight!r}")
        _check_same(first, vectors, role)
        d = vectors.diff(role).double()
        if mode == "orthogonal":
            for u in done:
                d = _project_out(d, u)
            done.append(d)
        total += w * d
        records.append(_term_record(vectors, role, w, None if files is None else files[i]))
    return _result(first, name, total, {"op": "combine", "mode": mode, "terms": records})


def difference(
    a: tuple[RoleVectors, str], b: tuple[RoleVectors, str], name: str | None = None
) -> RoleVectors:
    """d_a − d_b as a new role (default name ``A-B``)."""
    return combine([(a[0], a[1], 1.0), (b[0], b[1], -1.0)], name or f"{a[1]}-{b[1]}")


def scale(v: tuple[RoleVectors, str], k: float, name: str | None = None) -> RoleVectors:
    """k·d_v as a new role (default name ``K*ROLE``)."""
    return combine([(v[0], v[1], k)], name or f"{k:g}*{v[1]}")


def project_out(
    v: tuple[RoleVectors, str], onto: tuple[RoleVectors, str], name: str | None = None
) -> RoleVectors:
    """d_v with its component along d_onto removed at every layer and position (default name
    ``V-without-ONTO``); where d_onto is zero (layer 0) d_v is kept as it is."""
    (vv, role), (ov, other) = v, onto
    _check_same(vv, ov, other)
    d = _project_out(vv.diff(role).double(), ov.diff(other).double())
    made = {
        "op": "project_out",
        "terms": [_term_record(vv, role, 1.0, None)],
        "onto": _term_record(ov, other, None, None),
    }
    return _result(vv, name or f"{role}-without-{other}", d, made)


# --- compositions named on the command line ----------------------------------------------------------

#: Separates a composition's terms and a term's role from its weight: ``doctor:1,lawyer:-0.5``.
TERM_SEP, WEIGHT_SEP = ",", ":"
#: Marks an orthogonal composition's name (a plain sum's name is its terms alone).
MODE_SEP = "/"


def parse_composition(text: str) -> list[tuple[str, float]]:
    """``doctor:1,lawyer:-0.5`` as ``[("doctor", 1.0), ("lawyer", -0.5)]``; a term without ``:W`` weighs 1.

    Only the syntax is checked here (names present and distinct, weights finite numbers); whether the roles
    exist is checked against a vector file by :func:`compose`.
    """
    if not isinstance(text, str) or not text.strip():
        raise RolevecError("a composition needs terms: pass ROLE:WEIGHT,... (e.g. doctor:1,lawyer:-0.5)")
    terms: list[tuple[str, float]] = []
    for raw in text.split(TERM_SEP):
        part = raw.strip()
        role, _, weight_text = part.rpartition(WEIGHT_SEP) if WEIGHT_SEP in part else (part, "", "1")
        role = role.strip()
        if not role:
            raise RolevecError(
                f"composition term {part!r} names no role: pass ROLE:WEIGHT,... (e.g. doctor:1,lawyer:-0.5)"
            )
        try:
            weight = float(weight_text)
        except ValueError:
            raise RolevecError(
                f"the weight of role {role!r} in composition {text!r} is {weight_text.strip()!r}, not a "
                "number: pass ROLE:WEIGHT with a number (e.g. lawyer:-0.5)"
            ) from None
        if not math.isfinite(weight):
            raise RolevecError(f"the weight of role {role!r} must be a finite number, not {weight_text!r}")
        if any(role == seen for seen, _ in terms):
            raise RolevecError(f"role {role!r} appears twice in composition {text!r}: name each role once")
        terms.append((role, weight))
    return terms


def composition_name(terms: Sequence[tuple[str, float]], mode: str = "sum") -> str:
    """The canonical name of a composition: ``doctor:1,lawyer:-0.5`` (``.../orthogonal`` when orthogonal).

    It is the role name the composed vector takes, so records, tables and files name it the same way
    whichever spelling of the weights (``1`` or ``1.0``) the user typed.
    """
    if mode not in COMBINE_MODES:
        raise RolevecError(f"combination mode must be one of {', '.join(COMBINE_MODES)}, not {mode!r}")
    body = TERM_SEP.join(f"{role}{WEIGHT_SEP}{float(w):g}" for role, w in terms)
    return body if mode == "sum" else f"{body}{MODE_SEP}{mode}"


def compose(
    vectors: RoleVectors,
    terms: str | Sequence[tuple[str, float]],
    *,
    mode: str = "sum",
    name: str | None = None,
) -> RoleVectors:
    """Several roles of one vector file as one composed role (weighted sum, or orthogonalised in order).

    What ``--compose doctor:1,lawyer:-0.5`` steers with: the result is an ordinary one-role
    :class:`RoleVectors` (named by :func:`composition_name` unless ``name`` is given), so addition,
    ablation, capping, folding and export take it as they take any role.

    Args:
        vectors: The vector file holding every term's role.
        terms: ``"doctor:1,lawyer:-0.5"``, or ``[("doctor", 1.0), ("lawyer", -0.5)]``.
        mode: ``sum`` (default) or ``orthogonal`` (each direction with the earlier ones projected out).
        name: The composed role's name (default: the canonical composition name).

    Returns:
        A :class:`RoleVectors` with the single composed role, provenance under ``arithmetic``.

    Example:
        ```python
        mix = compose(RoleVectors.load("vectors.safetensors"), "doctor:1,lawyer:-0.5")
        steering = resolve_steering(mix, mix.roles[0], layers=12, alpha=3.0)
        ```
    """
    parsed = parse_composition(terms) if isinstance(terms, str) else [(str(r), float(w)) for r, w in terms]
    if not parsed:
        raise RolevecError("a composition needs at least one term: pass ROLE:WEIGHT,...")
    missing = [role for role, _ in parsed if role not in vectors.roles]
    if missing:
        raise RolevecError(
            f"composition names role{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} that "
            f"the vector file lacks (it has: {', '.join(vectors.roles)})"
        )
    label = name or composition_name(parsed, mode)
    return combine([(vectors, role, weight) for role, weight in parsed], label, mode=mode)
