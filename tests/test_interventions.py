"""Interventions beyond the core tests: ablation seen from the writers' side, padding, resolution, errors."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch

from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks, hooked, input_hook, output_hook
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from rolevec.steering.interventions import Steering, ablate, resolve_steering
from rolevec.vectors.role_vectors import RoleVectors

TEXTS = ["Explain how eigenvalues relate to stability.", "Hi", "What is the dose of amoxicillin?"]


def role_vectors(adapter: ModelAdapter, *, fingerprint: str | None = None, seed: int = 0) -> RoleVectors:
    gen = torch.Generator().manual_seed(seed)
    shape = (adapter.chat.n_positions, adapter.n_layers + 1, adapter.hidden_size)
    return RoleVectors(
        role_means={"doctor": torch.randn(shape, generator=gen), "lawyer": torch.randn(shape, generator=gen)},
        base_mean=torch.randn(shape, generator=gen),
        positions=tuple(adapter.chat.positions),
        position_tokens=tuple(adapter.chat.position_tokens()),
        metadata={"model": adapter.name, "model_fingerprint": fingerprint or adapter.fingerprint()},
    )


def _block_outputs(adapter: ModelAdapter, texts: list[str]) -> list[torch.Tensor]:
    """Every block's output and the final norm's input, read with forward hooks on the blocks."""
    seen: list[torch.Tensor] = []

    def keep(x: torch.Tensor) -> None:
        seen.append(x.detach().clone())

    batch = adapter.encode([adapter.render(t) for t in texts])
    post = [(block, output_hook(keep)) for block in adapter.blocks]
    with torch.inference_mode(), hooked(post=post, pre=[(adapter.final_norm, input_hook(keep))]):
        adapter.model(**batch.model_kwargs())
    return seen


def _max_projection(xs: list[torch.Tensor], dhat: torch.Tensor) -> float:
    return max(float((x @ dhat).abs().max() / x.norm(dim=-1).max().clamp_min(1.0)) for x in xs)


def test_ablation_keeps_block_outputs_orthogonal(tiny: ModelAdapter) -> None:
    """Block outputs are residual + writer outputs: only the writer hooks can make them orthogonal."""
    torch.manual_seed(1)
    d = torch.randn(tiny.hidden_size)
    dhat = d / d.norm()
    clean = _block_outputs(tiny, TEXTS)
    assert _max_projection(clean, dhat) > 1e-2

    # control: projecting only the block inputs leaves the direction in every block's output
    def project(x: torch.Tensor) -> torch.Tensor:
        return x - (x @ dhat).unsqueeze(-1) * dhat

    sites = [tiny.residual_site(layer) for layer in range(tiny.n_layers + 1)]
    with hooked(pre=[(s, input_hook(project)) for s in sites]):
        inputs_only = _block_outputs(tiny, TEXTS)
    assert _max_projection(inputs_only[:-1], dhat) > 1e-3

    with ablate(tiny, d):
        ablated = _block_outputs(tiny, TEXTS)
    assert len(ablated) == tiny.n_layers + 1
    assert _max_projection(ablated, dhat) < 1e-5
    assert count_hooks(tiny.model) == 0


def _rows(
    adapter: ModelAdapter, texts: list[str], steer: Callable[[], object] | None, side: str
) -> list[torch.Tensor]:
    """Logits of each text's real tokens, from one padded batch."""
    batch = adapter.encode([adapter.render(t) for t in texts], padding_side=side)
    with torch.inference_mode():
        if steer is None:
            logits = adapter.model(**batch.model_kwargs()).logits
        else:
            with steer():  # type: ignore[attr-defined]
                logits = adapter.model(**batch.model_kwargs()).logits
    out = []
    width = batch.input_ids.shape[1]
    for i, n in enumerate(batch.lengths.tolist()):
        out.append(logits[i, :n] if side == "right" else logits[i, width - n :])
    return out


@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_batched_steering_with_padding_matches_unbatched(tiny: ModelAdapter, mode: str) -> None:
    torch.manual_seed(2)
    d = torch.randn(tiny.hidden_size)
    steering = Steering(mode=mode, vectors={2: d}, alpha=4.0 if mode == "add" else 0.0)
    singles = [_rows(tiny, [t], lambda: steering.apply(tiny), "right")[0] for t in TEXTS]
    plain = _rows(tiny, TEXTS[:1], None, "right")[0]
    assert not torch.allclose(plain, singles[0], atol=1e-3)  # the steering does something
    for side in ("right", "left"):
        batched = _rows(tiny, TEXTS, lambda: steering.apply(tiny), side)
        for got, want in zip(batched, singles, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_steering_adds_each_layer_its_own_vector(tiny_llama: ModelAdapter) -> None:
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}

    def keep(store: dict[int, torch.Tensor], layer: int) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            store[layer] = x.detach().clone()

        return fn

    gen = torch.Generator().manual_seed(3)
    a, b = (
        torch.randn(tiny_llama.hidden_size, generator=gen),
        torch.randn(tiny_llama.hidden_size, generator=gen),
    )
    steering = Steering(mode="add", vectors={1: a, 3: b}, alpha=2.0)
    batch = tiny_llama.encode([tiny_llama.render("Hi")])
    sites = {layer: tiny_llama.residual_site(layer) for layer in (1, 3)}
    # hooks run in registration order: observers outside the steering see the input before the shift
    with (
        torch.inference_mode(),
        hooked(pre=[(s, input_hook(keep(before, k))) for k, s in sites.items()]),
        steering.apply(tiny_llama),
        hooked(pre=[(s, input_hook(keep(after, k))) for k, s in sites.items()]),
    ):
        tiny_llama.model(**batch.model_kwargs())
    for layer, vector in ((1, a), (3, b)):
        shift = after[layer] - before[layer]
        torch.testing.assert_close(shift, (2.0 * vector).expand_as(shift), rtol=0, atol=1e-5)
    assert count_hooks(tiny_llama.model) == 0
    assert steering.scaled()[3].equal(2.0 * b)
    assert "layer 1,3" in steering.describe()


def test_resolve_steering_checks_everything(tiny_llama: ModelAdapter) -> None:
    vecs = role_vectors(tiny_llama)
    steering = resolve_steering(vecs, "doctor", layers=2, alpha=3.0, adapter=tiny_llama)
    assert steering.mode == "add" and steering.layers == [2] and steering.alpha == 3.0
    assert torch.equal(steering.vectors[2], vecs.vector("doctor", 2, -1))
    ablation = resolve_steering(vecs, "lawyer", layers=1, position=-2, ablate=True, adapter=tiny_llama)
    assert ablation.mode == "ablate" and torch.isclose(ablation.direction.norm(), torch.tensor(1.0))

    cases: list[tuple[dict[str, object], str]] = [
        ({"layers": 1, "alpha": 1.0, "role": "chef"}, "role 'chef'"),
        ({"layers": 7, "alpha": 1.0}, "layer 7 is out of range"),
        ({"layers": 1, "alpha": 1.0, "position": -99}, "position -99"),
        ({"layers": 1, "alpha": math.nan}, "finite"),
        ({"layers": 1, "alpha": math.inf}, "finite"),
        ({"layers": 1}, "`alpha`"),
        ({"layers": 1, "alpha": 1.0, "ablate": True}, "either"),
        ({"layers": [1, 2], "ablate": True}, "single"),
    ]
    for kwargs, message in cases:
        role = str(kwargs.pop("role", "doctor"))
        with pytest.raises(RolevecError, match=message):
            resolve_steering(vecs, role, adapter=tiny_llama, **kwargs)  # type: ignore[arg-type]


def test_resolve_refuses_another_model(tiny_llama: ModelAdapter) -> None:
    other = role_vectors(tiny_llama, fingerprint="0123456789abcdef")
    with pytest.raises(RolevecError, match=r"fingerprint 0123456789abcdef.*`allow_other_model`"):
        resolve_steering(other, "doctor", layers=1, alpha=1.0, adapter=tiny_llama)
    with pytest.warns(UserWarning, match="fingerprint 0123456789abcdef.*meaningless"):  # allowed, not silent
        steering = resolve_steering(
            other, "doctor", layers=1, alpha=1.0, adapter=tiny_llama, allow_other_model=True
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # applying what was resolved does not warn again
        with steering.apply(tiny_llama):
            pass
    deeper = role_vectors(make_adapter("llama", n_layers=4))
    with pytest.raises(RolevecError, match="4 layers"):
        resolve_steering(deeper, "doctor", layers=1, alpha=1.0, adapter=tiny_llama)
    gen = torch.Generator().manual_seed(0)
    narrow = RoleVectors(
        role_means={"doctor": torch.randn(2, 4, 16, generator=gen)},
        base_mean=torch.zeros(2, 4, 16),
        positions=(-2, -1),
        position_tokens=("a", "b"),
    )
    with pytest.raises(RolevecError, match="hidden size 16"):
        resolve_steering(narrow, "doctor", layers=1, alpha=1.0, adapter=tiny_llama)


def test_steering_rejects_bad_vectors() -> None:
    with pytest.raises(RolevecError, match="NaN"):
        Steering(mode="add", vectors={1: torch.tensor([1.0, math.nan])}, alpha=1.0)
    with pytest.raises(RolevecError, match="mode"):
        Steering(mode="clamp", vectors={1: torch.ones(2)})
    with pytest.raises(RolevecError, match="at least one"):
        Steering(mode="add", vectors={}, alpha=1.0)
    with pytest.raises(RolevecError, match="zero"):
        _ = Steering(mode="ablate", vectors={1: torch.zeros(4)}).direction
    tiny = make_adapter("llama")
    with (
        pytest.raises(RolevecError, match="where"),
        Steering(mode="ablate", vectors={1: torch.ones(32)}).apply(tiny, where="prompt"),
    ):
        pass
    assert count_hooks(tiny.model) == 0


def zero_at(vectors: RoleVectors, layer: int, *, role: str = "doctor", noise: float = 0.0) -> RoleVectors:
    """The same vectors with ``role``'s mean equal to the base mean at ``layer`` (plus a little noise)."""
    means = {r: m.clone() for r, m in vectors.role_means.items()}
    means[role][:, layer] = vectors.base_mean[:, layer] * (1.0 + noise)
    return RoleVectors(
        role_means=means,
        base_mean=vectors.base_mean,
        positions=vectors.positions,
        position_tokens=vectors.position_tokens,
        metadata=vectors.metadata,
    )


def test_layer_0_vector_is_zero_after_extraction(tiny_llama: ModelAdapter) -> None:
    """Why the refusal below explains layer 0 as it does: block 0's input at the template positions is
    the embedding of the same template tokens for every prompt, so μ − ν is exactly zero there."""
    from rolevec.data.sources import PromptSet
    from rolevec.vectors.extraction import extract_role_vectors

    role = PromptSet("doctor", ("Treat a mild fever.", "Explain blood pressure."), "test")
    base = PromptSet("base", ("Write a poem.", "Name two animals, please, and say why."), "test")
    vecs = extract_role_vectors(tiny_llama, {"doctor": role}, base, progress=False)
    assert all(float(vecs.vector("doctor", 0, p).norm()) == 0.0 for p in vecs.positions)
    assert float(vecs.vector("doctor", 1, -1).norm()) > 0.0
    with pytest.raises(RolevecError, match="layer 0 is the input of block 0"):
        resolve_steering(vecs, "doctor", layers=0, ablate=True)


@pytest.mark.parametrize("noise", [0.0, 3e-7])
def test_ablating_a_zero_vector_is_refused_before_any_model(tiny_llama: ModelAdapter, noise: float) -> None:
    """Ablation needs a unit direction: a zero (or rounding-level) vector used to pass resolution and fail
    later, after the model had loaded (or, near zero, give a direction made of rounding noise)."""
    vecs = zero_at(role_vectors(tiny_llama), 0, noise=noise)
    assert (float(vecs.vector("doctor", 0, -2).norm()) > 0.0) is bool(noise)  # rounding-level, not zero
    with pytest.raises(RolevecError) as info:
        resolve_steering(vecs, "doctor", layers=0, position=-2, ablate=True)
    assert str(info.value) == (
        "the vector of role 'doctor' at layer 0, position -2 is zero: layer 0 is the input of block 0, "
        "where the template tokens' embeddings are the same for every prompt, so the role vector there is "
        "zero, and a zero vector has no direction to ablate: pass another `layer` (1..3)"
    )
    other = zero_at(role_vectors(tiny_llama), 2)
    with pytest.raises(RolevecError, match=r"at layer 2, position -1 is zero: its role and base prompts"):
        resolve_steering(other, "doctor", layers=2, ablate=True, adapter=tiny_llama)
    assert resolve_steering(vecs, "lawyer", layers=0, ablate=True).mode == "ablate"  # lawyer's is not zero


def test_adding_a_zero_vector_warns(tiny_llama: ModelAdapter) -> None:
    vecs = zero_at(role_vectors(tiny_llama), 0)
    with pytest.warns(
        UserWarning, match=r"layer 0, position -1 is zero: layer 0 is the input .*changes nothing"
    ):
        steering = resolve_steering(vecs, "doctor", layers=[0, 1, 2], alpha=2.0, adapter=tiny_llama)
    assert steering.layers == [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_steering(vecs, "doctor", layers=[0, 1], alpha=2.0, warn_zero=False)
        resolve_steering(vecs, "doctor", layers=[1, 2], alpha=2.0)  # no zero vector among these
    two = zero_at(zero_at(role_vectors(tiny_llama), 1), 3)
    with pytest.warns(UserWarning, match=r"at layers 1, 3, position -1 is zero: its role and base"):
        resolve_steering(two, "doctor", layers=[1, 2, 3], alpha=1.0)
