from __future__ import annotations

import pytest
import torch

from rolevec.errors import RolevecError
from rolevec.evaluation.scoring import LetterScorer, _batch, iter_scores, prepare
from rolevec.model.hooks import count_hooks
from rolevec.model.loading import ModelAdapter
from rolevec.model.prefix import (
    PrefixKV,
    PrefixMemo,
    PrefixSplit,
    common_length,
    forward_kwargs,
    prefix_kv,
    split_prefix,
)
from test_evaluation import items


def test_split_keeps_a_token_per_row_and_the_mask_whole(tiny_llama: ModelAdapter) -> None:
    same = tiny_llama.pad([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10, 11]])
    parts = split_prefix(same, min_length=1)
    assert parts is not None and parts.length == 5  # the shorter row keeps its last token
    assert parts.suffix.input_ids.tolist() == [[10, tiny_llama.tokenizer.pad_token_id], [10, 11]]
    assert parts.suffix.attention_mask.shape == (2, 7)  # still covers the prefix columns
    assert parts.suffix.position_ids.tolist() == [[5, 5], [5, 6]]
    assert parts.suffix.last_index().tolist() == [0, 1]
    assert split_prefix(tiny_llama.pad([[1, 2, 3], [4, 5, 6]]), min_length=1) is None  # nothing shared
    assert split_prefix(tiny_llama.pad([[5, 6, 7, 8, 9]] * 2), min_length=5) is None  # too short to pay
    assert split_prefix(tiny_llama.pad([[5, 6, 7, 8, 9]]), min_length=1) is None  # one row: no gain
    assert split_prefix(tiny_llama.pad([[5, 6, 7, 8], [5, 6, 7, 9]], padding_side="left"), 1) is None


def test_split_batch_needs_its_prefix(tiny_llama: ModelAdapter) -> None:
    prepared, _ = prepare(tiny_llama, items(4))
    batch, _ = _batch(tiny_llama, prepared)
    parts = split_prefix(batch)
    assert parts is not None
    with pytest.raises(RolevecError, match="needs that prefix"):
        forward_kwargs(tiny_llama, parts.suffix)
    kv = prefix_kv(tiny_llama, parts, shift=(1, torch.zeros(3, tiny_llama.hidden_size)))
    assert kv.groups == 3 and kv.length == parts.length
    with pytest.raises(RolevecError, match="prefix group"):
        forward_kwargs(tiny_llama, parts.suffix, kv)  # 4 rows, 3 groups
    assert count_hooks(tiny_llama.model) == 0


def test_probe_drops_prefix_sharing_when_it_changes_logits(
    tiny_llama: ModelAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache that does not reproduce the prefix (simulated: its keys perturbed) is caught by the probe;
    the scorer goes on with full rows and the fast path."""
    import rolevec.evaluation.scoring as scoring

    real = scoring.prefix_kv

    def broken(adapter: ModelAdapter, split: object, shift: object = None) -> object:
        kv = real(adapter, split, shift)  # type: ignore[arg-type]
        layers = tuple((k + 1.0, v) for k, v in kv.layers)
        return type(kv)(layers, kv.length)

    monkeypatch.setattr(scoring, "prefix_kv", broken)
    prepared, _ = prepare(tiny_llama, items(4))
    batch, letter_ids = _batch(tiny_llama, prepared)
    scorer = LetterScorer(tiny_llama)
    with pytest.warns(UserWarning, match="common prefix"):
        out = scorer.letter_logits(batch, letter_ids)
    assert scorer.mode == "fast" and not scorer.share_prefix
    torch.testing.assert_close(out, scorer.naive(batch, letter_ids), rtol=0, atol=1e-4)


def test_probes_cover_whole_and_split_batches(tiny_llama: ModelAdapter) -> None:
    """A first batch of one long question has no prefix to share: the split path is probed later."""
    prepared, _ = prepare(tiny_llama, items(5))
    scorer = LetterScorer(tiny_llama)
    references: list[int] = []
    real = scorer.naive

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        references.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    scorer.naive = counting  # type: ignore[method-assign]
    single, ids1 = _batch(tiny_llama, prepared[:1])
    scorer.letter_logits(single, ids1)
    assert references == [1] and scorer._probe_prefix
    batch, ids = _batch(tiny_llama, prepared)
    scorer.letter_logits(batch, ids)
    assert references == [1, 1] and not scorer._probe_prefix
    scorer.letter_logits(batch, ids)
    scorer.letter_logits(single, ids1)
    assert references == [1, 1]  # each probe once


def test_common_length_and_cut_at() -> None:
    assert common_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_length([[1, 2, 3], [1, 2, 3, 4]]) == 3  # one row is a prefix of the other
    assert common_length([]) == 0


def test_split_cuts_at_the_run_head(tiny_llama: ModelAdapter) -> None:
    batch = tiny_llama.pad([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 10, 12]])
    longest = split_prefix(batch, min_length=1)
    assert longest is not None and longest.length == 6
    capped = split_prefix(batch, min_length=1, at=4)
    assert capped is not None and capped.length == 4 and capped.suffix.input_ids[:, 0].tolist() == [9, 9]
    assert split_prefix(batch, min_length=5, at=4) is None  # a cap below the minimum: not worth a forward


def test_memo_runs_the_head_once_per_run(tiny_llama: ModelAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch of a scoring run reuses the head computed for the first; the logits match full rows."""
    import rolevec.evaluation.scoring as scoring

    calls: list[int] = []
    real = scoring.prefix_kv

    def counting(adapter: ModelAdapter, split: PrefixSplit, shift: object = None) -> PrefixKV:
        calls.append(split.length)
        return real(adapter, split, shift)  # type: ignore[arg-type]

    monkeypatch.setattr(scoring, "prefix_kv", counting)
    prepared, _ = prepare(tiny_llama, items(12))
    scorer = LetterScorer(tiny_llama)
    got = [r for batch in iter_scores(tiny_llama, prepared, scorer=scorer, batch_size=3) for r in batch]
    head = common_length([p.ids for p in prepared])
    assert calls == [head]  # four batches, one prefix forward
    plain = LetterScorer(tiny_llama, share_prefix=False)
    want = [r for batch in iter_scores(tiny_llama, prepared, scorer=plain, batch_size=3) for r in batch]
    assert [r.qid for r in got] == [r.qid for r in want]
    torch.testing.assert_close(
        torch.tensor([r.logits for r in got]), torch.tensor([r.logits for r in want]), rtol=0, atol=1e-4
    )


def test_memo_entries_are_keyed_by_tokens_and_bounded(tiny_llama: ModelAdapter) -> None:
    memo = PrefixMemo(max_entries=2)
    assert memo.at is None  # no run given: each batch cuts at its own common head
    heads = ([5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7, 10])
    for head in (*heads, heads[2]):
        parts = memo.split(tiny_llama.pad([[*head, 1, 2], [*head, 3]]))
        assert parts is not None and parts.length == 4
        memo.states(tiny_llama, parts)
    assert memo.computed == 3 and len(memo._entries) == 2
