"""Composition (--compose) and the cap condition: parsing, the composed vector against sums by hand, every
command that steers with one (generate, fold, export, evaluate), and the identity of their records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.cli import main
from rolevec.core.records import read_records, record_identity
from rolevec.data.mcq import builtin_mcq_dir
from rolevec.errors import RolevecError
from rolevec.evaluation.conditions import Condition, to_record
from rolevec.evaluation.scoring import ItemResult
from rolevec.model.loading import ModelAdapter
from rolevec.steering.export import read_control_vector
from rolevec.steering.generation import generate
from rolevec.steering.interventions import Steering
from rolevec.vectors.arithmetic import combine, compose, composition_name, parse_composition
from test_folding import PROMPTS, steered_logits
from test_interventions import role_vectors

# --- parsing and the composed vector -----------------------------------------------------------------


def test_parse_composition_reads_weights_and_defaults_to_one() -> None:
    assert parse_composition("doctor:1,lawyer:-0.5") == [("doctor", 1.0), ("lawyer", -0.5)]
    assert parse_composition(" doctor , lawyer:2e-1 ") == [("doctor", 1.0), ("lawyer", 0.2)]
    assert composition_name([("doctor", 1.0), ("lawyer", -0.5)]) == "doctor:1,lawyer:-0.5"
    assert composition_name(parse_composition("doctor:1.0,lawyer"), "orthogonal") == (
        "doctor:1,lawyer:1/orthogonal"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "needs terms"),
        ("doctor:heavy", "not a number"),
        ("doctor:", "not a number"),
        ("doctor:nan", "finite"),
        ("doctor:inf", "finite"),
        (":1", "names no role"),
        ("doctor,,lawyer", "names no role"),
        ("doctor:1,doctor:2", "twice"),
    ],
)
def test_parse_composition_refuses_bad_text(text: str, message: str) -> None:
    with pytest.raises(RolevecError, match=message):
        parse_composition(text)


def test_compose_equals_the_sum_by_hand_and_keeps_provenance(tiny_llama: ModelAdapter) -> None:
    vecs = role_vectors(tiny_llama)
    mix = compose(vecs, "doctor:1,lawyer:-0.5")
    assert mix.roles == ("doctor:1,lawyer:-0.5",)
    for layer in (1, 2, 3):
        want = vecs.vector("doctor", layer, -1).double() - 0.5 * vecs.vector("lawyer", layer, -1).double()
        torch.testing.assert_close(mix.vector(mix.roles[0], layer, -1).double(), want, rtol=1e-5, atol=1e-5)
    terms = mix.metadata["arithmetic"]["terms"]
    assert [(t["role"], t["weight"]) for t in terms] == [("doctor", 1.0), ("lawyer", -0.5)]
    assert [t["digest"] for t in terms] == [vecs.digest("doctor"), vecs.digest("lawyer")]
    # orthogonal: the lawyer term keeps only what is orthogonal to the doctor vector
    ortho = compose(vecs, [("doctor", 1.0), ("lawyer", 1.0)], mode="orthogonal")
    assert ortho.roles == ("doctor:1,lawyer:1/orthogonal",)
    same = combine([(vecs, "doctor", 1.0), (vecs, "lawyer", 1.0)], "x", mode="orthogonal")
    assert torch.equal(ortho.diff(ortho.roles[0]), same.diff("x"))
    d, law = vecs.vector("doctor", 2, -1).double(), vecs.vector("lawyer", 2, -1).double()
    want = d + law - (law @ d) / (d @ d) * d
    torch.testing.assert_close(ortho.vector(ortho.roles[0], 2, -1).double(), want, rtol=1e-5, atol=1e-5)


def test_compose_refuses_a_role_the_file_lacks(tiny_llama: ModelAdapter) -> None:
    with pytest.raises(RolevecError, match=r"'pirate' that the vector file lacks \(it has: doctor, lawyer\)"):
        compose(role_vectors(tiny_llama), "doctor:1,pirate:2")


# --- the commands that steer with one vector ------------------------------------------------------------


def _mix(tiny: ModelAdapter, layer: int, mode: str = "sum") -> torch.Tensor:
    vecs = role_vectors(tiny)
    mixed = compose(vecs, "doctor:1,lawyer:-0.5", mode=mode)
    return mixed.vector(mixed.roles[0], layer, -1)


def test_export_with_compose_writes_the_weighted_sum(
    tmp_path: Path, saved_tiny: tuple[list[str], ModelAdapter]
) -> None:
    opts, tiny = saved_tiny
    for mode in ("sum", "orthogonal"):
        out = tmp_path / f"mix-{mode}.gguf"
        args = ["export", *opts, "--format", "gguf", "--compose", "doctor:1,lawyer:-0.5", "--alpha", "2"]
        assert main([*args, "--compose-mode", mode, "--layers", "2:4", "--out", str(out)]) == 0
        back = read_control_vector(out)
        for layer in (2, 3):
            torch.testing.assert_close(back[layer], 2.0 * _mix(tiny, layer, mode))
    # the two modes differ: the lawyer vector is not orthogonal to the doctor's
    a, b = (
        read_control_vector(tmp_path / "mix-sum.gguf"),
        read_control_vector(tmp_path / "mix-orthogonal.gguf"),
    )
    assert not torch.allclose(a[2], b[2])


def test_fold_with_compose_equals_hooked_steering_and_records_the_terms(
    tmp_path: Path, saved_tiny: tuple[list[str], ModelAdapter]
) -> None:
    from transformers import AutoModelForCausalLM

    opts, tiny = saved_tiny
    out = tmp_path / "folded"
    args = ["fold", *opts, "--compose", "doctor:1,lawyer:-0.5", "--layer", "2", "--alpha", "3"]
    assert main([*args, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steering"]["role"] == "doctor:1,lawyer:-0.5"
    steering = Steering.addition(_mix(tiny, 2), layer=2, alpha=3.0)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = tiny.encode([tiny.render(PROMPTS[0])])
    with torch.inference_mode():
        got = reloaded(**batch.model_kwargs()).logits
    torch.testing.assert_close(got, steered_logits(tiny, steering, PROMPTS[:1]), rtol=1e-4, atol=1e-4)


def test_generate_with_compose_steers_with_the_composed_vector(
    saved_tiny: tuple[list[str], ModelAdapter], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, tiny = saved_tiny
    args = ["generate", *opts, "--compose", "doctor:1,lawyer:-0.5", "--layer", "2", "--alpha", "40"]
    assert main([*args, "--max-new-tokens", "6", "Hi"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[steered: add α=40 (role 'doctor:1,lawyer:-0.5', layer 2, position -1)]")
    steered = generate(
        tiny, "Hi", steering=Steering.addition(_mix(tiny, 2), layer=2, alpha=40.0), max_new_tokens=6
    )
    assert steered.text in out
    # and with capping along the composed direction
    args = ["generate", *opts, "--compose", "doctor:1,lawyer:-0.5", "--layer", "2", "--cap=-0.1:0.1"]
    assert main([*args, "--max-new-tokens", "4", "Hi"]) == 0
    assert "cap projection to [-0.1, 0.1] (role 'doctor:1,lawyer:-0.5'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compose", "doctor:1,pirate:2"], "'pirate' that the vector file lacks"),
        (["--compose", "doctor:heavy"], "--compose: the weight of role 'doctor'"),
        (["--compose", "doctor", "--role", "doctor"], "either --role ROLE or --compose"),
        (["--compose", "doctor", "--selection", "sel.json"], "with --compose pass --layer"),
        ([], "pass --vectors FILE and --role ROLE or --compose"),
    ],
)
def test_compose_bad_input_is_one_line(
    saved_tiny: tuple[list[str], ModelAdapter],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    opts, _ = saved_tiny
    capsys.readouterr()
    assert main(["generate", *opts, "--layer", "2", "--alpha", "1", *extra, "Hi"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


# --- conditions and their records --------------------------------------------------------------------------


def _result(qid: str = "law/1") -> ItemResult:
    return ItemResult(qid, "law", "law", "A", "A", True, 0.5, (0.5, 0.5), (0.0, 0.0))


def test_condition_records_carry_composition_and_cap_in_their_identity() -> None:
    plain = Condition.make("add", role="doctor", layer=2, position=-1, alpha=3.0)
    summed = Condition.make("add", compose=[("doctor", 1.0), ("lawyer", -0.5)], layer=2, position=-1, alpha=3)
    ortho = Condition.make(
        "add",
        compose=[("doctor", 1.0), ("lawyer", -0.5)],
        compose_mode="orthogonal",
        layer=2,
        position=-1,
        alpha=3.0,
    )
    capped = Condition.make("cap", role="doctor", layer=2, position=-1, cap=(-1.0, 2.0))
    wider = Condition.make("cap", role="doctor", layer=2, position=-1, cap=(-1.0, 3.0))
    at_two = Condition.make("cap", role="doctor", layer=2, position=-1, cap=(-1.0, 2.0), cap_layers=[1, 2])
    conds = [plain, summed, ortho, capped, wider, at_two]
    assert len({c.identity() for c in conds}) == len(conds)
    assert summed.role == "doctor:1,lawyer:-0.5" and ortho.role == "doctor:1,lawyer:-0.5/orthogonal"
    assert capped.cap_layers == (2,) and at_two.cap_layers == (1, 2)
    for cond in conds:
        record = json.loads(json.dumps(to_record(cond, _result(), "test")))  # as read back from the store
        assert record_identity(record) == (*cond.identity(), "test", "law/1")
    # a single role's addition keeps the record form it always had (no new keys)
    assert set(to_record(plain, _result(), "test")) == {
        "condition",
        "role",
        "persona_template",
        "layer",
        "position",
        "alpha",
        "domain",
        "split",
        "qid",
        "subject",
        "gold",
        "pred",
        "correct",
        "p_gold",
        "probs",
        "scoring",
    }
    assert to_record(summed, _result(), "test")["compose"] == {
        "mode": "sum",
        "terms": [["doctor", 1.0], ["lawyer", -0.5]],
    }
    assert to_record(at_two, _result(), "test")["cap"] == [-1.0, 2.0]


def test_condition_steering_builds_the_composed_vector_and_the_cap(tiny_llama: ModelAdapter) -> None:
    vecs = role_vectors(tiny_llama)
    summed = Condition.make("add", compose=[("doctor", 1.0), ("lawyer", -0.5)], layer=2, position=-1, alpha=3)
    steering = summed.steering(vecs)
    assert steering is not None and steering.mode == "add" and steering.alpha == 3.0
    torch.testing.assert_close(steering.vectors[2], _mix(tiny_llama, 2))
    capped = Condition.make(
        "cap",
        compose=[("doctor", 1.0), ("lawyer", -0.5)],
        layer=2,
        position=-1,
        cap=(0, 1),
        cap_layers=[1, 3],
    )
    steering = capped.steering(vecs)
    assert steering is not None and steering.mode == "cap" and steering.layers == [1, 3]
    assert (steering.lo, steering.hi) == (0.0, 1.0)
    torch.testing.assert_close(steering.direction, _mix(tiny_llama, 2) / _mix(tiny_llama, 2).norm())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Condition.make("cap", role="doctor", layer=2, position=-1), "needs a range"),
        (lambda: Condition.make("cap", role="doctor", layer=2, position=-1, cap=(2.0, 1.0)), "lo 2 > hi 1"),
        (
            lambda: Condition.make("add", role="doctor", layer=2, position=-1, alpha=1, cap=(0, 1)),
            "only condition cap",
        ),
        (lambda: Condition.make("persona", compose=[("doctor", 1.0)]), "persona is one role"),
        (
            lambda: Condition.make(
                "add", role="doctor", compose=[("doctor", 1.0)], layer=2, position=-1, alpha=1
            ),
            "either `role` or `compose`",
        ),
        (lambda: Condition("add", "doctor", None, 2, -1, 1.0, (("doctor", 1.0),), "sum"), "canonical name"),
    ],
)
def test_condition_refuses_bad_compositions_and_caps(make: Any, message: str) -> None:
    with pytest.raises(RolevecError, match=message):
        make()


# --- evaluate -----------------------------------------------------------------------------------------------


def _evaluate(saved: tuple[list[str], ModelAdapter], out: Path, *extra: str) -> list[str]:
    opts, _ = saved
    return [
        "evaluate",
        *opts,
        "--mcq-dir",
        str(builtin_mcq_dir()),
        "--domains",
        "math,law",
        "--limit",
        "3",
        "--layer",
        "2",
        "--position",
        "-1",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_evaluate_composed_and_capped_conditions_resume_and_match_a_saved_composition(
    tmp_path: Path, saved_tiny: tuple[list[str], ModelAdapter], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, tiny = saved_tiny
    run = tmp_path / "run"
    args = _evaluate(
        saved_tiny,
        run,
        "--compose",
        "doctor:1,lawyer:-0.5",
        "--conditions",
        "baseline,add,ablate,random,cap",
        "--alpha",
        "8",
        "--cap=-0.2:0.2",
    )
    assert main(args) == 0
    records = list(read_records(run / "records.jsonl"))
    kinds = sorted({(r["condition"], r["role"]) for r in records})
    assert kinds == [
        ("ablate", "doctor:1,lawyer:-0.5"),
        ("add", "doctor:1,lawyer:-0.5"),
        ("baseline", None),
        ("cap", "doctor:1,lawyer:-0.5"),
        ("random", "doctor:1,lawyer:-0.5"),
    ]
    assert all(r["compose"]["terms"] == [["doctor", 1.0], ["lawyer", -0.5]] for r in records if r["role"])
    assert all(r["cap"] == [-0.2, 0.2] and r["cap_layers"] == [2] for r in records if r["condition"] == "cap")
    settings = json.loads((run / "settings.json").read_text())
    vecs = role_vectors(tiny)
    assert settings["vectors:doctor"] == vecs.digest("doctor") and settings["vectors:lawyer"] == vecs.digest(
        "lawyer"
    )
    # a rerun resumes: nothing new
    capsys.readouterr()
    assert main(args) == 0
    assert "0 new record(s), 30 already" in capsys.readouterr().err
    # the composed addition scores as the same composition saved as a plain role of a vector file
    saved = compose(vecs, "doctor:1,lawyer:-0.5", name="mix")
    saved.save(tmp_path / "mix.safetensors")
    other = tmp_path / "plain"
    plain = [a if a != opts[-1] else str(tmp_path / "mix.safetensors") for a in _evaluate(saved_tiny, other)]
    assert main([*plain, "--role", "mix", "--conditions", "add,cap", "--alpha", "8", "--cap=-0.2:0.2"]) == 0
    by_key = {(r["condition"], r["qid"]): r for r in read_records(other / "records.jsonl")}
    for r in records:
        if r["condition"] in ("add", "cap"):
            twin = by_key[(r["condition"], r["qid"])]
            assert twin["pred"] == r["pred"] and twin["probs"] == pytest.approx(r["probs"], abs=1e-6)
    # a second cap range is a new condition, not a resumed one
    capsys.readouterr()
    assert main([*_evaluate(saved_tiny, run), "--role", "doctor", "--conditions", "cap", "--cap=-1:1"]) == 0
    assert "6 new record(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--role", "doctor", "--conditions", "cap"], "condition cap needs a range: pass --cap"),
        (["--role", "doctor", "--conditions", "add", "--alpha", "1", "--cap=0:1"], "add cap to --conditions"),
        (["--role", "doctor", "--conditions", "cap", "--cap=2:1"], "--cap range '2:1' has LO > HI"),
        (["--role", "doctor", "--conditions", "cap", "--cap=0:1", "--cap-layers", "1,9"], "layer 9"),
        (["--compose", "doctor:1,pirate:1", "--conditions", "add", "--alpha", "1"], "'pirate' that"),
        (["--compose", "doctor:x", "--conditions", "add", "--alpha", "1"], "not a number"),
        (["--compose", "doctor", "--conditions", "persona"], "--compose steers"),
        (
            ["--compose", "doctor", "--conditions", "persona,add", "--alpha", "1"],
            "a composition has no persona",
        ),
    ],
)
def test_evaluate_bad_compose_and_cap_input_is_one_line(
    tmp_path: Path,
    saved_tiny: tuple[list[str], ModelAdapter],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    capsys.readouterr()
    assert main([*_evaluate(saved_tiny, tmp_path / "run"), *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rolevec")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()
