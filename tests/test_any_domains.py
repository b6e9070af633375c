"""Reports for any benchmark: domains outside the paper's 8, 3- and 5-choice questions, continuation
scoring with acc_norm, and a role -> domain map for roles the paper's table does not know."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from rolevec.analysis.report import console_summary, load_run, write_report
from rolevec.analysis.stats import format_table, summarize
from rolevec.analysis.tables import analyse, chance_levels, load_records, role_domains, sweep_panels
from rolevec.data.sources import load_role_domains, role_domain
from rolevec.errors import RolevecError
from synthetic_run import make_run_dir

DOMAINS = ("medqa", "arc", "math")
CHOICES = {"medqa": 5, "arc": 3, "math": 4}
ROLE_MAP = {"doctor": "medqa", "science_teacher": "arc"}  # doctor is "medicine" in the paper's table
ROLES = ("doctor", "science_teacher", "mathematician")
SOURCE = {"source": "hf:GBaker/MedQA-USMLE-4-options", "split": "test"}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _rows(run: Path) -> list[dict[str, Any]]:
    text = (run / "records.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _run(tmp_path: Path, *, optional: bool = True, scoring: str | None = "continuation") -> Path:
    settings = {"mcq": SOURCE, "scoring": scoring} if scoring else None
    return make_run_dir(
        tmp_path / "run",
        roles=ROLES,
        n=40,
        optional=optional,
        domains=DOMAINS,
        n_choices=CHOICES,
        scoring=scoring,
        role_map=ROLE_MAP,
        settings=settings,
    )


def test_continuation_report_for_other_domains(tmp_path: Path) -> None:
    run = _run(tmp_path)
    files = write_report(run)
    # the paper's domains first in the paper's order, then the others sorted
    baseline = _csv(run / "tables" / "baseline.csv")
    assert [r["domain"] for r in baseline] == ["math", "arc", "medqa"]
    chance = {r["domain"]: float(r["chance"]) for r in baseline}
    assert chance == pytest.approx({"math": 0.25, "arc": 1 / 3, "medqa": 0.2})
    # acc and acc_norm recomputed from the records themselves
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in _rows(run):
        if row["condition"] == "baseline" and row["split"] == "test":
            counts[row["domain"]][0] += 1
            counts[row["domain"]][1] += row["correct"]
            counts[row["domain"]][2] += row["correct_norm"]
    for r in baseline:
        n, correct, correct_norm = counts[r["domain"]]
        assert int(r["n"]) == n == 40
        assert float(r["accuracy"]) == pytest.approx(correct / n)
        assert float(r["acc_norm"]) == pytest.approx(correct_norm / n)
    assert any(float(r["acc_norm"]) != float(r["accuracy"]) for r in baseline)  # a separate column

    summary = {(r["role"], r["condition"]): r for r in _csv(run / "tables" / "summary.csv")}
    doctor = summary[("doctor", "add α=3")]
    assert doctor["domain"] == "medqa" and float(doctor["chance"]) == pytest.approx(0.2)
    teacher = summary[("science_teacher", "ablate")]
    assert teacher["domain"] == "arc" and float(teacher["chance"]) == pytest.approx(1 / 3)
    assert doctor["acc_norm"] and doctor["baseline acc_norm"]

    cells = _csv(run / "tables" / "cells.csv")
    assert {r["domain"] for r in cells} == set(DOMAINS)
    for r in cells:
        assert float(r["chance"]) == pytest.approx(1 / CHOICES[r["domain"]])
    # one cell's acc_norm, paired with the baseline on the same questions, from the records
    cell = next(r for r in cells if (r["role"], r["condition"], r["domain"]) == ("doctor", "ablate", "medqa"))
    norm = {
        (row["condition"], row["qid"]): row["correct_norm"]
        for row in _rows(run)
        if row["domain"] == "medqa" and row["split"] == "test" and row["role"] in (None, "doctor")
    }
    qids = [q for (c, q) in norm if c == "ablate"]
    assert float(cell["acc_norm"]) == pytest.approx(sum(norm[("ablate", q)] for q in qids) / len(qids))
    assert float(cell["baseline acc_norm"]) == pytest.approx(
        sum(norm[("baseline", q)] for q in qids) / len(qids)
    )

    sweep = _csv(run / "tables" / "sweep_curves.csv")
    teacher_rows = [r for r in sweep if r["role"] == "science_teacher"]
    assert teacher_rows and {r["domain"] for r in teacher_rows} == {"arc"}
    assert all(float(r["chance"]) == pytest.approx(1 / 3) for r in teacher_rows)

    names = {p.name for p in files.figures}
    assert {"baseline.png", "sweep.png", "heatmap_add_a3.png", "persona_vs_vector.png", "pca.png"} <= names
    for path in files.figures:
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 1000

    for text in (files.html.read_text(encoding="utf-8"), files.markdown.read_text(encoding="utf-8")):
        assert "Question source: hf:GBaker/MedQA-USMLE-4-options (split: test)" in text
        assert "Scoring rule: continuation" in text
        assert "Choices per question: 3 (41 questions), 4 (41 questions), 5 (41 questions)" in text
        assert (
            "Chance level (test split, mean of 1/number of choices): math 25.0%, arc 33.3%, medqa 20.0%"
            in text
        )
        assert "acc_norm" in text
        assert "MMLU domain" not in text


def test_letter_scored_run_has_chance_but_no_acc_norm(tmp_path: Path) -> None:
    run = make_run_dir(
        tmp_path / "run",
        roles=ROLES,
        domains=DOMAINS,
        n_choices=CHOICES,
        scoring="letter",
        role_map=ROLE_MAP,
        settings={"mcq": "questions/arc_medqa.jsonl", "scoring": "letter"},
    )
    files = write_report(run)
    baseline = _csv(run / "tables" / "baseline.csv")
    assert "acc_norm" not in baseline[0] and "acc_norm" not in _csv(run / "tables" / "cells.csv")[0]
    assert float(next(r for r in baseline if r["domain"] == "medqa")["chance"]) == pytest.approx(0.2)
    text = files.markdown.read_text(encoding="utf-8")
    assert "Question source: questions/arc_medqa.jsonl" in text and "Scoring rule: letter" in text


def test_older_runs_say_unknown_and_mmlu_chance(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", optional=False)  # no settings.json, no scoring field, 4 choices
    files = write_report(run)
    text = files.markdown.read_text(encoding="utf-8")
    assert "Question source: unknown" in text and "Scoring rule: unknown" in text
    assert "Choices per question: 4 (all 248 questions)" in text  # 8 domains × (30 test + 1 val)
    baseline = _csv(run / "tables" / "baseline.csv")
    assert len(baseline) == 8 and {float(r["chance"]) for r in baseline} == {0.25}
    # records that name their rule but settings that do not: the rule comes from the records
    (run / "settings.json").write_text(json.dumps({"split": {"source": "builtin:mmlu"}}), encoding="utf-8")
    rows = [{**row, "scoring": "letter"} for row in _rows(run)]
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    text = write_report(run, force=True).markdown.read_text(encoding="utf-8")
    assert "Scoring rule: letter (from records.jsonl; settings.json does not pin it)" in text
    assert "Question source: builtin:mmlu (the split's source" in text


def test_role_map_decides_the_own_domain_without_a_selection(tmp_path: Path) -> None:
    run = _run(tmp_path, optional=False)  # no selection.json or sweep: nothing says science_teacher's domain
    records = load_records(run)
    without = analyse(records)
    assert without.role_domain["science_teacher"] is None
    assert without.role_domain["doctor"] == "medicine"  # the paper's table, which has no medqa questions
    assert all(s.in_domain is None for s in without.summaries if s.role != "mathematician")

    path = tmp_path / "roles.json"
    path.write_text(json.dumps({"Science Teacher": "arc", "doctor": "medqa"}), encoding="utf-8")
    mapping = load_role_domains(path)
    assert mapping == {"science_teacher": "arc", "doctor": "medqa"}
    mapped = analyse(records, role_map=mapping)
    assert mapped.role_domain == {"mathematician": "math", "science_teacher": "arc", "doctor": "medqa"}
    inside = [s for s in mapped.summaries if s.in_domain is not None]
    assert {s.role for s in inside} == set(ROLES) and all(s.ood_domains == 2 for s in inside)

    write_report(run, role_map=mapping)
    summary = {r["role"]: r["domain"] for r in _csv(run / "tables" / "summary.csv")}
    assert summary == {"mathematician": "math", "science_teacher": "arc", "doctor": "medqa"}
    lines = console_summary(run, role_map=mapping)
    assert "chance" in lines[0]
    assert any(line.startswith("science_teacher") and "0.333" in line for line in lines)
    # a map pinned in settings.json is read too
    settings = json.loads((run / "settings.json").read_text(encoding="utf-8"))
    settings["role_domains"] = {"science_teacher": "arc"}
    (run / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    assert load_run(run).analysis.role_domain["science_teacher"] == "arc"


def test_role_domains_precedence_and_the_sweep() -> None:
    sweep = [
        {"role": "nurse", "domain": "medqa"},
        {"role": "poet", "domain": "a"},
        {"role": "poet", "domain": "b"},
    ]
    got = role_domains(sweep=sweep)
    assert got["nurse"] == "medqa"  # the sweep runs on the role's own domain: it overrides the table
    assert "poet" not in got  # swept on two domains: the sweep does not say
    selection = {"roles": {"nurse": {"domain": "medicine"}}}
    assert role_domains(selection, sweep=sweep)["nurse"] == "medicine"
    assert role_domains(selection, sweep=sweep, mapping={"Nurse": "arc"})["nurse"] == "arc"


def test_sweep_panels_carry_the_chance_level(tmp_path: Path) -> None:
    run = _run(tmp_path)
    data = load_run(run)
    val = chance_levels(load_records(run), "val")
    assert val == pytest.approx({"medqa": 0.2, "arc": 1 / 3, "math": 0.25})
    panels = {p.role: p for p in sweep_panels(data.sweep.value, data.selection, chance=val)}
    assert panels["science_teacher"].domain == "arc"
    assert panels["science_teacher"].chance == pytest.approx(1 / 3)
    assert panels["doctor"].chance == pytest.approx(0.2)


def test_load_role_domains_refuses_bad_maps(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    cases = {
        "[1, 2]": "holds a JSON list, not an object",
        "{}": "maps no role",
        '{"nurse": 3}': "entry 'nurse' maps to 3: pass the domain as a non-empty string",
        '{"nurse": "  "}': "entry 'nurse' maps to",
        '{"nurse": "medqa", "Nurse": "arc"}': "maps role 'nurse' twice",
        "{nurse": "malformed JSON",
    }
    for text, message in cases.items():
        path.write_text(text, encoding="utf-8")
        with pytest.raises(RolevecError, match=r"map\.json") as info:
            load_role_domains(path)
        assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RolevecError, match="does not exist: pass a JSON file of role -> domain"):
        load_role_domains(tmp_path / "missing.json")


def test_role_domain_reads_the_map_first() -> None:
    mapping = {"doctor": "medqa", "science_teacher": "arc"}
    assert role_domain("Doctor", mapping=mapping) == "medqa"
    assert role_domain("science-teacher", mapping=mapping, strict=True) == "arc"
    assert role_domain("lawyer", mapping=mapping) == "law"  # the paper's table after the map
    assert role_domain("astronaut", mapping=mapping) is None
    with pytest.raises(RolevecError, match=r"nor in the role -> domain map.*`role_domains`"):
        role_domain("astronaut", mapping=mapping, strict=True)


def test_stats_tables_carry_chance_and_acc_norm(tmp_path: Path) -> None:
    run = _run(tmp_path, optional=False)
    records = [r for r in _rows(run) if r["split"] == "test"]
    rows = {(r.condition, r.role, r.alpha, r.group): r for r in summarize(records)}
    base = rows[("baseline", None, None, "medqa")]
    assert base.chance == pytest.approx(0.2)
    medqa = [r for r in records if r["condition"] == "baseline" and r["domain"] == "medqa"]
    assert base.accuracy_norm == pytest.approx(sum(r["correct_norm"] for r in medqa) / len(medqa))
    assert rows[("add", "science_teacher", 3.0, "arc")].chance == pytest.approx(1 / 3)
    table = format_table(list(rows.values()))
    header = table.splitlines()[0].split()
    assert "chance" in header and "acc_norm" in header
    assert any("0.333" in line and line.startswith("add science_teacher") for line in table.splitlines())
    letter = [{k: v for k, v in r.items() if k not in ("correct_norm", "pred_norm")} for r in records]
    assert "acc_norm" not in format_table(summarize(letter)).splitlines()[0]
    assert all(r.accuracy_norm is None for r in summarize(letter))
