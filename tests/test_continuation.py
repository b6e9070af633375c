"""Continuation scoring: each choice's summed log-likelihood, the context run once for all its choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rolevec.core.records import RecordStore, read_records
from rolevec.data.mcq import MCQItem, MCQSet, make_split
from rolevec.errors import RolevecError
from rolevec.evaluation.conditions import Condition, applied, evaluate_conditions, score
from rolevec.evaluation.continuation import (
    ContinuationScorer,
    encode_pair,
    prepare_choices,
    results_from_logliks,
)
from rolevec.evaluation.scoring import LetterScorer, PromptFormat
from rolevec.model.hooks import count_hooks
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from rolevec.vectors.role_vectors import RoleVectors

TEMPLATE = PromptFormat("{question}", answer_prefix="Answer:")  # no trailing space: " no" is one token


def items(n: int, domain: str = "x") -> list[MCQItem]:
    """Contexts of different lengths; choices of one token and of several, 2 to 5 per question."""
    words = ("A", "a very long answer indeed", "B", "the sea and the sky", "seven")
    out = []
    for i in range(n):
        k = 2 + i % 4
        choices = tuple(words[(i + j) % len(words)] + (" again" * (j % 2)) for j in range(k))
        out.append(MCQItem(f"{domain}/{i}", domain, "Finish this." + " Go on." * (i % 3), choices, "A", "s"))
    return out


def reference(adapter: ModelAdapter, prepared: list, q: int, c: int) -> float:
    """log p(continuation | context) from model(...).logits of the whole row, in float64."""
    p = prepared[q]
    ids = torch.tensor([list(p.context) + list(p.continuations[c])])
    with torch.inference_mode():
        logits = adapter.model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    n = len(p.context)
    return float(sum(lp[n - 1 + j, t] for j, t in enumerate(p.continuations[c])))


def vectors_for(adapter: ModelAdapter) -> RoleVectors:
    torch.manual_seed(0)
    shape = (len(adapter.chat.positions), adapter.n_layers + 1, adapter.hidden_size)
    return RoleVectors(
        role_means={"r": torch.randn(shape)},
        base_mean=torch.randn(shape),
        positions=tuple(adapter.chat.positions),
        position_tokens=tuple(adapter.chat.position_tokens()),
        metadata={"model": adapter.name, "model_fingerprint": adapter.fingerprint()},
    )


def test_pairs_are_encoded_as_lm_eval_does(tiny_llama: ModelAdapter) -> None:
    tok = tiny_llama.tokenizer
    context, cont = encode_pair(tiny_llama, "The answer is ", "blue")
    # the context's trailing space moves to the continuation
    assert context == tok("The answer is", add_special_tokens=tiny_llama.chat.add_special_tokens)["input_ids"]
    assert tok.decode(cont) == " blue"


def test_shared_context_equals_whole_rows_and_the_model_logits(tiny: ModelAdapter) -> None:
    """The context once, its choices against the cached context: the same sums as full rows, and as
    log_softmax(model(...).logits) of each row, also under steering hooks."""
    qs = items(7)
    prepared, _ = prepare_choices(tiny, qs, TEMPLATE)
    assert any(len(c) == 1 for p in prepared for c in p.continuations)
    assert any(len(c) > 2 for p in prepared for c in p.continuations)
    vecs = vectors_for(tiny)
    scorer = ContinuationScorer(tiny, probe=False)
    for cond in (
        Condition("baseline"),
        Condition.make("add", role="r", layer=1, position=-1, alpha=2.0),
        Condition.make("ablate", role="r", layer=2, position=-1),
    ):
        with applied(tiny, cond.steering(vecs)):
            shared = scorer.shared(prepared)
            full = scorer.full(prepared)
            ref = [
                [reference(tiny, prepared, q, c) for c in range(len(p.continuations))]
                for q, p in enumerate(prepared)
            ]
        for a, b, r in zip(shared, full, ref, strict=True):
            assert len(a) == len(r)
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
            torch.testing.assert_close(torch.tensor(a), torch.tensor(r), rtol=0, atol=1e-4)
    assert count_hooks(tiny.model) == 0


def test_results_take_acc_and_acc_norm() -> None:
    item = MCQItem("x/0", "x", "q", ("ab", "abcdefgh", "c"), "B", "s")
    from rolevec.evaluation.continuation import Choices

    p = Choices(item, (1,), ((2,), (3,), (4,)))
    # sums: B has the highest sum, but per character A wins (-1/2 > -2/8? no: -0.5 < -0.25), so B
    (r,) = results_from_logliks([p], [[-1.0, -2.0, -3.0]])
    assert r.pred == "A" and r.pred_norm == "B" and r.scoring == "continuation"
    assert r.correct is False and abs(sum(r.probs) - 1) < 1e-9 and r.logits == (-1.0, -2.0, -3.0)
    assert r.p_gold == pytest.approx(r.probs[1])


def test_score_and_records_under_every_condition(tmp_path: Path) -> None:
    adapter = make_adapter("llama")
    qs = items(12)
    mcq = MCQSet({"x": qs}, "test:continuation")
    split = make_split(mcq, seed=0, val_fraction=0.25)
    vecs = vectors_for(adapter)
    conditions = [
        Condition("baseline"),
        Condition.make("persona", role="r"),
        Condition.make("add", role="r", layer=1, position=-1, alpha=3.0),
        Condition.make("ablate", role="r", layer=1, position=-1),
        Condition.make("random", role="r", layer=1, position=-1, alpha=3.0),
    ]
    with RecordStore(tmp_path / "records.jsonl") as store:
        report = evaluate_conditions(
            adapter,
            mcq,
            split,
            conditions,
            store,
            vectors=vecs,
            prompt_format=TEMPLATE,
            progress=False,
            scoring="continuation",
        )
    test_n = len(split.qids("x", "test"))
    assert report.n_new == 5 * test_n
    records = list(read_records(tmp_path / "records.jsonl"))
    assert {r["scoring"] for r in records} == {"continuation"}
    by_qid = {it.qid: it for it in qs}
    for r in records:
        n = len(by_qid[r["qid"]].choices)
        assert len(r["probs"]) == len(r["logliks"]) == n
        assert r["pred_norm"] in "ABCDE"[:n] and r["correct_norm"] == (r["pred_norm"] == r["gold"])
    # the records equal score() per condition, and steering changed the sums
    test_items = split.select(mcq, "x", "test")
    base = score(adapter, test_items, "baseline", prompt_format=TEMPLATE, scoring="continuation")
    added = score(
        adapter, test_items, conditions[2], vectors=vecs, prompt_format=TEMPLATE, scoring="continuation"
    )
    stored = {(r["condition"], r["qid"]): r for r in records}
    for b, a in zip(base, added, strict=True):
        assert stored[("baseline", b.qid)]["logliks"] == pytest.approx(list(b.logits), abs=1e-5)
        assert stored[("add", a.qid)]["logliks"] == pytest.approx(list(a.logits), abs=1e-5)
    assert any(
        abs(x - y) > 1e-3
        for b, a in zip(base, added, strict=True)
        for x, y in zip(b.logits, a.logits, strict=True)
    )
    # resuming adds nothing
    with RecordStore(tmp_path / "records.jsonl") as store:
        again = evaluate_conditions(
            adapter,
            mcq,
            split,
            conditions,
            store,
            vectors=vecs,
            prompt_format=TEMPLATE,
            progress=False,
            scoring="continuation",
        )
    assert again.n_new == 0 and again.n_done_before == 5 * test_n


def test_bad_scoring_input(tiny_llama: ModelAdapter) -> None:
    qs = items(2)
    with pytest.raises(RolevecError, match="scoring must be one of letter, continuation"):
        score(tiny_llama, qs, scoring="loglik")
    with pytest.raises(RolevecError, match="needs a ContinuationScorer"):
        score(tiny_llama, qs, scorer=LetterScorer(tiny_llama), scoring="continuation")
    with pytest.raises(RolevecError, match="needs a LetterScorer"):
        score(tiny_llama, qs, scorer=ContinuationScorer(tiny_llama), prompt_format=None)
    empty = MCQItem("x/9", "x", "q", ("", "b"), "A", "s", delimiter="")
    with pytest.raises(RolevecError, match=r"item x/9: choice '' adds no token"):
        prepare_choices(tiny_llama, [empty], TEMPLATE)


def test_sweep_scores_candidates_by_continuation(tmp_path: Path) -> None:
    """The sweep under continuation scoring: every candidate under its own hooks, records say so, and an
    addition's records equal score() under the same condition."""
    from rolevec.evaluation.sweep import run_sweep

    adapter = make_adapter("llama")
    qs = items(6)
    vecs = vectors_for(adapter)
    with RecordStore(tmp_path / "sweep.jsonl") as store:
        result = run_sweep(
            adapter,
            vecs,
            "r",
            qs,
            store,
            domain="x",
            layers=(1, 3),
            positions=[-1],
            alphas=[2.0],
            prompt_format=TEMPLATE,
            progress=False,
            scoring="continuation",
        )
        records = list(store.records())
    assert result.reuse == "reuse" and result.rows
    assert {r["scoring"] for r in records} == {"continuation"}
    assert {r["condition"] for r in records} == {"baseline", "add", "ablate"}
    cond = Condition.make("add", role="r", layer=2, position=-1, alpha=2.0)
    direct = score(adapter, qs, cond, vectors=vecs, prompt_format=TEMPLATE, scoring="continuation")
    stored = {r["qid"]: r for r in records if r["condition"] == "add" and r["layer"] == 2}
    for d in direct:
        assert stored[d.qid]["logliks"] == pytest.approx(list(d.logits), abs=1e-5)
        assert stored[d.qid]["pred_norm"] == d.pred_norm


def test_additions_resumed_mid_stack_equal_hooked_runs(tiny: ModelAdapter) -> None:
    """Each addition from the unsteered residual at its layer, for contexts and choices: the same sums as
    the addition done by hooks, at the lowest, a middle and the top layer, also when the cache bound
    allows one layer at a time."""
    qs = items(6)
    prepared, _ = prepare_choices(tiny, qs, TEMPLATE)
    vecs = vectors_for(tiny)
    layers = (0, tiny.n_layers // 2, tiny.n_layers - 1)
    steerings = [
        Condition.make("add", role="r", layer=layer, position=-1, alpha=alpha).steering(vecs)
        for layer in layers
        for alpha in (1.0, 4.0)
    ]
    scorer = ContinuationScorer(tiny, probe=False)
    for bound in (512 * 1024**2, 1):
        resumed = scorer.resumed(prepared, steerings, max_cache_bytes=bound)
        assert len(resumed) == len(steerings)
        for steering, got in zip(steerings, resumed, strict=True):
            assert steering is not None
            with steering.apply(tiny):
                ref = scorer.shared(prepared)
            for a, b in zip(got, ref, strict=True):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
    base = scorer.shared(prepared)
    assert any(
        abs(x - y) > 1e-3
        for row, b in zip(resumed[-1], base, strict=True)
        for x, y in zip(row, b, strict=True)
    )
    assert count_hooks(tiny.model) == 0
