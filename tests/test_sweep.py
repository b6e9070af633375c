from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import rolevec.evaluation.scoring as resume_module
import rolevec.evaluation.sweep as sweep_module
from rolevec.core.records import RecordStore, read_records
from rolevec.data.mcq import MCQItem, MCQSet, make_split
from rolevec.errors import RolevecError
from rolevec.evaluation.conditions import Condition, applied, score
from rolevec.evaluation.scoring import (
    LetterScorer,
    Work,
    _batch,
    cache_batches,
    prepare,
    residual_at,
    stack_rows,
)
from rolevec.evaluation.selection import (
    check_held_out,
    load_selection,
    select,
    selected_site,
    write_selection,
)
from rolevec.evaluation.sweep import (
    GridRow,
    grid_rows,
    run_sweep,
    write_sweep_file,
)
from rolevec.model.hooks import count_hooks
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from rolevec.steering.interventions import Steering
from test_evaluation import break_resume, items, vectors_for


def _check_resumed_candidates(
    adapter: ModelAdapter, n: int, layers: Sequence[int], share_prefix: bool, atol: float = 1e-4
) -> None:
    """Candidates stacked along the batch, run from a cached mid-stack residual (with the prompts' common
    prefix shared or not), match full steered forwards with hooks, letter logit by letter logit."""
    vecs = vectors_for(adapter, ("r",))
    prepared, _ = prepare(adapter, items(n))
    batch, letter_ids = _batch(adapter, prepared)
    scorer = LetterScorer(adapter, probe=False, share_prefix=share_prefix)
    work = Work.of(batch, scorer)
    assert (work.split is not None) == share_prefix
    x = residual_at(adapter, work.batch, layers[0], prefix=work.base)
    cur = layers[0]
    for layer in layers:
        x = residual_at(adapter, work.batch, layer, start=(cur, x), prefix=work.base)
        cur = layer
        cands = [(-1, 1.0), (-2, 3.0), (-1, -2.0)]
        shifts = [
            Steering.addition(vecs.vector("r", layer, p), layer=layer, alpha=a).shift(x) for p, a in cands
        ]
        resumed = scorer.letter_logits(
            stack_rows(work.batch, len(cands)),
            letter_ids.repeat(len(cands), 1),
            start=work.resume(adapter, layer, shifts, x),
        )
        for k, (p, a) in enumerate(cands):
            cond = Condition.make("add", role="r", layer=layer, position=p, alpha=a)
            with applied(adapter, cond.steering(vecs)):
                independent = scorer.naive(batch, letter_ids)
            torch.testing.assert_close(resumed[k * n : (k + 1) * n], independent, rtol=0, atol=atol)
    assert count_hooks(adapter.model) == 0


@pytest.mark.parametrize("share_prefix", [True, False])
def test_resumed_stacked_candidates_equal_independent_runs(tiny: ModelAdapter, share_prefix: bool) -> None:
    _check_resumed_candidates(tiny, 5, range(tiny.n_layers + 1), share_prefix)


def _sweep(
    adapter: ModelAdapter, tmp_path: Path, name: str, questions: list[MCQItem] | None = None, **kw: Any
) -> tuple[Any, dict[Any, dict[str, Any]]]:
    vecs = vectors_for(adapter, ("r",))
    path = tmp_path / name / "records.jsonl"
    options: dict[str, Any] = {
        "domain": "math",
        "layers": (0, 3),
        "positions": (-1, -3),
        "alphas": (1.0, 4.0),
        "batch_size": 3,
        "progress": False,
    }
    options.update(kw)
    with RecordStore(path) as store:
        result = run_sweep(adapter, vecs, "r", questions or items(7), store, **options)
    records = {
        (r["condition"], r["layer"], r["position"], r["alpha"], r["qid"]): r for r in read_records(path)
    }
    return result, records


def _assert_same(a: dict[Any, dict[str, Any]], b: dict[Any, dict[str, Any]]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["pred"] == b[key]["pred"]
        assert a[key]["probs"] == pytest.approx(b[key]["probs"], abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_sweep_reuse_matches_independent(arch: str, tmp_path: Path) -> None:
    adapter = make_adapter(arch)
    reused, rec_reused = _sweep(adapter, tmp_path, "reuse", max_rows=12)
    independent, rec_indep = _sweep(adapter, tmp_path, "indep", reuse=False)
    assert reused.reuse == "reuse" and independent.reuse == "independent"
    assert reused.probe_error is not None and reused.probe_error <= 1e-4
    # baseline + 3 layers x 2 positions x (2 alphas + ablation), 7 questions each
    assert len(rec_reused) == 7 * (1 + 3 * 2 * 3)
    _assert_same(rec_reused, rec_indep)
    assert [r.to_json() for r in reused.rows] == [r.to_json() for r in independent.rows]
    # a tiny cache bound forces one-question batches and no stacking: same records again
    _tight, rec_tight = _sweep(adapter, tmp_path, "tight", max_rows=64, max_cache_bytes=1)
    _assert_same(rec_tight, rec_reused)


def test_one_mid_stack_check_serves_every_sweep_of_a_scorer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter("llama")
    scorer = LetterScorer(adapter)
    calls: list[int] = []
    real = resume_module.Work.resume

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(resume_module.Work, "resume", counting)
    first, _ = _sweep(adapter, tmp_path, "a", scorer=scorer, ablate_scope="none")
    n_first = len(calls)
    second, _ = _sweep(adapter, tmp_path, "b", scorer=scorer, ablate_scope="none")
    assert len(calls) - n_first == n_first - 1  # the probe's resumed candidate ran only the first time
    assert first.probe_error == second.probe_error and list(scorer.resume_checks) == [((0, 1, 2), True)]


def test_sweep_falls_back_when_mid_stack_resume_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make_adapter("llama")
    _reference, rec_ref = _sweep(adapter, tmp_path, "ref", reuse=False)
    break_resume(monkeypatch)
    with pytest.warns(UserWarning, match="independently"):
        result, records = _sweep(adapter, tmp_path, "fallback")
    assert result.reuse == "independent" and result.probe_error is not None and result.probe_error > 1e-3
    _assert_same(records, rec_ref)


def test_sweep_resumes_and_ablates_only_passing_sites(tmp_path: Path) -> None:
    adapter = make_adapter("qwen2")
    # Gold answers are what one addition predicts, so that site beats the baseline and the filter has
    # something to keep (random weights alone leave no passing site).
    steer = Condition.make("add", role="r", layer=1, position=-1, alpha=4.0)
    steered = score(adapter, items(7), steer, vectors=vectors_for(adapter, ("r",)))
    qs = [replace(q, answer=r.pred) for q, r in zip(items(7), steered, strict=True)]
    assert not all(r.correct for r in score(adapter, qs, "baseline"))
    first, rec_first = _sweep(adapter, tmp_path, "run", qs, ablate_scope="passing")
    add_rows = [r for r in first.rows if r.condition == "add"]
    passing = {(r.layer, r.position) for r in add_rows if r.accuracy > r.baseline_accuracy}
    assert (1, -1) in passing and len(passing) < 6  # some sites pass, some do not
    assert {(r.layer, r.position) for r in first.rows if r.condition == "ablate"} == passing
    again, rec_again = _sweep(adapter, tmp_path, "run", qs, ablate_scope="passing")
    assert again.n_new == 0 and rec_again.keys() == rec_first.keys()
    full, _ = _sweep(adapter, tmp_path, "run", qs, ablate_scope="all")
    assert full.n_new == 7 * (6 - len(passing))


def test_cache_batches_respect_the_bound() -> None:
    adapter = make_adapter("llama")
    prepared, _ = prepare(adapter, items(10))
    per_token = adapter.hidden_size * 4
    longest = max(len(p.ids) for p in prepared)
    bound = 2 * 3 * longest * per_token  # room for 3 questions (plus as much for the stacked copies)
    batches = cache_batches(prepared, 16, per_token, bound)
    assert sorted(i for b in batches for i in b) == list(range(10))
    for b in batches:
        width = max(len(prepared[i].ids) for i in b)
        assert 2 * len(b) * width * per_token <= bound
    assert max(len(b) for b in batches) <= 3
    assert all(len(b) == 1 for b in cache_batches(prepared, 16, per_token, 1))


def _row(cond: str, layer: int, position: int, alpha: float | None, acc: float, base: float = 0.5) -> GridRow:
    return GridRow("lawyer", "law", cond, layer, position, alpha, 10, round(acc * 10), acc, base)


def test_selection_criterion_and_tie_rule() -> None:
    rows = [
        _row("add", 2, -1, 1.0, 0.7),
        _row("ablate", 2, -1, None, 0.6),  # ablation also beats the baseline: not qualifying
        _row("add", 3, -1, 3.0, 0.6),
        _row("ablate", 3, -1, None, 0.5),
        _row("add", 3, -2, 1.0, 0.6),  # same accuracy, same ablation, smaller α -> wins the tie
        _row("ablate", 3, -2, None, 0.5),
        _row("add", 1, -2, 1.0, 0.6),
        _row("ablate", 1, -2, None, 0.5),  # same α too, lower layer -> wins
    ]
    choice = select(rows)
    assert (choice.layer, choice.position, choice.alpha) == (1, -2, 1.0)
    assert choice.criterion_met and choice.n_candidates_passing == 3
    assert choice.val_ablate_accuracy == 0.5
    nothing = select(
        [_row("add", 2, -1, 1.0, 0.4), _row("add", 4, -1, 1.0, 0.45), _row("ablate", 4, -1, None, 0.1)]
    )
    assert not nothing.criterion_met and nothing.n_candidates_passing == 0
    assert (nothing.layer, nothing.alpha) == (4, 1.0)


def test_selection_file_round_trip_and_fingerprint(tmp_path: Path) -> None:
    llama, qwen = make_adapter("llama"), make_adapter("qwen2")
    choice = select([_row("add", 2, -1, 3.0, 0.7), _row("ablate", 2, -1, None, 0.4)])
    path = write_selection(
        tmp_path / "selection.json",
        llama,
        split_seed=0,
        layers=(0, 2),
        choices=[choice],
        validation={"law": ["law/3", "law/1"]},
    )
    doc = json.loads(path.read_text())
    assert set(doc) == {"model", "model_fingerprint", "split_seed", "layers", "roles", "validation_qids"}
    assert doc["validation_qids"] == {"law": ["law/1", "law/3"]}
    assert set(doc["roles"]["lawyer"]) == {
        "domain",
        "layer",
        "position",
        "alpha",
        "val_accuracy",
        "val_baseline",
        "val_ablate_accuracy",
        "criterion_met",
        "n_candidates_passing",
    }
    assert selected_site(load_selection(path, llama), "lawyer") == (2, -1, 3.0)
    with pytest.raises(RolevecError, match="fingerprint"):
        load_selection(path, qwen)
    with pytest.raises(RolevecError, match="`force=True`"):
        write_selection(path, qwen, split_seed=0, layers=(0, 2), choices=[choice])
    # a merge keeps the questions of earlier choices
    write_selection(path, llama, split_seed=0, layers=(0, 2), choices=[], validation={"law": ["law/2"]})
    assert json.loads(path.read_text())["validation_qids"] == {"law": ["law/1", "law/2", "law/3"]}


def test_held_out_check_refuses_testing_on_selection_questions() -> None:
    """Whatever the seeds: a test split that shares a question with the sweep's validation is refused."""
    mcq = MCQSet({"law": items(10, "law"), "math": items(10)}, "test")
    with pytest.warns(UserWarning, match="repeated question"):  # items() repeats its text every 4
        split = make_split(mcq, seed=0, val_fraction=0.3)
    val, test = split.qids("law", "val"), split.qids("law", "test")
    check_held_out({"split_seed": 5, "validation_qids": {"law": val}}, split, ["law", "math"])
    with pytest.raises(RolevecError, match="1 law question"):
        check_held_out({"split_seed": 0, "validation_qids": {"law": [*val, test[0]]}}, split, ["law"])
    check_held_out({"split_seed": 0, "validation_qids": {"law": [test[0]]}}, split, ["math"])  # not tested
    with pytest.raises(RolevecError, match="split seed 5"):  # an older selection: only its seed to go by
        check_held_out({"split_seed": 5}, split, ["law"])


def test_grid_rows_and_sweep_file(tmp_path: Path) -> None:
    adapter = make_adapter("llama")
    result, _ = _sweep(adapter, tmp_path, "grid")
    records = list(read_records(tmp_path / "grid" / "records.jsonl"))
    rows = grid_rows(records, role="r", domain="math", qids=[f"math/{i}" for i in range(7)])
    assert rows == result.rows and len(rows) == 3 * 2 * 3
    path = tmp_path / "sweep.jsonl"
    write_sweep_file(path, rows)
    other = [GridRow("s", "law", "add", 0, -1, 1.0, 1, 1, 1.0, 0.0)]
    write_sweep_file(path, other)
    write_sweep_file(path, rows)  # replaces the r/math rows, keeps s/law
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len(rows) + 1
    assert set(lines[0]) == {
        "role",
        "domain",
        "condition",
        "layer",
        "position",
        "alpha",
        "n",
        "correct",
        "accuracy",
        "baseline_accuracy",
    }


@pytest.mark.e2e
def test_sweep_reuse_on_embedded_model(embedded: ModelAdapter) -> None:
    _check_resumed_candidates(embedded, 3, (8, 9, 20), share_prefix=True)


def test_layer_step_and_zero_vectors_are_skipped(tmp_path: Path) -> None:
    adapter = make_adapter("llama")
    vecs = vectors_for(adapter, ("r",))
    means = dict(vecs.role_means)
    means["r"] = means["r"].clone()
    means["r"][:, 0] = vecs.base_mean[:, 0]  # layer 0: the same template tokens for every prompt
    zeroed = type(vecs)(means, vecs.base_mean, vecs.positions, vecs.position_tokens, dict(vecs.metadata))
    path = tmp_path / "records.jsonl"
    with RecordStore(path) as store, pytest.warns(UserWarning, match="all-zero vector"):
        result = run_sweep(
            adapter,
            zeroed,
            "r",
            items(4),
            store,
            domain="math",
            layers=(0, 4),
            layer_step=2,
            positions=(-1,),
            alphas=(1.0,),
            progress=False,
        )
    assert {r.layer for r in result.rows} == {2}
    with RecordStore(tmp_path / "other.jsonl") as store, pytest.raises(RolevecError, match="zero"):
        run_sweep(adapter, zeroed, "r", items(4), store, domain="math", layers=(0, 1), progress=False)


@pytest.mark.e2e
def test_mid_stack_check_passes_in_bfloat16_on_embedded_model() -> None:
    """Half precision moves single large activations of SmolLM2 by several units when the batch shape
    changes; the check must still accept a correct resume there, or the sweep silently loses its reuse."""
    from rolevec.model.loading import load_model

    adapter = load_model(None, dtype="bfloat16")
    prepared, _ = prepare(adapter, items(4))
    ok, error = sweep_module.probe_reuse(
        adapter, vectors_for(adapter, ("r",)), "r", prepared, (1, 24), -1, 1.0, LetterScorer(adapter)
    )
    assert ok, error
