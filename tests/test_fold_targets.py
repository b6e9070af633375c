"""Serving targets of a fold: each engine's verdict per intervention kind, the CLI refusing before it
writes, the transformers target reloading with the edit, and (where llama-cpp-python is installed) the
llama.cpp check of benchmarks/check_llama_cpp.py on the embedded model."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.cli import main
from rolevec.cli.fold import TARGETS as CLI_TARGETS
from rolevec.errors import RolevecError
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import ARCHITECTURES, make_adapter
from rolevec.steering.folding import fold, fold_problem, logits_error, save_folded, steered_logits
from rolevec.steering.interventions import Steering
from rolevec.steering.targets import LOADER_RULES, TARGETS, check_target, target_verdict
from tiny_folder import save_tiny

PROMPTS = ["Explain how eigenvalues relate to stability.", "Hi"]
KINDS = ("add0", "add2", "ablate")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

#: (arch, kind) -> verdict per target (transformers, llama.cpp, vllm); None where rolevec cannot fold at
#: all (tests/test_folding.py covers those refusals).
VERDICTS: dict[tuple[str, str], tuple[str, str, str] | None] = {
    ("llama", "add0"): ("ok", "ok", "ok"),
    ("llama", "add2"): ("ok", "ok", "ok"),  # mlp_bias: llama.cpp loads ffn_down.bias, vLLM reads mlp_bias
    ("llama", "ablate"): ("ok", "ok", "ok"),
    ("qwen2", "add0"): ("ok", "ok", "ok"),
    ("qwen2", "add2"): None,
    ("qwen2", "ablate"): ("ok", "ok", "ok"),
    # layer 0 unties the head: llama.cpp re-ties it (a uniform logit shift, then the softcap), vLLM asserts
    ("gemma2", "add0"): ("ok", "partial", "refused"),
    ("gemma2", "add2"): None,
    ("gemma2", "ablate"): None,
    ("mistral", "add0"): ("ok", "ok", "ok"),
    ("mistral", "add2"): None,
    ("mistral", "ablate"): ("ok", "ok", "ok"),
    ("phi3", "add0"): ("ok", "ok", "ok"),
    ("phi3", "add2"): None,
    ("phi3", "ablate"): ("ok", "ok", "ok"),
    ("gpt2", "add0"): ("ok", "ok", "ok"),  # untied head: both load lm_head.weight
    ("gpt2", "add2"): ("ok", "ok", "ok"),
    ("gpt2", "ablate"): ("ok", "ok", "ok"),
    ("gpt_neox", "add0"): ("ok", "ok", "ok"),
    ("gpt_neox", "add2"): ("ok", "ok", "ok"),
    ("gpt_neox", "ablate"): ("ok", "ok", "ok"),
}


def _steering(kind: str, hidden: int) -> Steering:
    d = torch.randn(hidden, generator=torch.Generator().manual_seed(7))
    if kind == "ablate":
        return Steering(mode="ablate", vectors={1: d})
    return Steering(mode="add", vectors={int(kind[-1]): d}, alpha=3.0)


def test_the_cli_offers_the_library_targets() -> None:
    assert CLI_TARGETS == TARGETS == ("transformers", "llama.cpp", "vllm")
    assert set(LOADER_RULES) == {"llama.cpp", "vllm"}  # transformers is measured, not a table
    assert set(LOADER_RULES["llama.cpp"]) == set(LOADER_RULES["vllm"]) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_verdict_per_target_and_kind(arch: str) -> None:
    tiny = make_adapter(arch)
    for kind in KINDS:
        steering = _steering(kind, tiny.hidden_size)
        expected = VERDICTS[(arch, kind)]
        assert (fold_problem(tiny, steering) is None) == (expected is not None), (arch, kind)
        if expected is None:
            continue
        for target, level in zip(TARGETS, expected, strict=True):
            verdict = target_verdict(tiny, steering, target)
            assert verdict.level == level, (arch, kind, target, verdict.message())
            assert verdict.record()["verdict"] == level and verdict.source
            if level == "ok":
                assert check_target(tiny, steering, target) == verdict
            else:
                with pytest.raises(RolevecError, match="`target=transformers`"):
                    check_target(tiny, steering, target)
        assert target_verdict(tiny, steering, "transformers").verified  # measured on every fold


def test_partial_needs_allow_partial_then_warns_and_records() -> None:
    tiny = make_adapter("gemma2")
    steering = _steering("add0", tiny.hidden_size)
    with pytest.raises(RolevecError, match=r"only in part.*softcapping.*`allow_partial=True`"):
        fold(tiny, steering, target="llama.cpp")
    with pytest.warns(UserWarning, match="llama.cpp serves this fold of gemma2 only in part"):
        folded = fold(tiny, steering, target="llama.cpp", allow_partial=True)
    assert folded.source["fold_target"].startswith("partial: llama.cpp would serve this fold of gemma2")
    # without a softcap the re-tied head shifts each position's logits by one constant: exact for softmax
    tiny.config.final_logit_softcapping = None
    verdict = check_target(tiny, steering, "llama.cpp")
    assert verdict.level == "ok" and "softmax ignores it" in verdict.reasons[0]
    with pytest.raises(RolevecError, match="requires tied embeddings"):
        fold(tiny, steering, target="vllm")


def test_a_loader_that_skips_the_bias_refuses_or_keeps_part() -> None:
    """The rule logic on a llama whose vLLM rule ignored `mlp_bias` (what vLLM did before it read it)."""
    tiny = make_adapter("llama")
    old = dataclasses.replace(LOADER_RULES["vllm"]["llama"], biases={"self_attn.o_proj": ()})
    rules = {"vllm": {"llama": old}}
    d = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(1))
    only_bias = Steering(mode="add", vectors={2: d}, alpha=2.0)
    verdict = target_verdict(tiny, only_bias, "vllm", rules=rules)
    assert verdict.level == "refused" and "skips the addition at layer 2 (the bias of mlp.down_proj)" in (
        verdict.message()
    )
    with_embedding = Steering(mode="add", vectors={0: d, 2: d}, alpha=2.0)
    assert target_verdict(tiny, with_embedding, "vllm", rules=rules).level == "partial"
    with pytest.warns(UserWarning, match="only in part"):
        check_target(tiny, with_embedding, "vllm", allow_partial=True, rules=rules)
    # a switch the engine reads but the fold does not turn on drops the bias too
    gated = dataclasses.replace(old, biases={"mlp.down_proj": (("some_other_bias", False),)})
    assert target_verdict(tiny, only_bias, "vllm", rules={"vllm": {"llama": gated}}).level == "refused"
    assert target_verdict(tiny, only_bias, "vllm").level == "ok"  # the real rule reads mlp_bias


def test_unknown_architecture_or_target_is_refused() -> None:
    tiny = make_adapter("llama")
    steering = _steering("add2", tiny.hidden_size)
    verdict = target_verdict(tiny, steering, "llama.cpp", rules={"llama.cpp": {}})
    assert verdict.level == "refused" and "no rule for how llama.cpp loads llama" in verdict.message()
    with pytest.raises(RolevecError, match=r"unknown serving target 'tgi'.*`target=vllm`"):
        target_verdict(tiny, steering, "tgi")
    with pytest.raises(RolevecError, match="unknown serving target"):
        fold(tiny, steering, target="tgi")


def test_transformers_target_reloads_with_the_edit(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    for arch, kind in (("llama", "add2"), ("gpt2", "ablate"), ("llama", "add0")):
        tiny = make_adapter(arch)
        steering = _steering(kind, tiny.hidden_size)
        folded = fold(tiny, steering, target="transformers")
        assert folded.source["fold_target"].startswith("ok: transformers serves")
        out = save_folded(folded, tmp_path / f"{arch}-{kind}", check=(tiny, steering))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reloaded: Any = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        batch = tiny.encode([tiny.render(t) for t in PROMPTS])
        with torch.inference_mode():
            got = reloaded(**batch.model_kwargs()).logits.float()
        hooked = steered_logits(tiny, steering, PROMPTS)
        assert float((got - hooked).abs().max()) <= 1e-5, (arch, kind)
        assert logits_error(hooked, steered_logits(tiny, None, PROMPTS)) > 1e-3  # the edit is there


def _saved(tmp_path: Path, arch: str) -> tuple[list[str], ModelAdapter]:
    return save_tiny(tmp_path, arch)


def _rolevec_lines(err: str) -> list[str]:
    """rolevec's own lines (transformers may draw a loading bar first)."""
    return [line for line in err.strip().splitlines() if line.startswith("rolevec")]


def test_cli_refuses_a_target_that_drops_the_fold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts, _ = _saved(tmp_path, "gemma2")
    fold_args = ["fold", *opts, "--role", "doctor", "--layer", "0", "--alpha", "2"]
    capsys.readouterr()
    assert main([*fold_args, "--target", "vllm", "--out", str(tmp_path / "out")]) == 2
    (err,) = _rolevec_lines(capsys.readouterr().err)
    assert (
        err.startswith("rolevec: error: vllm cannot serve this fold of gemma2") and "tied embeddings" in err
    )
    assert "--target transformers" in err and "`" not in err  # spelled as the command's flags
    # partial: refused without --allow-partial, folded with a warning and recorded with it
    assert main([*fold_args, "--target", "llama.cpp", "--out", str(tmp_path / "out")]) == 2
    (err,) = _rolevec_lines(capsys.readouterr().err)
    assert "only in part" in err and "--allow-partial" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "v.safetensors"]  # nothing written
    args = [*fold_args, "--target", "llama.cpp", "--allow-partial", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    lines = _rolevec_lines(capsys.readouterr().err)
    assert any(
        line.startswith("rolevec: warning: llama.cpp serves this fold of gemma2 only in part")
        for line in lines
    )
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())["fold"]["target"]
    assert record["target"] == "llama.cpp" and record["verdict"] == "partial" and not record["verified"]


def test_cli_records_an_ok_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts, _ = _saved(tmp_path, "llama")
    out = tmp_path / "out"
    capsys.readouterr()
    args = [
        "fold",
        *opts,
        "--role",
        "doctor",
        "--layer",
        "2",
        "--alpha",
        "3",
        "--target",
        "vllm",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert (
        "target vllm serves this fold of llama (ok; vllm models/llama.py" in err
        and f"vllm serve {out}" in err
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"]["target"] == "vllm"
    assert manifest["fold"]["target"] == {
        "target": "vllm",
        "verdict": "ok",
        "reasons": [],
        "source": LOADER_RULES["vllm"]["llama"].source,
        "verified": False,
    }
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True  # the switch vLLM reads


@pytest.mark.e2e
def test_llama_cpp_serves_the_folded_embedded_model(tmp_path: Path) -> None:
    """benchmarks/check_llama_cpp.py, smaller: converted to GGUF, llama.cpp's greedy tokens are rolevec's."""
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import check_llama_cpp as check  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(BENCHMARKS))
    source = check.find_llama_cpp_source(None)
    if source is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found: set LLAMA_CPP_SRC to its folder")
    result = check.run_check(source, work=tmp_path, n_prompts=2, max_new_tokens=12)
    assert result["ok"], json.dumps(result, indent=1)
    for row in result["prompts"]:
        assert row["steered"]["identical"] and row["unsteered"]["identical"]
    assert result["summary"]["steered_differs_from_unsteered"] >= 1
