"""The validation sweep over steering sites (layer × position × α) for one role, reusing work.

Addition at layer l leaves everything below l unchanged, so the addition candidates run from a shared
unsteered residual (:mod:`rolevec.evaluation.scoring`): per batch of questions the lower blocks run once, and
each candidate runs only the blocks from l up, several candidates stacked in one forward. A one-batch parity
probe checks that resuming mid-stack reproduces the full forward on this architecture; if not, the sweep
warns and runs every candidate independently. Ablation touches every layer, so its candidates always run
independently (with the fast scorer).

Every per-question result goes to the run's record store, so a killed sweep resumes where it stopped.
Entry points::

    default_layers(n_layers, fraction=0.8) -> tuple[int, int]           # half-open [a, b)
    (layers, positions and α are read by rolevec.core.spec, the one grammar)
    run_sweep(adapter, vectors, role, items, store, *, domain, layers, positions, alphas, ...) -> SweepResult
    grid_rows(records, *, role, domain, qids, split="val") -> list[GridRow]
    write_sweep_file(path, rows)     # sweep.jsonl; rows of the same role/domain are replaced
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import atomic_write, read_text
from ..core.records import Store
from ..core.spec import check_alpha, default_layers
from ..data.mcq import MCQItem
from ..errors import RolevecError
from ..model.loading import ModelAdapter
from ..steering.interventions import Steering, zero_layers
from ..vectors.role_vectors import RoleVectors
from .conditions import Condition, applied, check_scoring, to_record
from .continuation import (
    Choices,
    ContinuationScorer,
    iter_continuations,
    prepare_choices,
    score_continuation_additions,
)
from .scoring import (
    DEFAULT_MAX_CACHE_BYTES,
    ItemResult,
    LetterScorer,
    Prepared,
    PromptFormat,
    check_resume,
    iter_scores,
    prepare,
    score_additions,
)

ABLATE_SCOPES = ("all", "passing", "none")


# --- arguments -------------------------------------------------------------------------------------


# --- grid rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridRow:
    """One aggregated sweep cell (a line of ``sweep.jsonl``)."""

    role: str
    domain: str
    condition: str
    layer: int
    position: int
    alpha: float | None
    n: int
    correct: int
    accuracy: float
    baseline_accuracy: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def grid_rows(
    records: Iterable[Mapping[str, Any]], *, role: str, domain: str, qids: Iterable[str], split: str = "val"
) -> list[GridRow]:
    """Aggregate add/ablate records of one role and domain over ``qids`` (baseline on the same qids)."""
    wanted = set(qids)
    base: dict[str, bool] = {}
    cells: dict[tuple[str, int, int, float | None], dict[str, bool]] = {}
    for r in records:
        if r["split"] != split or r["domain"] != domain or r["qid"] not in wanted:
            continue
        if r["condition"] == "baseline":
            base[r["qid"]] = bool(r["correct"])
        elif r["condition"] in ("add", "ablate") and r["role"] == role:
            alpha = None if r["alpha"] is None else float(r["alpha"])
            key = (r["condition"], int(r["layer"]), int(r["position"]), alpha)
            cells.setdefault(key, {})[r["qid"]] = bool(r["correct"])
    rows = []
    for (cond, layer, position, alpha), answers in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2], kv[0][3] or 0.0)
    ):
        n = len(answers)
        k = sum(answers.values())
        paired = [q for q in answers if q in base]
        base_acc = sum(base[q] for q in paired) / len(paired) if paired else float("nan")
        rows.append(GridRow(role, domain, cond, layer, position, alpha, n, k, k / n, base_acc))
    return rows


def write_sweep_file(path: str | Path, rows: Sequence[GridRow]) -> Path:
    """Rewrite ``sweep.jsonl`` atomically: rows of the (role, domain) pairs in ``rows`` replace old ones."""
    p = Path(path)
    replaced = {(r.role, r.domain) for r in rows}
    kept: list[dict[str, Any]] = []
    if p.exists():
        for number, line in enumerate(read_text(p, what="sweep file").splitlines(), 1):
            if line.strip():
                try:
                    old = json.loads(line)
                    key = (old["role"], old["domain"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise RolevecError(
                        f"{p} line {number} is not a sweep row ({exc}): fix or remove that line, "
                        "or rerun with `force=True`"
                    ) from None
                if key not in replaced:
                    kept.append(old)
    lines = [json.dumps(r, ensure_ascii=False) for r in [*kept, *(row.to_json() for row in rows)]]
    text = "".join(line + "\n" for line in lines)
    atomic_write(p, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)
    return p


# --- mid-stack resumption ------------------------------------------------------------------------


def probe_reuse(
    adapter: ModelAdapter,
    vectors: RoleVectors,
    role: str,
    prepared: Sequence[Prepared],
    layers: tuple[int, int],
    position: int,
    alpha: float,
    scorer: LetterScorer,
) -> tuple[bool, float]:
    """Does resuming mid-stack reproduce full forwards here? :func:`rolevec.evaluation.scoring.check_resume`
    over the first, middle and last layer of the range, with one candidate of the role resumed at the middle
    one."""
    a, b = layers
    mid = (a + b - 1) // 2
    vector = vectors.vector(role, mid, position)
    candidate = Steering.addition(vector, layer=mid, alpha=alpha, role=role, position=position)
    return check_resume(adapter, prepared, (a, mid, b - 1), candidate, scorer)


# --- the sweep -------------------------------------------------------------------------------------


Candidate = tuple[int, int, float]  # layer, position, alpha


@dataclass
class SweepResult:
    role: str
    domain: str
    rows: list[GridRow]
    baseline_accuracy: float
    reuse: str  # "reuse" | "independent"
    probe_error: float | None = None
    n_new: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


class _Sweep:
    def __init__(
        self,
        adapter: ModelAdapter,
        vectors: RoleVectors,
        role: str,
        prepared: list[Prepared],
        store: Store,
        split_label: str,
        scorer: LetterScorer,
        batch_size: int,
        bar: Any,
        choices: list[Choices] | None = None,
    ) -> None:
        self.adapter = adapter
        self.vectors = vectors
        self.role = role
        self.prepared = prepared
        self.store = store
        self.split_label = split_label
        self.scorer = scorer
        self.batch_size = batch_size
        self.bar = bar
        self.choices = choices  # continuation scoring: the questions' contexts and choices
        self.continuation = ContinuationScorer(adapter) if choices is not None else None
        self.n_new = 0
        self.stats: dict[str, int] = {}

    def qids(self) -> list[str]:
        return [p.item.qid for p in (self.choices if self.choices is not None else self.prepared)]

    def pending(self, cond: Condition) -> set[str]:
        ident = cond.identity()
        return {q for q in self.qids() if not self.store.done((*ident, self.split_label, q))}

    def independent(self, cond: Condition, todo: set[str]) -> None:
        if self.choices is not None:
            assert self.continuation is not None
            part = [p for p in self.choices if p.item.qid in todo]
            if not part:
                return
            with applied(self.adapter, cond.steering(self.vectors)):
                for results in iter_continuations(
                    self.adapter, part, scorer=self.continuation, batch_size=self.batch_size
                ):
                    self.n_new += self.store.append(to_record(cond, r, self.split_label) for r in results)
                    self.bar.update(len(results))
            return
        chunk = [p for p in self.prepared if p.item.qid in todo]
        if not chunk:
            return
        with applied(self.adapter, cond.steering(self.vectors)):
            for results in iter_scores(self.adapter, chunk, scorer=self.scorer, batch_size=self.batch_size):
                self.n_new += self.store.append(to_record(cond, r, self.split_label) for r in results)
                self.bar.update(len(results))

    def reuse(self, pending: dict[Candidate, set[str]], max_rows: int, max_cache_bytes: int) -> bool:
        """The addition candidates from the shared unsteered residual; False where continuation scoring's
        first-batch check fails (nothing scored then)."""
        todo = {
            c: (
                Steering.addition(
                    self.vectors.vector(self.role, c[0], c[1]),
                    layer=c[0],
                    alpha=c[2],
                    role=self.role,
                    position=c[1],
                ),
                qids,
            )
            for c, qids in pending.items()
            if qids
        }

        def emit(cand: Candidate, results: list[ItemResult]) -> None:
            cond = Condition.make("add", role=self.role, layer=cand[0], position=cand[1], alpha=cand[2])
            self.n_new += self.store.append(to_record(cond, r, self.split_label) for r in results)
            self.bar.update(len(results))

        if self.choices is not None:
            assert self.continuation is not None
            return score_continuation_additions(
                self.adapter,
                self.choices,
                todo,
                self.continuation,
                emit,
                batch_size=self.batch_size,
                max_cache_bytes=max_cache_bytes,
            )
        self.stats = score_additions(
            self.adapter,
            self.prepared,
            todo,
            self.scorer,
            emit,
            batch_size=self.batch_size,
            max_rows=max_rows,
            max_cache_bytes=max_cache_bytes,
        )
        return True


def run_sweep(
    adapter: ModelAdapter,
    vectors: RoleVectors,
    role: str,
    items: Sequence[MCQItem],
    store: Store,
    *,
    domain: str,
    layers: tuple[int, int] | None = None,
    positions: Sequence[int] | None = None,
    alphas: Sequence[float] = (1.0, 3.0),
    prompt_format: PromptFormat | None = None,
    split_label: str = "val",
    batch_size: int = 16,
    max_rows: int | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    layer_step: int = 1,
    reuse: bool = True,
    ablate_scope: str = "all",
    scorer: LetterScorer | None = None,
    progress: bool = True,
    bar: Any = None,
    scoring: str = "letter",
) -> SweepResult:
    """Score baseline, every addition candidate and the ablation sites of one role on ``items``.

    ``layers`` is half-open ``[a, b)`` (default: first 80%), of which every ``layer_step``-th layer from ``a``
    is swept (a coarse grid for quick runs); ``max_rows`` bounds rows per forward when
    candidates are stacked (default ``batch_size``); ``max_cache_bytes`` bounds the cached residual plus the
    stacked copies of one question batch. ``ablate_scope``: ``all`` sites, only sites where some α beats the
    baseline (``passing``, enough for the selection criterion), or ``none``. ``bar`` is a tqdm-like bar to
    keep up to date instead of a new one (a distributed worker's reports its totals to the driver).
    ``scoring="continuation"`` scores each choice's log-likelihood; its addition candidates resume from
    the unsteered residual too (:func:`~rolevec.evaluation.continuation.score_continuation_additions`).
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    if not items:
        raise RolevecError(f"no validation questions for {domain}: pass more data or a larger `val_fraction`")
    if ablate_scope not in ABLATE_SCOPES:
        raise RolevecError(f"ablate scope must be one of {', '.join(ABLATE_SCOPES)}, not {ablate_scope!r}")
    vectors.check_compatible(adapter)
    a, b = layers or default_layers(adapter.n_layers)
    for layer in (a, b - 1):
        vectors.check_layer(layer)
    pos = tuple(positions) if positions is not None else tuple(vectors.positions)
    for p in pos:
        vectors.position_index(p)
    alpha_list = tuple(dict.fromkeys(float(check_alpha(x)) for x in alphas))
    scorer = scorer or LetterScorer(adapter)
    choices: list[Choices] | None = None
    if check_scoring(scoring) == "continuation":
        choices, _ = prepare_choices(adapter, items, prompt_format)
        prepared: list[Prepared] = []
    else:
        prepared, _ = prepare(adapter, items, prompt_format)
    qids = [it.qid for it in items]
    max_rows = max_rows or batch_size

    base_cond = Condition("baseline")
    if layer_step < 1:
        raise RolevecError(f"layer step must be at least 1, not {layer_step}")
    swept = range(a, b, layer_step)
    zero = sorted((layer, p) for p in pos for layer in zero_layers(vectors, role, swept, p))
    if zero:
        warnings.warn(
            f"{len(zero)} site(s) of {role} have an all-zero vector (e.g. layer {zero[0][0]}, position "
            f"{zero[0][1]}: the same template token for every prompt) and are left out of the sweep",
            stacklevel=2,
        )
    layer_list = [layer for layer in range(a, b, layer_step) if any((layer, p) not in zero for p in pos)]
    if not layer_list:
        raise RolevecError(f"every vector of {role} in layers {a}:{b} is zero: pass a higher `layers` range")
    cands: list[Candidate] = [
        (layer, p, al) for layer in layer_list for p in pos for al in alpha_list if (layer, p) not in zero
    ]
    own_bar = tqdm(total=0, disable=not progress, desc=f"sweep {role}", unit="q") if bar is None else None
    with own_bar if own_bar is not None else nullcontext(bar) as bar:
        sweep = _Sweep(adapter, vectors, role, prepared, store, split_label, scorer, batch_size, bar, choices)
        base_todo = sweep.pending(base_cond)
        pending = {
            c: sweep.pending(Condition.make("add", role=role, layer=c[0], position=c[1], alpha=c[2]))
            for c in cands
        }
        ablate_sites = [(layer, p) for layer in layer_list for p in pos if (layer, p) not in zero]
        ablate_pending = {
            s: sweep.pending(Condition.make("ablate", role=role, layer=s[0], position=s[1]))
            for s in ablate_sites
        }
        bar.total = len(base_todo) + sum(len(t) for t in pending.values())
        if ablate_scope == "all":
            bar.total += sum(len(t) for t in ablate_pending.values())
        bar.refresh()

        bar.set_description(f"sweep {role}: baseline")
        sweep.independent(base_cond, base_todo)

        mode = "reuse" if reuse else "independent"
        probe_error: float | None = None
        if reuse and any(pending.values()) and choices is None:  # continuation checks its own first batch
            ok, probe_error = probe_reuse(
                adapter, vectors, role, prepared, (a, b), pos[0], alpha_list[0], scorer
            )
            if not ok:
                warnings.warn(
                    f"resuming the forward mid-stack does not reproduce full runs on {adapter.name} "
                    f"(difference {probe_error:.2e}); running every sweep candidate independently (slower)",
                    stacklevel=2,
                )
                mode = "independent"
        bar.set_description(f"sweep {role}: add")
        if mode == "reuse" and not sweep.reuse(pending, max_rows, max_cache_bytes):
            mode = "independent"
        if mode == "independent":
            for c, todo in pending.items():
                sweep.independent(
                    Condition.make("add", role=role, layer=c[0], position=c[1], alpha=c[2]), todo
                )

        if ablate_scope != "none":
            sites = ablate_sites
            if ablate_scope == "passing":
                rows = grid_rows(store.records(), role=role, domain=domain, qids=qids, split=split_label)
                good = {
                    (r.layer, r.position)
                    for r in rows
                    if r.condition == "add" and r.accuracy > r.baseline_accuracy
                }
                sites = [s for s in ablate_sites if s in good]
                bar.total += sum(len(ablate_pending[s]) for s in sites)
                bar.refresh()
            bar.set_description(f"sweep {role}: ablate")
            for s in sites:
                sweep.independent(
                    Condition.make("ablate", role=role, layer=s[0], position=s[1]), ablate_pending[s]
                )

    rows = grid_rows(store.records(), role=role, domain=domain, qids=qids, split=split_label)
    in_range = [
        r
        for r in rows
        if r.layer in layer_list and r.position in pos and (r.alpha is None or r.alpha in alpha_list)
    ]
    base_acc = (
        in_range[0].baseline_accuracy
        if in_range
        else _baseline_accuracy(store.records(), domain, qids, split_label)
    )
    return SweepResult(role, domain, in_range, base_acc, mode, probe_error, sweep.n_new, dict(sweep.stats))


def _baseline_accuracy(
    records: Iterable[Mapping[str, Any]], domain: str, qids: Sequence[str], split: str
) -> float:
    wanted = set(qids)
    answers = [
        bool(r["correct"])
        for r in records
        if r["condition"] == "baseline"
        and r["domain"] == domain
        and r["split"] == split
        and r["qid"] in wanted
    ]
    return sum(answers) / len(answers) if answers else float("nan")
