"""How role vectors sit relative to each other: cosine similarity, a 2-D PCA, and norms across layers.

Comparisons are made at ONE residual site (layer, position) for all roles, because vectors taken at
different layers live in differently scaled spaces; by default that is the site chosen most often on
the validation split. Everything is deterministic (exact SVD in float64 with a fixed sign convention).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RolevecError
from ..vectors.role_vectors import RoleVectors
from .tables import order_domains, order_roles, role_domains


@dataclass(frozen=True)
class Site:
    layer: int
    position: int
    reason: str  # why this site, printed in the report


def common_site(vectors: RoleVectors, selection: Mapping[str, Any] | None = None) -> Site:
    """The (layer, position) chosen for most roles; without a selection, the middle layer at -1."""
    chosen: Counter[tuple[int, int]] = Counter()
    for role, info in ((selection or {}).get("roles") or {}).items():
        if role in vectors.roles and info.get("layer") is not None and info.get("position") is not None:
            chosen[(int(info["layer"]), int(info["position"]))] += 1
    if chosen:
        # most frequent; ties go to the earlier layer, then the position nearer the end of the prompt
        (layer, position), count = min(chosen.items(), key=lambda kv: (-kv[1], kv[0][0], -kv[0][1]))
        return Site(layer, position, f"chosen for {count} of {sum(chosen.values())} roles")
    return Site(vectors.n_layers // 2, vectors.positions[-1], "middle layer, last position (no selection)")


def _matrix(vectors: RoleVectors, roles: Sequence[str], site: Site) -> torch.Tensor:
    if not roles:
        raise RolevecError("no roles to compare: pass at least one role that is in the vector file")
    return torch.stack([vectors.vector(r, site.layer, site.position).double() for r in roles])


@dataclass(frozen=True)
class Similarity:
    roles: tuple[str, ...]
    site: Site
    matrix: tuple[tuple[float, ...], ...]  # cosine similarity, NaN where a vector is zero


def cosine_matrix(vectors: RoleVectors, roles: Sequence[str], site: Site) -> Similarity:
    x = _matrix(vectors, roles, site)
    norms = x.norm(dim=1)
    unit = x / norms.clamp_min(1e-300).unsqueeze(1)
    sim = (unit @ unit.T).clamp(-1.0, 1.0)
    zero = norms == 0
    sim[zero, :] = math.nan
    sim[:, zero] = math.nan
    rows = tuple(tuple(float(v) for v in row) for row in sim.tolist())
    return Similarity(tuple(roles), site, rows)


@dataclass(frozen=True)
class Projection:
    roles: tuple[str, ...]
    site: Site
    coords: tuple[tuple[float, float], ...]
    explained: tuple[float, float]  # share of variance along each component


def pca_2d(vectors: RoleVectors, roles: Sequence[str], site: Site) -> Projection:
    """Project the role vectors on their two leading principal components (exact, deterministic)."""
    if len(roles) < 2:
        raise RolevecError(f"a PCA of role vectors needs at least 2 roles, got {len(roles)}")
    x = _matrix(vectors, roles, site)
    centred = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    k = min(2, s.shape[0])
    coords = u[:, :k] * s[:k]
    # fix the arbitrary sign of each component: its largest-magnitude coordinate is positive
    for j in range(k):
        col = coords[:, j]
        if float(col[int(col.abs().argmax())]) < 0:
            coords[:, j] = -col
    if k < 2:
        coords = torch.cat([coords, torch.zeros(len(roles), 2 - k, dtype=coords.dtype)], dim=1)
    total = float((s**2).sum())
    shares = [float(v) / total if total > 0 else 0.0 for v in (s**2)[:2].tolist()] + [0.0, 0.0]
    points = tuple((float(a), float(b)) for a, b in coords.tolist())
    return Projection(tuple(roles), site, points, (shares[0], shares[1]))


def norms_by_layer(
    vectors: RoleVectors, roles: Sequence[str], positions: Mapping[str, int] | int
) -> dict[str, list[float]]:
    """‖d‖ at every layer 0..n_layers for each role, at its own (or one shared) position."""
    out: dict[str, list[float]] = {}
    for role in roles:
        position = positions if isinstance(positions, int) else positions.get(role, vectors.positions[-1])
        index = vectors.position_index(position)
        out[role] = [float(v) for v in vectors.diff(role)[index].double().norm(dim=-1).tolist()]
    return out


# --- everything the report shows -------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    roles: tuple[str, ...]  # ordered by domain
    domains: Mapping[str, str | None]
    similarity: Similarity
    projection: Projection | None  # None with fewer than two roles
    norms: Mapping[str, list[float]]
    note: str  # which sites were used, for the report


def role_geometry(
    vectors: RoleVectors,
    selection: Mapping[str, Any] | None = None,
    *,
    role_map: Mapping[str, str] | None = None,
) -> Geometry:
    """Similarity and PCA at the common site, norms at each role's chosen position; roles grouped by
    domain, each role's domain from ``role_map`` (a role -> domain map), the selection or the paper."""
    if not vectors.roles:
        raise RolevecError("the vector file holds no roles: extract some with `rolevec extract`")
    selection = selection or {}
    domain_of = role_domains(selection, mapping=role_map)
    domains = order_domains({d for d in (domain_of.get(r) for r in vectors.roles) if d})
    roles = order_roles(vectors.roles, domain_of, domains)
    site = common_site(vectors, selection)
    chosen = selection.get("roles") or {}
    positions = {
        r: int(chosen[r]["position"])
        for r in roles
        if r in chosen and chosen[r].get("position") in vectors.positions
    }
    projection = pca_2d(vectors, roles, site) if len(roles) >= 2 else None
    return Geometry(
        roles=roles,
        domains={r: domain_of.get(r) for r in roles},
        similarity=cosine_matrix(vectors, roles, site),
        projection=projection,
        norms=norms_by_layer(vectors, roles, positions),
        note=f"Similarity and PCA at layer {site.layer}, position {site.position} ({site.reason}); "
        "norms at each role's chosen position (the last position where none was chosen).",
    )
