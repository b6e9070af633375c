"""Adjusted p-values, bootstrap intervals and the report's main-findings lines (issue 18, part 5)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from rolevec.analysis.report import write_report
from rolevec.analysis.stats import (
    benjamini_hochberg,
    cluster_bootstrap,
    clustered_mcnemar,
    holm,
    mcnemar,
    paired_bootstrap,
)
from rolevec.analysis.tables import analyse, load_records, pool
from synthetic_run import domain_of, make_run_dir


# --- the adjustments ------------------------------------------------------------------------------
def test_holm_and_bh_hand_computed() -> None:
    # sorted: 0.005, 0.01, 0.03, 0.04; Holm multiplies by 4, 3, 2, 1 and takes the running maximum
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: p·m/rank = 0.02, 0.02, 0.04, 0.04, then the running minimum from the largest
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # ties get the same adjusted value
    assert holm([0.01, 0.01, 0.5]) == pytest.approx([0.03, 0.03, 0.5])
    assert benjamini_hochberg([0.01, 0.01, 0.5]) == pytest.approx([0.015, 0.015, 0.5])
    # capped at 1
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert benjamini_hochberg([0.6, 0.7]) == pytest.approx([0.7, 0.7])
    assert holm([]) == [] and benjamini_hochberg([]) == []


def test_missing_p_values_stay_none_and_leave_the_family() -> None:
    pvalues = [None, 0.01, math.nan, 0.02]
    assert holm(pvalues) == [None, pytest.approx(0.02), None, pytest.approx(0.02)]
    assert benjamini_hochberg(pvalues) == [None, pytest.approx(0.02), None, pytest.approx(0.02)]
    with pytest.raises(ValueError, match="outside"):
        holm([0.5, 1.5])


def test_adjustment_properties_on_random_families() -> None:
    rng = random.Random(3)
    for size in (1, 2, 7, 60, 300):
        raw = [rng.random() ** 3 for _ in range(size)]
        h, b = holm(raw), benjamini_hochberg(raw)
        for name, adj in (("holm", h), ("bh", b)):
            values = [v for v in adj if v is not None]
            assert len(values) == size, name
            assert all(p <= v + 1e-15 and v <= 1.0 for p, v in zip(raw, values, strict=True)), name
            order = sorted(range(size), key=lambda i: raw[i])
            assert all(values[i] <= values[j] + 1e-15 for i, j in itertools.pairwise(order)), name
        assert all(x is not None and y is not None and x >= y - 1e-15 for x, y in zip(h, b, strict=True))
    assert holm([0.03]) == [0.03] and benjamini_hochberg([0.03]) == [0.03]  # a family of one


def test_clustered_mcnemar() -> None:
    # one pair per cluster: McNemar's statistic without continuity correction, (b − c)² / (b + c)
    assert clustered_mcnemar([1] * 30 + [-1] * 10) == pytest.approx(math.erfc(math.sqrt(10.0 / 2)))
    assert clustered_mcnemar([0, 0]) == 1.0 and clustered_mcnemar([]) == 1.0
    # three roles moving together on each question: the same evidence as one role, not three
    assert clustered_mcnemar([3] * 30 + [-3] * 10) == pytest.approx(clustered_mcnemar([1] * 30 + [-1] * 10))
    assert mcnemar(90, 30) < clustered_mcnemar([3] * 30 + [-3] * 10)


# --- the bootstrap --------------------------------------------------------------------------------
def test_paired_bootstrap_contains_the_estimate_shrinks_and_is_seeded() -> None:
    both, gained, lost, neither = 40, 15, 5, 40
    point = 100 * ((both + gained) - (both + lost)) / (both + lost)
    low, high = paired_bootstrap(both, gained, lost, neither)
    assert low < point < high
    assert paired_bootstrap(both, gained, lost, neither) == (low, high)  # deterministic
    assert paired_bootstrap(both, gained, lost, neither, seed=1) != (low, high)
    big_low, big_high = paired_bootstrap(10 * both, 10 * gained, 10 * lost, 10 * neither)
    assert big_low < point < big_high
    assert big_high - big_low < 0.5 * (high - low)  # about 1/sqrt(10) as wide
    assert all(math.isnan(v) for v in paired_bootstrap(0, 3, 0, 5))  # baseline never right
    assert all(math.isnan(v) for v in paired_bootstrap(0, 0, 0, 0))
    with pytest.raises(ValueError):
        paired_bootstrap(-1, 0, 0, 0)


def _pairs(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = rng.random() < 0.5
        cond = (not base) if rng.random() < 0.2 else base
        out.append((int(cond), int(base)))
    return out


def test_cluster_bootstrap_accounts_for_shared_questions() -> None:
    questions = _pairs(120, seed=4)
    point = 100 * (sum(c for c, _ in questions) - sum(b for _, b in questions)) / sum(b for _, b in questions)
    # three roles answering the same questions the same way: 360 pairs but only 120 independent questions
    by_pair = [q for q in questions for _ in range(3)]
    by_question = [(3 * c, 3 * b) for c, b in questions]
    pair_low, pair_high = cluster_bootstrap(by_pair)
    clu_low, clu_high = cluster_bootstrap(by_question)
    assert pair_low < point < pair_high and clu_low < point < clu_high
    assert (clu_high - clu_low) > 1.4 * (pair_high - pair_low)  # about sqrt(3) wider
    # with one pair per cluster it is the paired bootstrap (up to resampling noise)
    both = sum(1 for c, b in questions if c and b)
    gained = sum(1 for c, b in questions if c and not b)
    lost = sum(1 for c, b in questions if b and not c)
    p_low, p_high = paired_bootstrap(both, gained, lost, len(questions) - both - gained - lost)
    one_low, one_high = cluster_bootstrap(questions)
    assert (one_high - one_low) == pytest.approx(p_high - p_low, rel=0.2)
    assert cluster_bootstrap(questions) == (one_low, one_high)  # seeded
    assert all(math.isnan(v) for v in cluster_bootstrap([]))


def test_pool_clusters_roles_that_share_questions(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", optional=False, n=40, seed=2)
    a = analyse(load_records(run))
    label = "add α=3"
    outside = [c for c in a.cells if c.condition.label == label and not c.in_domain]
    pooled = pool((c, None) for c in outside)
    assert pooled.n == sum(c.stats.n for c in outside) == 3 * 7 * 40
    assert pooled.questions == 8 * 40  # every domain's questions once, whatever the number of roles
    assert pooled.roles == 3 and pooled.cells == len(outside)
    assert pooled.correct == sum(c.stats.correct for c in outside)
    assert pooled.reference_correct == sum(c.stats.base_correct for c in outside)
    assert pooled.ci[0] < pooled.rel_change < pooled.ci[1]


# --- the report -----------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _opt(value: str) -> float | None:
    return float(value) if value else None


def _recompute_findings(rows: list[dict[str, Any]]) -> dict[str, tuple[float, int, int, float]]:
    """From the raw records: per stated test, (pooled rel. change, pairs, questions, raw clustered p)."""
    test = [r for r in rows if r["split"] == "test"]
    base = {(r["domain"], r["qid"]): r["correct"] for r in test if r["condition"] == "baseline"}
    answers: dict[tuple[str, Any, str], dict[tuple[str, str], bool]] = defaultdict(dict)
    for r in test:
        if r["condition"] != "baseline":
            answers[(r["role"], (r["condition"], r["alpha"]), r["domain"])][(r["domain"], r["qid"])] = r[
                "correct"
            ]

    def stats(comparisons: list[tuple[dict[tuple[str, str], bool], dict[tuple[str, str], bool]]]) -> Any:
        sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for cond, ref in comparisons:
            for q, ok in cond.items():
                if q in ref:
                    sums[q][0] += ok
                    sums[q][1] += ref[q]
        c, b = sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())
        n = sum(1 for cond, ref in comparisons for q in cond if q in ref)
        return 100 * (c - b) / b, n, len(sums), clustered_mcnemar(v[0] - v[1] for v in sums.values())

    roles = sorted({r["role"] for r in test if r["role"]})
    own = {role: domain_of(role) for role in roles}
    add, ablate, persona, rnd = ("add", 3.0), ("ablate", None), ("persona", None), ("random", 3.0)
    keys = {k[2] for k in answers}

    def cells(cond: Any, inside: bool | None) -> list[dict[tuple[str, str], bool]]:
        return [
            answers[(role, cond, d)]
            for role in roles
            for d in sorted(keys)
            if (role, cond, d) in answers and (inside is None or (d == own[role]) == inside)
        ]

    return {
        "add in": stats([(c, base) for c in cells(add, True)]),
        "add out": stats([(c, base) for c in cells(add, False)]),
        "ablate in": stats([(c, base) for c in cells(ablate, True)]),
        "ablate out": stats([(c, base) for c in cells(ablate, False)]),
        "vs": stats([(answers[(r, add, own[r])], answers[(r, persona, own[r])]) for r in roles]),
        "random": stats([(c, base) for c in cells(rnd, None)]),
    }


def _p_words(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


@pytest.mark.parametrize("n", [30, 150])
def test_report_shows_adjusted_p_families_and_the_findings(tmp_path: Path, n: int) -> None:
    run = make_run_dir(tmp_path / "run", n=n, seed=11)
    files = write_report(run)
    md = files.markdown.read_text(encoding="utf-8")
    page = files.html.read_text(encoding="utf-8")
    n_cells = 3 * 8 * 5  # roles × domains × (persona, add α=1, add α=3, ablate, random)
    for text in (md, page):
        assert f"family: the {n_cells} role × domain × condition cells of this table" in text
        assert "family: the 30 McNemar tests of this table" in text  # 15 summary rows × 2 tests
        assert "family: the 24 role × domain cells of this table" in text  # one condition's matrix
        assert "family: the 6 pooled tests of these lines" in text
        assert "cluster bootstrap" in text
    assert "| McNemar p | p Holm | p BH |" in md
    assert "<th>McNemar p</th><th>p Holm</th><th>p BH</th>" in page
    # the findings come first: before the banner and every section
    assert page.index("Main findings") < page.index('class="banner"') < page.index("<h2>")
    assert md.index("Main findings") < md.index("> How to read") < md.index("## Run")

    # CSVs: the adjusted columns are Holm and BH of the McNemar column over the whole table
    cells = _read_csv(run / "tables" / "cells.csv")
    assert len(cells) == n_cells
    raw = [float(r["McNemar p"]) for r in cells]
    assert [float(r["p Holm"]) for r in cells] == pytest.approx(holm(raw))
    assert [float(r["p BH"]) for r in cells] == pytest.approx(benjamini_hochberg(raw))
    for r in cells:
        low, high = _opt(r["rel. 95% CI (bootstrap) low"]), _opt(r["rel. 95% CI (bootstrap) high"])
        rel = _opt(r["rel. change"])
        if low is not None and high is not None and rel is not None:
            assert low - 1e-9 <= rel <= high + 1e-9
    summary = _read_csv(run / "tables" / "summary.csv")
    family = [_opt(r[k]) for r in summary for k in ("McNemar p", "pooled p")]
    expect = holm(family)
    got = [_opt(r[k]) for r in summary for k in ("p Holm", "pooled p Holm")]
    assert got == pytest.approx(expect)
    got_bh = [_opt(r[k]) for r in summary for k in ("p BH", "pooled p BH")]
    assert got_bh == pytest.approx(benjamini_hochberg(family))

    # the significance counts of the banner use the adjusted values
    holm_k = sum(float(r["p Holm"]) < 0.05 for r in cells)
    bh_k = sum(float(r["p BH"]) < 0.05 for r in cells)
    raw_k = sum(p < 0.05 for p in raw)
    assert f"Significant cells: {holm_k} of {n_cells} after Holm and {bh_k} after Benjamini–Hochberg" in md
    assert f"unadjusted, {raw_k} have McNemar p < 0.05" in md

    # the three lines, with numbers recomputed here from the records
    rows = [json.loads(line) for line in (run / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    found = _recompute_findings(rows)
    order = ["add in", "add out", "ablate in", "ablate out", "vs", "random"]
    adjusted = dict(zip(order, holm([found[k][3] for k in order]), strict=True))
    lines = re.findall(r"^- (.*)$", md.split("> How to read")[0], flags=re.M)
    assert len(lines) == 3
    first, second, third = (line.replace("&lt;", "<") for line in lines)
    for key, line in (
        ("add in", first),
        ("add out", first),
        ("ablate in", first),
        ("ablate out", first),
        ("vs", second),
        ("random", third),
    ):
        rel, pairs, questions, _ = found[key]
        p = adjusted[key]
        assert p is not None
        text = f"{rel:+.1f}%"
        assert text in line, (key, text, line)
        assert f"n = {pairs:,} pairs on {questions:,} questions, 3 roles, Holm p {_p_words(p)}" in line, key
    assert first.startswith("In-domain vs out-of-domain: add α=3:") and "ablate:" in first
    assert second.startswith("Persona vs vector") and third.startswith("Random control: random α=3")
    assert found["add in"][1] == 3 * n and found["add out"][1] == 3 * 7 * n and found["random"][2] == 8 * n
