"""Continuation scoring: each choice's log-likelihood after the prompt, for tasks whose choices are texts.

lm-evaluation-harness scores a multiple-choice document by the summed log-probability of every choice's
tokens (``delimiter + choice``) after the context: ``acc`` takes the argmax of the sums, ``acc_norm`` of the
sums divided by each choice's length in characters. This module computes the same numbers with the
prompt's forward shared across the choices: the contexts of a batch of questions run once (keys and values
kept), then every choice's tokens run as one row attending to its question's cached context. A choice of
one token costs nothing beyond the context (its log-probability is read at the context's last position),
which is what letter-answer tasks scored this way need.

Pairs are tokenised as lm-eval does (``_encode_pair``): trailing whitespace of the context moves to the
continuation, the continuation's tokens are those of ``context + continuation`` after the context's. The
first batch is checked against plain full forwards of ``context + continuation``; on a mismatch the scorer
warns and scores full rows from then on.

Steering applies through the hooks active around the call (additions at all positions reach the choice
tokens too). Entry points::

    prepare_choices(adapter, items, prompt_format=None, system=None) -> tuple[list[Choices], bool]
    ContinuationScorer(adapter, probe=True).logliks(batch_of_choices) -> list[list[float]]
    iter_continuations(adapter, prepared, *, scorer=None, batch_size=16) -> Iterator[list[ItemResult]]
    score_continuation_additions(adapter, prepared, todo, scorer, emit, batch_size=16) -> bool

One-layer additions (the sweep's candidates, the test stage's additions and random controls) can run from
the unsteered residual at their layer instead (:meth:`ContinuationScorer.resumed`): the contexts and the
choice rows run once unsteered with the residual kept at the additions' layers; each addition then skips
the blocks below its layer, for the contexts and for the choices, whose cached keys and values below that
layer are the unsteered ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..data.mcq import MCQItem
from ..errors import RolevecError
from ..model.batching import batch_overhead_tokens, logit_tolerance, plan_batches
from ..model.hooks import StopForward, hooked, input_hook, output_hook, skipped
from ..model.loading import ModelAdapter
from ..steering.interventions import Steering
from .scoring import DEFAULT_MAX_CACHE_BYTES, ItemResult, PromptFormat, finish_logits, logit_postprocess

#: Rows of choice tokens per forward, as a multiple of the batch size in questions.
ROWS_PER_QUESTION = 4
#: Positions whose full-vocabulary log-probabilities are formed at once.
HEAD_CHUNK = 256


@dataclass(frozen=True)
class Choices:
    """A question's context tokens and each choice's continuation tokens, tokenised as lm-eval pairs."""

    item: MCQItem
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def lengths(self) -> tuple[int, ...]:
        """Each choice's length in characters (lm-eval's ``acc_norm`` divides by it)."""
        return tuple(len(c) for c in self.item.choices)


def encode_pair(adapter: ModelAdapter, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-eval's ``_encode_pair`` makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    special = adapter.chat.add_special_tokens

    def encode(text: str) -> list[int]:
        return [int(t) for t in adapter.tokenizer(text, add_special_tokens=special)["input_ids"]]

    whole = encode(context + continuation)
    head = encode(context)
    return head, whole[len(head) :]


def prepare_choices(
    adapter: ModelAdapter,
    items: Sequence[MCQItem],
    prompt_format: PromptFormat | None = None,
    system: str | None = None,
) -> tuple[list[Choices], bool]:
    """Tokenise every question's context and choices; also whether a system turn had to be folded."""
    fmt = prompt_format or PromptFormat()
    out: list[Choices] = []
    folded_any = False
    for item in items:
        text, folded = fmt.prompt(adapter, item, system)
        folded_any |= folded
        context: list[int] | None = None
        conts: list[tuple[int, ...]] = []
        for choice in item.choices:
            head, cont = encode_pair(adapter, text, item.delimiter + choice)
            if not cont:
                raise RolevecError(
                    f"item {item.qid}: choice {choice!r} adds no token after the prompt; give every choice "
                    "some text"
                )
            if context is not None and head != context:  # cannot happen: the context is encoded alone
                raise RolevecError(f"item {item.qid}: its context tokenises differently per choice")
            context = head
            conts.append(tuple(cont))
        if not context:
            raise RolevecError(f"item {item.qid}: the prompt has no tokens")
        out.append(Choices(item, tuple(context), tuple(conts)))
    return out, folded_any


class ContinuationScorer:
    """Summed log-likelihood of each choice's tokens after its question's context, context run once.

    Args:
        adapter: The model to score with.
        probe: Check the first batch against plain full forwards of context + choice (default ``True``).
        shared: Run each context once for all its choices (default ``True``); ``False`` runs every
            context + choice row whole (the reference).

    Example:
        ```python
        prepared, _ = prepare_choices(adapter, items)
        scorer = ContinuationScorer(adapter)
        sums = scorer.logliks(prepared[:8])  # one list of sums per question, one sum per choice
        ```
    """

    def __init__(self, adapter: ModelAdapter, *, probe: bool = True, shared: bool = True) -> None:
        self.adapter = adapter
        self.mode = "shared" if shared else "full"
        self._probe = probe and shared
        self.probe_error: float | None = None
        #: The first batch's difference between additions resumed mid-stack and done by hooks.
        self.resume_error: float | None = None
        self.scale, self.softcap = logit_postprocess(adapter.config)

    # --- the head: log-probabilities of given tokens at given positions ----------------------------
    def _log_probs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``log p(target)`` for each row of final-norm states ``hidden`` ``[N, H]`` (float32)."""
        unembed = self.adapter.unembed
        out = []
        for start in range(0, int(hidden.shape[0]), HEAD_CHUNK):
            logits = finish_logits(
                unembed(hidden[start : start + HEAD_CHUNK]).float(), self.scale, self.softcap
            )
            lp = torch.log_softmax(logits, dim=-1)
            t = targets[start : start + HEAD_CHUNK].to(lp.device)
            out.append(lp.gather(1, t.unsqueeze(1)).squeeze(1))
        return torch.cat(out).to(self.adapter.device) if out else torch.zeros(0)

    def _row_sums(
        self, rows: int, picks: list[torch.Tensor], targets: list[int], owner: list[int]
    ) -> list[float]:
        """Per row, the summed ``log p(target)`` of the states ``picks`` it owns (float64)."""
        lp = self._log_probs(torch.stack(picks).float(), torch.tensor(targets, dtype=torch.long))
        per_row = torch.zeros(rows, dtype=torch.float64)
        per_row.index_add_(0, torch.tensor(owner), lp.double().cpu())
        return [float(x) for x in per_row]

    def _final_states(
        self, kwargs: dict[str, Any], resume: tuple[int, torch.Tensor] | None = None, keep: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The final norm's output of one forward, and the residual at the input of each layer in ``keep``.

        ``resume=(layer, x)``: the blocks below ``layer`` are skipped and ``x`` is put in place at its input
        (an addition at ``layer`` leaves everything below it as it was)."""
        adapter = self.adapter
        grabbed: dict[str, torch.Tensor] = {}
        kept: dict[int, torch.Tensor] = {}

        def grab(x: torch.Tensor) -> None:
            grabbed["h"] = x
            raise StopForward

        def keeper(layer: int) -> Any:
            def fn(x: torch.Tensor) -> None:
                kept[layer] = x.detach().clone()

            return fn

        pre: list[Any] = [(adapter.residual_site(layer), input_hook(keeper(layer))) for layer in keep]
        skip: Any = nullcontext()
        if resume is not None:
            layer, x = resume
            skip = skipped(list(adapter.blocks[:layer]))
            pre.append((adapter.residual_site(layer), input_hook(lambda _: x)))
        with skip, hooked(pre=pre, post=[(adapter.final_norm, output_hook(grab))]), suppress(StopForward):
            adapter.model(**kwargs)
        if "h" not in grabbed:
            raise RolevecError("the forward never reached the final norm; the architecture map is wrong")
        return grabbed["h"], kept

    # --- the reference: every context + choice row whole -----------------------------------------
    def full(self, prepared: Sequence[Choices]) -> list[list[float]]:
        rows = [(q, c) for q, p in enumerate(prepared) for c in range(len(p.continuations))]
        sums: list[list[float]] = [[0.0] * len(p.continuations) for p in prepared]
        adapter = self.adapter
        for start in range(0, len(rows), max(1, ROWS_PER_QUESTION * 4)):
            part = rows[start : start + ROWS_PER_QUESTION * 4]
            seqs = [list(prepared[q].context) + list(prepared[q].continuations[c]) for q, c in part]
            batch = adapter.pad(seqs, padding_side="right")
            with torch.inference_mode():
                hidden, _ = self._final_states({**batch.model_kwargs(), "use_cache": False})
                picks, targets, owner = [], [], []
                for r, (q, c) in enumerate(part):
                    n_ctx, cont = len(prepared[q].context), prepared[q].continuations[c]
                    for j, token in enumerate(cont):
                        picks.append(hidden[r, n_ctx - 1 + j])
                        targets.append(token)
                        owner.append(r)
                per_row = self._row_sums(len(part), picks, targets, owner)
            for r, (q, c) in enumerate(part):
                sums[q][c] = per_row[r]
        return sums

    # --- the fast path: contexts once, choices against their cached context -----------------------
    def shared(self, prepared: Sequence[Choices]) -> list[list[float]]:
        """Each question's context runs once (under the hooks now active), its choices against it."""
        passes = _Passes(self, prepared)
        with torch.inference_mode():
            last, states, _ = passes.contexts()
            sums = passes.first_tokens(last)
            for chunk in passes.chunks:
                out, _ = passes.continuations(chunk, states)
                passes.add(sums, chunk, out)
        return sums

    def resumed(
        self,
        prepared: Sequence[Choices],
        steerings: Sequence[Steering],
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    ) -> list[list[list[float]]]:
        """The sums under each one-layer addition of ``steerings`` (no hooks may be active), from the
        unsteered residuals: each addition runs only the blocks from its layer up, for the contexts and for
        the choices. Returns one :meth:`shared`-like result per steering, in order.

        The unsteered residuals are kept for as many layers at once as ``max_cache_bytes`` allows; more
        layers take more unsteered passes."""
        passes = _Passes(self, prepared)
        itemsize = torch.empty((), dtype=self.adapter.dtype).element_size()
        tokens = passes.contexts_width * len(prepared) + sum(int(c.ids.numel()) for c in passes.chunks)
        per_layer = max(1, tokens * self.adapter.hidden_size * itemsize)
        layers = sorted({s.layer for s in steerings})
        group = max(1, max_cache_bytes // per_layer)
        out: list[list[list[float]] | None] = [None] * len(steerings)
        with torch.inference_mode():
            for g in range(0, len(layers), group):
                keep = layers[g : g + group]
                _, states, ctx_x = passes.contexts(keep=keep)
                cont_x = [passes.continuations(chunk, states, keep=keep)[1] for chunk in passes.chunks]
                for i, steering in enumerate(steerings):
                    layer = steering.layer
                    if layer not in keep:
                        continue
                    shift = steering.shift(ctx_x[layer])
                    last, steered, _ = passes.contexts(resume=(layer, ctx_x[layer] + shift))
                    # below the addition the keys and values are the unsteered ones (those blocks are skipped
                    # and write nothing); from its layer up, the steered context's
                    mixed = states[:layer] + steered[layer:]
                    sums = passes.first_tokens(last)
                    for chunk, xs in zip(passes.chunks, cont_x, strict=True):
                        x = xs[layer]
                        hidden, _ = passes.continuations(chunk, mixed, resume=(layer, x + shift.to(x.dtype)))
                        passes.add(sums, chunk, hidden)
                    out[i] = sums
                del states, ctx_x, cont_x
        assert all(o is not None for o in out)
        return [o for o in out if o is not None]

    def logliks(self, prepared: Sequence[Choices]) -> list[list[float]]:
        """Per question, each choice's summed log-likelihood; the first call is checked against full rows."""
        if self.mode == "full":
            return self.full(prepared)
        out = self.shared(prepared)
        if not self._probe:
            return out
        self._probe = False
        ref = self.full(prepared)
        ok, self.probe_error = sums_agree(out, ref, self.adapter.dtype)
        if ok:
            return out
        warnings.warn(
            f"sharing each question's context across its choices changes log-likelihoods by "
            f"{self.probe_error:.2e} on "
            f"{self.adapter.name}; scoring every choice on its whole row instead (slower)",
            stacklevel=2,
        )
        self.mode = "full"
        return ref


@dataclass(frozen=True)
class _Chunk:
    """Choice rows of one forward: (question, choice) pairs, their input tokens (all but each choice's last
    token) right padded, and where each row's positions start."""

    part: list[tuple[int, int]]
    ids: torch.Tensor
    mask: torch.Tensor
    owners: torch.Tensor
    positions: torch.Tensor


class _Passes:
    """The forwards of one question batch: the left-padded contexts, then the choice rows against them."""

    def __init__(self, scorer: ContinuationScorer, prepared: Sequence[Choices]) -> None:
        adapter = scorer.adapter
        self.scorer, self.prepared, self.adapter = scorer, prepared, adapter
        device = adapter.device
        # Left padded: every context ends at the same cache index, so each choice's tokens follow their
        # context without a gap (a sliding-window layer measures distance in cache indices).
        self.batch = adapter.pad([list(p.context) for p in prepared], padding_side="left")
        self.contexts_width = int(self.batch.input_ids.shape[1])
        n_ctx = [len(p.context) for p in prepared]
        ctx_mask = self.batch.attention_mask
        # rows: the choices with more than one token; a one-token choice is read at the context's end
        rows = [
            (q, c) for q, p in enumerate(prepared) for c, cont in enumerate(p.continuations) if len(cont) > 1
        ]
        per_forward = max(1, ROWS_PER_QUESTION * len(prepared))
        pad_id = int(adapter.tokenizer.pad_token_id)
        self.chunks: list[_Chunk] = []
        for start in range(0, len(rows), per_forward):
            part = rows[start : start + per_forward]
            inputs = [list(prepared[q].continuations[c][:-1]) for q, c in part]
            t_max = max(len(x) for x in inputs)
            ids = torch.tensor([x + [pad_id] * (t_max - len(x)) for x in inputs], device=device)
            cont_mask = torch.tensor(
                [[1] * len(x) + [0] * (t_max - len(x)) for x in inputs], device=device, dtype=ctx_mask.dtype
            )
            owners = torch.tensor([q for q, _ in part], device=device)
            mask = torch.cat([ctx_mask.to(device).index_select(0, owners), cont_mask], dim=1)
            offsets = torch.tensor([n_ctx[q] for q, _ in part], device=device).unsqueeze(1)
            positions = offsets + torch.arange(t_max, device=device).unsqueeze(0)
            self.chunks.append(_Chunk(part, ids, mask, owners, positions))

    def contexts(
        self, *, keep: Sequence[int] = (), resume: tuple[int, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor | None, torch.Tensor | None]], dict[int, torch.Tensor]]:
        """The contexts' last-position states ``[Q, H]``, every layer's keys and values, and the residuals
        at ``keep``. Layers below a ``resume`` point hold no keys (their blocks are skipped)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        kwargs = {**self.batch.model_kwargs(), self.adapter.cache_argument: cache, "use_cache": True}
        hidden, kept = self.scorer._final_states(kwargs, resume=resume, keep=keep)
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise RolevecError("this transformers release's cache has no per-layer states")
        states = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
        first = resume[0] if resume is not None else 0
        if len(states) != self.adapter.n_layers or any(k is None for k, _ in states[first:]):
            raise RolevecError("the context cache does not hold every layer's keys and values")
        return hidden[:, -1], states, kept

    def first_tokens(self, last: torch.Tensor) -> list[list[float]]:
        """Sums started with each choice's first token, read at its context's last position."""
        firsts = [
            (q, c, p.continuations[c][0])
            for q, p in enumerate(self.prepared)
            for c in range(len(p.continuations))
        ]
        lp = self.scorer._log_probs(
            last[torch.tensor([q for q, _, _ in firsts], device=last.device)].float(),
            torch.tensor([t for _, _, t in firsts], dtype=torch.long),
        )
        sums = [[0.0] * len(p.continuations) for p in self.prepared]
        for (q, c, _), v in zip(firsts, lp.double().cpu().tolist(), strict=True):
            sums[q][c] += v
        return sums

    def continuations(
        self,
        chunk: _Chunk,
        states: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]],
        *,
        keep: Sequence[int] = (),
        resume: tuple[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The choice rows of ``chunk`` against their questions' cached contexts ``states``."""
        from transformers import DynamicCache

        owners = chunk.owners
        data = [
            (None, None)
            if k is None or v is None
            else (k.index_select(0, owners.to(k.device)), v.index_select(0, owners.to(v.device)))
            for k, v in states
        ]
        kwargs = {
            "input_ids": chunk.ids,
            "attention_mask": chunk.mask,
            "position_ids": chunk.positions,
            self.adapter.cache_argument: DynamicCache(data),
            "use_cache": True,
        }
        return self.scorer._final_states(kwargs, resume=resume, keep=keep)

    def add(self, sums: list[list[float]], chunk: _Chunk, hidden: torch.Tensor) -> None:
        """Add each row's later tokens' log-probabilities (read from the chunk's final states)."""
        picks, targets, owner = [], [], []
        for r, (q, c) in enumerate(chunk.part):
            cont = self.prepared[q].continuations[c]
            for j in range(len(cont) - 1):
                picks.append(hidden[r, j])
                targets.append(cont[j + 1])
                owner.append(r)
        per_row = self.scorer._row_sums(len(chunk.part), picks, targets, owner)
        for r, (q, c) in enumerate(chunk.part):
            sums[q][c] += per_row[r]


def results_from_logliks(prepared: Sequence[Choices], sums: Sequence[Sequence[float]]) -> list[ItemResult]:
    """``pred``: argmax of the sums (``acc``); ``pred_norm``: of the sums per character (``acc_norm``);
    ``probs``: the softmax over the sums (how sure the model is among the choices)."""
    out: list[ItemResult] = []
    for p, row in zip(prepared, sums, strict=True):
        item = p.item
        values = torch.tensor(list(row), dtype=torch.float64)
        probs = torch.softmax(values, dim=0)
        lengths = torch.tensor([max(1, n) for n in p.lengths], dtype=torch.float64)
        pred = item.letters[int(values.argmax())]
        pred_norm = item.letters[int((values / lengths).argmax())]
        out.append(
            ItemResult(
                item.qid,
                item.domain,
                item.subject,
                item.answer,
                pred,
                pred == item.answer,
                float(probs[item.answer_index]),
                tuple(float(x) for x in probs),
                tuple(float(x) for x in values),
                scoring="continuation",
                pred_norm=pred_norm,
            )
        )
    return out


def iter_continuations(
    adapter: ModelAdapter,
    prepared: Sequence[Choices],
    *,
    scorer: ContinuationScorer | None = None,
    batch_size: int = 16,
) -> Iterator[list[ItemResult]]:
    """Results batch by batch (batches of questions of similar context length, longest first)."""
    scorer = scorer or ContinuationScorer(adapter)
    for chunk in question_batches(adapter, prepared, batch_size):
        yield results_from_logliks(chunk, scorer.logliks(chunk))


def question_batches(
    adapter: ModelAdapter, prepared: Sequence[Choices], batch_size: int
) -> list[list[Choices]]:
    """Questions in batches of similar context + longest-choice length, longest first (less padding)."""
    lengths = [len(p.context) + max(len(c) for c in p.continuations) for p in prepared]
    plan = plan_batches(lengths, batch_size, overhead_tokens=batch_overhead_tokens(adapter.device))
    return [[prepared[i] for i in idx] for idx in plan]


def sums_agree(
    got: Sequence[Sequence[float]], ref: Sequence[Sequence[float]], dtype: torch.dtype
) -> tuple[bool, float]:
    """Do two batches of summed log-likelihoods agree within the dtype's logit tolerance (relative to the
    largest reference sum)? Also the largest difference."""
    error = max(abs(a - b) for x, y in zip(got, ref, strict=True) for a, b in zip(x, y, strict=True))
    atol, rtol = logit_tolerance(dtype)
    return error <= atol + rtol * max(1.0, max(abs(b) for y in ref for b in y)), error


K = TypeVar("K", bound=Hashable)


def score_continuation_additions(
    adapter: ModelAdapter,
    prepared: Sequence[Choices],
    todo: Mapping[K, tuple[Steering, set[str]]],
    scorer: ContinuationScorer,
    emit: Callable[[K, list[ItemResult]], None],
    *,
    batch_size: int = 16,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
) -> bool:
    """Score each one-layer addition on its pending questions (``todo[key] = (addition, qids)``) from
    the unsteered residuals (see :meth:`ContinuationScorer.resumed`), calling ``emit(key, results)`` per
    batch and addition. No hooks may be active.

    The first batch is checked: its first addition resumed against the same addition by hooks. Where they
    differ, nothing is emitted and the call returns False (the caller scores each addition by hooks).
    """
    wanted = {q for _, pending in todo.values() for q in pending}
    checked = False
    for chunk in question_batches(adapter, [p for p in prepared if p.item.qid in wanted], batch_size):
        qids = {p.item.qid for p in chunk}
        keys = [key for key, (_, pending) in todo.items() if qids & pending]
        if not keys:
            continue
        steerings = [todo[key][0] for key in keys]
        sums = scorer.resumed(chunk, steerings, max_cache_bytes)
        if not checked:
            checked = True
            with steerings[0].apply(adapter):
                ref = scorer.logliks(chunk)
            ok, error = sums_agree(sums[0], ref, adapter.dtype)
            scorer.resume_error = error
            if not ok:
                warnings.warn(
                    f"resuming the forward mid-stack changes continuation log-likelihoods by {error:.2e} on "
                    f"{adapter.name}; scoring each addition by hooks instead (slower)",
                    stacklevel=2,
                )
                return False
        for key, own in zip(keys, sums, strict=True):
            pending = todo[key][1]
            emit(key, [r for r in results_from_logliks(chunk, own) if r.qid in pending])
    return True
