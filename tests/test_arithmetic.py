"""Vector arithmetic, checked against the same sums computed by hand from the role and base means."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rolevec.errors import RolevecError
from rolevec.vectors.arithmetic import combine, difference, project_out, scale
from rolevec.vectors.role_vectors import RoleVectors

SHAPE = (2, 4, 6)  # positions, layers + 1, hidden
POSITIONS = (-2, -1)


def _vectors(
    seed: int, *, fingerprint: str = "fp-a", roles: tuple[str, ...] = ("doctor", "lawyer")
) -> RoleVectors:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=gen)
    means = {r: torch.randn(SHAPE, generator=gen) for r in roles}
    means[roles[0]][:, 0] = base[:, 0]  # layer 0: a zero vector, as after extraction
    return RoleVectors(
        means,
        base,
        POSITIONS,
        ("<a>", "<b>"),
        {"model": "tiny", "model_fingerprint": fingerprint, "created": f"2026-01-0{seed % 9 + 1}"},
    )


def _by_hand(vectors: RoleVectors, role: str, position: int, layer: int) -> torch.Tensor:
    i = POSITIONS.index(position)
    return vectors.role_means[role][i, layer].double() - vectors.base_mean[i, layer].double()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_weighted_sum_at_every_site() -> None:
    a, b = _vectors(1), _vectors(2)
    out = combine([(a, "doctor", 1.0), (b, "lawyer", -0.5), (a, "lawyer", 2.0)], "mix")
    assert out.roles == ("mix",)
    for position in POSITIONS:
        for layer in range(4):
            want = (
                _by_hand(a, "doctor", position, layer)
                - 0.5 * _by_hand(b, "lawyer", position, layer)
                + 2.0 * _by_hand(a, "lawyer", position, layer)
            )
            _close(out.vector("mix", layer, position), want)


def test_difference_and_scale() -> None:
    a, b = _vectors(1), _vectors(2)
    diff = difference((a, "doctor"), (b, "lawyer"))
    assert diff.roles == ("doctor-lawyer",)
    twice = scale((a, "lawyer"), -3.0, name="anti")
    for layer in range(4):
        _close(
            diff.vector("doctor-lawyer", layer, -1),
            _by_hand(a, "doctor", -1, layer) - _by_hand(b, "lawyer", -1, layer),
        )
        _close(twice.vector("anti", layer, -2), -3.0 * _by_hand(a, "lawyer", -2, layer))


def test_project_out_removes_the_component_by_hand() -> None:
    a = _vectors(3)
    out = project_out((a, "lawyer"), (a, "doctor"))
    assert out.roles == ("lawyer-without-doctor",)
    for position in POSITIONS:
        for layer in range(4):
            v, u = _by_hand(a, "lawyer", position, layer), _by_hand(a, "doctor", position, layer)
            got = out.vector("lawyer-without-doctor", layer, position)
            if layer == 0:  # doctor's vector is zero there: nothing to remove
                _close(got, v)
                continue
            _close(got, v - (v @ u) / (u @ u) * u)
            assert abs(float(got.double() @ u)) <= 1e-4 * float(u.norm())


def test_orthogonal_combination_projects_out_earlier_terms() -> None:
    a, b = _vectors(4), _vectors(5, roles=("pirate", "judge"))
    out = combine([(a, "doctor", 1.0), (b, "pirate", 2.0), (b, "judge", -1.0)], "ortho", mode="orthogonal")
    for layer in range(1, 4):
        d1, d2, d3 = (_by_hand(v, r, -1, layer) for v, r in ((a, "doctor"), (b, "pirate"), (b, "judge")))
        u2 = d2 - (d2 @ d1) / (d1 @ d1) * d1
        u3 = d3 - (d3 @ d1) / (d1 @ d1) * d1
        u3 = u3 - (u3 @ u2) / (u2 @ u2) * u2
        assert abs(float(u3 @ d1)) < 1e-9 and abs(float(u3 @ d2)) < 1e-9
        _close(out.vector("ortho", layer, -1), d1 + 2.0 * u2 - u3)
    plain = combine([(a, "doctor", 1.0), (b, "pirate", 2.0)], "plain")
    assert not torch.allclose(plain.vector("plain", 2, -1), out.vector("ortho", 2, -1))


def test_provenance_round_trips_through_save_and_load(tmp_path: Path) -> None:
    a, b = _vectors(1), _vectors(2)
    out = combine([(a, "doctor", 1.0), (b, "lawyer", -0.5)], "mix", files=["a.safetensors", "b.safetensors"])
    made = out.metadata["arithmetic"]
    assert made["op"] == "combine" and made["mode"] == "sum" and made["name"] == "mix"
    assert [(t["role"], t["weight"], t["file"]) for t in made["terms"]] == [
        ("doctor", 1.0, "a.safetensors"),
        ("lawyer", -0.5, "b.safetensors"),
    ]
    assert [t["digest"] for t in made["terms"]] == [a.digest("doctor"), b.digest("lawyer")]
    assert out.metadata["model_fingerprint"] == "fp-a"
    out.save(tmp_path / "mix.safetensors")
    back = RoleVectors.load(tmp_path / "mix.safetensors")
    assert back.metadata["arithmetic"] == made
    assert back.digest("mix") == out.digest("mix")
    # a result used again keeps its own recipe nested in the new one
    again = scale((back, "mix"), 2.0)
    assert again.metadata["arithmetic"]["terms"][0]["from"] == made


def test_incompatible_terms_are_refused_in_one_line() -> None:
    a = _vectors(1)
    other_model = _vectors(2, fingerprint="fp-b")
    other_shape = RoleVectors(
        {"doctor": torch.zeros(2, 3, 6)}, torch.ones(2, 3, 6), POSITIONS, ("<a>", "<b>"), {}
    )
    other_positions = RoleVectors(
        {"doctor": torch.zeros(SHAPE)}, torch.ones(SHAPE), (-3, -1), ("<a>", "<b>"), {}
    )
    cases = [
        (lambda: combine([(a, "doctor", 1.0), (other_model, "lawyer", 1.0)], "x"), "another model"),
        (lambda: difference((a, "doctor"), (other_shape, "doctor")), "shape"),
        (lambda: project_out((a, "doctor"), (other_positions, "doctor")), "positions"),
        (lambda: combine([(a, "surgeon", 1.0)], "x"), "'surgeon' is not in this vector file"),
        (lambda: combine([(a, "doctor", float("nan"))], "x"), "finite number"),
        (lambda: combine([], "x"), "at least one term"),
        (lambda: combine([(a, "doctor", 1.0)], "x", mode="gram"), "sum, orthogonal"),
        (lambda: combine([(a, "doctor", 1.0)], ""), "`name`"),
        (lambda: combine([(a, "doctor", 1.0)], "x", files=[]), "one per term"),
    ]
    for call, expect in cases:
        with pytest.raises(RolevecError, match=expect) as info:
            call()
        assert "\n" not in str(info.value)
