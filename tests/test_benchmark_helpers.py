"""The benchmarks' model shapes and file names: GPU figures rest on these being the published models."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def common() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import common as module

        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize(
    ("shape", "billions"),
    [("smollm2-135m", 0.1345), ("llama-3.2-1b", 1.2358), ("llama-3.1-8b", 8.0301)],
)
def test_random_shapes_have_the_published_parameter_counts(
    common: ModuleType, shape: str, billions: float
) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**common.RANDOM_SHAPES[shape])
    with torch.device("meta"):  # counts only, no memory
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert count / 1e9 == pytest.approx(billions, rel=2e-3)


def test_random_model_gives_every_dtype_the_same_weights(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
    }
    monkeypatch.setitem(common.RANDOM_SHAPES, "tiny", tiny)
    f32 = common.random_model("tiny", None, "cpu", "float32")
    bf16 = common.random_model("tiny", None, "cpu", "bfloat16")
    again = common.random_model("tiny", None, "cpu", "float32")
    assert f32.n_layers == 2 and f32.hidden_size == 32 and bf16.dtype == torch.bfloat16
    for (name, a), (_, b), (_, c) in zip(
        f32.model.named_parameters(),
        bf16.model.named_parameters(),
        again.model.named_parameters(),
        strict=True,
    ):
        assert torch.equal(a, c), name  # seeded
        assert torch.equal(a.to(torch.bfloat16), b), name  # drawn once, then cast
    assert f32.name == "random:tiny" and f32.chat.n_positions > 0


def test_result_files_are_tagged_by_device_and_model(common: ModuleType) -> None:
    assert common.run_tag("cpu", None) == ""
    assert common.run_tag("cuda", "random:llama-3.2-1b") == "-cuda-llama-3.2-1b"
    assert common.run_tag("cuda:1", "/models/Llama-3.1-8B/") == "-cuda1-Llama-3.1-8B"
    assert common.run_tag("cpu", "weights/model.Q4.gguf") == "-model.Q4"


def test_rows_against_another_dtype_need_the_same_predictions(common: ModuleType) -> None:
    assert common.cross_verdict(0.969, "met") == "no verdict (predictions differ: agreement 96.9%)"
    assert common.cross_verdict(1.0, "met") == "met (same predictions)"


def test_sweep_lower_bound_keeps_the_baseline_residuals(common: ModuleType) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_sweep
        import run_all
    finally:
        sys.path.remove(str(BENCHMARKS))
    cands = [(layer, -1, alpha) for layer in (1, 5, 9, 13, 17, 21) for alpha in (1.0, 3.0)]
    theory = bench_sweep.theoretical(30, cands)
    tails = 2 * sum(30 - layer for layer in (1, 5, 9, 13, 17, 21))
    assert theory["lower_bound_time_ratio"] == pytest.approx((30 + tails) / (13 * 30))
    assert theory["ceiling_time_ratio"] == pytest.approx((30 + 21 + tails) / (13 * 30))
    # a result file from before the bound was recorded gets the same number
    layers = [1, 5, 9, 13, 17, 21]
    older = {"theory": {}, "n_layers": 30, "layers": layers, "alphas": [1.0, 3.0], "position": -1}
    assert run_all.sweep_lower_bound(older) == pytest.approx(theory["lower_bound_time_ratio"])
