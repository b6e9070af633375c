"""The paper's evaluation conditions, and the test stage that scores them into records.

A :class:`Condition` is the identity part of a record (baseline, persona, add, ablate, random at a site)
and builds the :class:`~rolevec.steering.interventions.Steering` it applies; :func:`evaluate_conditions`
scores every condition on a split through the scoring engine (:mod:`rolevec.evaluation.scoring`), resuming
from the records already stored.

Entry points::

    Condition(kind, role=None, persona_template=None, layer=None, position=None, alpha=None)
    Condition.steering(vectors, random_seed=0) -> Steering | None
    persona_system(role, template="you_are") -> str
    score(adapter, items, condition, *, scoring="letter", vectors=None, ...) -> list[ItemResult]
    evaluate_conditions(adapter, mcq, split, conditions, store, *, vectors=None, ...) -> EvaluationReport
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.records import CONDITIONS, Store, condition_identity, steer_identity
from ..core.spec import check_alpha
from ..data.mcq import MCQItem, MCQSet, Split
from ..data.sources import role_display
from ..errors import RolevecError
from ..model.loading import ModelAdapter
from ..steering.interventions import Steering
from ..vectors.arithmetic import compose, composition_name
from ..vectors.role_vectors import RoleVectors
from .continuation import Choices, ContinuationScorer, iter_continuations, prepare_choices
from .scoring import (
    ItemResult,
    LetterScorer,
    Prepared,
    PromptFormat,
    iter_scores,
    prepare,
)

#: Zheng et al. (2024) persona system prompts; ``{article}`` is a/an, ``{role}`` the display name.
PERSONA_TEMPLATES = {
    "you_are": "You are {article} {role}.",
    "imagine": "Imagine you are {article} {role}.",
    "talking_to": "You are talking to {article} {role}.",
}

STEERED = ("add", "ablate", "random", "cap")
#: How a question is scored: its answer letters' logits at the last prompt position, or each choice's
#: summed log-likelihood after the prompt (see :mod:`rolevec.evaluation.continuation`).
SCORING = ("letter", "continuation")
#: Conditions that add one vector at one layer: they can share the unsteered lower layers.
ADDITIVE = ("add", "random")


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
    """One evaluation condition; its fields are the identity part of a record.

    Validated at construction: a steered condition needs a role and a site, ``add`` and ``random`` an α,
    ``cap`` a range. :meth:`make` sets the fields that do not apply to ``kind`` to ``None``.

    Args:
        kind: ``baseline``, ``persona``, ``add``, ``ablate``, ``random`` (a random direction of the role
            vector's norm, the control for ``add``) or ``cap`` (the projection on the role's unit direction
            kept within ``cap`` at ``cap_layers``).
        role: The role whose persona or vector is used (not for ``baseline``); for a composition, its
            canonical name (:func:`rolevec.vectors.arithmetic.composition_name`, set by :meth:`make`).
        persona_template: For ``persona``: ``you_are``, ``imagine`` or ``talking_to``.
        layer: For steered kinds: the layer the role vector is taken from (and added at).
        position: For steered kinds: the post-instruction position of the vector (e.g. -1).
        alpha: For ``add`` and ``random``: the scale α of the added vector.
        compose: For steered kinds: ``((role, weight), ...)``, steer with these roles' weighted vectors
            combined (:func:`rolevec.vectors.arithmetic.compose`) instead of one role's.
        compose_mode: With ``compose``: ``sum`` (default) or ``orthogonal``.
        cap: For ``cap``: ``(lo, hi)``, the range the projection is kept in.
        cap_layers: For ``cap``: the layers whose input is capped (default: ``layer`` alone).

    Example:
        ```python
        conditions = [
            Condition("baseline"),
            Condition.make("persona", role="doctor"),
            Condition.make("add", role="doctor", layer=12, position=-1, alpha=3.0),
            Condition.make("cap", role="doctor", layer=12, position=-1, cap=(-2.0, 5.0)),
            Condition.make("add", compose=[("doctor", 1.0), ("lawyer", -0.5)], layer=12, position=-1,
                           alpha=3.0),
        ]
        ```
    """

    kind: str
    role: str | None = None
    persona_template: str | None = None
    layer: int | None = None
    position: int | None = None
    alpha: float | None = None
    compose: tuple[tuple[str, float], ...] | None = None
    compose_mode: str | None = None
    cap: tuple[float, float] | None = None
    cap_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONDITIONS:
            raise RolevecError(f"unknown condition {self.kind!r}: pass one of {', '.join(CONDITIONS)}")
        if self.kind != "baseline" and not self.role:
            raise RolevecError(f"condition {self.kind} needs a role (`role`)")
        if self.kind in STEERED and (self.layer is None or self.position is None):
            raise RolevecError(
                f"condition {self.kind} needs a site: pass `layer` and `position`, or `selection` FILE"
            )
        if self.kind in ("add", "random"):
            if self.alpha is None:
                raise RolevecError(f"condition {self.kind} needs `alpha` (or `selection` FILE)")
            check_alpha(self.alpha)
        if self.compose is not None:
            if self.kind not in STEERED:
                raise RolevecError(
                    f"condition {self.kind} takes one role, not a composition: pass `role` (a composition "
                    f"steers: {', '.join(STEERED)})"
                )
            if self.role != composition_name(self.compose, self.compose_mode or "sum"):
                raise RolevecError(
                    f"a composed condition's role must be its canonical name "
                    f"{composition_name(self.compose, self.compose_mode or 'sum')!r}: build it with "
                    "Condition.make(..., compose=...)"
                )
        elif self.compose_mode is not None:
            raise RolevecError("`compose_mode` applies to a composition only: pass `compose` too")
        if self.kind == "cap":
            if self.cap is None or self.cap_layers is None:
                raise RolevecError("condition cap needs a range `cap` (LO, HI); build it with Condition.make")
            _check_cap(self.cap)
            if not self.cap_layers:
                raise RolevecError("condition cap needs at least one layer in `cap_layers`")
        elif self.cap is not None or self.cap_layers is not None:
            raise RolevecError(f"only condition cap takes `cap`/`cap_layers`, not {self.kind}")

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
        compose: Sequence[tuple[str, float]] | None = None,
        compose_mode: str = "sum",
        cap: tuple[float, float] | None = None,
        cap_layers: Sequence[int] | None = None,
    ) -> Condition:
        """A condition with the fields that do not apply to ``kind`` set to None.

        With ``compose`` the role is the composition's canonical name (``role`` must then be omitted);
        a ``cap`` condition caps at ``cap_layers``, by default at ``layer`` alone.
        """
        terms: tuple[tuple[str, float], ...] | None = None
        mode: str | None = None
        if compose is not None:
            if role is not None:
                raise RolevecError("pass either `role` or `compose`, not both")
            terms = tuple((str(r), float(w)) for r, w in compose)
            if not terms:
                raise RolevecError("a composition needs at least one term: pass `compose` as (role, weight)")
            mode = compose_mode
            role = composition_name(terms, mode)
        if kind != "cap" and (cap is not None or cap_layers is not None):
            raise RolevecError(f"only condition cap takes `cap`/`cap_layers`, not {kind}")
        if kind == "baseline":
            return cls(kind)
        if kind == "persona":
            if terms is not None:
                raise RolevecError("a persona is one role's: pass `role`, not `compose`")
            return cls(kind, role, persona_template)
        if kind == "ablate":
            return cls(kind, role, None, layer, position, None, terms, mode)
        if kind == "cap":
            if cap is None:
                raise RolevecError("condition cap needs a range: pass `cap` as (LO, HI)")
            capped = (float(cap[0]), float(cap[1]))
            at = tuple(int(x) for x in cap_layers) if cap_layers is not None else None
            if at is None and layer is not None:
                at = (int(layer),)
            return cls(kind, role, None, layer, position, None, terms, mode, capped, at)
        return cls(kind, role, None, layer, position, None if alpha is None else float(alpha), terms, mode)

    def steer_fields(self) -> dict[str, Any]:
        """The :data:`rolevec.core.records.STEER_FIELDS` this condition sets (none for a single role's
        addition, ablation or random control: their records keep their old form)."""
        out: dict[str, Any] = {}
        if self.compose is not None:
            out["compose"] = {"mode": self.compose_mode or "sum", "terms": [[r, w] for r, w in self.compose]}
        if self.cap is not None:
            out["cap"] = [self.cap[0], self.cap[1]]
            out["cap_layers"] = list(self.cap_layers or ())
        return out

    def identity(self) -> tuple[Any, ...]:
        extra = self.steer_fields()
        return condition_identity(
            self.kind,
            self.role,
            self.persona_template,
            self.layer,
            self.position,
            self.alpha,
            steer_identity(extra.get("compose"), extra.get("cap"), extra.get("cap_layers")),
        )

    def fields(self) -> dict[str, Any]:
        return {
            "condition": self.kind,
            "role": self.role,
            "persona_template": self.persona_template,
            "layer": self.layer,
            "position": self.position,
            "alpha": None if self.alpha is None else float(self.alpha),
            **self.steer_fields(),
        }

    @property
    def roles(self) -> tuple[str, ...]:
        """The vector-file roles this condition reads: a composition's terms, else its one role."""
        if self.compose is not None:
            return tuple(r for r, _ in self.compose)
        return () if self.role is None else (self.role,)

    def source(self, vectors: RoleVectors) -> RoleVectors:
        """The vectors holding this condition's ``role``: ``vectors`` itself, or the composition made from
        it (so checks such as the zero-vector one read it like any role)."""
        if self.compose is None:
            return vectors
        return compose(vectors, list(self.compose), mode=self.compose_mode or "sum")

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
            raise RolevecError(f"condition {self.kind} needs role vectors: pass `vectors` FILE")
        assert self.role is not None and self.layer is not None and self.position is not None
        vec = self.source(vectors).vector(self.role, self.layer, self.position)
        if self.kind == "random":
            vec = random_direction(vec, random_seed, key=f"{self.role}:{self.layer}:{self.position}")
        if self.kind == "ablate":
            return Steering.ablation(vec, layer=self.layer, role=self.role, position=self.position)
        if self.kind == "cap":
            assert self.cap is not None and self.cap_layers is not None  # checked in __post_init__
            return Steering.capping(
                vec,
                layers=list(self.cap_layers),
                lo=self.cap[0],
                hi=self.cap[1],
                role=self.role,
                position=self.position,
            )
        assert self.alpha is not None
        return Steering.addition(
            vec, layer=self.layer, alpha=self.alpha, role=self.role, position=self.position
        )


def _check_cap(cap: tuple[float, float]) -> None:
    """A capping range as two finite numbers, lo ≤ hi (the Steering checks it again when it is built)."""
    lo, hi = cap
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RolevecError(f"capping range ({lo}, {hi}) must be two finite numbers LO ≤ HI")
    if lo > hi:
        raise RolevecError(f"capping range has lo {lo:g} > hi {hi:g}: pass `cap` as (LO, HI) with LO ≤ HI")


def random_direction(vector: torch.Tensor, seed: int, *, key: str = "") -> torch.Tensor:
    """A Gaussian direction with the norm of ``vector``, from ``seed`` and a site key (reproducible)."""
    digest = hashlib.sha256(f"rolevec-random:{seed}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    direction = torch.randn(vector.shape[-1], generator=gen, dtype=torch.float64)
    scaled: torch.Tensor = direction / direction.norm() * vector.double().norm()
    return scaled.float()


def default_scoring(source: object) -> str:
    """The scoring rule ``auto`` stands for: ``continuation`` for an ``lm-eval:`` task (lm-eval scores its
    multiple-choice tasks so), ``letter`` for any other source (their prompts list lettered choices)."""
    text = getattr(source, "source", source)
    return "continuation" if isinstance(text, str) and text.startswith("lm-eval:") else "letter"


def resolve_scoring(scoring: str | None, source: object) -> str:
    """``scoring`` checked, with ``auto`` (or ``None``) decided by :func:`default_scoring`."""
    return default_scoring(source) if scoring in (None, "auto") else check_scoring(str(scoring))


def check_scoring(scoring: str) -> str:
    if scoring not in SCORING:
        raise RolevecError(f"scoring must be one of {', '.join(SCORING)}, not {scoring!r}")
    return scoring


def check_scorer(scoring: str, scorer: LetterScorer | ContinuationScorer | None) -> None:
    """Refuse a scorer of the other rule (each rule has its own head)."""
    if scoring == "continuation" and isinstance(scorer, LetterScorer):
        raise RolevecError("continuation scoring needs a ContinuationScorer (or none), not a LetterScorer")
    if scoring == "letter" and isinstance(scorer, ContinuationScorer):
        raise RolevecError("letter scoring needs a LetterScorer (or none), not a ContinuationScorer")


def applied(adapter: ModelAdapter, steering: Steering | None) -> AbstractContextManager[None]:
    """``steering`` applied to ``adapter``, or nothing (baseline and persona conditions)."""
    return nullcontext() if steering is None else steering.apply(adapter)


def score(
    adapter: ModelAdapter,
    items: Sequence[MCQItem],
    condition: Condition | str = "baseline",
    *,
    vectors: RoleVectors | None = None,
    prompt_format: PromptFormat | None = None,
    batch_size: int = 16,
    scorer: LetterScorer | ContinuationScorer | None = None,
    random_seed: int = 0,
    progress: bool = False,
    scoring: str = "letter",
) -> list[ItemResult]:
    """Score questions under one condition; results in the order of ``items``.

    Args:
        adapter: The model to score with.
        items: The questions (e.g. ``split.select(mcq, "medicine", "test")``).
        condition: A :class:`Condition`, or a kind name without fields (default ``baseline``).
        vectors: The role vectors a steered condition takes its vector from.
        prompt_format: How a question becomes the prompt (default: :class:`PromptFormat`'s).
        batch_size: Questions per forward (default 16).
        scorer: A :class:`LetterScorer` to reuse (default: a new one).
        random_seed: The seed of the ``random`` condition's direction (default 0).
        progress: Show a progress bar (default ``False``).
        scoring: ``letter`` (default: the answer letters' logits) or ``continuation`` (each choice's
            summed log-likelihood; ``pred_norm`` per character); ``scorer`` must match it.

    Returns:
        One result per item (``pred``, ``correct``, ``p_gold``, ``probs``, ...).

    Example:
        ```python
        items = make_split(mcq).select(mcq, "medicine", "test", limit=20)
        results = score(adapter, items, "baseline")
        accuracy = sum(r.correct for r in results) / len(results)
        ```
    """
    from tqdm.auto import tqdm

    cond = Condition(condition) if isinstance(condition, str) else condition
    check_scoring(scoring)
    by_qid: dict[str, ItemResult] = {}
    with (
        applied(adapter, cond.steering(vectors, random_seed)),
        tqdm(total=len(items), disable=not progress, desc=cond.kind, unit="q") as bar,
    ):
        for results in _scores(adapter, items, cond.system(), prompt_format, scorer, batch_size, scoring):
            by_qid.update((r.qid, r) for r in results)
            bar.update(len(results))
    return [by_qid[it.qid] for it in items]


def _scores(
    adapter: ModelAdapter,
    items: Sequence[MCQItem],
    system: str | None,
    prompt_format: PromptFormat | None,
    scorer: LetterScorer | ContinuationScorer | None,
    batch_size: int,
    scoring: str,
) -> Any:
    """Results batch by batch under the hooks now active, by the chosen scoring rule."""
    check_scorer(scoring, scorer)
    if scoring == "continuation":
        assert not isinstance(scorer, LetterScorer)  # check_scorer refused it
        choices, _ = prepare_choices(adapter, items, prompt_format, system)
        return iter_continuations(adapter, choices, scorer=scorer, batch_size=batch_size)
    assert not isinstance(scorer, ContinuationScorer)
    prepared, _ = prepare(adapter, items, prompt_format, system)
    return iter_scores(adapter, prepared, scorer=scorer, batch_size=batch_size)


def to_record(condition: Condition, result: ItemResult, split: str) -> dict[str, Any]:
    """The JSONL record of one result (field order as :data:`rolevec.core.records.FIELDS`)."""
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
        "scoring": result.scoring,
        **(
            {
                "pred_norm": result.pred_norm,
                "correct_norm": result.pred_norm == result.gold,
                "logliks": list(result.logits),
            }
            if result.scoring == "continuation"
            else {}
        ),
    }


@dataclass
class EvaluationReport:
    """What one call did: new and already-stored records, folded persona prompts, scorer mode."""

    n_new: int = 0
    n_done_before: int = 0
    persona_folded: bool = False
    scorer_mode: str = "fast"
    per_condition: dict[str, int] = field(default_factory=dict)
    #: Questions left out with ``skip_bad`` because their answer letters are not single tokens.
    skipped: list[str] = field(default_factory=list)


def evaluate_conditions(
    adapter: ModelAdapter,
    mcq: MCQSet,
    split: Split,
    conditions: Sequence[Condition],
    store: Store,
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
    scoring: str = "letter",
    skip_bad: bool = False,
) -> EvaluationReport:
    """Score every condition on every domain's ``split_name`` items, appending records per batch.

    Records already in ``store`` are skipped, so an interrupted call resumes where it stopped. The
    record's ``split`` is the item's own split ("val" or "test"), also when ``split_name`` is "all".
    With ``reuse`` the additions and random controls of a domain run from one shared unsteered residual
    (:mod:`rolevec.evaluation.scoring`), each from its own layer up, after a parity check (independent runs
    where it fails).

    Args:
        adapter: The model to score with.
        mcq: The questions.
        split: Which questions are validation and which test.
        conditions: The conditions to score.
        store: The open :class:`RecordStore` the records are appended to.
        vectors: The role vectors steered conditions take their vectors from.
        domains: The domains to score (default: every domain of ``mcq``).
        split_name: ``test`` (default), ``val`` or ``all``.
        limit: Score only the first ``limit`` items of each domain's split.
        prompt_format: How a question becomes the prompt (default: :class:`PromptFormat`'s).
        batch_size: Questions per forward (default 16).
        scorer: A :class:`LetterScorer` (or, for continuation scoring, a :class:`ContinuationScorer`)
            to reuse (default: a new one).
        random_seed: The seed of the ``random`` condition's directions (default 0).
        reuse: Run additions and random controls from a shared residual (default ``True``), for either
            scoring rule.
        progress: Show a progress bar.
        scoring: ``letter`` (default) or ``continuation`` (each choice's summed log-likelihood).
        skip_bad: Leave out (listed in the report's ``skipped``) questions whose answer letters are not
            single tokens after their prompt, instead of raising.

    Returns:
        An ``EvaluationReport``: records new and already stored, per condition, and the scorer mode.

    Example:
        ```python
        conditions = [Condition("baseline"), Condition.make("persona", role="doctor")]
        with RecordStore("runs/mine/records.jsonl") as store:
            report = evaluate_conditions(adapter, mcq, split, conditions, store, domains=["medicine"])
        print(report.n_new, "new records")
        ```
    """
    from tqdm.auto import tqdm

    check_scoring(scoring)
    continuation = scoring == "continuation"
    check_scorer(scoring, scorer)
    cscorer = scorer if isinstance(scorer, ContinuationScorer) else ContinuationScorer(adapter)
    lscorer = scorer if isinstance(scorer, LetterScorer) else LetterScorer(adapter)
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
    # questions tokenised once per rule and system turn: (letters|choices, system) -> qid -> prepared
    prepared_cache: dict[tuple[str, str | None], dict[str, Any]] = {}

    def tokenised(rule: str, todo: Sequence[MCQItem], system: str | None) -> list[Any]:
        cache = prepared_cache.setdefault((rule, system), {})
        fresh = [it for it in todo if it.qid not in cache]
        if fresh:
            made: Sequence[Prepared | Choices]
            if rule == "choices":
                made, folded = prepare_choices(adapter, fresh, prompt_format, system)
            else:
                skipped: list[str] | None = [] if skip_bad else None
                try:
                    made, folded = prepare(adapter, fresh, prompt_format, system, skipped=skipped)
                except RolevecError as exc:
                    raise RolevecError(f"{mcq.source} {exc}; or `skip_bad` to skip such items") from None
                report.skipped += [q for q in skipped or () if q not in report.skipped]
                cache.update((q, None) for q in skipped or ())
            report.persona_folded |= folded
            cache.update((p.item.qid, p) for p in made)
        return [cache[it.qid] for it in todo if cache[it.qid] is not None]

    def prepared_for(todo: Sequence[MCQItem], system: str | None) -> list[Prepared]:
        return tokenised("letters", todo, system)

    def choices_for(todo: Sequence[MCQItem], system: str | None) -> list[Choices]:
        return tokenised("choices", todo, system)

    def record(cond: Condition, results: Sequence[ItemResult], which: dict[str, str]) -> None:
        new = store.append(to_record(cond, r, which[r.qid]) for r in results)
        report.n_new += new
        report.per_condition[cond.kind] = report.per_condition.get(cond.kind, 0) + new
        bar.update(len(results))

    def independent(cond: Condition, domain: str, todo: list[MCQItem], which: dict[str, str]) -> None:
        bar.set_description(f"{cond.kind} {domain}")
        if continuation:
            choices = choices_for(todo, cond.system())
            with applied(adapter, cond.steering(vectors, random_seed)):
                for results in iter_continuations(adapter, choices, scorer=cscorer, batch_size=batch_size):
                    record(cond, results, which)
            return
        prepared = prepared_for(todo, cond.system())
        with applied(adapter, cond.steering(vectors, random_seed)):
            for results in iter_scores(adapter, prepared, scorer=lscorer, batch_size=batch_size):
                record(cond, results, which)

    def resumed(domain: str, entries: list[tuple[Condition, str, list[MCQItem], dict[str, str]]]) -> bool:
        """The domain's additions from a shared residual; False where the parity check fails."""
        from .continuation import score_continuation_additions
        from .scoring import check_resume, score_additions  # resume builds on this module

        union = list({it.qid: it for _, _, todo, _ in entries for it in todo}.values())
        todo_map: dict[Condition, tuple[Steering, set[str]]] = {}
        for cond, _, todo, _ in entries:
            steering = cond.steering(vectors, random_seed)
            assert steering is not None
            todo_map[cond] = (steering, {it.qid for it in todo})
        which = entries[0][3]
        if continuation:
            bar.set_description(f"add/random {domain}")
            return score_continuation_additions(
                adapter,
                choices_for(union, None),
                todo_map,
                cscorer,
                lambda cond, results: record(cond, results, which),
                batch_size=batch_size,
            )
        prepared = prepared_for(union, None)
        if not prepared:  # every question skipped (skip_bad)
            return True
        layers = sorted({a.layer for a, _ in todo_map.values()})
        middle = layers[len(layers) // 2]
        candidate = next(a for a, _ in todo_map.values() if a.layer == middle)
        ok, error = check_resume(adapter, prepared, (layers[0], middle, layers[-1]), candidate, lscorer)
        if not ok:
            warnings.warn(
                f"resuming the forward mid-stack does not reproduce full runs on {adapter.name} "
                f"(difference {error:.2e}); scoring each addition independently (slower)",
                stacklevel=3,
            )
            return False
        bar.set_description(f"add/random {domain}")
        score_additions(
            adapter,
            prepared,
            todo_map,
            lscorer,
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
    report.scorer_mode = cscorer.mode if continuation else lscorer.mode
    return report


def run_settings(
    adapter: ModelAdapter,
    prompt_format: PromptFormat,
    split: Split,
    random_seed: int | None = None,
    *,
    vectors: RoleVectors | None = None,
    roles: Sequence[str] = (),
    scoring: str = "letter",
) -> dict[str, Any]:
    """What must not change between runs that add records to one folder (see records.check_settings).

    With ``vectors``, each steered role's vectors are named by their digest: records are keyed by role and
    site, not by the file, so other vectors for the same role must not resume into them."""
    settings: dict[str, Any] = {
        "model": adapter.name,
        "model_fingerprint": adapter.fingerprint(),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "prompt": prompt_format.to_json(),
        "scoring": check_scoring(scoring),
        "mcq": split.source,  # the question source (as the split names it: ids are only unique within it)
        "split": {"seed": split.seed, "val_fraction": split.val_fraction, "source": split.source},
    }
    if random_seed is not None:
        settings["random_seed"] = random_seed
    if vectors is not None:
        settings.update({f"vectors:{role}": vectors.digest(role) for role in roles})
    return settings
