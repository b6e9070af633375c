from __future__ import annotations

import math

import pytest
import torch

from rolevec.analysis.geometry import Site, common_site, cosine_matrix, norms_by_layer, pca_2d, role_geometry
from rolevec.errors import RolevecError
from rolevec.vectors.role_vectors import RoleVectors
from synthetic_run import make_selection, make_vectors


def _vectors(directions: dict[str, torch.Tensor]) -> RoleVectors:
    """One position, two layers; the role vector at layer 1 is the given direction, layer 0 is zero."""
    hidden = next(iter(directions.values())).shape[0]
    base = torch.zeros(1, 2, hidden)
    means = {}
    for role, d in directions.items():
        m = base.clone()
        m[0, 1] = d
        means[role] = m
    return RoleVectors(role_means=means, base_mean=base, positions=(-1,), position_tokens=("\n",))


SITE = Site(1, -1, "test")


def test_cosine_of_known_directions() -> None:
    e = torch.eye(3)
    v = _vectors({"a": e[0], "b": 2 * e[0], "c": -e[0], "d": e[1], "z": torch.zeros(3)})
    sim = cosine_matrix(v, ["a", "b", "c", "d", "z"], SITE)
    m = sim.matrix
    assert m[0][1] == pytest.approx(1.0) and m[0][2] == pytest.approx(-1.0) and m[0][3] == pytest.approx(0.0)
    assert all(m[i][j] == pytest.approx(m[j][i]) for i in range(4) for j in range(4))
    assert all(math.isnan(x) for x in m[4]) and math.isnan(m[0][4])


def test_pca_recovers_a_planar_configuration_exactly() -> None:
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 2)).Q  # an orthonormal plane in 8-D
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 2.0]])
    roles = [f"r{i}" for i in range(len(points))]
    v = _vectors({r: (basis @ p).float() for r, p in zip(roles, points, strict=True)})
    proj = pca_2d(v, roles, SITE)
    coords = torch.tensor(proj.coords, dtype=torch.float64)
    assert torch.allclose(
        torch.cdist(coords, coords), torch.cdist(points.double(), points.double()), atol=1e-4
    )
    assert sum(proj.explained) == pytest.approx(1.0)
    assert proj.explained[0] >= proj.explained[1]
    assert proj == pca_2d(v, roles, SITE)  # deterministic, signs included


def test_pca_sign_convention_and_small_inputs() -> None:
    v = _vectors({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-3.0, 0.0])})
    proj = pca_2d(v, ["a", "b"], SITE)
    assert proj.coords[1][0] > 0 and abs(proj.coords[0][0]) < proj.coords[1][0]  # largest |coord| positive
    assert all(p[1] == pytest.approx(0.0) for p in proj.coords)  # two points span one component only
    with pytest.raises(RolevecError, match="at least 2 roles"):
        pca_2d(v, ["a"], SITE)


def test_norms_by_layer_follow_the_diffs() -> None:
    v = make_vectors()
    norms = norms_by_layer(v, v.roles, {"doctor": -2})
    assert set(norms) == set(v.roles)
    for role, values in norms.items():
        index = v.position_index(-2 if role == "doctor" else -1)
        expected = v.diff(role)[index].norm(dim=-1)
        assert values == pytest.approx(expected.tolist(), rel=1e-5)
        assert len(values) == v.n_layers + 1


def test_common_site_is_the_most_chosen() -> None:
    v = make_vectors()
    site = common_site(v, make_selection())  # mathematician at layer 3, the others at layer 2
    assert (site.layer, site.position) == (2, -1) and "2 of 3" in site.reason
    fallback = common_site(v, None)
    assert (fallback.layer, fallback.position) == (v.n_layers // 2, -1)


def test_role_geometry_orders_roles_by_domain() -> None:
    v = make_vectors(["doctor", "lawyer", "mathematician"])
    g = role_geometry(v, make_selection())
    assert g.roles == ("lawyer", "mathematician", "doctor")  # law, math, medicine
    assert g.domains["doctor"] == "medicine"
    assert g.projection is not None and g.projection.roles == g.roles
    assert (g.similarity.site.layer, g.similarity.site.position) == (2, -1)
    single = role_geometry(make_vectors(["doctor"]))
    assert single.projection is None and single.similarity.matrix[0][0] == pytest.approx(1.0)
