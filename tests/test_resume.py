from __future__ import annotations

from typing import Any

import torch

from rolevec.evaluation.conditions import Condition, score
from rolevec.evaluation.scoring import (
    ItemResult,
    LetterScorer,
    cache_batches,
    cache_groups,
    prepare,
    score_additions,
)
from rolevec.model.hooks import count_hooks
from rolevec.model.testing import make_adapter
from rolevec.steering.interventions import Steering
from test_evaluation import items, vectors_for


def test_cache_groups_stay_within_half_the_bound() -> None:
    widths = [(4, 10), (4, 9), (2, 30), (1, 100)]
    assert cache_groups(widths, 1, 200) == [[0, 1], [2], [3]]  # 40 + 36 <= 100; 60 alone; 100 alone
    assert cache_groups(widths, 1, 10) == [[0], [1], [2], [3]]  # nothing fits: one batch per group
    assert cache_groups(widths, 1, 10_000) == [[0, 1, 2, 3]]


def _run(
    adapter: Any, bound: int, batch_size: int = 3
) -> tuple[dict[Any, dict[str, ItemResult]], dict[str, int]]:
    vecs = vectors_for(adapter, ("r",))
    prepared, _ = prepare(adapter, items(11))
    qids = {p.item.qid for p in prepared}
    todo = {
        (layer, p, a): (Steering.addition(vecs.vector("r", layer, p), layer=layer, alpha=a), set(qids))
        for layer in (1, 2)
        for p in (-1, -2)
        for a in (1.0, 3.0)
    }
    got: dict[Any, dict[str, ItemResult]] = {}

    def emit(key: Any, results: list[ItemResult]) -> None:
        got.setdefault(key, {}).update((r.qid, r) for r in results)

    stats = score_additions(
        adapter, prepared, todo, LetterScorer(adapter), emit, batch_size=batch_size, max_cache_bytes=bound
    )
    return got, stats


def test_layer_major_additions_match_hooked_runs_and_share_the_prefix() -> None:
    """Several question batches cached together: the candidates' prefix runs once per layer, not once per
    batch and forward, and every candidate's letter logits match the same addition done by hooks."""
    adapter = make_adapter("llama")
    got, stats = _run(adapter, bound=2**30)
    assert stats["cache_groups"] == 1 and stats["prefix_runs"] == 2  # two layers
    n_batches = len(cache_batches(prepare(adapter, items(11))[0], 3, adapter.hidden_size * 4, 2**30))
    assert n_batches >= 3 and stats["forwards"] == 8 * n_batches  # 3-row batches: one candidate a forward
    vecs = vectors_for(adapter, ("r",))
    for (layer, p, a), results in got.items():
        cond = Condition.make("add", role="r", layer=layer, position=p, alpha=a)
        want = score(adapter, items(11), cond, vectors=vecs, scorer=LetterScorer(adapter, share_prefix=False))
        assert len(results) == 11
        for w in want:
            torch.testing.assert_close(
                torch.tensor(results[w.qid].logits), torch.tensor(w.logits), rtol=0, atol=1e-4
            )
    assert count_hooks(adapter.model) == 0


def test_a_small_bound_caches_less_and_gives_the_same_results() -> None:
    adapter = make_adapter("llama")
    roomy, _ = _run(adapter, bound=2**30)
    width = max(len(p.ids) for p in prepare(adapter, items(11))[0])
    bound = 2 * 3 * width * adapter.hidden_size * 4  # one 3-question batch per half
    tight, stats = _run(adapter, bound=bound)
    assert stats["cache_groups"] >= 4
    assert stats["largest_cache_bytes"] <= bound
    for key, results in roomy.items():
        for qid, r in results.items():
            assert tight[key][qid].pred == r.pred
            torch.testing.assert_close(
                torch.tensor(tight[key][qid].logits), torch.tensor(r.logits), rtol=0, atol=1e-5
            )
