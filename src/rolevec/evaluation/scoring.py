"""The scoring engine: questions to prompts, batches, the letter head, and additions resumed mid-stack.

Everything that turns questions into answer-letter scores lives here, so evaluation (conditions and the
test stage) and the sweep share one implementation of prompt preparation, the shared-prefix memo (with
:mod:`rolevec.model.prefix`), the letter head and resumed additions. Batch planning, the device policy and
the numeric tolerances sit one layer down in :mod:`rolevec.model.batching`, because extraction uses them too.

Letter scoring computes only what the answer needs: the forward stops at the final norm (a hook raises
:class:`~rolevec.model.hooks.StopForward`), the normed hidden state of each row's last real token is
multiplied by just the answer letters' rows of the unembedding (plus bias, and Gemma-2 style soft-capping or
logit scaling from the config). Full-vocabulary logits are never formed. A one-batch parity probe against
``model(...).logits`` guards it; on a mismatch the scorer warns and uses the plain forward instead.

Resumed additions: adding a vector at the input of layer l leaves every layer below l unchanged. So per
batch of questions the unsteered residual is advanced block by block through the candidates' sorted
layers (only the current layer's input is kept), and each candidate runs only the blocks from l up:
blocks below are skipped and ``cached + α·v`` (:meth:`~rolevec.steering.interventions.Steering.shift`) is put
in place at the input of l. Candidates at one layer share a forward, stacked along the batch (rows =
questions × candidates), up to a row and a memory bound. :func:`check_resume` compares the resumed path
with full hooked forwards on one small batch first; callers fall back to independent runs where it fails.

Entry points::

    PromptFormat(template=PAPER_TEMPLATE, answer_prefix=None)
    prepare(adapter, items, prompt_format, system=None) -> tuple[list[Prepared], bool]
    LetterScorer(adapter, *, fast=True, probe=True).letter_logits(batch, letter_ids, start=None)
    iter_scores(adapter, prepared, *, scorer=None, batch_size=16) -> Iterator[list[ItemResult]]
    residual_at(adapter, batch, layer, start=None, prefix=None) -> Tensor
    check_resume(adapter, prepared, checkpoints, candidate, scorer) -> (ok, error)
    score_additions(adapter, prepared, todo, scorer, emit=..., batch_size=16) # todo: {key: (Steering, qids)}
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from ..data.mcq import ALL_LETTERS, MCQItem
from ..errors import RolevecError
from ..model.batching import (
    BATCH_OVERHEAD_TOKENS,
    batch_overhead_tokens,
    logit_tolerance,
    plan_batches,
    shares_prefix,
    state_tolerance,
)
from ..model.hooks import StopForward, hooked, input_hook, onloaded, output_hook, skipped
from ..model.loading import Batch, ModelAdapter
from ..model.prefix import PrefixKV, PrefixMemo, PrefixSplit, forward_kwargs, prefix_kv, split_prefix
from ..steering.interventions import Steering

#: The paper's prompt, as the user turn. Fields: question, A, B, C, D, subject (and choices, see below).
PAPER_TEMPLATE = (
    "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer with the letter of the correct answer.\nAnswer:"
)
#: The block of four lettered choices in :data:`PAPER_TEMPLATE`; an item with another number of choices
#: gets its own lettered lines in its place (``{choices}``), so four-choice prompts stay byte for byte.
_PAPER_CHOICES = "A. {A}\nB. {B}\nC. {C}\nD. {D}"
_FIELDS = {"question": "q", "subject": "s", "choices": "c", **{letter: letter for letter in ALL_LETTERS}}


def choice_lines(item: MCQItem) -> str:
    """``A. <choice>`` lines, one per choice, joined by newlines."""
    return "\n".join(f"{letter}. {text}" for letter, text in zip(item.letters, item.choices, strict=True))


# --- prompts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the user turn, and an optional assistant prefix after the generation prompt.

    Args:
        template: The user turn, with ``{question}`` and optionally ``{choices}`` (the lettered choice
            lines), ``{A}`` to ``{Z}`` and ``{subject}`` (default: the paper's template, ending in
            ``Answer:``; its four ``X. {X}`` lines become the item's own lines for other numbers of
            choices).
        answer_prefix: Text put at the start of the assistant turn, before the scored letter (default
            none).
        verbatim: Use an item's own ``instruction`` (the paper's released files carry the whole user turn)
            as the user turn, unchanged (default ``True``); ``False`` renders it from the template.

    Example:
        ```python
        from rolevec.evaluation.scoring import PAPER_TEMPLATE
        fmt = PromptFormat(template="A question on {subject}. " + PAPER_TEMPLATE)
        results = score(adapter, items, prompt_format=fmt)
        ```
    """

    template: str = PAPER_TEMPLATE
    answer_prefix: str | None = None
    verbatim: bool = True

    def __post_init__(self) -> None:
        try:
            self.template.format(**_FIELDS)
        except (KeyError, IndexError, ValueError) as exc:
            raise RolevecError(
                f"prompt template has an unknown or malformed field ({exc}); use only {{question}}, "
                "{choices}, {A} to {Z} and {subject}"
            ) from exc
        if "{question}" not in self.template:
            raise RolevecError("prompt template lacks {question}: include it")

    def user_text(self, item: MCQItem) -> str:
        if self.verbatim and item.instruction is not None:
            return item.instruction
        template = self.template
        if len(item.choices) != 4 and _PAPER_CHOICES in template:
            template = template.replace(_PAPER_CHOICES, "{choices}")
        named = {f for _, f, _, _ in string.Formatter().parse(template) if f in ALL_LETTERS}
        if named and named != set(item.letters):
            raise RolevecError(
                f"item {item.qid} has {len(item.choices)} choices but the prompt template names choices "
                f"{', '.join(sorted(named))}: use {{choices}} for the lettered choice lines"
            )
        return template.format(
            question=item.question,
            choices=choice_lines(item),
            subject=item.subject.replace("_", " "),
            **dict(zip(item.letters, item.choices, strict=True)),
        )

    def prompt(self, adapter: ModelAdapter, item: MCQItem, system: str | None = None) -> tuple[str, bool]:
        """The full prompt text, and whether a system turn had to be folded into the user turn."""
        text, folded = adapter.chat.render(self.user_text(item), system)
        if self.answer_prefix:
            text += self.answer_prefix
        return text, folded

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template, "answer_prefix": self.answer_prefix, "verbatim": self.verbatim}


# --- scoring ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A question tokenised for one prompt variant, with the ids of its answer letters (one per choice)."""

    item: MCQItem
    ids: tuple[int, ...]
    letter_ids: tuple[int, ...]


def prepare(
    adapter: ModelAdapter,
    items: Sequence[MCQItem],
    prompt_format: PromptFormat | None = None,
    system: str | None = None,
    *,
    skipped: list[str] | None = None,
) -> tuple[list[Prepared], bool]:
    """Tokenise every question once; returns the prepared items and whether the system turn was folded.

    An item whose answer letters are not single tokens after its prompt is an error naming it, unless
    ``skipped`` is given: then its id is appended there and the item left out."""
    fmt = prompt_format or PromptFormat()
    out: list[Prepared] = []
    folded_any = False
    letter_cache: dict[tuple[str, int], list[int] | str] = {}
    for item in items:
        text, folded = fmt.prompt(adapter, item, system)
        folded_any |= folded
        ids = adapter.tokenizer(text, add_special_tokens=adapter.chat.add_special_tokens)["input_ids"]
        # The letters' ids depend only on how the prompt ends; the template's fixed tail decides that.
        key = (text[-64:], len(item.choices))
        if key not in letter_cache:
            try:
                letter_cache[key] = adapter.letter_token_ids(text, item.letters)
            except RolevecError as exc:
                letter_cache[key] = str(exc)
        letters = letter_cache[key]
        if isinstance(letters, str):
            if skipped is None:
                raise RolevecError(f"item {item.qid}: {letters}")
            skipped.append(item.qid)
            continue
        out.append(Prepared(item, tuple(int(i) for i in ids), tuple(letters)))
    return out, folded_any


def length_batches(
    prepared: Sequence[Prepared], batch_size: int, *, overhead_tokens: int = BATCH_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Indices grouped in batches of similar token count (longest first), to cut padding."""
    return plan_batches([len(p.ids) for p in prepared], batch_size, overhead_tokens=overhead_tokens)


@dataclass(frozen=True)
class ItemResult:
    """One question's score: the predicted letter and the softmax over the item's choices.

    ``scoring`` says which rule made it: ``letter`` (the answer letters' logits at the last prompt
    position) or ``continuation`` (each choice's summed log-likelihood after the prompt, ``logits`` holding
    those sums; ``pred_norm`` is the argmax of the sums per character, lm-eval's ``acc_norm``).
    """

    qid: str
    domain: str
    subject: str
    gold: str
    pred: str
    correct: bool
    p_gold: float
    probs: tuple[float, ...]
    logits: tuple[float, ...]
    scoring: str = "letter"
    pred_norm: str | None = None


def results_from_logits(items: Sequence[MCQItem], logits: torch.Tensor) -> list[ItemResult]:
    """Prediction = argmax of each item's letter logits; probabilities = softmax over those letters.

    ``logits`` is ``[rows, K]`` with K the batch's largest number of choices; an item with fewer choices
    reads only its first ones (the rest are padding).
    """
    logits = logits.detach().float().cpu()
    out: list[ItemResult] = []
    for row, item in enumerate(items):
        n = len(item.choices)
        own = logits[row, :n]
        p = [float(x) for x in torch.softmax(own, dim=-1)]
        pred = item.letters[int(own.argmax())]
        out.append(
            ItemResult(
                item.qid,
                item.domain,
                item.subject,
                item.answer,
                pred,
                pred == item.answer,
                p[item.answer_index],
                tuple(p),
                tuple(float(x) for x in own),
            )
        )
    return out


def logit_postprocess(config: Any) -> tuple[float, float | None]:
    """``(scale, softcap)`` a model applies after its head: Cohere multiplies by ``logit_scale``, Granite
    divides by ``logits_scaling``, Gemma-2 soft-caps at ``final_logit_softcapping``."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    return scale, getattr(config, "final_logit_softcapping", None)


def finish_logits(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """Head outputs as the model's own forward returns them (see :func:`logit_postprocess`)."""
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@dataclass(frozen=True)
class Resume:
    """Where a forward resumes mid-stack: blocks below ``layer`` are skipped and ``residual`` is put in
    place at its input. For a batch split after its common prefix, ``prefix`` holds the prefix's states
    (computed under the same steering), one group per block of rows."""

    layer: int
    residual: torch.Tensor
    prefix: PrefixKV | None = None


class LetterScorer:
    """Letter logits of a batch, computed only for the answer letters at each row's last real token.

    With ``share_prefix`` the rows' common head (the chat template's system turn and user header) runs
    once per batch (see :mod:`rolevec.model.prefix`). The first batch is checked against a plain full forward;
    on a mismatch the scorer drops prefix sharing, then the fast path, with a warning.

    Args:
        adapter: The model to score with.
        fast: Compute the four letters' logits from the final norm's output instead of the full logits
            (default ``True``); ``False`` always runs the plain forward.
        probe: Check the first batch of the fast path against a plain forward (default ``True``).
        share_prefix: Run the rows' common head once per batch (default ``True``; fast path only).

    Example:
        ```python
        scorer = LetterScorer(adapter)
        results = score(adapter, items, "baseline", scorer=scorer)
        print(scorer.mode)  # "fast", or "naive" after a failed parity check
        ```
    """

    def __init__(
        self, adapter: ModelAdapter, *, fast: bool = True, probe: bool = True, share_prefix: bool = True
    ) -> None:
        self.adapter = adapter
        self.mode = "fast" if fast else "naive"
        # A model split over devices keeps each layer's prefix states on its own device, which the prefix
        # code (one device per PrefixKV) does not follow: it scores full rows.
        self.share_prefix = share_prefix and fast and len(adapter.devices) == 1
        # One probe for batches scored whole and one for batches split after a shared prefix: the first
        # batch may be a single long question, which has no prefix to share.
        self._probe_plain = self._probe_prefix = probe and fast
        self.probe_error: float | None = None
        #: Mid-stack parity checks (resumed additions) by (checked layers, prefix shared): (passed, error).
        self.resume_checks: dict[tuple[tuple[int, ...], bool], tuple[bool, float]] = {}
        self.scale, self.softcap = logit_postprocess(adapter.config)

    def _start_hooks(self, start: Resume | None) -> tuple[Any, list[Any]]:
        if start is None:
            return nullcontext(), []
        layer, residual = start.layer, start.residual
        site = self.adapter.residual_site(layer)
        return skipped(list(self.adapter.blocks[:layer])), [(site, input_hook(lambda x: residual))]

    def split(self, batch: Batch, memo: PrefixMemo | None = None) -> tuple[PrefixSplit, PrefixKV] | None:
        """The batch cut after its common prefix with the prefix's states under the active hooks, or None
        where sharing is off or does not apply. ``memo`` reuses states of earlier batches of the same run."""
        if not self.share_prefix:
            return None
        parts = memo.split(batch) if memo is not None else split_prefix(batch)
        if parts is None:
            return None
        try:
            if memo is not None:
                return parts, memo.states(self.adapter, parts, prefix_kv)
            return parts, prefix_kv(self.adapter, parts)
        except (RolevecError, TypeError, ValueError, AttributeError) as exc:
            warnings.warn(
                f"prefix sharing does not work on {self.adapter.name} ({exc}); scoring full rows instead",
                stacklevel=3,
            )
            self.share_prefix = False
            return None

    def naive(self, batch: Batch, letter_ids: torch.Tensor, start: Resume | None = None) -> torch.Tensor:
        """``model(...).logits[row, last, letters]``: the reference the fast path must match."""
        skip, pre = self._start_hooks(start)
        kwargs = forward_kwargs(self.adapter, batch, start.prefix if start else None)
        with torch.inference_mode(), skip, hooked(pre=pre):
            logits = self.adapter.model(**kwargs).logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        last: torch.Tensor = logits[rows, batch.last_index().to(logits.device)]
        return last.gather(1, letter_ids.to(last.device)).float()

    def fast(
        self, batch: Batch, letter_ids: torch.Tensor, start: Resume | None = None, *, share: bool = True
    ) -> torch.Tensor:
        """Letter logits from the final norm's output; ``share`` runs a whole batch's common head once."""
        if start is not None:
            return self._fast(batch, letter_ids, start, start.prefix)
        work, prefix = self._shared(batch) if share else (batch, None)
        return self._fast(work, letter_ids, None, prefix)

    def _shared(self, batch: Batch, memo: PrefixMemo | None = None) -> tuple[Batch, PrefixKV | None]:
        """What runs for ``batch``: its suffix and the prefix's states, or the batch itself and None."""
        split = self.split(batch, memo)
        return (batch, None) if split is None else (split[0].suffix, split[1])

    def _fast(
        self, batch: Batch, letter_ids: torch.Tensor, start: Resume | None, prefix: PrefixKV | None
    ) -> torch.Tensor:
        adapter = self.adapter
        grabbed: dict[str, torch.Tensor] = {}

        def grab(x: torch.Tensor) -> None:
            grabbed["h"] = x
            raise StopForward

        kwargs = forward_kwargs(adapter, batch, prefix)
        skip, pre = self._start_hooks(start)
        with torch.inference_mode(), skip, hooked(pre=pre, post=[(adapter.final_norm, output_hook(grab))]):
            with suppress(StopForward):
                adapter.model(**kwargs)
            if "h" not in grabbed:
                raise RolevecError("the forward never reached the final norm; the architecture map is wrong")
            hidden = grabbed["h"]
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last = hidden[rows, batch.last_index().to(hidden.device)]  # [B, H]
            unembed = adapter.unembed
            # Under a device map the head may sit on another device than the final norm, or be offloaded
            # (meta weights until accelerate's hook brings them in): its four rows are read in place.
            with onloaded(unembed):
                weight = unembed.weight
                assert isinstance(weight, torch.Tensor)
                ids = letter_ids.to(weight.device)
                # Four rows cost nothing in float32. Half-precision logits near 30 are rounded to steps of
                # 0.25, which turns close answers into exact ties that argmax resolves as "A".
                rows_w = weight[ids].float()  # [B, 4, H]
                logits = torch.einsum("bh,bkh->bk", last.to(weight.device).float(), rows_w)
                bias = getattr(unembed, "bias", None)
                if isinstance(bias, torch.Tensor):
                    logits = logits + bias[ids].float()
            logits = finish_logits(logits, self.scale, self.softcap)
            return logits.float().to(adapter.device)  # where the plain forward's logits come out

    def letter_logits(
        self,
        batch: Batch,
        letter_ids: torch.Tensor,
        start: Resume | None = None,
        *,
        memo: PrefixMemo | None = None,
        share: bool = True,
    ) -> torch.Tensor:
        """``[rows, K]`` float32 letter logits (letters' ids given per row as ``[rows, K]``).

        The parity probes run on the first call without ``start`` that scores whole rows and on the first
        that shares a prefix (a plain full forward is their reference). ``memo``: the calling run's prefix
        states, valid while its hooks stay as they are. ``share=False`` scores whole rows.
        """
        if self.mode == "naive":
            return self.naive(batch, letter_ids, start)
        if start is not None:
            return self.fast(batch, letter_ids, start)
        work, prefix = self._shared(batch, memo) if share else (batch, None)
        out = self._fast(work, letter_ids, None, prefix)
        shared = prefix is not None
        if not (self._probe_prefix if shared else self._probe_plain):
            return out
        if shared:
            self._probe_prefix = False
        else:
            self._probe_plain = False
        ref = self.naive(batch, letter_ids)
        atol, rtol = logit_tolerance(self.adapter.dtype)
        error = float((out - ref).abs().max())
        self.probe_error = max(error, self.probe_error or 0.0)
        if torch.allclose(out, ref, atol=atol, rtol=rtol):
            return out
        if shared:
            plain = self.fast(batch, letter_ids, share=False)
            if torch.allclose(plain, ref, atol=atol, rtol=rtol):
                warnings.warn(
                    f"sharing the prompts' common prefix changes letter logits by {error:.2e} on "
                    f"{self.adapter.name}; scoring full rows instead (slower)",
                    stacklevel=2,
                )
                self.share_prefix = self._probe_plain = False
                return plain
        warnings.warn(
            f"fast letter scoring differs from the full forward by {error:.2e} on "
            f"{self.adapter.name}; using the full forward instead (slower)",
            stacklevel=2,
        )
        self.mode = "naive"
        self.share_prefix = False
        return ref


def _batch(adapter: ModelAdapter, prepared: Sequence[Prepared]) -> tuple[Batch, torch.Tensor]:
    """The padded batch and its letters' ids ``[rows, K]``; rows with fewer than K letters repeat their
    first (those columns are never read: see :func:`results_from_logits`)."""
    batch = adapter.pad([p.ids for p in prepared], padding_side="right")
    width = max(len(p.letter_ids) for p in prepared)
    rows = [list(p.letter_ids) + [p.letter_ids[0]] * (width - len(p.letter_ids)) for p in prepared]
    letter_ids = torch.tensor(rows, dtype=torch.long, device=adapter.device)
    return batch, letter_ids


def iter_scores(
    adapter: ModelAdapter,
    prepared: Sequence[Prepared],
    *,
    scorer: LetterScorer | None = None,
    batch_size: int = 16,
) -> Iterator[list[ItemResult]]:
    """Results batch by batch (length-sorted batches; each list in its batch's order).

    The hooks active at the first batch must stay until the last: the prompts' common head is computed
    once under them and reused by every batch.
    """
    scorer = scorer or LetterScorer(adapter)
    share = shares_prefix(adapter.device)
    memo = PrefixMemo([p.ids for p in prepared]) if share else None
    overhead = batch_overhead_tokens(adapter.device)
    for idx in length_batches(prepared, batch_size, overhead_tokens=overhead):
        chunk = [prepared[i] for i in idx]
        batch, letter_ids = _batch(adapter, chunk)
        logits = scorer.letter_logits(batch, letter_ids, memo=memo, share=share)
        yield results_from_logits([p.item for p in chunk], logits)


# --- additions resumed from a cached residual ------------------------------------------------------

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
    atol, rtol = logit_tolerance(adapter.dtype)
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
