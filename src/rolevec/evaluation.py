"""Scoring multiple-choice questions by the four answer-letter logits, under the paper's conditions.

The fast path computes only what the answer needs: the forward stops at the final norm (a hook raises
:class:`~rolevec.hooks.StopForward`), the normed hidden state of each row's last real token is multiplied by
just the four letter rows of the unembedding (plus bias, and Gemma-2 style soft-capping or logit scaling
from the config). Full-vocabulary logits are never formed. A one-batch parity probe against
``model(...).logits`` guards it; on a mismatch the scorer warns and uses the plain forward instead.

Entry points::

    PromptFormat(template=PAPER_TEMPLATE, answer_prefix=None)
    Condition(kind, role=None, persona_template=None, layer=None, position=None, alpha=None)
    persona_system(role, template="you_are") -> str
    LetterScorer(adapter, *, fast=True, probe=True).letter_logits(batch, letter_ids, start=None)
    prepare(adapter, items, prompt_format, system=None) -> tuple[list[Prepared], bool]
    score(adapter, items, condition, *, vectors=None, ...) -> list[ItemResult]
    evaluate_conditions(adapter, mcq, split, conditions, store, *, vectors=None, ...) -> EvaluationReport
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import role_display
from .errors import RolevecError
from .hooks import StopForward, hooked, input_hook, output_hook, skipped
from .interventions import Steering
from .mcq import LETTERS, MCQItem, MCQSet, Split
from .model import Batch, ModelAdapter
from .prefix import PrefixKV, PrefixMemo, PrefixSplit, forward_kwargs, prefix_kv, split_prefix
from .records import CONDITIONS, RecordStore, condition_identity
from .spec import check_alpha
from .vectors import RoleVectors

#: The paper's prompt, as the user turn. Fields: question, A, B, C, D, subject.
PAPER_TEMPLATE = (
    "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer with the letter of the correct answer.\nAnswer:"
)

#: Zheng et al. (2024) persona system prompts; ``{article}`` is a/an, ``{role}`` the display name.
PERSONA_TEMPLATES = {
    "you_are": "You are {article} {role}.",
    "imagine": "Imagine you are {article} {role}.",
    "talking_to": "You are talking to {article} {role}.",
}

STEERED = ("add", "ablate", "random")
#: Conditions that add one vector at one layer: they can share the unsteered lower layers.
ADDITIVE = ("add", "random")


# --- prompts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the user turn, and an optional assistant prefix after the generation prompt."""

    template: str = PAPER_TEMPLATE
    answer_prefix: str | None = None

    def __post_init__(self) -> None:
        try:
            self.template.format(question="q", A="a", B="b", C="c", D="d", subject="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise RolevecError(
                f"prompt template has an unknown or malformed field ({exc}); use only {{question}}, {{A}}, "
                "{B}, {C}, {D} and {subject}"
            ) from exc
        if "{question}" not in self.template:
            raise RolevecError("prompt template lacks {question}: include it")

    def user_text(self, item: MCQItem) -> str:
        a, b, c, d = item.choices
        return self.template.format(
            question=item.question, A=a, B=b, C=c, D=d, subject=item.subject.replace("_", " ")
        )

    def prompt(self, adapter: ModelAdapter, item: MCQItem, system: str | None = None) -> tuple[str, bool]:
        """The full prompt text, and whether a system turn had to be folded into the user turn."""
        text, folded = adapter.chat.render(self.user_text(item), system)
        if self.answer_prefix:
            text += self.answer_prefix
        return text, folded

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template, "answer_prefix": self.answer_prefix}


def persona_system(role: str, template: str = "you_are") -> str:
    """'You are a data scientist.' / 'You are an economist.' (a/an by the first letter's vowel)."""
    text = PERSONA_TEMPLATES.get(template, template)
    if "{role}" not in text:
        raise RolevecError(
            f"unknown persona template {template!r}: pass one of {', '.join(PERSONA_TEMPLATES)} or a text "
            "with {role} (and optionally {article})"
        )
    name = role_display(role)
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return text.format(role=name, article=article)


# --- conditions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One evaluation condition; its fields are the identity part of a record."""

    kind: str
    role: str | None = None
    persona_template: str | None = None
    layer: int | None = None
    position: int | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONDITIONS:
            raise RolevecError(f"unknown condition {self.kind!r}: pass one of {', '.join(CONDITIONS)}")
        if self.kind != "baseline" and not self.role:
            raise RolevecError(f"condition {self.kind} needs a role (--role)")
        if self.kind in STEERED and (self.layer is None or self.position is None):
            raise RolevecError(
                f"condition {self.kind} needs a site: pass --layer and --position, or --selection FILE"
            )
        if self.kind in ("add", "random"):
            if self.alpha is None:
                raise RolevecError(f"condition {self.kind} needs --alpha (or --selection FILE)")
            check_alpha(self.alpha)

    @classmethod
    def make(
        cls,
        kind: str,
        *,
        role: str | None = None,
        persona_template: str = "you_are",
        layer: int | None = None,
        position: int | None = None,
        alpha: float | None = None,
    ) -> Condition:
        """A condition with the fields that do not apply to ``kind`` set to None."""
        if kind == "baseline":
            return cls(kind)
        if kind == "persona":
            return cls(kind, role, persona_template)
        if kind == "ablate":
            return cls(kind, role, None, layer, position, None)
        return cls(kind, role, None, layer, position, None if alpha is None else float(alpha))

    def identity(self) -> tuple[Any, ...]:
        return condition_identity(
            self.kind, self.role, self.persona_template, self.layer, self.position, self.alpha
        )

    def fields(self) -> dict[str, Any]:
        return {
            "condition": self.kind,
            "role": self.role,
            "persona_template": self.persona_template,
            "layer": self.layer,
            "position": self.position,
            "alpha": None if self.alpha is None else float(self.alpha),
        }

    def system(self) -> str | None:
        if self.kind != "persona":
            return None
        assert self.role is not None
        return persona_system(self.role, self.persona_template or "you_are")

    def steering(self, vectors: RoleVectors | None, random_seed: int = 0) -> Steering | None:
        """The intervention this condition applies (None for baseline and persona).

        ``random`` adds a Gaussian direction of the role vector's norm, drawn from ``random_seed`` and the
        site, so a rerun draws the same one.
        """
        if self.kind not in STEERED:
            return None
        if vectors is None:
            raise RolevecError(f"condition {self.kind} needs role vectors: pass --vectors FILE")
        assert self.role is not None and self.layer is not None and self.position is not None
        vec = vectors.vector(self.role, self.layer, self.position)
        if self.kind == "random":
            vec = random_direction(vec, random_seed, key=f"{self.role}:{self.layer}:{self.position}")
        if self.kind == "ablate":
            return Steering.ablation(vec, layer=self.layer, role=self.role, position=self.position)
        assert self.alpha is not None
        return Steering.addition(
            vec, layer=self.layer, alpha=self.alpha, role=self.role, position=self.position
        )


def random_direction(vector: torch.Tensor, seed: int, *, key: str = "") -> torch.Tensor:
    """A Gaussian direction with the norm of ``vector``, from ``seed`` and a site key (reproducible)."""
    digest = hashlib.sha256(f"rolevec-random:{seed}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    direction = torch.randn(vector.shape[-1], generator=gen, dtype=torch.float64)
    scaled: torch.Tensor = direction / direction.norm() * vector.double().norm()
    return scaled.float()


def applied(adapter: ModelAdapter, steering: Steering | None) -> AbstractContextManager[None]:
    """``steering`` applied to ``adapter``, or nothing (baseline and persona conditions)."""
    return nullcontext() if steering is None else steering.apply(adapter)


# --- scoring ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A question tokenised for one prompt variant, with the ids of its four answer letters."""

    item: MCQItem
    ids: tuple[int, ...]
    letter_ids: tuple[int, int, int, int]


def prepare(
    adapter: ModelAdapter,
    items: Sequence[MCQItem],
    prompt_format: PromptFormat | None = None,
    system: str | None = None,
) -> tuple[list[Prepared], bool]:
    """Tokenise every question once; returns the prepared items and whether the system turn was folded."""
    fmt = prompt_format or PromptFormat()
    out: list[Prepared] = []
    folded_any = False
    letter_cache: dict[str, list[int]] = {}
    for item in items:
        text, folded = fmt.prompt(adapter, item, system)
        folded_any |= folded
        ids = adapter.tokenizer(text, add_special_tokens=adapter.chat.add_special_tokens)["input_ids"]
        # The letters' ids depend only on how the prompt ends; the template's fixed tail decides that.
        tail = text[-64:]
        if tail not in letter_cache:
            letter_cache[tail] = adapter.letter_token_ids(text, LETTERS)
        letters = letter_cache[tail]
        out.append(
            Prepared(item, tuple(int(i) for i in ids), (letters[0], letters[1], letters[2], letters[3]))
        )
    return out, folded_any


#: The cost of one more forward call, in padded tokens (Python, hooks, the shared prefix's own forward).
BATCH_OVERHEAD_TOKENS = 64
#: The same on a GPU, where a forward of a 1B–8B model is bound by its kernel launches and Python up to
#: thousands of tokens: on an H200, 128 questions at batch 64 cut into 13 forwards (the CPU's overhead)
#: scored no faster than 16 forwards of 8 with full logits.
ACCELERATOR_BATCH_OVERHEAD_TOKENS = 1024


def batch_overhead_tokens(device: torch.device) -> int:
    """What one more forward costs on ``device``, in padded tokens (see ``plan_batches``)."""
    return BATCH_OVERHEAD_TOKENS if device.type == "cpu" else ACCELERATOR_BATCH_OVERHEAD_TOKENS


def shares_prefix(device: torch.device) -> bool:
    """Whether scoring and extraction run the prompts' common head once (see :mod:`rolevec.prefix`).

    On a CPU it saves the head's tokens in every row. On an H200 the head's own forward and the per-batch
    cache copies cost more than that: length-planned batches with full logits and no sharing outscored
    the shared fast path on the SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B shapes (912/813/231 against
    801/686/232 questions/s), so accelerators read full rows.
    """
    return device.type == "cpu"


def plan_batches(
    lengths: Sequence[int],
    max_rows: int,
    *,
    max_tokens: int | None = None,
    overhead_tokens: int = BATCH_OVERHEAD_TOKENS,
) -> list[list[int]]:
    """Indices in batches of similar length, longest first, cut where padding plus per-batch overhead is
    least (a dynamic programme over the sorted lengths; each batch costs rows × its longest row + overhead).

    ``max_rows`` bounds the rows of a batch and ``max_tokens`` its rows × width (a row longer than that
    still forms a batch of one).
    """
    if max_rows < 1:
        raise RolevecError(f"batch size must be at least 1, not {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end - 1, max(-1, end - 1 - max_rows), -1):
            rows = end - start
            width = lengths[order[start]]
            if rows > 1 and max_tokens is not None and rows * width > max_tokens:
                break
            cost = best[start] + rows * width + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches: list[list[int]] = []
    end = n
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def length_batches(
    prepared: Sequence[Prepared], batch_size: int, *, overhead_tokens: int = BATCH_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Indices grouped in batches of similar token count (longest first), to cut padding."""
    return plan_batches([len(p.ids) for p in prepared], batch_size, overhead_tokens=overhead_tokens)


@dataclass(frozen=True)
class ItemResult:
    qid: str
    domain: str
    subject: str
    gold: str
    pred: str
    correct: bool
    p_gold: float
    probs: tuple[float, float, float, float]
    logits: tuple[float, float, float, float]


def results_from_logits(items: Sequence[MCQItem], logits: torch.Tensor) -> list[ItemResult]:
    """Prediction = argmax of the four letter logits; probabilities = softmax over those four."""
    logits = logits.detach().float().cpu()
    probs = torch.softmax(logits, dim=-1)
    preds = logits.argmax(dim=-1)
    out: list[ItemResult] = []
    for row, item in enumerate(items):
        p = [float(x) for x in probs[row]]
        lg = [float(x) for x in logits[row]]
        pred = LETTERS[int(preds[row])]
        gold_index = LETTERS.index(item.answer)
        out.append(
            ItemResult(
                item.qid,
                item.domain,
                item.subject,
                item.answer,
                pred,
                pred == item.answer,
                p[gold_index],
                (p[0], p[1], p[2], p[3]),
                (lg[0], lg[1], lg[2], lg[3]),
            )
        )
    return out


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing two ways of computing the same logits."""
    return (1e-4, 1e-4) if dtype == torch.float32 else (5e-2, 2e-2)


def state_tolerance(dtype: torch.dtype, n_layers: int) -> float:
    """Relative error (of a whole state, by norm) allowed between two ways of computing the same residual
    states. Half-precision rounding grows with depth, about eps·√layers: SmolLM2 in bfloat16 gives 2e-2
    for the same rows in batches of 2 and 16. A broken prefix cache gives 0.3 and more there."""
    return max(_tolerance(dtype)[1], float(torch.finfo(dtype).eps) * math.sqrt(n_layers + 1))


@dataclass(frozen=True)
class Resume:
    """Where a forward resumes mid-stack: blocks below ``layer`` are skipped and ``residual`` is put in
    place at its input. For a batch split after its common prefix, ``prefix`` holds the prefix's states
    (computed under the same steering), one group per block of rows."""

    layer: int
    residual: torch.Tensor
    prefix: PrefixKV | None = None


class LetterScorer:
    """Letter logits of a batch, computed only for the four letters at each row's last real token.

    With ``share_prefix`` the rows' common head (the chat template's system turn and user header) runs
    once per batch (see :mod:`rolevec.prefix`). The first batch is checked against a plain full forward;
    on a mismatch the scorer drops prefix sharing, then the fast path, with a warning.
    """

    def __init__(
        self, adapter: ModelAdapter, *, fast: bool = True, probe: bool = True, share_prefix: bool = True
    ) -> None:
        self.adapter = adapter
        self.mode = "fast" if fast else "naive"
        self.share_prefix = share_prefix and fast
        # One probe for batches scored whole and one for batches split after a shared prefix: the first
        # batch may be a single long question, which has no prefix to share.
        self._probe_plain = self._probe_prefix = probe and fast
        self.probe_error: float | None = None
        #: Mid-stack parity checks (rolevec.resume) by (checked layers, prefix shared): (passed, error).
        self.resume_checks: dict[tuple[tuple[int, ...], bool], tuple[bool, float]] = {}
        cfg = adapter.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere multiplies
        self.scale /= float(getattr(cfg, "logits_scaling", None) or 1.0)  # Granite divides

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
        last: torch.Tensor = logits[rows, batch.last_index()]
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
            last = hidden[rows, batch.last_index()]  # [B, H]
            unembed = adapter.unembed
            weight = unembed.weight
            assert isinstance(weight, torch.Tensor)
            ids = letter_ids.to(weight.device)
            # Four rows cost nothing in float32. Half-precision logits near 30 are rounded to steps of
            # 0.25, which turns close answers into exact ties that argmax resolves as "A".
            rows_w = weight[ids].float()  # [B, 4, H]
            logits = torch.einsum("bh,bkh->bk", last.float(), rows_w)
            bias = getattr(unembed, "bias", None)
            if isinstance(bias, torch.Tensor):
                logits = logits + bias[ids].float()
            if self.scale != 1.0:
                logits = logits * self.scale
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits.float()

    def letter_logits(
        self,
        batch: Batch,
        letter_ids: torch.Tensor,
        start: Resume | None = None,
        *,
        memo: PrefixMemo | None = None,
        share: bool = True,
    ) -> torch.Tensor:
        """``[rows, 4]`` float32 letter logits (letters' ids given per row as ``[rows, 4]``).

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
        atol, rtol = _tolerance(self.adapter.dtype)
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
    batch = adapter.pad([p.ids for p in prepared], padding_side="right")
    letter_ids = torch.tensor([p.letter_ids for p in prepared], dtype=torch.long, device=adapter.device)
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


def score(
    adapter: ModelAdapter,
    items: Sequence[MCQItem],
    condition: Condition | str = "baseline",
    *,
    vectors: RoleVectors | None = None,
    prompt_format: PromptFormat | None = None,
    batch_size: int = 16,
    scorer: LetterScorer | None = None,
    random_seed: int = 0,
    progress: bool = False,
) -> list[ItemResult]:
    """Score questions under one condition; results in the order of ``items``."""
    from tqdm.auto import tqdm

    cond = Condition(condition) if isinstance(condition, str) else condition
    prepared, _ = prepare(adapter, items, prompt_format, cond.system())
    by_qid: dict[str, ItemResult] = {}
    with (
        applied(adapter, cond.steering(vectors, random_seed)),
        tqdm(total=len(prepared), disable=not progress, desc=cond.kind, unit="q") as bar,
    ):
        for results in iter_scores(adapter, prepared, scorer=scorer, batch_size=batch_size):
            by_qid.update((r.qid, r) for r in results)
            bar.update(len(results))
    return [by_qid[it.qid] for it in items]


def to_record(condition: Condition, result: ItemResult, split: str) -> dict[str, Any]:
    """The JSONL record of one result (field order as :data:`rolevec.records.FIELDS`)."""
    return {
        **condition.fields(),
        "domain": result.domain,
        "split": split,
        "qid": result.qid,
        "subject": result.subject,
        "gold": result.gold,
        "pred": result.pred,
        "correct": result.correct,
        "p_gold": result.p_gold,
        "probs": list(result.probs),
    }


@dataclass
class EvaluationReport:
    """What one call did: new and already-stored records, folded persona prompts, scorer mode."""

    n_new: int = 0
    n_done_before: int = 0
    persona_folded: bool = False
    scorer_mode: str = "fast"
    per_condition: dict[str, int] = field(default_factory=dict)


def evaluate_conditions(
    adapter: ModelAdapter,
    mcq: MCQSet,
    split: Split,
    conditions: Sequence[Condition],
    store: RecordStore,
    *,
    vectors: RoleVectors | None = None,
    domains: Sequence[str] | None = None,
    split_name: str = "test",
    limit: int | None = None,
    prompt_format: PromptFormat | None = None,
    batch_size: int = 16,
    scorer: LetterScorer | None = None,
    random_seed: int = 0,
    reuse: bool = True,
    progress: bool = True,
) -> EvaluationReport:
    """Score every condition on every domain's ``split_name`` items, appending records per batch.

    Records already in ``store`` are skipped, so an interrupted call resumes where it stopped. The
    record's ``split`` is the item's own split ("val" or "test"), also when ``split_name`` is "all".
    With ``reuse`` the additions and random controls of a domain run from one shared unsteered residual
    (:mod:`rolevec.resume`), each from its own layer up, after a parity check (independent runs where
    it fails).
    """
    from tqdm.auto import tqdm

    scorer = scorer or LetterScorer(adapter)
    report = EvaluationReport()
    doms = list(domains) if domains is not None else mcq.domains
    plan: list[tuple[Condition, str, list[MCQItem], dict[str, str]]] = []
    for cond in conditions:
        if cond.kind in STEERED:
            cond.steering(vectors, random_seed)  # fail early on a missing role/site
        for domain in doms:
            items = split.select(mcq, domain, split_name, limit)
            which = split.split_of(domain)
            todo = [it for it in items if not store.done((*cond.identity(), which[it.qid], it.qid))]
            report.n_done_before += len(items) - len(todo)
            if todo:
                plan.append((cond, domain, todo, which))
    prepared_cache: dict[str | None, dict[str, Prepared]] = {}

    def prepared_for(todo: Sequence[MCQItem], system: str | None) -> list[Prepared]:
        cache = prepared_cache.setdefault(system, {})
        fresh = [it for it in todo if it.qid not in cache]
        if fresh:
            prepared, folded = prepare(adapter, fresh, prompt_format, system)
            report.persona_folded |= folded
            cache.update((p.item.qid, p) for p in prepared)
        return [cache[it.qid] for it in todo]

    def record(cond: Condition, results: Sequence[ItemResult], which: dict[str, str]) -> None:
        new = store.append(to_record(cond, r, which[r.qid]) for r in results)
        report.n_new += new
        report.per_condition[cond.kind] = report.per_condition.get(cond.kind, 0) + new
        bar.update(len(results))

    def independent(cond: Condition, domain: str, todo: list[MCQItem], which: dict[str, str]) -> None:
        prepared = prepared_for(todo, cond.system())
        bar.set_description(f"{cond.kind} {domain}")
        with applied(adapter, cond.steering(vectors, random_seed)):
            for results in iter_scores(adapter, prepared, scorer=scorer, batch_size=batch_size):
                record(cond, results, which)

    def resumed(domain: str, entries: list[tuple[Condition, str, list[MCQItem], dict[str, str]]]) -> bool:
        """The domain's additions from a shared residual; False where the parity check fails."""
        from .resume import check_resume, score_additions  # resume builds on this module

        union = list({it.qid: it for _, _, todo, _ in entries for it in todo}.values())
        prepared = prepared_for(union, None)
        todo_map: dict[Condition, tuple[Steering, set[str]]] = {}
        for cond, _, todo, _ in entries:
            steering = cond.steering(vectors, random_seed)
            assert steering is not None
            todo_map[cond] = (steering, {it.qid for it in todo})
        layers = sorted({a.layer for a, _ in todo_map.values()})
        middle = layers[len(layers) // 2]
        candidate = next(a for a, _ in todo_map.values() if a.layer == middle)
        ok, error = check_resume(adapter, prepared, (layers[0], middle, layers[-1]), candidate, scorer)
        if not ok:
            warnings.warn(
                f"resuming the forward mid-stack does not reproduce full runs on {adapter.name} "
                f"(difference {error:.2e}); scoring each addition independently (slower)",
                stacklevel=3,
            )
            return False
        which = entries[0][3]
        bar.set_description(f"add/random {domain}")
        score_additions(
            adapter,
            prepared,
            todo_map,
            scorer,
            lambda cond, results: record(cond, results, which),
            batch_size=batch_size,
        )
        return True

    by_domain: dict[str, list[tuple[Condition, str, list[MCQItem], dict[str, str]]]] = {}
    total = sum(len(todo) for _, _, todo, _ in plan)
    with tqdm(total=total, disable=not progress, desc="evaluate", unit="q") as bar:
        for entry in plan:
            if reuse and entry[0].kind in ADDITIVE:
                by_domain.setdefault(entry[1], []).append(entry)  # after the rest, from shared residuals
            else:
                independent(*entry)
        for domain, entries in by_domain.items():
            if not resumed(domain, entries):
                for entry in entries:
                    independent(*entry)
    report.scorer_mode = scorer.mode
    return report


def run_settings(
    adapter: ModelAdapter,
    prompt_format: PromptFormat,
    split: Split,
    random_seed: int | None = None,
    *,
    vectors: RoleVectors | None = None,
    roles: Sequence[str] = (),
) -> dict[str, Any]:
    """What must not change between runs that add records to one folder (see records.check_settings).

    With ``vectors``, each steered role's vectors are named by their digest: records are keyed by role and
    site, not by the file, so other vectors for the same role must not resume into them."""
    settings: dict[str, Any] = {
        "model": adapter.name,
        "model_fingerprint": adapter.fingerprint(),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "prompt": prompt_format.to_json(),
        "split": {"seed": split.seed, "val_fraction": split.val_fraction, "source": split.source},
    }
    if random_seed is not None:
        settings["random_seed"] = random_seed
    if vectors is not None:
        settings.update({f"vectors:{role}": vectors.digest(role) for role in roles})
    return settings
