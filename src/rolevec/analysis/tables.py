"""Role × domain tables from a run's per-question records, in the paper's form.

Every comparison is *paired*: a condition's rows are matched with the baseline rows of the same test
questions (same domain and qid), the relative change is ``100·(acc − acc_base)/acc_base`` on those pairs,
and significance is McNemar's test on the discordant pairs (:func:`rolevec.analysis.stats.mcnemar`: exact
binomial below 25 discordant pairs, chi-square with continuity correction above). Each accuracy carries its
sample size and a 95% Wilson interval, so a small sample never reads as a finding.

Nothing here assumes the paper's 8 MMLU domains or four choices: domains are whatever the records hold
(the paper's first, in its order, then the others sorted), each question's chance level is 1/len(probs),
and continuation-scored records add lm-eval's ``acc_norm`` (``correct_norm``) next to ``acc``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.records import read_records
from ..data.sources import domain_roles, normalise_role
from ..errors import RolevecError
from .stats import (
    benjamini_hochberg,
    cluster_bootstrap,
    clustered_mcnemar,
    holm,
    mcnemar,
    paired_bootstrap,
    steer_variant,
    wilson,
)

CONDITIONS = ("baseline", "persona", "add", "ablate", "random", "cap")
#: Below this many paired questions per cell the report warns that differences are noise unless p < 0.05.
SMALL_N = 100
#: p-values below this get a star in tables and figures.
SIGNIFICANCE = 0.05
Z95 = 1.959963984540054


# --- statistics ------------------------------------------------------------------------------------
def paired_difference_interval(gained: int, lost: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wald interval of the paired difference of two proportions, (gained − lost)/n."""
    if n <= 0:
        return (math.nan, math.nan)
    diff = (gained - lost) / n
    var = ((gained + lost) / n - diff * diff) / n
    half = z * math.sqrt(max(var, 0.0))
    return (diff - half, diff + half)


@dataclass(frozen=True)
class Record:
    """The fields of one ``records.jsonl`` row that the tables need."""

    condition: str
    role: str | None
    persona_template: str | None
    layer: int | None
    position: int | None
    alpha: float | None
    domain: str
    split: str
    qid: str
    correct: bool
    #: How many choices the question had (len(probs)); None when the record carries no probabilities.
    n_choices: int | None = None
    #: ``letter`` or ``continuation``; None for records written before there was a choice (letter scored).
    scoring: str | None = None
    #: Continuation scoring's per-character verdict (lm-eval's acc_norm); None for letter scoring.
    correct_norm: bool | None = None
    #: A capped record's range, as :func:`rolevec.analysis.stats.steer_variant` writes it; else None.
    variant: str | None = None

    @property
    def chance(self) -> float | None:
        """Accuracy of guessing uniformly among the question's choices."""
        return 1.0 / self.n_choices if self.n_choices else None


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def parse_record(row: Mapping[str, Any]) -> Record:
    condition = str(row["condition"])
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}")
    role = row.get("role")
    if condition != "baseline" and not role:
        raise ValueError(f"a {condition!r} row needs a role")
    probs = row.get("probs")
    if probs is not None and not isinstance(probs, list):
        raise ValueError("'probs' is not a list")
    norm = row.get("correct_norm")
    return Record(
        condition=condition,
        role=None if role is None else str(role),
        persona_template=None if row.get("persona_template") is None else str(row["persona_template"]),
        layer=_opt_int(row.get("layer")),
        position=_opt_int(row.get("position")),
        alpha=_opt_float(row.get("alpha")),
        domain=str(row["domain"]),
        split=str(row.get("split", "test")),
        qid=str(row["qid"]),
        correct=bool(row["correct"]),
        n_choices=len(probs) if probs else None,
        scoring=None if row.get("scoring") is None else str(row["scoring"]),
        correct_norm=None if norm is None else bool(norm),
        variant=steer_variant(row),
    )


def load_records(run_dir: str | Path) -> list[Record]:
    """All rows of ``RUN_DIR/records.jsonl``; a run without one has not been evaluated yet."""
    path = Path(run_dir) / "records.jsonl"
    if not path.is_file():
        raise RolevecError(
            f"{path} does not exist: run `rolevec evaluate` (or `rolevec run`) into {Path(run_dir)} first"
        )
    records: list[Record] = []
    for number, row in enumerate(read_records(path), 1):
        try:
            if not isinstance(row, dict):
                raise TypeError("not a JSON object")
            records.append(parse_record(row))
        except (KeyError, TypeError, ValueError) as exc:
            raise RolevecError(f"{path} record {number} is not a rolevec record ({exc})") from exc
    if not records:
        raise RolevecError(
            f"{path} holds no records yet: run `rolevec evaluate` (or `rolevec run`) with `run_dir` "
            f"{Path(run_dir)}"
        )
    return records


def builtin_domains() -> dict[str, list[str]]:
    """The paper's Table 2 (domain → roles)."""
    return domain_roles()


def role_domains(
    selection: Mapping[str, Any] | None = None,
    domains: Mapping[str, Sequence[str]] | None = None,
    *,
    mapping: Mapping[str, str] | None = None,
    sweep: Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, str]:
    """Each role's own domain, so in- and out-of-domain can be told apart for any roles and domains.

    Later sources win: the domain table (``domains``, default the paper's Table 2), then the roles and
    domains of the sweep's rows (the sweep runs on each role's own domain), then the run's selection.json,
    then ``mapping`` (a role -> domain map, :func:`rolevec.data.sources.load_role_domains`), which is what
    the caller says now.
    """
    table = builtin_domains() if domains is None else domains
    out = {role: domain for domain, roles in table.items() for role in roles}
    swept: dict[str, set[str]] = defaultdict(set)
    for row in sweep or ():
        if isinstance(row, Mapping) and row.get("role") and row.get("domain"):
            swept[str(row["role"])].add(str(row["domain"]))
    out.update({role: next(iter(found)) for role, found in swept.items() if len(found) == 1})
    for role, info in ((selection or {}).get("roles") or {}).items():
        if isinstance(info, Mapping) and info.get("domain"):
            out[str(role)] = str(info["domain"])
    if mapping:
        by_key = {normalise_role(role): domain for role, domain in mapping.items()}
        for role in list(out):
            if normalise_role(role) in by_key:
                out[role] = by_key[normalise_role(role)]
        for key, domain in by_key.items():
            out.setdefault(key, domain)
    return out


def chance_levels(records: Iterable[Record], split: str | None = "test") -> dict[str, float]:
    """Per domain, the mean of 1/len(probs) over its questions (each question once): the accuracy of
    guessing, 0.25 for MMLU; domains whose records carry no probabilities are left out."""
    seen: dict[tuple[str, str], float] = {}
    for r in records:
        if (split is None or r.split == split) and r.chance is not None:
            seen.setdefault((r.domain, r.qid), r.chance)
    by_domain: dict[str, list[float]] = defaultdict(list)
    for (domain, _), chance in seen.items():
        by_domain[domain].append(chance)
    return {d: sum(v) / len(v) for d, v in by_domain.items()}


def choice_counts(records: Iterable[Record]) -> dict[int, int]:
    """How many distinct questions have each number of choices (the report says which were asked)."""
    seen: dict[tuple[str, str, str], int] = {}
    for r in records:
        if r.n_choices is not None:
            seen.setdefault((r.split, r.domain, r.qid), r.n_choices)
    counts: dict[int, int] = defaultdict(int)
    for n in seen.values():
        counts[n] += 1
    return dict(sorted(counts.items()))


# --- conditions --------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class ConditionKey:
    """One evaluated condition of one role; ``label`` is what tables and figures print."""

    rank: int
    alpha: float
    template: str
    layer: int
    position: int
    variant: str = ""
    kind: str = field(compare=False, default="")
    label: str = field(compare=False, default="")


def _alpha_text(alpha: float) -> str:
    return f"{alpha:g}"


def condition_keys(records: Sequence[Record]) -> dict[tuple[Any, ...], ConditionKey]:
    """Label every (condition, α, template, layer, position) that occurs, unambiguously per role
    (in the records given: ``analyse`` passes those of one split)."""
    raw: dict[tuple[Any, ...], set[str]] = defaultdict(set)
    for r in records:
        if r.condition == "baseline":
            continue
        raw[(r.condition, r.alpha, r.persona_template, r.layer, r.position, r.variant)].add(str(r.role))
    templates = sorted({k[2] for k in raw if k[0] == "persona" and k[2] is not None})
    base_labels: dict[tuple[Any, ...], str] = {}
    for key in raw:
        kind, alpha, template = key[0], key[1], key[2]
        if kind == "persona":
            label = "persona" if len(templates) <= 1 else f"persona {templates.index(template) + 1}"
        elif kind in ("add", "random") and alpha is not None:
            label = f"{kind} α={_alpha_text(alpha)}"
        else:
            label = kind
        if key[5]:
            label = f"{label} {key[5]}"
        base_labels[key] = label
    # the same label at several (layer, position) sites for one role gets the site appended
    sites: dict[tuple[str, str], set[tuple[Any, Any]]] = defaultdict(set)
    for key, roles in raw.items():
        for role in roles:
            sites[(role, base_labels[key])].add((key[3], key[4]))
    keys: dict[tuple[Any, ...], ConditionKey] = {}
    for key, roles in raw.items():
        label = base_labels[key]
        if any(len(sites[(role, label)]) > 1 for role in roles):
            label = f"{label} @L{key[3]} p{key[4]}"
        kind = str(key[0])
        keys[key] = ConditionKey(
            rank=CONDITIONS.index(kind),
            alpha=-math.inf if key[1] is None else float(key[1]),
            template=key[2] or "",
            layer=-1 if key[3] is None else int(key[3]),
            position=0 if key[4] is None else int(key[4]),
            variant=key[5] or "",
            kind=kind,
            label=label,
        )
    return keys


# --- statistics of one comparison --------------------------------------------------------------------
@dataclass(frozen=True)
class Paired:
    """A condition against the baseline on the same questions."""

    n: int
    correct: int
    base_correct: int
    gained: int  # baseline wrong, condition right
    lost: int  # baseline right, condition wrong

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else math.nan

    @property
    def base_accuracy(self) -> float:
        return self.base_correct / self.n if self.n else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)

    @property
    def base_ci(self) -> tuple[float, float]:
        return wilson(self.base_correct, self.n)

    @property
    def rel_change(self) -> float:
        """Relative change of accuracy in percent; undefined (NaN) when the baseline scores zero."""
        if not self.n or self.base_correct == 0:
            return math.nan
        return 100.0 * (self.correct - self.base_correct) / self.base_correct

    @property
    def rel_ci(self) -> tuple[float, float]:
        """95% interval of the relative change: the paired difference's interval over acc_base."""
        if not self.n or self.base_correct == 0:
            return (math.nan, math.nan)
        low, high = paired_difference_interval(self.gained, self.lost, self.n)
        base = self.base_accuracy
        return (100.0 * low / base, 100.0 * high / base)

    @property
    def rel_ci_bootstrap(self) -> tuple[float, float]:
        """Paired bootstrap 95% interval of the relative change (questions resampled, condition and
        baseline together; seeded, so the same run gives the same interval)."""
        both = self.base_correct - self.lost
        neither = self.n - self.base_correct - self.gained
        return paired_bootstrap(both, self.gained, self.lost, neither)

    @property
    def p_value(self) -> float:
        return mcnemar(self.gained, self.lost)

    def __add__(self, other: Paired) -> Paired:
        return Paired(
            self.n + other.n,
            self.correct + other.correct,
            self.base_correct + other.base_correct,
            self.gained + other.gained,
            self.lost + other.lost,
        )


EMPTY = Paired(0, 0, 0, 0, 0)


#: Per-question outcome codes of a cell, aligned with ``Analysis.questions[domain]``: 2·condition + baseline
#: for a paired question, ABSENT where the condition has no row for it.
ABSENT = 4


def outcome_codes(condition: Mapping[str, bool], baseline: Mapping[str, bool]) -> bytes:
    """One byte per baseline question (in the baseline's order): what the cluster bootstrap resamples."""
    return bytes(
        ABSENT if qid not in condition else 2 * bool(condition[qid]) + bool(base)
        for qid, base in baseline.items()
    )


def pair(condition: Mapping[str, bool], baseline: Mapping[str, bool]) -> Paired:
    """Pair per-question correctness (qid → correct) with the baseline's on the shared qids."""
    n = correct = base_correct = gained = lost = 0
    for qid, ok in condition.items():
        if qid not in baseline:
            continue
        base = baseline[qid]
        n += 1
        correct += ok
        base_correct += base
        gained += ok and not base
        lost += base and not ok
    return Paired(n, correct, base_correct, gained, lost)


# --- the analysis -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One role × condition × domain comparison."""

    role: str
    role_domain: str | None
    condition: ConditionKey
    domain: str
    stats: Paired
    #: acc_norm paired the same way, for continuation-scored records (None for letter scoring).
    norm: Paired | None = None
    #: Per-question outcomes (:func:`outcome_codes`), so pooled tables can resample by question.
    outcomes: bytes = field(default=b"", repr=False, compare=False)

    @property
    def in_domain(self) -> bool:
        return self.domain == self.role_domain


@dataclass(frozen=True)
class Summary:
    """One role × condition: its own domain vs the mean over the other domains (the paper's Table 3)."""

    role: str
    role_domain: str | None
    condition: ConditionKey
    in_domain: Paired | None
    ood_mean_rel: float  # unweighted mean of the per-domain relative changes
    ood_domains: int
    ood_pooled: Paired  # all out-of-domain questions pooled, for n and a p-value
    in_domain_norm: Paired | None = None  # acc_norm on the own domain (continuation scoring)


@dataclass(frozen=True)
class BaselineRow:
    domain: str
    n: int
    correct: int
    chance: float = math.nan  # mean 1/number of choices over the domain's questions
    n_norm: int = 0  # questions with an acc_norm verdict (continuation scoring)
    correct_norm: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else math.nan

    @property
    def accuracy_norm(self) -> float:
        return self.correct_norm / self.n_norm if self.n_norm else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)


@dataclass(frozen=True)
class Analysis:
    domains: tuple[str, ...]
    roles: tuple[str, ...]
    role_domain: Mapping[str, str | None]
    conditions: tuple[ConditionKey, ...]
    baseline: tuple[BaselineRow, ...]
    cells: tuple[Cell, ...]
    summaries: tuple[Summary, ...]
    unpaired: int  # condition rows whose question has no baseline row (left out of every table)
    chance: Mapping[str, float] = field(default_factory=dict)  # domain -> chance level of its questions
    scoring: tuple[str, ...] = ("letter",)  # the scoring rules of the analysed records, sorted
    _cells: dict[tuple[str, str, str], Cell] = field(init=False, repr=False, compare=False)
    _summaries: dict[tuple[str, str], Summary] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cells", {(c.role, c.condition.label, c.domain): c for c in self.cells})
        object.__setattr__(self, "_summaries", {(s.role, s.condition.label): s for s in self.summaries})

    def cell(self, role: str, label: str, domain: str) -> Cell | None:
        return self._cells.get((role, label, domain))

    def summary(self, role: str, label: str) -> Summary | None:
        return self._summaries.get((role, label))

    @property
    def labels(self) -> tuple[str, ...]:
        """Condition labels in display order, each once."""
        seen: dict[str, None] = {}
        for key in self.conditions:
            seen.setdefault(key.label, None)
        return tuple(seen)

    def column_n(self, label: str, domain: str) -> str:
        """'n=…' of one condition's cells in one domain (a range when roles differ)."""
        sizes = sorted({c.stats.n for c in self.cells if c.condition.label == label and c.domain == domain})
        if not sizes:
            return "n=0"
        return f"n={sizes[0]}" if len(sizes) == 1 else f"n={sizes[0]}–{sizes[-1]}"

    @property
    def continuation(self) -> bool:
        """Whether any analysed record is continuation scored (tables then show acc_norm too)."""
        return "continuation" in self.scoring

    @property
    def min_n(self) -> int:
        sizes = [c.stats.n for c in self.cells] or [b.n for b in self.baseline]
        return min(sizes, default=0)


def star(p: float) -> str:
    return "*" if p < SIGNIFICANCE else ""


# --- many comparisons and pooled comparisons -----------------------------------------------------------
@dataclass(frozen=True)
class Adjusted:
    """Holm and Benjamini–Hochberg adjusted p-values of one test within its family."""

    holm: float | None
    bh: float | None


def adjust(pvalues: Sequence[float | None]) -> list[Adjusted]:
    """Both adjustments of one family of p-values (None stays None), in the input's order."""
    return [Adjusted(h, b) for h, b in zip(holm(pvalues), benjamini_hochberg(pvalues), strict=True)]


def condition_holm(a: Analysis, label: str) -> dict[tuple[str, str], float]:
    """(role, domain) -> Holm-adjusted p over the role × domain cells of one condition (one heatmap's
    family, so the table and the figure mark the same cells)."""
    cells = [c for c in a.cells if c.condition.label == label]
    adjusted = holm([c.stats.p_value for c in cells])
    return {(c.role, c.domain): p for c, p in zip(cells, adjusted, strict=True) if p is not None}


@dataclass(frozen=True)
class Pooled:
    """Pairs of several cells pooled, with questions as clusters (roles of a domain share questions)."""

    cells: int
    roles: int
    n: int  # pairs
    questions: int  # distinct questions (clusters)
    correct: int  # right under the condition, over all pairs
    reference_correct: int  # right under the reference (the baseline, or another condition)
    ci: tuple[float, float]  # cluster bootstrap 95% interval of rel_change
    p_value: float  # clustered McNemar

    @property
    def rel_change(self) -> float:
        if self.reference_correct == 0:
            return math.nan
        return 100.0 * (self.correct - self.reference_correct) / self.reference_correct


def pool(comparisons: Iterable[tuple[Cell, Cell | None]]) -> Pooled:
    """Pool (cell, reference) comparisons by question: the reference is the baseline when None, else
    another cell of the same role and domain (paired on the questions both answered).

    Each question is one cluster whatever the number of roles that answered it, so the interval (cluster
    bootstrap: one resample of question ids for every role's pairs) and the p-value (clustered McNemar)
    do not treat roles sharing the same questions as independent evidence.
    """
    sums: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    cells = 0
    roles: set[str] = set()
    n = 0
    for cell, reference in comparisons:
        ref = reference.outcomes if reference is not None else None
        used = False
        for i, code in enumerate(cell.outcomes):
            if code == ABSENT:
                continue
            ok = code >> 1
            if ref is None:
                other = code & 1
            elif ref[i] == ABSENT:
                continue
            else:
                other = ref[i] >> 1
            entry = sums[(cell.domain, i)]
            entry[0] += ok
            entry[1] += other
            entry[2] += ok - other
            n += 1
            used = True
        if used:
            cells += 1
            roles.add(cell.role)
    clusters = [(c, r) for c, r, _ in sums.values()]
    return Pooled(
        cells=cells,
        roles=len(roles),
        n=n,
        questions=len(sums),
        correct=sum(c for c, _ in clusters),
        reference_correct=sum(r for _, r in clusters),
        ci=cluster_bootstrap(clusters),
        p_value=clustered_mcnemar(d for _, _, d in sums.values()),
    )


def order_domains(found: Iterable[str], table: Mapping[str, Sequence[str]] | None = None) -> tuple[str, ...]:
    """The domain table's order first, then any other domain alphabetically."""
    canonical = list(builtin_domains() if table is None else table)
    found_set = set(found)
    return tuple([d for d in canonical if d in found_set] + sorted(found_set - set(canonical)))


def order_roles(
    roles: Iterable[str], role_domain: Mapping[str, str | None], domains: Sequence[str]
) -> tuple[str, ...]:
    """Roles grouped by their domain, in domain order; roles without a known domain last."""
    canonical = {role: i for i, role in enumerate(role_domains())}

    def key(role: str) -> tuple[int, int, str]:
        domain = role_domain.get(role)
        rank = domains.index(domain) if domain in domains else len(domains)
        return (rank, canonical.get(role, len(canonical)), role)

    return tuple(sorted(set(roles), key=key))


def analyse(
    records: Sequence[Record],
    *,
    selection: Mapping[str, Any] | None = None,
    domains: Mapping[str, Sequence[str]] | None = None,
    split: str = "test",
    role_map: Mapping[str, str] | None = None,
) -> Analysis:
    """Pair every condition with the baseline per domain and summarise in- vs out-of-domain.

    Args:
        records: The run's records (``rolevec.analysis.tables.load_records(run_dir)``).
        selection: The run's parsed ``selection.json``; its roles' domains take precedence.
        domains: Domain -> its roles, deciding each role's own domain (default: the paper's Table 2).
        split: The split whose records are analysed (default ``test``).
        role_map: A role -> domain map (:func:`rolevec.data.sources.load_role_domains`) for roles outside
            the table; it takes precedence over the selection and the table.

    Returns:
        The ``Analysis``: per-domain cells, per-role summaries and the baseline rows.

    Example:
        ```python
        from rolevec.analysis.tables import load_records
        result = analyse(load_records("runs/quick"), domains={"medicine": ["doctor"]})
        for s in result.summaries:
            print(s.role, s.condition.label, s.ood_mean_rel)
        ```
    """
    rows = [r for r in records if r.split == split]
    baseline: dict[str, dict[str, bool]] = defaultdict(dict)
    baseline_norm: dict[str, dict[str, bool]] = defaultdict(dict)
    for r in rows:
        if r.condition == "baseline":
            baseline[r.domain][r.qid] = r.correct
            if r.correct_norm is not None:
                baseline_norm[r.domain][r.qid] = r.correct_norm
    keys = condition_keys(rows)
    grouped: dict[tuple[str, tuple[Any, ...], str], dict[str, bool]] = defaultdict(dict)
    grouped_norm: dict[tuple[str, tuple[Any, ...], str], dict[str, bool]] = defaultdict(dict)
    unpaired = 0
    for r in rows:
        if r.condition == "baseline":
            continue
        raw = (r.condition, r.alpha, r.persona_template, r.layer, r.position, r.variant)
        grouped[(str(r.role), raw, r.domain)][r.qid] = r.correct
        if r.correct_norm is not None:
            grouped_norm[(str(r.role), raw, r.domain)][r.qid] = r.correct_norm
        unpaired += r.qid not in baseline.get(r.domain, {})
    domain_of = role_domains(selection, domains, mapping=role_map)
    all_domains = order_domains({r.domain for r in rows}, domains)
    roles = order_roles({role for role, _, _ in grouped}, domain_of, all_domains)
    cells = []
    for (role, raw, domain), answers in grouped.items():
        stats = pair(answers, baseline.get(domain, {}))
        if stats.n:
            norm_answers = grouped_norm.get((role, raw, domain))
            norm = pair(norm_answers, baseline_norm.get(domain, {})) if norm_answers else None
            norm = norm if norm is not None and norm.n else None
            codes = outcome_codes(answers, baseline.get(domain, {}))
            cells.append(Cell(role, domain_of.get(role), keys[raw], domain, stats, norm, codes))
    cells.sort(key=lambda c: (roles.index(c.role), c.condition, all_domains.index(c.domain)))
    summaries = []
    for role in roles:
        for key in sorted({c.condition for c in cells if c.role == role}):
            own = [c for c in cells if c.role == role and c.condition == key]
            inside_cell = next((c for c in own if c.in_domain), None)
            inside = inside_cell.stats if inside_cell else None
            outside = [c.stats for c in own if not c.in_domain]
            rels = [s.rel_change for s in outside if not math.isnan(s.rel_change)]
            summaries.append(
                Summary(
                    role=role,
                    role_domain=domain_of.get(role),
                    condition=key,
                    in_domain=inside,
                    ood_mean_rel=sum(rels) / len(rels) if rels else math.nan,
                    ood_domains=len(outside),
                    ood_pooled=sum(outside, EMPTY),
                    in_domain_norm=inside_cell.norm if inside_cell else None,
                )
            )
    chance = chance_levels(rows, split)
    base_rows = tuple(
        BaselineRow(
            d,
            len(baseline[d]),
            sum(baseline[d].values()),
            chance.get(d, math.nan),
            len(baseline_norm[d]),
            sum(baseline_norm[d].values()),
        )
        for d in all_domains
        if d in baseline
    )
    return Analysis(
        domains=all_domains,
        roles=roles,
        role_domain={role: domain_of.get(role) for role in roles},
        conditions=tuple(sorted(set(keys.values()))),
        baseline=base_rows,
        cells=tuple(cells),
        summaries=tuple(summaries),
        unpaired=unpaired,
        chance=chance,
        scoring=tuple(sorted({r.scoring or "letter" for r in rows})) or ("letter",),
    )


# --- sweep --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepCurve:
    label: str
    layers: tuple[int, ...]
    accuracy: tuple[float, ...]


@dataclass(frozen=True)
class SweepPanel:
    role: str
    domain: str
    baseline: float
    n: int
    curves: tuple[SweepCurve, ...]
    chosen: tuple[int, float] | None
    chance: float = math.nan  # chance level of the domain's questions (dashed line in the figure)


def sweep_panels(
    rows: Iterable[Mapping[str, Any]],
    selection: Mapping[str, Any] | None = None,
    order: Sequence[str] = (),
    *,
    role_map: Mapping[str, str] | None = None,
    chance: Mapping[str, float] | None = None,
) -> list[SweepPanel]:
    """Per role, on its own domain: the best add accuracy over positions at each layer and α, and ablation
    (mean over positions), with the baseline, the chosen site and the domain's chance level (``chance``:
    domain -> level, :func:`chance_levels` of the validation records); roles in ``order`` first."""
    by_role: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("role") is not None and row.get("accuracy") is not None:
            by_role[str(row["role"])].append(row)
    panels = []
    chosen_info = (selection or {}).get("roles") or {}
    domain_of = role_domains(selection, mapping=role_map, sweep=[r for rs in by_role.values() for r in rs])
    roles = [r for r in order if r in by_role] + sorted(set(by_role) - set(order))
    for role in roles:
        own = domain_of.get(role)
        role_rows = [r for r in by_role[role] if r.get("domain") == own] or by_role[role]
        domain = str(role_rows[0].get("domain"))
        role_rows = [r for r in role_rows if r.get("domain") == domain]
        best: dict[float, dict[int, float]] = defaultdict(dict)
        ablate: dict[int, list[float]] = defaultdict(list)
        for r in role_rows:
            layer, acc = int(r["layer"]), float(r["accuracy"])
            if r.get("condition") == "ablate":
                ablate[layer].append(acc)
            elif r.get("condition") == "add" and r.get("alpha") is not None:
                alpha = float(r["alpha"])
                best[alpha][layer] = max(acc, best[alpha].get(layer, -math.inf))
        curves = []
        for alpha in sorted(best):
            layers = tuple(sorted(best[alpha]))
            curves.append(
                SweepCurve(f"add α={alpha:g} (best position)", layers, tuple(best[alpha][x] for x in layers))
            )
        if ablate:
            layers = tuple(sorted(ablate))
            means = tuple(sum(ablate[x]) / len(ablate[x]) for x in layers)
            curves.append(SweepCurve("ablate (mean over positions)", layers, means))
        bases = [float(r["baseline_accuracy"]) for r in role_rows if r.get("baseline_accuracy") is not None]
        info = chosen_info.get(role) or {}
        chosen = None
        if info.get("layer") is not None and info.get("val_accuracy") is not None:
            chosen = (int(info["layer"]), float(info["val_accuracy"]))
        panels.append(
            SweepPanel(
                role=role,
                domain=domain,
                baseline=sum(bases) / len(bases) if bases else math.nan,
                n=max((int(r.get("n") or 0) for r in role_rows), default=0),
                curves=tuple(curves),
                chosen=chosen,
                chance=(chance or {}).get(domain, math.nan),
            )
        )
    return panels


def main_label(a: Analysis, kind: str) -> str | None:
    """The condition of one kind that the headline summary speaks for: the one with most cells, then the
    largest |α| (the paper's strongest setting); None when the run has no such condition."""
    found: dict[str, tuple[int, float]] = {}
    for c in a.cells:
        if c.condition.kind == kind:
            count, alpha = found.get(c.condition.label, (0, abs(c.condition.alpha)))
            found[c.condition.label] = (count + 1, alpha)
    if not found:
        return None
    return max(found, key=lambda label: (*found[label], label))


#: The diagnostics of ``diagnostics.json`` a vector must beat random directions on, in table order.
DIAGNOSTICS = ("consistency", "separation", "stability")


@dataclass(frozen=True)
class DiagnosticRow:
    """One role's entry of ``diagnostics.json`` (NaN where a value is missing or not a number)."""

    role: str
    layer: int | None
    position: int | None
    values: dict[str, float]
    thresholds: dict[str, float]
    split_half: float
    flagged: tuple[str, ...]
    #: The label-shuffle null's 95th percentiles (NaN in a file written before there was one).
    shuffle_thresholds: dict[str, float] = field(default_factory=dict)

    def bar(self, name: str) -> float:
        """What diagnostic ``name`` must beat: the higher of the two nulls (the random one alone in an
        older file)."""
        shuffled = self.shuffle_thresholds.get(name, math.nan)
        return self.thresholds[name] if math.isnan(shuffled) else max(self.thresholds[name], shuffled)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def diagnostic_rows(data: Mapping[str, Any], roles: Sequence[str] = ()) -> list[DiagnosticRow]:
    """The roles of ``diagnostics.json`` (``roles`` first, in their order, then the rest), read leniently:
    a malformed entry is left out rather than failing the report."""
    entries = data.get("roles")
    if not isinstance(entries, Mapping):
        return []
    order = [r for r in roles if r in entries] + sorted(r for r in entries if r not in roles)
    rows = []
    for role in order:
        entry = entries[role]
        if not isinstance(entry, Mapping):
            continue
        thresholds = entry.get("thresholds")
        thresholds = thresholds if isinstance(thresholds, Mapping) else {}
        flagged = entry.get("flagged")
        shuffled = entry.get("shuffle_thresholds")
        shuffled = shuffled if isinstance(shuffled, Mapping) else {}
        rows.append(
            DiagnosticRow(
                role=str(role),
                layer=_whole(entry.get("layer")),
                position=_whole(entry.get("position")),
                values={k: _number(entry.get(k)) for k in DIAGNOSTICS},
                thresholds={k: _number(thresholds.get(k)) for k in DIAGNOSTICS},
                split_half=_number(entry.get("split_half")),
                flagged=tuple(str(f) for f in flagged) if isinstance(flagged, list) else (),
                shuffle_thresholds={k: _number(shuffled.get(k)) for k in DIAGNOSTICS},
            )
        )
    return rows
