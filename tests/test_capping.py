"""Projection capping (the `cap` steering mode): the projection on d̂ lands in [lo, hi], nothing else moves,
hooks never leak, and fold/export refuse it because it is not a fixed addition."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.cli import main
from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks, hooked, input_hook
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_model, make_tokenizer
from rolevec.steering.export import export_control_vector, export_lm_eval, lm_eval_config
from rolevec.steering.folding import fold, fold_, fold_problem, save_folded
from rolevec.steering.generation import generate
from rolevec.steering.interventions import Steering, resolve_steering
from rolevec.steering.targets import check_target, target_verdict
from test_interventions import role_vectors, zero_at

TEXTS = ["Explain eigenvalues to me.", "Hi"]


def _inputs_around(
    adapter: ModelAdapter, steering: Steering, layers: Sequence[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's input just before and just after the steering's hooks, in one steered forward.

    Pre-hooks run in registration order: the observer registered before ``apply`` sees the input the cap
    receives, the one registered inside sees what the block receives."""
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    sites = [adapter.residual_site(layer) for layer in layers]

    def keeper(into: list[torch.Tensor]) -> Any:
        return input_hook(lambda x: into.append(x.detach().float().clone()))

    batch = adapter.encode([adapter.render(t) for t in TEXTS])
    with (
        torch.inference_mode(),
        hooked(pre=[(s, keeper(before)) for s in sites]),
        steering.apply(adapter),
        hooked(pre=[(s, keeper(after)) for s in sites]),
    ):
        adapter.model(**batch.model_kwargs())
    return before, after


def _projections(adapter: ModelAdapter, d: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Unsteered projections x·d̂ at the inputs of ``layers``, all tokens pooled."""
    wide = Steering.capping(d, layers=list(layers), lo=-1e30, hi=1e30)
    before, _ = _inputs_around(adapter, wide, layers)
    dhat = d / d.norm()
    return torch.cat([(x @ dhat).flatten() for x in before])


def test_cap_keeps_projection_in_range_and_leaves_the_rest(tiny: ModelAdapter) -> None:
    torch.manual_seed(3)
    d = torch.randn(tiny.hidden_size)
    dhat = d / d.norm()
    layers = [1, 2]
    clean = _projections(tiny, d, layers)
    lo, hi = float(clean.quantile(0.3)), float(clean.quantile(0.7))  # some tokens below, some above
    steering = Steering.capping(d, layers=layers, lo=lo, hi=hi, role="doctor")
    before, after = _inputs_around(tiny, steering, layers)
    assert count_hooks(tiny.model) == 0
    moved_low = moved_high = 0
    for x, y in zip(before, after, strict=True):
        p, q = x @ dhat, y @ dhat
        scale = max(float(x.norm(dim=-1).max()), 1.0)
        tol = 1e-5 * scale
        assert float(q.min()) >= lo - tol and float(q.max()) <= hi + tol
        torch.testing.assert_close(q, p.clamp(lo, hi), rtol=0, atol=tol)
        # what is orthogonal to d̂ is the same before and after the cap
        ortho_x = x - p.unsqueeze(-1) * dhat
        ortho_y = y - q.unsqueeze(-1) * dhat
        torch.testing.assert_close(ortho_y, ortho_x, rtol=0, atol=tol)
        inside = (p >= lo) & (p <= hi)
        assert torch.equal(y[inside], x[inside])  # tokens already in range are not touched at all
        moved_low += int((p < lo).sum())
        moved_high += int((p > hi).sum())
    assert moved_low > 0 and moved_high > 0  # the test exercised both bounds


def test_a_range_holding_every_value_changes_nothing(tiny_llama: ModelAdapter) -> None:
    d = torch.randn(tiny_llama.hidden_size, generator=torch.Generator().manual_seed(1))
    batch = tiny_llama.encode([tiny_llama.render(t) for t in TEXTS])
    with torch.inference_mode():
        clean = tiny_llama.model(**batch.model_kwargs()).logits
        clean_p = _projections(tiny_llama, d, [1, 2, 3])
        wide = Steering.capping(d, layers=[1, 2, 3], lo=float(clean_p.min()) - 1, hi=float(clean_p.max()) + 1)
        with wide.apply(tiny_llama):
            same = tiny_llama.model(**batch.model_kwargs()).logits
        tight = Steering.capping(d, layers=[1, 2, 3], lo=0.0, hi=0.0)
        with tight.apply(tiny_llama):
            changed = tiny_llama.model(**batch.model_kwargs()).logits
    assert torch.equal(same, clean)
    assert not torch.allclose(changed, clean)


def test_hooks_are_removed_also_on_error(tiny_llama: ModelAdapter) -> None:
    steering = Steering.capping(torch.ones(tiny_llama.hidden_size), layers=[1, 2], lo=-1.0, hi=1.0)
    with pytest.raises(RuntimeError, match="boom"), steering.apply(tiny_llama):
        assert count_hooks(tiny_llama.model) == 2
        raise RuntimeError("boom")
    assert count_hooks(tiny_llama.model) == 0


def test_generation_runs_under_a_cap(tiny: ModelAdapter) -> None:
    d = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(2))
    steering = Steering.capping(d, layers=[1], lo=-0.5, hi=0.5, role="doctor")
    out = generate(tiny, "What causes a fever?", steering=steering, max_new_tokens=4)
    assert len(out.token_ids) == 4
    assert count_hooks(tiny.model) == 0


def test_describe_and_provenance() -> None:
    s = Steering.capping(torch.ones(4), layers=[3, 2], lo=-2, hi=5, role="doctor", position=-2)
    assert s.describe() == "cap projection to [-2, 5] (role 'doctor', layer 2,3, position -2)"
    record = s.provenance()
    assert record["mode"] == "cap" and record["layers"] == [2, 3]
    assert (record["lo"], record["hi"], record["alpha"]) == (-2.0, 5.0, None)


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"lo": 2.0, "hi": 1.0}, "lo 2 > hi 1"),
        ({"lo": math.nan, "hi": 1.0}, "`lo` must be a finite"),
        ({"lo": 0.0, "hi": math.inf}, "`hi` must be a finite"),
        ({"lo": 0.0, "hi": 1.0, "layers": []}, "at least one layer"),
    ],
)
def test_bad_capping_is_one_line(kwargs: dict[str, Any], expect: str) -> None:
    args: dict[str, Any] = {"layers": [1], **kwargs}
    with pytest.raises(RolevecError, match=expect) as info:
        Steering.capping(torch.ones(4), **args)
    assert "\n" not in str(info.value)


def test_zero_direction_tokens_and_stray_bounds_are_refused() -> None:
    with pytest.raises(RolevecError, match="zero"):
        Steering.capping(torch.zeros(4), layers=[1], lo=0.0, hi=1.0)
    with pytest.raises(RolevecError, match="capping acts on every token"):
        Steering("cap", {1: torch.ones(4)}, lo=0.0, hi=1.0, tokens=(0,))
    with pytest.raises(RolevecError, match="only capping takes"):
        Steering("add", {1: torch.ones(4)}, alpha=1.0, lo=0.0)


def test_a_layer_the_model_lacks_is_refused(tiny_llama: ModelAdapter) -> None:
    steering = Steering.capping(torch.ones(tiny_llama.hidden_size), layers=[1, 9], lo=0.0, hi=1.0)
    with pytest.raises(RolevecError, match="layer 9 is out of range"), steering.apply(tiny_llama):
        pass
    assert count_hooks(tiny_llama.model) == 0


def test_resolve_steering_caps_along_the_role_vector(tiny_llama: ModelAdapter) -> None:
    vectors = role_vectors(tiny_llama)
    one = resolve_steering(vectors, "doctor", layers=2, cap=(-1.0, 1.0), adapter=tiny_llama)
    assert one.mode == "cap" and one.layers == [2] and (one.lo, one.hi) == (-1.0, 1.0)
    torch.testing.assert_close(one.vectors[2], vectors.vector("doctor", 2, -1))
    many = resolve_steering(vectors, "doctor", layers=2, cap=(0.0, 3.0), cap_layers=[1, 2, 3])
    assert many.layers == [1, 2, 3]
    for layer in many.layers:  # the direction is the steering layer's, at every capped layer
        torch.testing.assert_close(many.vectors[layer], vectors.vector("doctor", 2, -1))
    with pytest.raises(RolevecError, match="no `alpha`"):
        resolve_steering(vectors, "doctor", layers=2, alpha=1.0, cap=(0.0, 1.0))
    with pytest.raises(RolevecError, match="layer 7 is out of range"):
        resolve_steering(vectors, "doctor", layers=2, cap=(0.0, 1.0), cap_layers=[1, 7])
    with pytest.raises(RolevecError, match="lo 1 > hi 0"):
        resolve_steering(vectors, "doctor", layers=2, cap=(1.0, 0.0))
    with pytest.raises(RolevecError, match="no direction to cap along"):
        resolve_steering(zero_at(vectors, 2), "doctor", layers=2, cap=(0.0, 1.0))
    with pytest.raises(RolevecError, match="only applies to capping"):
        resolve_steering(vectors, "doctor", layers=2, alpha=1.0, cap_layers=[1])


def test_fold_and_export_refuse_capping(tiny_llama: ModelAdapter, tmp_path: Path) -> None:
    steering = Steering.capping(torch.ones(tiny_llama.hidden_size), layers=[1], lo=0.0, hi=1.0)
    why = "capping steering cannot be (folded into weights|exported)"
    problem = fold_problem(tiny_llama, steering)
    assert problem is not None and "depends on its projection" in problem
    for call in (
        lambda: fold(tiny_llama, steering),
        lambda: fold_(tiny_llama, steering),
        lambda: save_folded(tiny_llama, tmp_path / "folded", check=(tiny_llama, steering)),
        lambda: export_control_vector(steering, tmp_path / "cv.gguf", model_hint="llama"),
        lambda: lm_eval_config(steering, tiny_llama),
        lambda: export_lm_eval(steering, tiny_llama, tmp_path / "steer.pt"),
    ):
        with pytest.raises(RolevecError, match=why) as info:
            call()
        assert "\n" not in str(info.value)
    for target in ("transformers", "llama.cpp", "vllm"):
        verdict = target_verdict(tiny_llama, steering, target)
        assert verdict.level == "refused" and "capping" in verdict.message()
        with pytest.raises(RolevecError, match="capping"):
            check_target(tiny_llama, steering, target)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_cli_generate_with_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = make_tokenizer()
    model: Any = make_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    from rolevec.model.loading import load_model

    adapter = load_model(str(tmp_path / "model"), device="cpu")
    role_vectors(adapter).save(tmp_path / "v.safetensors")
    argv = ["generate", "--model", str(tmp_path / "model"), "--device", "cpu"]
    argv += ["--vectors", str(tmp_path / "v.safetensors"), "--role", "doctor", "--layer", "2"]
    argv += ["--max-new-tokens", "3"]
    assert main([*argv, "--cap=-1.5:2", "Hello"]) == 0  # `=`: argparse takes "-1.5:2" for an option
    assert (
        "[steered: cap projection to [-1.5, 2] (role 'doctor', layer 2, position -1)]"
        in capsys.readouterr().out
    )
    assert main([*argv, "--cap=-1:1", "--cap-layers", "1,2,3", "Hello"]) == 0
    assert "layer 1,2,3" in capsys.readouterr().out
    for bad, expect in (("3:1", "LO > HI"), ("one:two", "two numbers"), ("1:2:3", "two numbers")):
        assert main([*argv, f"--cap={bad}", "Hello"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rolevec: error: --cap") and expect in err[0]
