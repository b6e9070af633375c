"""The shared stage functions: subsets of roles or conditions merge into the folder one call would leave."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from rolevec.core.records import read_records
from rolevec.data.mcq import MCQItem, MCQSet, make_split
from rolevec.evaluation.conditions import Condition, EvaluationReport, evaluate_conditions
from rolevec.model.loading import ModelAdapter
from rolevec.study.stages import open_records, select_sites
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
