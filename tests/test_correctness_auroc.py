"""The correctness AUROC of a role direction's last-token projection (rolevec.analysis.correctness) and its
run-folder wrapper (rolevec.study.correctness).

Expected projections come from a hooked forward of the letter scorer's own token ids, one question at a
time: the residual read is the one at the token whose logits give the answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rolevec.analysis.correctness import (
    _summary,
    correctness_auroc,
    direction_aurocs,
    last_token_projections,
    random_unit_directions,
)
from rolevec.data.mcq import MCQItem
from rolevec.errors import RolevecError
from rolevec.evaluation.conditions import Condition, evaluate_conditions, score
from rolevec.evaluation.scoring import PromptFormat, prepare
from rolevec.evaluation.selection import Choice, write_selection
from rolevec.model.hooks import count_hooks, hooked, input_hook
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from rolevec.study.correctness import correctness_auroc_from_run
from rolevec.study.stages import load_questions, open_records
from test_evaluation import vectors_for

FMT = PromptFormat()


def questions(n: int, domain: str = "math") -> list[MCQItem]:
    """Questions of different lengths and answers, short enough for the tiny models' context."""
    return [
        MCQItem(
            f"{domain}/{i}",
            domain,
            f"Question {i}: which is prime?" + " Think." * (i % 5),
            ("4", "6", "7", "9"),
            "ABCD"[i % 4],
            "s",
        )
        for i in range(n)
    ]


def scorer_token_residual(
    adapter: ModelAdapter, item: MCQItem, layer: int, add: tuple[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """The residual at the input of ``layer`` at the last of the letter scorer's ids, by a hooked forward;
    ``add`` = (layer, vector) adds the vector at that block's input, by hand."""
    (prepared,), _ = prepare(adapter, [item], FMT)
    seen: list[torch.Tensor] = []

    def grab(hidden: torch.Tensor) -> None:
        seen.append(hidden[0, -1].detach().double().clone())

    pre = [(adapter.residual_site(layer), input_hook(grab))]
    if add is not None:
        at, vec = add
        pre.insert(0, (adapter.residual_site(at), input_hook(lambda h: h + vec.to(h.dtype))))
    ids = torch.tensor([prepared.ids])
    with torch.no_grad(), hooked(pre=pre):
        adapter.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return seen[0]


# --- the AUROC and the null ----------------------------------------------------------------------------


def test_auroc_equals_the_share_of_pairs_won_with_ties_half() -> None:
    # correct: 0.4, 0.8, 0.4; wrong: 0.1, 0.4, 0.2. Pairs won: 0.4 -> 2 + tie, 0.8 -> 3, 0.4 -> 2 + tie: 8/9
    scores = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.4, 0.2])
    correct = [False, True, False, True, True, False]
    table = torch.stack([scores, -scores, torch.ones(6)], dim=1)
    got = direction_aurocs(table, correct)
    assert got[0] == pytest.approx(8 / 9, abs=1e-15)
    assert got[1] == pytest.approx(1 / 9, abs=1e-15)  # the flipped sign predicts the other way
    assert got[2] == 0.5  # all ties
    # by brute force over every pair, as a second hand
    pos = [s for s, c in zip(scores.tolist(), correct, strict=True) if c]
    neg = [s for s, c in zip(scores.tolist(), correct, strict=True) if not c]
    brute = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert got[0] == pytest.approx(brute, abs=1e-15)


def test_the_p_value_is_two_sided_and_counts_random_directions_at_least_as_far_from_half() -> None:
    labels = torch.tensor([True, False, True])
    null = [0.5, 0.3, 0.75, 0.1, 0.55]  # distances 0, .2, .25, .4, .05
    high = _summary("unsteered", 3, labels, [0.8, *null], seed=0)  # distance .3: only 0.1 reaches it
    low = _summary("unsteered", 3, labels, [0.2, *null], seed=0)
    assert (high.exceeded_by, high.p_value) == (1, 2 / 6)
    assert (low.exceeded_by, low.p_value) == (1, 2 / 6)  # either sign of prediction counts
    tie = _summary("unsteered", 3, labels, [0.25, *null], seed=0)  # distance .25 = 0.75's: counted
    assert tie.exceeded_by == 2
    assert high.random_mean == pytest.approx(sum(null) / 5)
    assert high.random_sd == pytest.approx(float(torch.tensor(null, dtype=torch.float64).std()))
    assert high.random_quantiles["50"] == pytest.approx(0.5)
    assert (high.n, high.n_correct, high.n_random) == (3, 2, 5)


def test_random_directions_are_unit_and_reproducible_by_seed() -> None:
    a = random_unit_directions(32, 8, seed=3)
    assert torch.equal(a, random_unit_directions(32, 8, seed=3))
    assert not torch.allclose(a, random_unit_directions(32, 8, seed=4))
    assert torch.allclose(a.double().norm(dim=1), torch.ones(8, dtype=torch.float64), atol=1e-6)
    assert torch.equal(random_unit_directions(32, 3, seed=3), a[:3])  # a larger null extends a smaller one
    with pytest.raises(RolevecError, match="n_random"):
        random_unit_directions(32, 0)


def test_a_planted_direction_scores_one_and_isotropic_random_directions_half() -> None:
    """Correctness is the sign of one known direction of isotropic activations: that direction's AUROC
    is 1 and random directions' AUROCs scatter around 0.5."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(600, 64, generator=gen, dtype=torch.float64)
    planted = random_unit_directions(64, 1, seed=99).double()[0]
    correct = (acts @ planted > 0).tolist()
    dirs = torch.cat([planted[None], random_unit_directions(64, 32, seed=0).double()])
    got = direction_aurocs(acts @ dirs.T, correct)
    result = _summary("unsteered", 0, torch.tensor(correct), got, seed=0)
    assert result.role_auroc == 1.0
    assert abs(result.random_mean - 0.5) < 0.05
    assert max(abs(a - 0.5) for a in result.random_aurocs) < 0.35
    assert result.p_value == 1 / 33


def test_one_sided_labels_and_mismatched_counts_are_refused() -> None:
    with pytest.raises(RolevecError, match="answered wrongly"):
        direction_aurocs(torch.zeros(3, 2), [False, False, False])
    with pytest.raises(RolevecError, match="2 correctness labels for 3"):
        direction_aurocs(torch.zeros(3, 2), [True, False])


# --- projections on a tiny llama ------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_projections_equal_a_hooked_forward_at_the_scorers_last_token(layer: int) -> None:
    adapter = make_adapter("llama")
    items = questions(7)
    dirs = random_unit_directions(adapter.hidden_size, 4, seed=1)
    got = last_token_projections(adapter, items, FMT, dirs, layer, batch_size=3)
    for i, item in enumerate(items):
        want = scorer_token_residual(adapter, item, layer) @ dirs.double().T
        assert torch.allclose(got[i], want, rtol=1e-4, atol=1e-4), item.qid
    assert len(set(got[:, 0].tolist())) == len(items)  # the questions really differ at that token
    assert count_hooks(adapter.model) == 0


def test_the_steered_reading_at_the_site_is_the_unsteered_one_plus_the_addition() -> None:
    """At the addition's own layer every direction's score moves by exactly α·v·d̂ (the blocks below are
    untouched); one layer up the scores equal a forward with the vector added by hand, and the move is no
    longer α·v·d̂ (nor the same for every question)."""
    adapter = make_adapter("llama")
    items = questions(6)
    layer, alpha = 1, 2.5
    vectors = vectors_for(adapter)
    v = vectors.vector("mathematician", layer, -1)
    steering = Condition.make("add", role="mathematician", layer=layer, position=-1, alpha=alpha).steering(
        vectors
    )
    assert steering is not None
    dirs = random_unit_directions(adapter.hidden_size, 5, seed=2)
    plain = last_token_projections(adapter, items, FMT, dirs, layer)
    steered = last_token_projections(adapter, items, FMT, dirs, layer, steering=steering)
    shift = alpha * (v.double() @ dirs.double().T)
    assert (shift.abs() > 1e-2).all() and len(set(shift.tolist())) == 5  # a real, direction-specific move
    assert torch.allclose(steered - plain, shift.expand_as(plain), rtol=1e-4, atol=1e-4)

    above_plain = last_token_projections(adapter, items, FMT, dirs, layer + 1)
    above = last_token_projections(adapter, items, FMT, dirs, layer + 1, steering=steering)
    for i, item in enumerate(items):
        want = scorer_token_residual(adapter, item, layer + 1, add=(layer, alpha * v)) @ dirs.double().T
        assert torch.allclose(above[i], want, rtol=1e-4, atol=1e-4), item.qid
    moved = above - above_plain  # through block `layer`: no longer the bare α·v·d̂
    assert (moved - shift).abs().max() > 1e-2 and moved.std(dim=0).max() > 1e-4
    assert count_hooks(adapter.model) == 0


def test_a_direction_that_decides_correctness_on_the_model_scores_one() -> None:
    """Labels planted from the model's own projection on a direction: that direction's AUROC is 1, and the
    null is reproducible by seed. (The random AUROCs are not near 0.5 here: a tiny model's last-token
    residual varies in few dimensions, so random directions share the planted one's ordering; the isotropic
    case above checks the null's centre. That is why the role is set against random directions, not 0.5.)"""
    adapter = make_adapter("llama")
    items = questions(24)
    planted = random_unit_directions(adapter.hidden_size, 1, seed=7)[0] * 3.0  # norm does not matter
    scores = last_token_projections(adapter, items, FMT, planted, 2)[:, 0]
    correct = (scores > scores.median()).tolist()
    result = correctness_auroc(adapter, items, correct, planted, 2, prompt_format=FMT, n_random=16, seed=5)
    assert result.role_auroc == 1.0 and result.n_correct == 12
    assert result.reading == "unsteered" and result.layer == 2 and result.n_random == 16
    flipped = correctness_auroc(
        adapter, items, [not c for c in correct], planted, 2, prompt_format=FMT, n_random=16, seed=5
    )
    assert flipped.role_auroc == 0.0 and flipped.p_value == result.p_value  # two-sided
    again = correctness_auroc(adapter, items, correct, planted, 2, prompt_format=FMT, n_random=16, seed=5)
    assert again.random_aurocs == result.random_aurocs  # reproducible by seed
    other = correctness_auroc(adapter, items, correct, planted, 2, prompt_format=FMT, n_random=16, seed=6)
    assert other.random_aurocs != result.random_aurocs


def test_an_answer_prefix_and_a_zero_vector_are_refused() -> None:
    adapter = make_adapter("llama")
    items = questions(4)
    correct = [True, False, True, False]
    v = torch.ones(adapter.hidden_size)
    with pytest.raises(RolevecError, match="answer prefix"):
        correctness_auroc(adapter, items, correct, v, 1, prompt_format=PromptFormat(answer_prefix="The"))
    with pytest.raises(RolevecError, match="zero"):
        correctness_auroc(adapter, items, correct, torch.zeros(adapter.hidden_size), 1, prompt_format=FMT)


# --- a run folder ---------------------------------------------------------------------------------------


def make_run(adapter: ModelAdapter, root: Path) -> Path:
    """A run folder as `rolevec run` leaves it: questions from a folder source, a selection, records."""
    source = root / "mcq"
    source.mkdir()
    rows = [
        {"question": it.question, "choices": list(it.choices), "answer": it.answer, "subject": it.subject}
        for it in questions(40)
    ]
    (source / "math.json").write_text(json.dumps(rows))
    run = root / "run"
    run.mkdir()
    q = load_questions(adapter, run, ["math"], source=source, val_fraction=0.25)
    vectors = vectors_for(adapter)
    vectors.save(run / "vectors.safetensors")
    choice = Choice("mathematician", "math", 2, -1, 3.0, 0.5, 0.4, None, True, 1)
    write_selection(run / "selection.json", adapter, split_seed=0, layers=(1, 3), choices=[choice])
    conditions = [
        Condition("baseline"),
        Condition.make("add", role="mathematician", layer=2, position=-1, alpha=1.0),
        Condition.make("add", role="mathematician", layer=2, position=-1, alpha=3.0),
    ]
    with open_records(run) as store:
        evaluate_conditions(
            adapter, q.mcq, q.split, conditions, store, vectors=vectors, domains=["math"], progress=False
        )
    return run


def test_from_run_reads_the_site_records_and_questions_of_the_folder(tmp_path: Path) -> None:
    adapter = make_adapter("llama")
    run = make_run(adapter, tmp_path)
    got = correctness_auroc_from_run(run, adapter, "mathematician", n_random=8, seed=1)
    assert (got.domain, got.layer, got.position, got.alpha) == ("math", 2, -1, 3.0)

    q = load_questions(adapter, run, ["math"], source=tmp_path / "mcq", val_fraction=0.25)
    items = q.split.select(q.mcq, "math", "test")
    vectors = vectors_for(adapter)
    v = vectors.vector("mathematician", 2, -1)
    base = [r.correct for r in score(adapter, items, "baseline")]
    add = Condition.make("add", role="mathematician", layer=2, position=-1, alpha=3.0)
    added = [r.correct for r in score(adapter, items, add, vectors=vectors)]
    assert base != added  # the two readings really have different labels
    want = correctness_auroc(adapter, items, base, v, 2, prompt_format=FMT, n_random=8, seed=1)
    want_steered = correctness_auroc(
        adapter, items, added, v, 2, prompt_format=FMT, steering=add.steering(vectors), n_random=8, seed=1
    )
    assert got.unsteered == want
    assert got.steered == want_steered
    assert got.steered.reading == "steered" and got.steered.n_correct == sum(added)
    at_one = correctness_auroc_from_run(run, adapter, "mathematician", alpha=1.0, n_random=8, seed=1)
    assert at_one.alpha == 1.0 and at_one.unsteered == want
    assert json.loads(json.dumps(got.to_json()))["steered"]["n_random"] == 8


def test_from_run_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    adapter = make_adapter("llama")
    run = make_run(adapter, tmp_path)
    with pytest.raises(RolevecError, match="no site for role 'lawyer'"):
        correctness_auroc_from_run(run, adapter, "lawyer")
    with pytest.raises(RolevecError, match=r"no add \(α=2"):
        correctness_auroc_from_run(run, adapter, "mathematician", alpha=2.0)
    (run / "split.json").unlink()
    with pytest.raises(RolevecError, match=r"split\.json does not exist"):
        correctness_auroc_from_run(run, adapter, "mathematician")


# --- the embedded model on real questions -----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:.*repeats questions")
def test_embedded_model_on_real_mmlu_questions(embedded: ModelAdapter, paper_data: Path) -> None:
    from rolevec.data.mcq import load_mcq
    from rolevec.data.sources import load_base, load_role_prompts, sample
    from rolevec.vectors.extraction import extract_role_vectors

    items = load_mcq(paper_data / "mmlu_domains", ["medicine"]).items["medicine"][:12]
    role = sample(load_role_prompts("doctor", paper_data / "roles"), 4, 42)
    base = sample(load_base(paper_data / "base" / "alpaca_train.json"), 4, 42)
    vectors = extract_role_vectors(embedded, {"doctor": role}, base, progress=False)
    layer = 15
    v = vectors.vector("doctor", layer, -1)
    correct = [r.correct for r in score(embedded, items, "baseline")]
    assert 0 < sum(correct) < len(items)
    result = correctness_auroc(embedded, items, correct, v, layer, prompt_format=FMT, n_random=8)
    assert (result.n, result.n_correct, result.n_random) == (12, sum(correct), 8)
    # the role's score is the scorer-token residual on the unit vector, checked on two questions
    unit = (v.double() / v.double().norm())[None]
    got = last_token_projections(embedded, items[:2], FMT, unit, layer)[:, 0]
    for i in range(2):
        want = float(scorer_token_residual(embedded, items[i], layer) @ unit[0])
        assert got[i].item() == pytest.approx(want, rel=1e-3, abs=1e-3)
    assert 0.0 <= result.role_auroc <= 1.0 and 0.0 < result.p_value <= 1.0
