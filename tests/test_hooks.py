from __future__ import annotations

import pytest
import torch

from rolevec.errors import RolevecError
from rolevec.model.hooks import StopForward, count_hooks, hooked, input_hook, output_hook, skipped
from rolevec.model.loading import ModelAdapter


def _logits(adapter: ModelAdapter) -> torch.Tensor:
    batch = adapter.encode([adapter.render("Explain eigenvalues.")])
    with torch.inference_mode():
        return adapter.model(**batch.model_kwargs()).logits


def test_hooks_removed_and_outputs_bit_identical(tiny: ModelAdapter) -> None:
    before = _logits(tiny)
    assert count_hooks(tiny.model) == 0
    shift = torch.ones(tiny.hidden_size)
    with hooked(pre=[(tiny.blocks[1], input_hook(lambda x: x + shift))]):
        assert count_hooks(tiny.model) == 1
        steered = _logits(tiny)
    assert count_hooks(tiny.model) == 0
    assert not torch.equal(before, steered)
    assert torch.equal(before, _logits(tiny))


def test_hooks_removed_when_hook_raises(tiny_llama: ModelAdapter) -> None:
    def boom(x: torch.Tensor) -> torch.Tensor:
        raise StopForward

    with pytest.raises(StopForward), hooked(pre=[(tiny_llama.blocks[0], input_hook(boom))]):
        _logits(tiny_llama)
    assert count_hooks(tiny_llama.model) == 0


def test_nested_contexts_unwind_in_order(tiny_llama: ModelAdapter) -> None:
    base = _logits(tiny_llama)
    one = torch.ones(tiny_llama.hidden_size)
    with hooked(pre=[(tiny_llama.blocks[0], input_hook(lambda x: x + one))]):
        with hooked(post=[(tiny_llama.blocks[1], output_hook(lambda x: x - one))]):
            assert count_hooks(tiny_llama.model) == 2
        assert count_hooks(tiny_llama.model) == 1
    assert count_hooks(tiny_llama.model) == 0
    assert torch.equal(base, _logits(tiny_llama))


def test_invalid_target_registers_nothing(tiny_llama: ModelAdapter) -> None:
    good = (tiny_llama.blocks[0], input_hook(lambda x: None))
    with pytest.raises(RolevecError), hooked(pre=[good, ("not a module", input_hook(lambda x: None))]):  # type: ignore[list-item]
        pass
    assert count_hooks(tiny_llama.model) == 0


def test_skipped_blocks_restore_forward(tiny: ModelAdapter) -> None:
    base = _logits(tiny)
    with skipped(list(tiny.blocks[:2])):
        assert count_hooks(tiny.model) == 2
        skipped_logits = _logits(tiny)
    assert count_hooks(tiny.model) == 0
    assert not torch.equal(base, skipped_logits)
    assert torch.equal(base, _logits(tiny))


def test_resume_mid_stack_matches_full_run(tiny: ModelAdapter) -> None:
    """Skipping blocks 0..L-1 and feeding the cached input of block L reproduces the full forward."""
    layer = 2
    batch = tiny.encode([tiny.render("Explain eigenvalues."), tiny.render("Hi")])
    cache: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor) -> None:
        cache["x"] = x.clone()

    with torch.inference_mode():
        with hooked(pre=[(tiny.blocks[layer], input_hook(keep))]):
            full = tiny.model(**batch.model_kwargs()).logits
        with (
            skipped(list(tiny.blocks[:layer])),
            hooked(pre=[(tiny.blocks[layer], input_hook(lambda x: cache["x"]))]),
        ):
            resumed = tiny.model(**batch.model_kwargs()).logits
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-5)


def test_count_ignores_hooks_transformers_installs_itself(tiny_llama: ModelAdapter) -> None:
    batch = tiny_llama.encode([tiny_llama.render("hi")])
    with torch.inference_mode():
        tiny_llama.model(**batch.model_kwargs(), output_hidden_states=True)
    theirs = sum(len(m._forward_hooks) for m in tiny_llama.model.modules())
    assert theirs > 0 and count_hooks(tiny_llama.model) == 0
    with hooked(post=[(tiny_llama.blocks[0], output_hook(lambda x: None))]):
        assert count_hooks(tiny_llama.model) == 1
    assert count_hooks(tiny_llama.model) == 0
