"""Additions scored from a shared mid-stack residual: the lower layers run once for many candidates.

Adding a vector at the input of layer l leaves every layer below l unchanged. So per batch of questions
the unsteered residual is advanced block by block through the candidates' sorted layers (only the current
layer's input is kept), and each candidate runs only the blocks from l up: blocks below are skipped and
``cached + α·v`` is put in place at the input of l. Candidates at one layer share a forward, stacked along
the batch (rows = questions × candidates), up to a row and a memory bound.

The validation sweep uses this for every addition candidate of a role's grid; evaluation uses it for the
test stage's additions and random controls, across roles (roles that chose the same layer share even the
blocks up to it). :func:`check_resume` compares the resumed path with full hooked forwards on one small
batch first; callers fall back to independent runs where it fails.

Entry points::

    Steering.shift(like)                                # α·v exactly as Steering.apply forms it
    residual_at(adapter, batch, layer, start=None, prefix=None) -> Tensor
    check_resume(adapter, prepared, checkpoints, candidate, scorer) -> (ok, error)
    score_additions(adapter, prepared, todo, scorer, emit=..., batch_size=16) # todo: {key: (Steering, qids)}
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from .errors import RolevecError
from .evaluation import (
    BATCH_OVERHEAD_TOKENS,
    ItemResult,
    LetterScorer,
    Prepared,
    Resume,
    _batch,
    _tolerance,
    batch_overhead_tokens,
    plan_batches,
    results_from_logits,
    state_tolerance,
)
from .hooks import StopForward, hooked, input_hook, skipped
from .interventions import Steering
from .model import Batch, ModelAdapter
from .prefix import PrefixKV, PrefixMemo, PrefixSplit, forward_kwargs, prefix_kv

DEFAULT_MAX_CACHE_BYTES = 512 * 1024**2

K = TypeVar("K", bound=Hashable)


def residual_at(
    adapter: ModelAdapter,
    batch: Batch,
    layer: int,
    start: tuple[int, torch.Tensor] | None = None,
    prefix: PrefixKV | None = None,
) -> torch.Tensor:
    """The residual at the input of ``layer``; from ``start=(l0, x0)`` only blocks l0..layer-1 run.

    For a batch split after its common prefix, ``prefix`` holds the prefix's (unsteered) states and the
    residual covers the remaining columns only.
    """
    if start is not None and start[0] == layer:
        return start[1]
    grabbed: dict[str, torch.Tensor] = {}

    def grab(x: torch.Tensor) -> None:
        grabbed["x"] = x
        raise StopForward

    pre: list[Any] = []
    skip: Any = nullcontext()
    if start is not None:
        l0, x0 = start
        if l0 > layer:
            raise RolevecError(f"cannot advance the residual from layer {l0} down to {layer}")
        skip = skipped(list(adapter.blocks[:l0]))
        pre.append((adapter.residual_site(l0), input_hook(lambda x: x0)))
    pre.append((adapter.residual_site(layer), input_hook(grab)))
    kwargs = forward_kwargs(adapter, batch, prefix)
    with torch.inference_mode(), skip, hooked(pre=pre), suppress(StopForward):
        adapter.model(**kwargs)
    if "x" not in grabbed:
        raise RolevecError(f"the forward never reached layer {layer}; the architecture map is wrong")
    return grabbed["x"]


def stack_rows(batch: Batch, copies: int) -> Batch:
    """``copies`` copies of the batch one after the other (group-major), one per candidate."""
    if copies == 1:
        return batch
    return replace(
        batch,
        input_ids=batch.input_ids.repeat(copies, 1),
        attention_mask=batch.attention_mask.repeat(copies, 1),
        position_ids=batch.position_ids.repeat(copies, 1),
        lengths=batch.lengths.repeat(copies),
    )


@dataclass(frozen=True)
class Work:
    """One question batch as it is resumed: split after the common prefix where the scorer shares it."""

    batch: Batch  # the suffix when split
    split: PrefixSplit | None
    base: PrefixKV | None  # the prefix's unsteered states

    @staticmethod
    def of(batch: Batch, scorer: LetterScorer, memo: PrefixMemo | None = None) -> Work:
        split = scorer.split(batch, memo)  # unsteered: no hooks are active here
        if split is None:
            return Work(batch, None, None)
        return Work(split[0].suffix, *split)

    @property
    def offset(self) -> int:
        return self.batch.prefix_length

    def resume(
        self,
        adapter: ModelAdapter,
        layer: int,
        shifts: list[torch.Tensor],
        x: torch.Tensor,
        prefix: PrefixKV | None = None,
    ) -> Resume:
        """Candidates ``shifts`` at ``layer`` stacked along the batch, from the unsteered residual ``x``;
        ``prefix``: their prefix states where already computed (one group per shift)."""
        stacked = torch.cat([x + s.to(x.dtype) for s in shifts])
        if self.split is not None and prefix is None:
            prefix = prefix_kv(adapter, self.split, shift=(layer, torch.stack(shifts)))
        return Resume(layer, stacked, prefix if self.split is not None else None)


def check_resume(
    adapter: ModelAdapter,
    prepared: Sequence[Prepared],
    checkpoints: Sequence[int],
    candidate: Steering,
    scorer: LetterScorer,
) -> tuple[bool, float]:
    """Does resuming mid-stack reproduce full forwards here? One small batch of questions.

    The residual is advanced through ``checkpoints`` as a resumed run advances it (with the prefix shared
    when the scorer shares it) and compared with a plain forward there; then ``candidate`` (its layer one
    of the checkpoints) resumed there is compared with the same addition done by hooks on whole rows. The
    verdict is kept on the scorer, so one check serves every later run with it over the same layers.
    """
    points = sorted(set(checkpoints))
    if candidate.layer not in points:
        raise RolevecError(f"the checked candidate's layer {candidate.layer} is not among {points}")
    key = (tuple(points), scorer.share_prefix)
    if key in scorer.resume_checks:
        return scorer.resume_checks[key]
    batch, letter_ids = _batch(adapter, list(prepared[:4]))
    scorer.letter_logits(batch, letter_ids)  # the scorer's own probes first: its fast path is the reference
    full: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def fn(x: torch.Tensor) -> None:
            full[layer] = x.detach().clone()

        return fn

    pre = [(adapter.residual_site(layer), input_hook(keep(layer))) for layer in points]
    with torch.inference_mode(), hooked(pre=pre):
        adapter.model(**batch.model_kwargs(), use_cache=False)
    atol, rtol = _tolerance(adapter.dtype)
    work = Work.of(batch, scorer)
    worst = 0.0
    advanced: dict[int, torch.Tensor] = {}
    prev: tuple[int, torch.Tensor] | None = None
    for layer in points:
        x = advanced[layer] = residual_at(adapter, work.batch, layer, start=prev, prefix=work.base)
        prev = (layer, x)
        # Relative to the whole state, not element by element: half precision moves single large
        # activations by a few units whenever the batch shape changes; a wrong resume moves everything.
        ref = full[layer][:, work.offset :].float()
        worst = max(worst, float((x.float() - ref).norm() / ref.norm().clamp(min=1e-12)))
    x_at = advanced[candidate.layer]
    start = work.resume(adapter, candidate.layer, [candidate.shift(x_at)], x_at)
    resumed = scorer.letter_logits(work.batch, letter_ids, start=start)
    # The reference is the same addition by hooks on whole rows, scored by the fast path (which the
    # scorer's own probe checks against model(...).logits): full logits in half precision are rounded to
    # steps of up to 0.25, coarser than any tolerance that would still catch a wrong resume.
    with candidate.apply(adapter):
        independent = scorer.fast(batch, letter_ids, share=False)
    logit_err = float((resumed - independent).abs().max())
    ok = worst <= state_tolerance(adapter.dtype, adapter.n_layers)
    ok = ok and torch.allclose(resumed, independent, atol=atol, rtol=rtol)
    scorer.resume_checks[key] = (ok, max(worst, logit_err))
    return scorer.resume_checks[key]


def cache_batches(
    prepared: Sequence[Prepared],
    batch_size: int,
    bytes_per_token: int,
    max_cache_bytes: int,
    *,
    overhead_tokens: int = BATCH_OVERHEAD_TOKENS,
) -> list[list[int]]:
    """Length-sorted question batches whose cached residual takes at most half of ``max_cache_bytes``.

    The other half is for the stacked candidate copies. A single question too long for the bound still
    forms a batch of one (nothing smaller is possible).
    """
    return plan_batches(
        [len(p.ids) for p in prepared],
        batch_size,
        max_tokens=max_cache_bytes // (2 * bytes_per_token),
        overhead_tokens=overhead_tokens,
    )


def cache_groups(
    widths: Sequence[tuple[int, int]], bytes_per_token: int, max_cache_bytes: int
) -> list[list[int]]:
    """Consecutive batches (given as ``(rows, width)``) whose residuals are cached together: at most half
    of ``max_cache_bytes`` in all, or one batch alone."""
    groups: list[list[int]] = []
    used = 0
    for i, (rows, width) in enumerate(widths):
        size = rows * width * bytes_per_token
        if groups and used + size <= max_cache_bytes // 2:
            groups[-1].append(i)
            used += size
        else:
            groups.append([i])
            used = size
    return groups


@dataclass
class _Cached:
    """One question batch of a cache group, its residual advanced as far as ``layer``."""

    chunk: list[Prepared]
    work: Work
    letter_ids: torch.Tensor
    copies: int
    x: torch.Tensor | None = None
    layer: int = -1

    def advance(self, adapter: ModelAdapter, layer: int) -> torch.Tensor:
        start = (self.layer, self.x) if self.x is not None else None
        self.x = residual_at(adapter, self.work.batch, layer, start=start, prefix=self.work.base)
        self.layer = layer
        return self.x


def score_additions(
    adapter: ModelAdapter,
    prepared: Sequence[Prepared],
    todo: Mapping[K, tuple[Steering, set[str]]],
    scorer: LetterScorer,
    emit: Callable[[K, list[ItemResult]], None],
    *,
    batch_size: int = 16,
    max_rows: int | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
) -> dict[str, int]:
    """Score each candidate on its pending questions (``todo[key] = (addition, qids)``) from the shared
    unsteered residual, calling ``emit(key, results)`` per batch and candidate. No hooks may be active.
    Returns counts: forwards, prefix runs, cache groups, and the most bytes of residual held at once
    (the group's cached residuals plus one forward's stacked copies).

    Layer by layer over a group of question batches: the residuals of the whole group are cached, and the
    shared prefix runs once per layer for all of that layer's candidates (a one-row prefix per candidate
    and batch was a sixth of a bfloat16 sweep). ``max_rows`` bounds rows per forward when candidates are
    stacked (default ``batch_size``); ``max_cache_bytes`` bounds the group's cached residuals plus the
    stacked copies of one forward.
    """
    max_rows = max_rows or batch_size
    itemsize = torch.empty((), dtype=adapter.dtype).element_size()
    per_token = adapter.hidden_size * itemsize
    memo = PrefixMemo([p.ids for p in prepared])
    wanted = {q for _, pending in todo.values() for q in pending}
    batches = [
        [prepared[i] for i in idx]
        for idx in cache_batches(
            prepared,
            batch_size,
            per_token,
            max_cache_bytes,
            overhead_tokens=batch_overhead_tokens(adapter.device),
        )
        if any(prepared[i].item.qid in wanted for i in idx)
    ]
    widths = [(len(chunk), max(len(p.ids) for p in chunk)) for chunk in batches]
    stats = {"forwards": 0, "prefix_runs": 0, "cache_groups": 0, "largest_cache_bytes": 0}
    for group in cache_groups(widths, per_token, max_cache_bytes):
        stats["cache_groups"] += 1
        held = 0  # bytes of the group's cached residuals
        cached: list[_Cached] = []
        for g in group:
            chunk = batches[g]
            batch, letter_ids = _batch(adapter, chunk)
            rows_q, width = widths[g]
            by_mem = max(1, max_cache_bytes // max(1, 2 * rows_q * width * per_token))  # the other half
            copies = max(1, min(max_rows // rows_q, by_mem))
            cached.append(_Cached(chunk, Work.of(batch, scorer, memo), letter_ids, copies))
        qids = [{p.item.qid for p in c.chunk} for c in cached]
        layers = sorted(
            {todo[key][0].layer for key, (_, pending) in todo.items() if any(q & pending for q in qids)}
        )
        for layer in layers:
            keys = [
                key
                for key, (a, pending) in todo.items()
                if a.layer == layer and any(q & pending for q in qids)
            ]
            index = {key: k for k, key in enumerate(keys)}
            steered: dict[tuple[int, ...], PrefixKV] = {}  # the layer's candidates' prefix, per head
            for c, q in zip(cached, qids, strict=True):
                here = [key for key in keys if q & todo[key][1]]
                if not here:
                    continue
                x = c.advance(adapter, layer)
                held = sum(int(o.x.numel()) * itemsize for o in cached if o.x is not None)
                for s in range(0, len(here), c.copies):
                    part_keys = here[s : s + c.copies]
                    shifts = [todo[key][0].shift(x) for key in part_keys]
                    prefix = None
                    if c.work.split is not None:
                        head = tuple(int(t) for t in c.work.split.prefix_ids.tolist())
                        if head not in steered:
                            all_shifts = torch.stack([todo[key][0].shift(x) for key in keys])
                            steered[head] = prefix_kv(adapter, c.work.split, shift=(layer, all_shifts))
                            stats["prefix_runs"] += 1
                        prefix = steered[head].select([index[key] for key in part_keys])
                    start = c.work.resume(adapter, layer, shifts, x, prefix=prefix)
                    stacked_bytes = int(start.residual.numel()) * itemsize
                    stats["largest_cache_bytes"] = max(stats["largest_cache_bytes"], held + stacked_bytes)
                    stats["forwards"] += 1
                    logits = scorer.letter_logits(
                        stack_rows(c.work.batch, len(part_keys)),
                        c.letter_ids.repeat(len(part_keys), 1),
                        start=start,
                    )
                    rows_q = len(c.chunk)
                    for g, key in enumerate(part_keys):
                        part = results_from_logits(
                            [p.item for p in c.chunk], logits[g * rows_q : (g + 1) * rows_q]
                        )
                        emit(key, [r for r in part if r.qid in todo[key][1]])
                    del logits, start
            del steered
    return stats
