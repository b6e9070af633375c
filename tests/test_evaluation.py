from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.core.records import RecordStore, read_records
from rolevec.data.mcq import MCQItem, MCQSet, make_split
from rolevec.errors import RolevecError
from rolevec.evaluation.conditions import (
    Condition,
    applied,
    evaluate_conditions,
    persona_system,
    random_direction,
    score,
)
from rolevec.evaluation.scoring import LetterScorer, PromptFormat, _batch, prepare
from rolevec.model.batching import plan_batches
from rolevec.model.hooks import count_hooks
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import counted, make_adapter
from rolevec.vectors.role_vectors import RoleVectors


def items(n: int, domain: str = "math") -> list[MCQItem]:
    """Questions of different lengths, so batches need padding."""
    return [
        MCQItem(
            f"{domain}/{i}",
            domain,
            "Which of the following is a prime number?" + " Think about it." * (i % 4),
            ("4", "6", "7", "9"),
            "ABCD"[i % 4],
            "college_mathematics" if i % 2 else "high_school_mathematics",
        )
        for i in range(n)
    ]


def vectors_for(adapter: ModelAdapter, roles: tuple[str, ...] = ("mathematician",)) -> RoleVectors:
    torch.manual_seed(0)
    shape = (len(adapter.chat.positions), adapter.n_layers + 1, adapter.hidden_size)
    return RoleVectors(
        role_means={r: torch.randn(shape) for r in roles},
        base_mean=torch.randn(shape),
        positions=tuple(adapter.chat.positions),
        position_tokens=tuple(adapter.chat.position_tokens()),
        metadata={"model": adapter.name, "model_fingerprint": adapter.fingerprint()},
    )


def test_paper_prompt_text(tiny_llama: ModelAdapter) -> None:
    item = MCQItem("law/0", "law", "Is it legal?", ("Yes", "No", "Maybe", "Never"), "B", "professional_law")
    user = PromptFormat().user_text(item)
    assert user == (
        "Is it legal?\nA. Yes\nB. No\nC. Maybe\nD. Never\n"
        "Answer with the letter of the correct answer.\nAnswer:"
    )
    text, folded = PromptFormat(answer_prefix="The answer is").prompt(tiny_llama, item)
    assert text == tiny_llama.render(user) + "The answer is" and not folded
    with pytest.raises(RolevecError, match="unknown or malformed field"):
        PromptFormat("{question} {answer}")
    # five choices: the paper template's four lettered lines become the item's own five
    five = MCQItem("law/1", "law", "Which?", ("p", "q", "r", "s", "t"), "E", "x")
    assert PromptFormat().user_text(five) == (
        "Which?\nA. p\nB. q\nC. r\nD. s\nE. t\nAnswer with the letter of the correct answer.\nAnswer:"
    )
    with pytest.raises(RolevecError, match=r"item law/1 has 5 choices.*\{choices\}"):
        PromptFormat("{question} A) {A} B) {B}").user_text(replace(five, choices=("p",) * 5))
    two = MCQItem("law/2", "law", "Q?", ("yes", "no"), "B", "x")
    assert PromptFormat("{question}\n{choices}").user_text(two) == "Q?\nA. yes\nB. no"
    verbatim = replace(two, instruction="As written.\nAnswer:")
    assert PromptFormat().user_text(verbatim) == "As written.\nAnswer:"
    assert PromptFormat(verbatim=False).user_text(verbatim).startswith("Q?\nA. yes\nB. no\n")


def test_persona_prompts_and_folding() -> None:
    assert persona_system("data_scientist") == "You are a data scientist."
    assert persona_system("economist") == "You are an economist."
    assert persona_system("economist", "imagine") == "Imagine you are an economist."
    assert persona_system("lawyer", "talking_to") == "You are talking to a lawyer."
    with pytest.raises(RolevecError, match="persona template"):
        persona_system("lawyer", "nonsense")
    chatml = make_adapter("llama")
    no_system = make_adapter("llama", template="no_system")
    cond = Condition.make("persona", role="lawyer")
    prepared, folded = prepare(chatml, items(2), system=cond.system())
    assert not folded and "system\nYou are a lawyer." in chatml.tokenizer.decode(prepared[0].ids)
    prepared, folded = prepare(no_system, items(2), system=cond.system())
    assert folded and "You are a lawyer.\n\nWhich" in no_system.tokenizer.decode(prepared[0].ids)


def test_answer_prefix_letters_follow_a_space(tiny_llama: ModelAdapter) -> None:
    plain, _ = prepare(tiny_llama, items(1))
    prefixed, _ = prepare(tiny_llama, items(1), PromptFormat(answer_prefix="The answer is"))
    decode = tiny_llama.tokenizer.decode
    assert [decode([i]) for i in plain[0].letter_ids] == ["A", "B", "C", "D"]
    assert [decode([i]) for i in prefixed[0].letter_ids] == [" A", " B", " C", " D"]
    with pytest.raises(RolevecError, match="not a single token"):
        prepare(tiny_llama, items(1), PromptFormat(answer_prefix="The answer is "))


@pytest.mark.parametrize("share", [True, False])
def test_fast_scoring_equals_full_logits(tiny: ModelAdapter, share: bool) -> None:
    """Only 4 unembedding rows at the last real token, the common prompt head run once per batch (or not),
    yet the same numbers as model(...).logits, also under steering hooks."""
    prepared, _ = prepare(tiny, items(7))
    batch, letter_ids = _batch(tiny, prepared)
    assert int(batch.lengths.min()) < batch.input_ids.shape[1]  # really padded
    scorer = LetterScorer(tiny, probe=False)
    split = scorer.split(batch)
    assert split is not None
    parts, prefix = split
    assert parts.suffix.prefix_length == prefix.length > 10  # the template head is shared
    vecs = vectors_for(tiny)
    for cond in (
        Condition("baseline"),
        Condition.make("add", role="mathematician", layer=1, position=-1, alpha=3.0),
        Condition.make("ablate", role="mathematician", layer=2, position=-2),
    ):
        with applied(tiny, cond.steering(vecs)):
            fast = scorer.fast(batch, letter_ids, share=share)
            naive = scorer.naive(batch, letter_ids)
        assert fast.shape == (7, 4)
        torch.testing.assert_close(fast, naive, rtol=0, atol=1e-4)
    assert count_hooks(tiny.model) == 0


def test_items_with_different_numbers_of_choices_share_a_batch(tiny: ModelAdapter) -> None:
    """2, 3, 5 and 10 choices in one batch: each item reads only its own letters, and the numbers equal
    model(...).logits at those letters' ids, item by item."""
    counts = (2, 3, 5, 10, 4, 26)
    mixed = [
        MCQItem(f"x/{i}", "x", "Pick one." + " More." * i, tuple(f"c{j}" for j in range(n)), "B", "s")
        for i, n in enumerate(counts)
    ]
    prepared, _ = prepare(tiny, mixed)
    assert [len(p.letter_ids) for p in prepared] == list(counts)
    decode = tiny.tokenizer.decode
    assert [decode([t]).strip() for t in prepared[3].letter_ids] == list("ABCDEFGHIJ")
    together = score(tiny, mixed, batch_size=8)
    alone = score(tiny, mixed, batch_size=1)
    for r, one, n in zip(together, alone, counts, strict=True):
        assert len(r.probs) == len(r.logits) == n and r.scoring == "letter"
        assert abs(sum(r.probs) - 1) < 1e-5 and r.pred in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]
        torch.testing.assert_close(torch.tensor(r.logits), torch.tensor(one.logits), rtol=0, atol=1e-4)
    for p, r in zip(prepared, together, strict=True):
        batch, letter_ids = _batch(tiny, [p])
        ref = LetterScorer(tiny, fast=False).naive(batch, letter_ids)[0]
        torch.testing.assert_close(torch.tensor(r.logits), ref, rtol=0, atol=1e-4)


def test_condition_steering_applies_each_condition_with_its_own_vector(tiny_llama: ModelAdapter) -> None:
    """``Condition.steering`` (what evaluation and the sweep steer with) against the interventions called
    directly: addition of the role vector, its random control, ablation of its direction."""
    from rolevec.steering.interventions import ablate, add

    vecs = vectors_for(tiny_llama)
    prepared, _ = prepare(tiny_llama, items(5))
    batch, letter_ids = _batch(tiny_llama, prepared)
    scorer = LetterScorer(tiny_llama, probe=False)
    baseline = scorer.naive(batch, letter_ids)
    d = vecs.vector("mathematician", 2, -1)
    control = random_direction(d, 0, key="mathematician:2:-1")
    expected = {
        "add": (add, {"vector": d, "layers": 2, "alpha": 3.0}),
        "random": (add, {"vector": control, "layers": 2, "alpha": 3.0}),
        "ablate": (ablate, {"direction": d}),
    }
    got: dict[str, torch.Tensor] = {}
    for kind, (direct, kwargs) in expected.items():
        cond = Condition.make(kind, role="mathematician", layer=2, position=-1, alpha=3.0)
        with applied(tiny_llama, cond.steering(vecs)):
            got[kind] = scorer.naive(batch, letter_ids)
        with direct(tiny_llama, **kwargs):
            torch.testing.assert_close(got[kind], scorer.naive(batch, letter_ids), rtol=0, atol=1e-6)
        assert (got[kind] - baseline).abs().max() > 1e-3  # each condition changes the logits
    assert (got["random"] - got["add"]).abs().max() > 1e-3  # the control is not the role vector
    assert Condition.make("persona", role="mathematician").steering(vecs) is None
    with applied(tiny_llama, Condition.make("persona", role="mathematician").steering(vecs)):
        torch.testing.assert_close(scorer.naive(batch, letter_ids), baseline)  # a prompt, not a hook
    assert count_hooks(tiny_llama.model) == 0


def test_probe_falls_back_to_full_forward_on_mismatch(tiny_llama: ModelAdapter) -> None:
    scorer = LetterScorer(tiny_llama)
    scorer.softcap = 0.5  # a wrong post-processing the probe must catch
    prepared, _ = prepare(tiny_llama, items(3))
    batch, letter_ids = _batch(tiny_llama, prepared)
    with pytest.warns(UserWarning, match="full forward"):
        out = scorer.letter_logits(batch, letter_ids)
    assert scorer.mode == "naive"
    torch.testing.assert_close(out, scorer.naive(batch, letter_ids))


def test_score_results_in_item_order_and_consistent(tiny_llama: ModelAdapter) -> None:
    qs = items(9)
    results = score(tiny_llama, qs, "baseline", batch_size=4)
    assert [r.qid for r in results] == [q.qid for q in qs]
    for r in results:
        assert abs(sum(r.probs) - 1) < 1e-5 and r.p_gold == r.probs["ABCD".index(r.gold)]
        assert r.pred == "ABCD"[max(range(4), key=lambda k: r.logits[k])]
        assert r.correct == (r.pred == r.gold)
    again = score(tiny_llama, list(reversed(qs)), "baseline", batch_size=3)
    assert {r.qid: r.pred for r in again} == {r.qid: r.pred for r in results}


def test_random_control_has_the_role_vector_norm() -> None:
    vec = torch.randn(32) * 7
    r1 = random_direction(vec, 0, key="a")
    assert torch.allclose(r1.norm(), vec.norm(), rtol=1e-5)
    assert torch.equal(r1, random_direction(vec, 0, key="a"))
    assert not torch.equal(r1, random_direction(vec, 1, key="a"))
    assert not torch.equal(r1, random_direction(vec, 0, key="b"))


def test_conditions_validate() -> None:
    with pytest.raises(RolevecError, match="needs a role"):
        Condition("persona")
    with pytest.raises(RolevecError, match="`layer` and `position`"):
        Condition("add", "lawyer")
    with pytest.raises(RolevecError, match="`alpha`"):
        Condition("random", "lawyer", None, 1, -1)
    with pytest.raises(RolevecError, match="unknown condition"):
        Condition("steer")
    assert Condition.make("ablate", role="r", layer=1, position=-1, alpha=3).alpha is None


def test_evaluate_conditions_writes_and_resumes(tiny_llama: ModelAdapter, tmp_path: Path) -> None:
    mcq = MCQSet({"math": items(10), "law": items(6, "law")}, "test")
    split = make_split(mcq, seed=0, val_fraction=0.3)
    vecs = vectors_for(tiny_llama)
    conditions = [
        Condition("baseline"),
        Condition.make("persona", role="mathematician"),
        Condition.make("add", role="mathematician", layer=1, position=-1, alpha=1.0),
        Condition.make("ablate", role="mathematician", layer=1, position=-1),
        Condition.make("random", role="mathematician", layer=1, position=-1, alpha=1.0),
    ]
    path = tmp_path / "records.jsonl"
    with RecordStore(path) as store:
        report = evaluate_conditions(
            tiny_llama, mcq, split, conditions[:2], store, vectors=vecs, split_name="all", progress=False
        )
        assert report.n_new == 2 * 16 and report.n_done_before == 0
        report = evaluate_conditions(
            tiny_llama, mcq, split, conditions, store, vectors=vecs, split_name="all", progress=False
        )
        assert report.n_new == 3 * 16 and report.n_done_before == 2 * 16
    records = list(read_records(path))
    assert len(records) == 5 * 16
    splits = {r["qid"]: r["split"] for r in records}
    assert sorted(q for q, s in splits.items() if s == "val") == sorted(
        split.domains["math"]["val"] + split.domains["law"]["val"]
    )
    stored = {c.kind: {r["qid"]: r for r in records if r["condition"] == c.kind} for c in conditions}
    assert all(len(by_qid) == 16 for by_qid in stored.values())
    # Each condition's records are what score() gives for it alone; the persona's are the baseline's
    # questions asked under "You are a mathematician." (prepared here without Condition.system()).
    math = items(10)
    persona, _ = prepare(tiny_llama, math, system="You are a mathematician.")
    batch, letter_ids = _batch(tiny_llama, persona)
    persona_probs = LetterScorer(tiny_llama, probe=False).naive(batch, letter_ids).softmax(-1)
    for k, item in enumerate(math):
        assert stored["persona"][item.qid]["probs"] == pytest.approx(persona_probs[k].tolist(), abs=1e-5)
    for cond in conditions:
        for res in score(tiny_llama, math, cond, vectors=vecs):
            assert stored[cond.kind][res.qid]["pred"] == res.pred
            assert stored[cond.kind][res.qid]["probs"] == pytest.approx(list(res.probs), abs=1e-6)
        if cond.kind != "baseline":  # and every condition differs from the baseline somewhere
            assert any(
                stored[cond.kind][q]["probs"] != pytest.approx(stored["baseline"][q]["probs"], abs=1e-4)
                for q in stored["baseline"]
            )


@pytest.mark.e2e
def test_fast_scoring_on_embedded_model(embedded: ModelAdapter) -> None:
    prepared, _ = prepare(embedded, items(3))
    assert prepared[0].letter_ids == (49, 50, 51, 52)
    batch, letter_ids = _batch(embedded, prepared)
    scorer = LetterScorer(embedded, probe=False)
    torch.testing.assert_close(
        scorer.fast(batch, letter_ids), scorer.naive(batch, letter_ids), rtol=0, atol=1e-4
    )


def test_plan_batches_cuts_padding_within_limits() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(60, 140) for _ in range(97)] + [400, 30]
    batches = plan_batches(lengths, 16, overhead_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 16 for b in batches)
    assert batches[0] == [97]  # the outlier alone: padding 15 rows to 400 costs more than one forward

    def cost(plan: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) + 64 for b in plan)

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks = [order[i : i + 16] for i in range(0, len(order), 16)]
    assert cost(batches) < cost(chunks)
    assert plan_batches([50] * 40, 16) == [list(range(16)), list(range(16, 32)), list(range(32, 40))]
    capped = plan_batches(lengths, 16, max_tokens=500)
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 500 for b in capped)
    with pytest.raises(RolevecError, match="at least 1"):
        plan_batches(lengths, 0)


def test_a_forward_costs_more_tokens_on_a_gpu_so_batches_fill_up() -> None:
    """On a GPU one more forward costs as much as ~10^3 padded tokens, so batches are cut only where
    padding is far costlier (the H200 benchmark: 13 forwards of up to 64 rows were no faster than 16 of 8)."""
    import random

    from rolevec.model.batching import batch_overhead_tokens

    assert batch_overhead_tokens(torch.device("cpu")) == 64
    gpu = batch_overhead_tokens(torch.device("cuda"))
    assert gpu >= 16 * batch_overhead_tokens(torch.device("cpu"))
    rng = random.Random(0)
    lengths = [rng.randint(60, 260) for _ in range(128)]  # MMLU prompts' spread
    on_cpu = plan_batches(lengths, 64, overhead_tokens=64)
    on_gpu = plan_batches(lengths, 64, overhead_tokens=gpu)
    assert len(on_gpu) <= 4 < len(on_cpu)


def _evaluate(adapter: ModelAdapter, path: Path, **kw: Any) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Additions and random controls of two roles at three layers (two share one), on two domains."""
    mcq = MCQSet({"math": items(9), "law": items(5, "law")}, "test")
    split = make_split(mcq, seed=0, val_fraction=0.3)
    vecs = vectors_for(adapter, ("mathematician", "lawyer"))
    top = adapter.n_layers - 1
    conditions = [Condition("baseline")]
    for role, layer in (("mathematician", 1), ("lawyer", top), ("lawyer", 1)):
        conditions += [
            Condition.make("add", role=role, layer=layer, position=-1, alpha=1.0),
            Condition.make("add", role=role, layer=layer, position=-1, alpha=3.0),
            Condition.make("random", role=role, layer=layer, position=-1, alpha=1.0),
        ]
    conditions.append(Condition.make("add", role="mathematician", layer=0, position=-2, alpha=2.0))
    with RecordStore(path) as store:
        report = evaluate_conditions(
            adapter, mcq, split, conditions, store, vectors=vecs, split_name="all", progress=False, **kw
        )
    assert report.n_new == 14 * len(conditions)
    return {
        (r["condition"], r["role"], r["layer"], r["position"], r["alpha"], r["qid"]): r
        for r in read_records(path)
    }


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_test_stage_additions_share_the_lower_layers(arch: str, tmp_path: Path) -> None:
    """Additions and random controls scored from a shared residual give the records of independent runs."""
    adapter = make_adapter(arch)
    scorer = LetterScorer(adapter)
    resumed = _evaluate(adapter, tmp_path / "resumed.jsonl", scorer=scorer)
    assert list(scorer.resume_checks) == [((0, 1, adapter.n_layers - 1), True)]  # the resumed path ran
    independent = _evaluate(adapter, tmp_path / "independent.jsonl", reuse=False)
    assert resumed.keys() == independent.keys()
    for key, rec in resumed.items():
        assert rec["pred"] == independent[key]["pred"], key
        assert rec["probs"] == pytest.approx(independent[key]["probs"], abs=1e-5), key


def break_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate an architecture that cannot be resumed mid-stack: advanced residuals drift."""
    import rolevec.evaluation.scoring as resume_module

    real = resume_module.residual_at

    def drifting(*args: Any, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = real(*args, **kwargs)
        return out + 0.5 if kwargs.get("start") is not None else out

    monkeypatch.setattr(resume_module, "residual_at", drifting)


def test_test_stage_falls_back_when_resuming_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = make_adapter("llama")
    reference = _evaluate(adapter, tmp_path / "reference.jsonl", reuse=False)
    break_resume(monkeypatch)
    with pytest.warns(UserWarning, match="independently"):
        got = _evaluate(adapter, tmp_path / "fallback.jsonl")
    assert got.keys() == reference.keys()
    assert all(got[k]["pred"] == reference[k]["pred"] for k in got)


def test_accelerators_score_whole_rows_with_the_same_logits(
    tiny_llama: ModelAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``shares_prefix`` says no (accelerators), no prefix is run and the letter logits stay the
    same as with the shared head."""
    import rolevec.evaluation.scoring as scoring

    assert scoring.shares_prefix(torch.device("cpu"))
    assert not scoring.shares_prefix(torch.device("cuda"))
    shared = score(tiny_llama, items(9), batch_size=4)
    runs: list[int] = []
    monkeypatch.setattr(scoring, "prefix_kv", counted(scoring.prefix_kv, runs))
    monkeypatch.setattr(scoring, "shares_prefix", lambda device: False)
    whole = score(tiny_llama, items(9), batch_size=4)
    assert runs == []
    assert [r.pred for r in whole] == [r.pred for r in shared]
    for a, b in zip(whole, shared, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logits, b.logits, strict=True)) <= 1e-4
    monkeypatch.setattr(scoring, "shares_prefix", lambda device: True)
    score(tiny_llama, items(9), batch_size=4)
    assert len(runs) == 1  # the CPU policy: one head for the run


def test_letters_that_are_not_single_tokens_name_the_item_or_are_skipped(tmp_path: Path) -> None:
    """After "Answer:" the tiny tokenizer has " A".." D" as single tokens but not " E": a five-choice item
    is one error naming the source and item, and with skip_bad it is left out and listed."""
    adapter = make_adapter("llama")
    four = [MCQItem(f"x/{i}", "x", f"Q{i}?", ("a", "b", "c", "d"), "A", "s") for i in range(6)]
    five = [MCQItem(f"x/{i}", "x", f"Q{i}?", ("a", "b", "c", "d", "e"), "E", "s") for i in range(6, 8)]
    mcq = MCQSet({"x": four + five}, "test:letters")
    split = make_split(mcq, seed=0, val_fraction=0.25)
    fmt = PromptFormat(answer_prefix="Answer:")
    with RecordStore(tmp_path / "a.jsonl") as store, pytest.raises(RolevecError) as err:
        evaluate_conditions(
            adapter,
            mcq,
            split,
            [Condition("baseline")],
            store,
            split_name="all",
            prompt_format=fmt,
            progress=False,
        )
    message = str(err.value)
    assert message.startswith("test:letters item x/") and "'E' is not a single token" in message
    assert "`skip_bad`" in message
    with RecordStore(tmp_path / "b.jsonl") as store:
        report = evaluate_conditions(
            adapter,
            mcq,
            split,
            [Condition("baseline")],
            store,
            split_name="all",
            prompt_format=fmt,
            progress=False,
            skip_bad=True,
        )
    assert sorted(report.skipped) == ["x/6", "x/7"] and report.n_new == 6
    assert {r["qid"] for r in read_records(tmp_path / "b.jsonl")} == {it.qid for it in four}
