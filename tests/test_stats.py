from __future__ import annotations

import math
from typing import Any

import pytest

from rolevec.analysis.stats import format_table, mcnemar, per_subject, relative_change, summarize, wilson


def test_wilson_known_values() -> None:
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_relative_change_is_the_papers_percentage() -> None:
    assert relative_change(0.55, 0.50) == pytest.approx(10.0)
    assert relative_change(0.45, 0.50) == pytest.approx(-10.0)
    assert relative_change(0.3, 0.0) is None


def test_mcnemar_exact_and_chi_square() -> None:
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(0, 5) == pytest.approx(0.0625)  # 2 * 0.5**5
    assert mcnemar(5, 0) == pytest.approx(0.0625)
    assert mcnemar(3, 3) == 1.0
    # 1 vs 9: exact two-sided binomial, 2 * (C(10,0) + C(10,1)) / 2**10
    assert mcnemar(1, 9) == pytest.approx(22 / 1024)
    # 30 vs 10 uses chi-square with continuity correction: (|30-10|-1)^2/40 = 9.025
    assert mcnemar(30, 10) == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))
    assert mcnemar(30, 10) == pytest.approx(0.002663, abs=1e-5)
    # chi-square regime with equal counts: no evidence at all (R's mcnemar.test gives 1), and never a
    # smaller p than a difference of one
    assert mcnemar(15, 15) == 1.0 and mcnemar(15, 16) == 1.0
    assert mcnemar(40, 40) >= mcnemar(40, 41)


def _rec(cond: str, qid: str, correct: bool, subject: str = "s1", **kw: Any) -> dict[str, Any]:
    base = {
        "condition": cond,
        "role": None if cond == "baseline" else "lawyer",
        "persona_template": None,
        "layer": None,
        "position": None,
        "alpha": None,
        "domain": "law",
        "split": "test",
        "qid": qid,
        "subject": subject,
        "correct": correct,
    }
    base.update(kw)
    return base


def test_summary_pairs_with_baseline_on_common_questions() -> None:
    base = [_rec("baseline", f"law/{i}", i < 5, subject="s1" if i < 6 else "s2") for i in range(10)]
    # add: right on 0..6 (gains 5, 6), wrong on 4 (loses 4); question 9 is missing from add
    add = [
        _rec("add", f"law/{i}", i in {0, 1, 2, 3, 5, 6}, layer=3, position=-1, alpha=3.0) for i in range(9)
    ]
    rows = summarize(base + add)
    assert [r.condition for r in rows] == ["baseline", "add"]
    b, a = rows
    assert (b.n, b.correct, b.accuracy, b.mcnemar_p) == (10, 5, 0.5, None)
    assert (a.n, a.correct, a.n_paired) == (9, 6, 9)
    assert a.baseline_accuracy == pytest.approx(5 / 9)
    assert a.rel_change == pytest.approx(100 * (6 / 9 - 5 / 9) / (5 / 9))
    assert (a.gained, a.lost) == (2, 1)
    assert a.mcnemar_p == pytest.approx(1.0)
    assert a.label == "add lawyer L3@-1 α=3"
    subjects = per_subject(base + add)
    assert {r.group for r in subjects} == {"law/s1", "law/s2"}
    table = format_table(rows)
    header = table.splitlines()[0]
    for column in ("accuracy", "95% CI", "rel. change", "McNemar p", "n"):
        assert column in header
    assert "+20.0%" in table and "[0.237, 0.763]" in table
