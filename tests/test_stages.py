"""The shared stage functions: subsets of roles or conditions merge into the folder one call would leave."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rolevec.core.records import read_records
from rolevec.data.mcq import MCQItem, MCQSet, make_split
from rolevec.data.sources import builtin_dir
from rolevec.errors import RolevecError
from rolevec.evaluation.conditions import Condition, EvaluationReport, evaluate_conditions
from rolevec.model.loading import ModelAdapter
from rolevec.study.stages import (
    StudyPrompts,
    extract_vectors,
    interpret_vectors,
    load_questions,
    open_records,
    sample_prompts,
    select_sites,
    study_conditions,
)
from rolevec.vectors.role_vectors import RoleVectors
from test_evaluation import vectors_for


def _mcq() -> MCQSet:
    def items(domain: str, n: int) -> list[MCQItem]:
        return [
            MCQItem(
                f"{domain}/{i}",
                domain,
                f"Question {i} of {domain}?",
                ("4", "6", "7", "9"),
                "ABCD"[i % 4],
                "s",
            )
            for i in range(n)
        ]

    return MCQSet({"math": items("math", 8), "law": items("law", 8)}, "test")


ROLES = ("mathematician", "lawyer")
DOMAIN_OF = {"mathematician": "math", "lawyer": "law"}


def _select(adapter: ModelAdapter, run_dir: Path, roles: tuple[str, ...]) -> None:
    mcq = _mcq()
    select_sites(
        adapter,
        vectors_for(adapter, ROLES),
        roles,
        mcq,
        make_split(mcq, seed=0, val_fraction=0.5),
        run_dir,
        domain_of=DOMAIN_OF,
        layers=(1, 3),
        positions=(-1,),
        alphas=(1.0, 3.0),
        progress=False,
    )


def _rows(path: Path) -> list[str]:
    return sorted(path.read_text().splitlines())


def test_selection_by_role_merges_into_the_folder_of_one_call(
    tiny_llama: ModelAdapter, tmp_path: Path
) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _select(tiny_llama, whole, ROLES)
        _select(tiny_llama, parts, ROLES[1:])  # the other order, one role per call
        _select(tiny_llama, parts, ROLES[:1])
    one, split = (json.loads((d / "selection.json").read_text()) for d in (whole, parts))
    assert set(one["roles"]) == set(ROLES) and one == split
    assert _rows(whole / "sweep.jsonl") == _rows(parts / "sweep.jsonl") and _rows(whole / "sweep.jsonl")
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, read_records(whole / "records.jsonl"))) == sorted(
        map(key, read_records(parts / "records.jsonl"))
    )


def test_conditions_in_subsets_score_each_record_once(tiny_llama: ModelAdapter, tmp_path: Path) -> None:
    mcq = _mcq()
    split = make_split(mcq, seed=0, val_fraction=0.5)
    vectors = vectors_for(tiny_llama, ROLES)
    conditions = [
        Condition("baseline"),
        Condition.make("add", role="lawyer", layer=1, position=-1, alpha=1.0),
        Condition.make("ablate", role="lawyer", layer=2, position=-1),
    ]

    def run(conds: list[Condition], out: Path) -> EvaluationReport:
        with open_records(out) as store:
            return evaluate_conditions(tiny_llama, mcq, split, conds, store, vectors=vectors, progress=False)

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    assert run(conditions, whole).n_new == 3 * 8
    assert run(conditions[2:], parts).n_new == 8
    second = run(conditions, parts)  # the rest, and the finished subset skipped
    assert second.n_new == 2 * 8 and second.n_done_before == 8
    assert run(conditions, parts).n_new == 0
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, read_records(whole / "records.jsonl"))) == sorted(
        map(key, read_records(parts / "records.jsonl"))
    )


# --- the other stages: prompts, vectors, questions, conditions, interpret ---------------------------

BUILTIN_ROLES = str(builtin_dir() / "roles")


def _prompts(run_dir: Path, roles: tuple[str, ...]) -> StudyPrompts:
    return sample_prompts(run_dir, roles, n_prompts=6, n_base=8, seed=3, roles_dir=BUILTIN_ROLES)


def test_prompts_sampled_in_subsets_equal_one_call(tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    _prompts(whole, ("doctor", "lawyer"))
    first = _prompts(parts, ("doctor",))
    stored = (parts / "prompts.json").read_text()
    assert _prompts(parts, ("doctor",)) == first and (parts / "prompts.json").read_text() == stored
    _prompts(parts, ("lawyer", "doctor"))
    one, split = (json.loads((d / "prompts.json").read_text()) for d in (whole, parts))
    assert one == split and list(one["roles"]) == ["doctor", "lawyer"] and len(one["base"]["prompts"]) == 8
    assert StudyPrompts.from_json(one).to_json() == one
    with pytest.raises(RolevecError, match="prompt_seed 3, not 4"):
        sample_prompts(parts, ("doctor",), n_prompts=6, n_base=8, seed=4, roles_dir=BUILTIN_ROLES)


def test_vectors_extracted_in_subsets_merge_over_one_base_mean(
    tiny_llama: ModelAdapter, tmp_path: Path
) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    prompts = _prompts(whole, ("doctor", "lawyer"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = extract_vectors(tiny_llama, prompts, whole, ("doctor", "lawyer"), progress=False)
        first = extract_vectors(tiny_llama, prompts, parts, ("doctor",), progress=False)
        merged = extract_vectors(tiny_llama, prompts, parts, ("doctor", "lawyer"), progress=False)
    assert first.roles == ("doctor",) and merged.roles == ("doctor", "lawyer")
    assert torch.equal(merged.base_mean, first.base_mean) and torch.equal(
        merged.diff("doctor"), first.diff("doctor")
    )
    for role in ("doctor", "lawyer"):  # the same numbers as one call, up to batching
        torch.testing.assert_close(merged.diff(role), one.diff(role), atol=1e-5, rtol=1e-5)
    reloaded = RoleVectors.load(parts / "vectors.safetensors")
    assert reloaded.roles == ("doctor", "lawyer") and set(reloaded.metadata["prompts"]) == {
        "doctor",
        "lawyer",
    }
    assert len(reloaded.metadata["merged_from"]) == 2
    again = extract_vectors(tiny_llama, prompts, parts, ("lawyer",), progress=False)  # nothing to do
    assert torch.equal(again.diff("lawyer"), merged.diff("lawyer"))


def test_vectors_of_another_base_or_seed_do_not_merge(tiny_llama: ModelAdapter) -> None:
    a = vectors_for(tiny_llama, ("doctor",))
    b = replace(vectors_for(tiny_llama, ("lawyer",)), metadata={**a.metadata, "seed": 9})
    with pytest.raises(RolevecError, match="another seed"):
        a.merged(b)
    assert a.merged(replace(b, metadata=a.metadata)).roles == ("doctor", "lawyer")


def test_questions_for_more_domains_later_give_the_split_of_one_call(
    tiny_llama: ModelAdapter, tmp_path: Path
) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    one = load_questions(tiny_llama, whole, ["law", "math"], split_seed=1, val_fraction=0.25)
    load_questions(tiny_llama, parts, ["law"], split_seed=1, val_fraction=0.25)
    later = load_questions(tiny_llama, parts, ["law", "math"], split_seed=1, val_fraction=0.25)
    assert later.split.domains == one.split.domains and set(one.split.domains) == {"law", "math"}
    assert json.loads((whole / "split.json").read_text()) == json.loads((parts / "split.json").read_text())
    assert (parts / "settings.json").exists()
    with pytest.raises(RolevecError):
        load_questions(tiny_llama, parts, ["law"], split_seed=2, val_fraction=0.25)


def test_study_conditions_list_every_role_at_its_site() -> None:
    from rolevec.evaluation.selection import Choice

    site = {"layer": 4, "position": -1, "alpha": 3.0, "val_accuracy": 0.5, "val_baseline": 0.4}
    choices = {
        role: Choice(role, "x", val_ablate_accuracy=None, criterion_met=True, n_candidates_passing=1, **site)
        for role in ("doctor", "lawyer")
    }
    conditions = study_conditions(
        choices, alphas=(1.0, 3.0), persona_templates=("You are a {role}.",), random_control=True
    )
    kinds = [c.kind for c in conditions]
    assert kinds == ["baseline", *(["persona", "add", "add", "ablate", "random"] * 2)]
    assert {
        (c.role, c.layer, c.position) for c in conditions if c.kind != "baseline" and c.layer is not None
    } == {
        ("doctor", 4, -1),
        ("lawyer", 4, -1),
    }
    without = study_conditions(choices, alphas=(1.0,), persona_templates=(), random_control=False)
    assert [c.kind for c in without] == ["baseline", "add", "ablate", "add", "ablate"]


def test_interpret_by_role_merges_and_a_new_alpha_redoes(tiny_llama: ModelAdapter, tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    vectors = vectors_for(tiny_llama, ROLES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for folder in (whole, parts):
            _select(tiny_llama, folder, ROLES)
        one = interpret_vectors(tiny_llama, vectors, whole, ROLES, progress=False)
        interpret_vectors(tiny_llama, vectors, parts, ROLES[:1], progress=False)
        merged = interpret_vectors(tiny_llama, vectors, parts, ROLES, progress=False)
        assert merged["roles"] == one["roles"] and list(merged["roles"]) == list(ROLES)
        redone = interpret_vectors(tiny_llama, vectors, parts, ROLES[:1], alpha=1.0, progress=False)
    assert redone["alpha"] == 1.0 and list(redone["roles"]) == [ROLES[0]]
    assert json.loads((parts / "interpret.json").read_text())["alpha"] == 1.0
