"""Accuracy with Wilson intervals, relative change, and McNemar's paired test against the baseline.

Plain :mod:`math`, no SciPy: the paper reports accuracy differences on a few hundred questions, which are
often within noise, so every table carries a 95% interval and a paired p-value. Entry points::

    wilson(k, n, z=1.96) -> tuple[float, float]
    relative_change(acc, base) -> float | None          # 100 * (acc - base) / base
    mcnemar(b, c) -> float                               # two-sided p-value
    clustered_mcnemar(differences) -> float              # McNemar when pairs share questions
    holm(pvalues) / benjamini_hochberg(pvalues)          # adjusted p-values over one family
    paired_bootstrap(both, gained, lost, neither)        # 95% interval of the relative change
    cluster_bootstrap(clusters)                          # the same, resampling whole questions
    summarize(records, *, by=("domain",)) -> list[SummaryRow]
    per_subject(records) -> list[SummaryRow]
    format_table(rows) -> str
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Below this many discordant pairs the exact binomial test is used, above it chi-square (1 dof, with
#: continuity correction), the usual rule of thumb.
EXACT_BELOW = 25


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is outside 0..{n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def relative_change(acc: float, base: float) -> float | None:
    """The paper's relative change in percent, 100·(acc − base)/base; None when the baseline is 0."""
    if base == 0:
        return None
    return 100.0 * (acc - base) / base


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided sign test P(X ≤ min) doubled, X ~ Bin(n, 1/2)."""
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def mcnemar(b: int, c: int, *, exact_below: int = EXACT_BELOW) -> float:
    """Two-sided p-value of McNemar's test from the discordant counts b and c.

    ``b`` = pairs right under the condition only, ``c`` = right under the baseline only (symmetric). Exact
    binomial when b + c < ``exact_below``, else chi-square with continuity correction.
    """
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    if n < exact_below:
        return _binom_two_sided(b, n)
    stat = max(0, abs(b - c) - 1) ** 2 / n  # the correction never pushes |b − c| = 0 below zero
    return math.erfc(math.sqrt(stat / 2.0))  # survival function of chi-square with 1 dof


def clustered_mcnemar(differences: Iterable[int]) -> float:
    """Two-sided p of McNemar's test when pairs come in clusters (Durkalski et al., 2003).

    ``differences`` holds, per cluster (a question shared by several roles' pairs), its gained minus lost
    pairs. Pooling roles that answered the same questions makes their pairs dependent, so the variance
    is taken over clusters: chi-square (Σd)²/Σd² with 1 dof. With one pair per cluster this is McNemar's
    statistic without continuity correction. 1.0 when no cluster has a discordant pair.
    """
    total = squares = 0
    for d in differences:
        total += d
        squares += d * d
    if squares == 0:
        return 1.0
    return math.erfc(math.sqrt(total * total / squares / 2.0))


# --- many comparisons ---------------------------------------------------------------------------------
def _family(pvalues: Sequence[float | None]) -> list[tuple[int, float]]:
    """(index, p) of the p-values that take part (None and NaN do not), sorted by p, ties by index."""
    found = [(i, float(p)) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    for _, p in found:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value {p} is outside [0, 1]")
    return sorted(found, key=lambda item: (item[1], item[0]))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order.

    The family is every p that is not None/NaN; those stay None. Holm controls the chance of any false
    finding among the family, without assuming the tests are independent.
    """
    ranked = _family(pvalues)
    m = len(ranked)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (i, p) in enumerate(ranked):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: Sequence[float | None]) -> list[float | None]:
    """Benjamini–Hochberg adjusted p-values (false discovery rate), in the input's order; None/NaN stay
    None. Less strict than Holm: it bounds the expected share of false findings among those reported."""
    ranked = _family(pvalues)
    m = len(ranked)
    out: list[float | None] = [None] * len(pvalues)
    running = 1.0
    for rank in range(m - 1, -1, -1):
        i, p = ranked[rank]
        running = min(running, m * p / (rank + 1))
        out[i] = running
    return out


# --- bootstrap intervals ------------------------------------------------------------------------------
#: Bootstrap resamples and seed of every interval in the report: fixed, so a report rebuilds identically.
RESAMPLES = 2000
SEED = 0


def _percentile_interval(
    cond: np.ndarray[Any, Any], base: np.ndarray[Any, Any], level: float
) -> tuple[float, float]:
    """Percentile interval of 100·(cond − base)/base over resamples whose baseline is not zero."""
    keep = base > 0
    if not keep.any():
        return (math.nan, math.nan)
    rel = 100.0 * (cond[keep] - base[keep]) / base[keep]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(rel, [tail, 1.0 - tail])
    return (float(low), float(high))


def paired_bootstrap(
    both: int,
    gained: int,
    lost: int,
    neither: int,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval of the relative change 100·(acc − acc_base)/acc_base from paired counts.

    Resampling n pairs with replacement only matters through how many of each kind (right under both,
    gained, lost, wrong under both) are drawn, so each resample is one multinomial draw: the same as
    resampling questions, condition and baseline together. NaN bounds without pairs or baseline hits.
    """
    counts = (both, gained, lost, neither)
    if min(counts) < 0:
        raise ValueError("pair counts must be non-negative")
    n = sum(counts)
    if n == 0 or both + lost == 0:
        return (math.nan, math.nan)
    rng = np.random.Generator(np.random.PCG64(seed))
    draws = rng.multinomial(n, [c / n for c in counts], size=resamples)
    cond = draws[:, 0] + draws[:, 1]
    base = draws[:, 0] + draws[:, 2]
    return _percentile_interval(cond.astype(float), base.astype(float), level)


def cluster_bootstrap(
    clusters: Sequence[tuple[int, int]],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval of the pooled relative change, resampling whole clusters with replacement.

    ``clusters`` holds per question (cluster) its number of pairs right under the condition and right
    under the baseline, summed over every role that answered it: one resample of question ids applies to
    all roles' pairs, so roles sharing questions do not count as independent evidence. With one pair
    per cluster it is the plain paired bootstrap.
    """
    m = len(clusters)
    if m == 0:
        return (math.nan, math.nan)
    values = np.asarray(clusters, dtype=float).reshape(m, 2)
    if values[:, 1].sum() == 0:
        return (math.nan, math.nan)
    rng = np.random.Generator(np.random.PCG64(seed))
    chunk = max(1, 2_000_000 // m)  # bounded memory for tables of many questions
    cond_parts, base_parts = [], []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        picks = rng.integers(0, m, size=(size, m))
        sums = values[picks].sum(axis=1)
        cond_parts.append(sums[:, 0])
        base_parts.append(sums[:, 1])
    return _percentile_interval(np.concatenate(cond_parts), np.concatenate(base_parts), level)


# --- tables ------------------------------------------------------------------------------------------

CONDITION_KEYS = ("condition", "role", "persona_template", "layer", "position", "alpha")


@dataclass(frozen=True)
class SummaryRow:
    """One (condition, group) line of a results table; paired fields are None for the baseline itself."""

    condition: str
    role: str | None
    persona_template: str | None
    layer: int | None
    position: int | None
    alpha: float | None
    group: str  # the domain (or "domain/subject")
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    baseline_accuracy: float | None
    rel_change: float | None
    n_paired: int
    gained: int  # right under the condition, wrong under the baseline
    lost: int  # wrong under the condition, right under the baseline
    mcnemar_p: float | None
    #: Mean of 1/number of choices over the group's questions (what guessing scores); None without probs.
    chance: float | None = None
    #: Continuation scoring's acc_norm (share of ``correct_norm``); None for letter-scored records.
    accuracy_norm: float | None = None
    #: What else tells this condition apart (a capping range and its layers, :func:`steer_variant`).
    variant: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        label = condition_label(
            self.condition, self.role, self.layer, self.position, self.alpha, self.persona_template
        )
        return label if self.variant is None else f"{label} {self.variant}"


def steer_variant(record: Mapping[str, Any]) -> str | None:
    """A capped record's range (and its capped layers when they are not the vector's own layer), e.g.
    ``[-2, 5]`` or ``[-2, 5] at L10,11``; None for every other record (a composition is in its role)."""
    cap = record.get("cap")
    if cap is None:
        return None
    text = f"[{float(cap[0]):g}, {float(cap[1]):g}]"
    layers = [int(x) for x in record.get("cap_layers") or ()]
    if layers and layers != [record.get("layer")]:
        text += " at L" + ",".join(map(str, layers))
    return text


def condition_label(
    condition: str,
    role: str | None,
    layer: int | None,
    position: int | None,
    alpha: float | None,
    persona_template: str | None = None,
) -> str:
    """A short name such as ``add lawyer L12@-1 α=3`` or ``persona lawyer [imagine]``."""
    parts = [condition]
    if role:
        parts.append(role)
    if persona_template:
        parts.append(f"[{persona_template}]")
    if layer is not None:
        site = f"L{layer}"
        if position is not None:
            site += f"@{position}"
        parts.append(site)
    if alpha is not None:
        parts.append(f"α={alpha:g}")
    return " ".join(parts)


def _group_key(record: Mapping[str, Any], by: Sequence[str]) -> str:
    return "/".join(str(record[k]) for k in by)


def summarize(records: Iterable[Mapping[str, Any]], *, by: Sequence[str] = ("domain",)) -> list[SummaryRow]:
    """Accuracy per (condition, group), paired with the baseline of the same group on common questions.

    Records of several splits are pooled; pass only the records you want in the table.
    """
    outcome: dict[tuple[Any, ...], dict[str, dict[str, bool]]] = {}
    norms: dict[tuple[Any, ...], dict[str, dict[str, bool]]] = {}
    chances: dict[str, dict[str, float]] = {}
    for r in records:
        cond = (*(r.get(k) for k in CONDITION_KEYS), steer_variant(r))
        group, qid = _group_key(r, by), str(r["qid"])
        outcome.setdefault(cond, {}).setdefault(group, {})[qid] = bool(r["correct"])
        if r.get("correct_norm") is not None:
            norms.setdefault(cond, {}).setdefault(group, {})[qid] = bool(r["correct_norm"])
        probs = r.get("probs")
        if isinstance(probs, list) and probs:
            chances.setdefault(group, {}).setdefault(qid, 1.0 / len(probs))
    baselines = {
        group: answers
        for cond, groups in outcome.items()
        if cond[0] == "baseline"
        for group, answers in groups.items()
    }
    rows: list[SummaryRow] = []
    for cond, groups in outcome.items():
        for group, answers in groups.items():
            n = len(answers)
            k = sum(answers.values())
            acc = k / n if n else 0.0
            lo, hi = wilson(k, n)
            base = baselines.get(group)
            paired = [q for q in answers if base is not None and q in base]
            base_acc: float | None = None
            rel: float | None = None
            p: float | None = None
            gained = lost = 0
            if base is not None and cond[0] != "baseline" and paired:
                base_acc = sum(base[q] for q in paired) / len(paired)
                cond_acc = sum(answers[q] for q in paired) / len(paired)
                rel = relative_change(cond_acc, base_acc)
                gained = sum(1 for q in paired if answers[q] and not base[q])
                lost = sum(1 for q in paired if base[q] and not answers[q])
                p = mcnemar(gained, lost)
            elif cond[0] == "baseline":
                base_acc = acc
            levels = chances.get(group)
            norm = norms.get(cond, {}).get(group)
            rows.append(
                SummaryRow(
                    condition=cond[0],
                    role=cond[1],
                    persona_template=cond[2],
                    layer=cond[3],
                    position=cond[4],
                    alpha=cond[5],
                    group=group,
                    n=n,
                    correct=k,
                    accuracy=acc,
                    ci_low=lo,
                    ci_high=hi,
                    baseline_accuracy=base_acc,
                    rel_change=rel,
                    n_paired=len(paired) if cond[0] != "baseline" else n,
                    gained=gained,
                    lost=lost,
                    mcnemar_p=p,
                    chance=sum(levels.values()) / len(levels) if levels else None,
                    accuracy_norm=sum(norm.values()) / len(norm) if norm else None,
                    variant=cond[6],
                )
            )
    order = {c: i for i, c in enumerate(("baseline", "persona", "add", "ablate", "random", "cap"))}
    rows.sort(
        key=lambda r: (
            r.group,
            order.get(r.condition, 9),
            r.role or "",
            r.layer if r.layer is not None else -1,
            r.position if r.position is not None else 0,
            r.alpha if r.alpha is not None else 0.0,
            r.variant or "",
        )
    )
    return rows


def per_subject(records: Iterable[Mapping[str, Any]]) -> list[SummaryRow]:
    """The same table broken down by subject within each domain (group = ``domain/subject``)."""
    return summarize(records, by=("domain", "subject"))


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def format_table(rows: Sequence[SummaryRow]) -> str:
    """A plain-text table: condition, group, accuracy (and acc_norm for continuation scoring), 95% CI,
    chance level, relative change, McNemar p, n."""
    norm = any(r.accuracy_norm is not None for r in rows)
    header: tuple[str, ...] = ("condition", "domain", "accuracy", *(("acc_norm",) if norm else ()), "95% CI")
    header += ("chance", "rel. change", "McNemar p", "n")
    lines = [header]
    for r in rows:
        rel = "—" if r.rel_change is None or r.condition == "baseline" else f"{r.rel_change:+.1f}%"
        acc_norm = ("—" if r.accuracy_norm is None else f"{r.accuracy_norm:.3f}",) if norm else ()
        lines.append(
            (
                r.label,
                r.group,
                f"{r.accuracy:.3f}",
                *acc_norm,
                f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
                "—" if r.chance is None else f"{r.chance:.3f}",
                rel,
                _fmt_p(r.mcnemar_p),
                str(r.n),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append(
            "  ".join(
                cell.ljust(w) if j < 2 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
