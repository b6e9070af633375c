from __future__ import annotations

import math

import pytest
import torch

from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks, hooked, input_hook
from rolevec.model.loading import ModelAdapter
from rolevec.steering.interventions import ablate, add


def _residuals(adapter: ModelAdapter, texts: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Inputs of every block and of the final norm, and the logits."""
    seen: list[torch.Tensor] = []
    batch = adapter.encode([adapter.render(t) for t in texts])

    def keep(x: torch.Tensor) -> None:
        seen.append(x.detach().clone())

    sites = [adapter.residual_site(layer) for layer in range(adapter.n_layers + 1)]
    with torch.inference_mode(), hooked(pre=[(s, input_hook(keep)) for s in sites]):
        logits = adapter.model(**batch.model_kwargs()).logits
    return seen, logits


def test_addition_is_exact_and_local(tiny: ModelAdapter) -> None:
    torch.manual_seed(0)
    d = torch.randn(tiny.hidden_size)
    clean, _ = _residuals(tiny, ["Explain eigenvalues."])
    with add(tiny, d, layers=2, alpha=3.0):
        steered, _ = _residuals(tiny, ["Explain eigenvalues."])
    assert count_hooks(tiny.model) == 0
    for layer in range(2):
        assert torch.equal(steered[layer], clean[layer])
    # the hooks run in registration order: the observer on block 2 sees the shifted input
    torch.testing.assert_close(steered[2] - clean[2], (3.0 * d).expand_as(clean[2]), rtol=0, atol=1e-5)


def test_alpha_zero_is_bit_identical(tiny: ModelAdapter) -> None:
    _, clean = _residuals(tiny, ["Hi there"])
    with add(tiny, torch.randn(tiny.hidden_size), layers=1, alpha=0.0):
        _, same = _residuals(tiny, ["Hi there"])
    assert torch.equal(clean, same)


def test_ablation_removes_direction_everywhere(tiny: ModelAdapter) -> None:
    torch.manual_seed(1)
    d = torch.randn(tiny.hidden_size)
    clean, _ = _residuals(tiny, ["Explain eigenvalues.", "Hi"])
    dhat = d / d.norm()
    assert max(float((x @ dhat).abs().max()) for x in clean) > 1e-2
    with ablate(tiny, d):
        # observe after ablation: register the observers inside so they run after the projections
        ablated, _ = _residuals(tiny, ["Explain eigenvalues.", "Hi"])
    for x in ablated:
        scale = float(x.norm(dim=-1).max())
        assert float((x @ dhat).abs().max()) <= 1e-5 * max(scale, 1.0)
    assert count_hooks(tiny.model) == 0


def test_bad_inputs(tiny_llama: ModelAdapter) -> None:
    d = torch.randn(tiny_llama.hidden_size)
    with pytest.raises(RolevecError, match="finite"), add(tiny_llama, d, layers=1, alpha=math.nan):
        pass
    with pytest.raises(RolevecError, match="hidden size"), add(tiny_llama, torch.randn(7), layers=1):
        pass
    with pytest.raises(RolevecError, match="out of range"), add(tiny_llama, d, layers=99):
        pass
    with pytest.raises(RolevecError, match="zero"), ablate(tiny_llama, torch.zeros(tiny_llama.hidden_size)):
        pass
    assert count_hooks(tiny_llama.model) == 0
