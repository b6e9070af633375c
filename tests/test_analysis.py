from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from rolevec.analysis.tables import (
    analyse,
    builtin_domains,
    load_records,
    pair,
    paired_difference_interval,
    parse_record,
    role_domains,
)
from rolevec.errors import RolevecError
from synthetic_run import DOMAINS, domain_of, make_records, write_jsonl


def _rec(condition: str, qid: str, correct: bool, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"condition": condition, "role": None, "domain": "math", "split": "test"}
    row.update(qid=qid, correct=correct, **kw)
    return row


def test_pairing_counts_and_relative_change() -> None:
    base = {"q1": True, "q2": True, "q3": False, "q4": False}
    cond = {"q1": True, "q2": False, "q3": True, "q4": True, "extra": True}
    s = pair(cond, base)
    assert (s.n, s.correct, s.base_correct, s.gained, s.lost) == (4, 3, 2, 2, 1)
    assert s.accuracy == 0.75 and s.base_accuracy == 0.5
    assert s.rel_change == pytest.approx(50.0)
    assert s.p_value == pytest.approx(1.0)  # 2 vs 1 discordant pairs: nowhere near significant
    low, high = s.rel_ci
    assert low < s.rel_change < high


def test_relative_change_undefined_when_baseline_scores_zero() -> None:
    s = pair({"q1": True}, {"q1": False})
    assert math.isnan(s.rel_change)
    assert all(math.isnan(v) for v in s.rel_ci)


def test_paired_difference_interval_matches_wald() -> None:
    low, high = paired_difference_interval(30, 10, 100)
    diff = 0.2
    se = math.sqrt((40 / 100 - diff**2) / 100)
    assert (low, high) == pytest.approx((diff - 1.959964 * se, diff + 1.959964 * se), rel=1e-5)


def test_significant_only_with_many_discordant_pairs() -> None:
    assert pair({f"q{i}": True for i in range(12)}, {f"q{i}": False for i in range(12)}).p_value < 0.001
    mixed = {f"q{i}": i % 2 == 0 for i in range(12)}
    assert pair(mixed, {f"q{i}": True for i in range(12)}).p_value > 0.01


def test_analyse_in_and_out_of_domain() -> None:
    rows = make_records(["mathematician", "doctor"], n=20, seed=3)
    a = analyse([parse_record(r) for r in rows])
    assert a.domains == DOMAINS
    assert a.roles == ("mathematician", "doctor")  # math before medicine, the domain table's order
    assert a.labels == ("persona", "add α=1", "add α=3", "ablate", "random α=3")
    assert [b.n for b in a.baseline] == [20] * 8  # val rows are ignored
    for s in a.summaries:
        assert s.role_domain == domain_of(s.role)
        own = a.cell(s.role, s.condition.label, str(s.role_domain))
        assert own is not None and own.in_domain and s.in_domain == own.stats
        others = [a.cell(s.role, s.condition.label, d) for d in DOMAINS if d != s.role_domain]
        rels = [c.stats.rel_change for c in others if c is not None and not math.isnan(c.stats.rel_change)]
        assert s.ood_domains == 7
        assert s.ood_mean_rel == pytest.approx(sum(rels) / len(rels))
        assert s.ood_pooled.n == 7 * 20
    add3 = a.summary("mathematician", "add α=3")
    assert add3 is not None and add3.in_domain is not None and add3.in_domain.rel_change > 0
    ablate = a.summary("doctor", "ablate")
    assert ablate is not None and ablate.in_domain is not None and ablate.in_domain.rel_change <= 0


def test_analyse_reads_the_split_it_is_given() -> None:
    rows = [_rec("baseline", "q1", True, split="val"), _rec("baseline", "q2", False, split="val")]
    rows += [
        _rec("add", q, True, split="val", role="mathematician", layer=1, position=-1, alpha=3.0)
        for q in ("q1", "q2")
    ]
    rows.append(_rec("baseline", "q1", True))  # a test row, left out of the validation analysis
    a = analyse([parse_record(r) for r in rows], split="val")
    assert a.labels == ("add α=3",)
    assert [(c.stats.n, c.stats.correct, c.stats.base_correct) for c in a.cells] == [(2, 2, 1)]


def test_unpaired_rows_are_counted_and_left_out() -> None:
    rows = [
        _rec("baseline", "q1", True),
        _rec("add", "q1", True, role="mathematician", layer=1, position=-1, alpha=1.0),
        _rec("add", "q2", True, role="mathematician", layer=1, position=-1, alpha=1.0),
    ]
    a = analyse([parse_record(r) for r in rows])
    assert a.unpaired == 1
    assert [c.stats.n for c in a.cells] == [1]


def test_several_sites_for_one_label_get_the_site_in_the_label() -> None:
    rows = [_rec("baseline", "q1", True)]
    for layer in (1, 2):
        rows.append(_rec("add", "q1", True, role="mathematician", layer=layer, position=-1, alpha=3.0))
    a = analyse([parse_record(r) for r in rows])
    assert set(a.labels) == {"add α=3 @L1 p-1", "add α=3 @L2 p-1"}


def test_role_domains_prefer_the_selection() -> None:
    assert role_domains()["lawyer"] == "law"
    assert role_domains({"roles": {"lawyer": {"domain": "politics"}, "poet": {"domain": "arts"}}}) == {
        **role_domains(),
        "lawyer": "politics",
        "poet": "arts",
    }
    assert sum(len(v) for v in builtin_domains().values()) == 29


def test_missing_records_say_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(RolevecError, match="rolevec evaluate"):
        load_records(tmp_path)


def test_bad_record_names_its_number(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "records.jsonl", [_rec("baseline", "q1", True), {"condition": "add", "qid": "x"}])
    with pytest.raises(RolevecError, match="record 2"):
        load_records(tmp_path)


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(_rec("baseline", "q1", True)) + "\n" + '{"condition": "bas', encoding="utf-8")
    assert len(load_records(tmp_path)) == 1
