from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from rolevec.errors import RolevecError
from rolevec.mcq import (
    DOMAINS,
    MCQSet,
    Split,
    builtin_mcq_dir,
    default_mcq_dir,
    ensure_split,
    load_mcq,
    make_split,
    parse_domains,
    role_domain,
)


def _item(i: int, subject: str = "college_mathematics", **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "question": f"Question {i}?",
        "choices": ["w", "x", "y", "z"],
        "answer": "ABCD"[i % 4],
        "subject": subject,
    }
    row.update(kw)
    return row


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_builtin_sample_loads_all_domains() -> None:
    mcq = load_mcq(builtin_mcq_dir())
    assert set(mcq.domains) == set(DOMAINS)
    for domain, items in mcq.items.items():
        assert len(items) == 24
        assert items[3].qid == f"{domain}/3" and items[3].domain == domain
        assert all(len(it.choices) == 4 and it.answer in "ABCD" for it in items)


def test_default_dir_prefers_env_then_shared_then_builtin(tmp_path: Path) -> None:
    path, kind = default_mcq_dir(tmp_path, env={"ROLEVEC_MMLU_DIR": str(tmp_path)})
    assert (path, kind) == (tmp_path, "env")
    with pytest.raises(RolevecError, match="ROLEVEC_MMLU_DIR"):
        default_mcq_dir(tmp_path, env={"ROLEVEC_MMLU_DIR": str(tmp_path / "missing")})
    shared = tmp_path / "shared" / "data" / "role-vectors-paper" / "mmlu_domains"
    shared.mkdir(parents=True)
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    path, kind = default_mcq_dir(work, env={})
    # the repository's own ../shared wins when it exists; otherwise the one found above the cwd
    assert kind == "shared" and path.name == "mmlu_domains"


def test_default_dir_falls_back_to_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rolevec.mcq as mcq_module

    monkeypatch.setattr(mcq_module, "SHARED_RELATIVE", Path("no-such-folder-anywhere"))
    path, kind = default_mcq_dir(tmp_path, env={})
    assert kind == "builtin" and path == builtin_mcq_dir()
    mcq = load_mcq(None, ["law"], cwd=tmp_path, env={})
    assert mcq.kind == "builtin" and len(mcq.items["law"]) == 24


def test_jsonl_csv_and_single_file_sources(tmp_path: Path) -> None:
    folder = tmp_path / "domains"
    folder.mkdir()
    (folder / "law.jsonl").write_text("\n".join(json.dumps(_item(i, "professional_law")) for i in range(5)))
    (folder / "math.csv").write_text(
        "question,A,B,C,D,answer,subject\nWhat is 2+2?,3,4,5,6,B,elementary\n"
        'Pick one,"a, with comma",b,c,d,0,elementary\n'
    )
    mcq = load_mcq(folder)
    assert mcq.domains == ["law", "math"]
    assert mcq.items["math"][0].choices == ("3", "4", "5", "6") and mcq.items["math"][0].answer == "B"
    assert mcq.items["math"][1].choices[0] == "a, with comma" and mcq.items["math"][1].answer == "A"
    csv2 = tmp_path / "econ.csv"
    csv2.write_text('question,choices,answer\nWhy?,"[""p"", ""q"", ""r"", ""s""]",D\n')
    assert load_mcq(csv2).items["econ"][0].choices == ("p", "q", "r", "s")
    mixed = _write(
        tmp_path / "mixed.json", [_item(0, domain="law"), _item(1, domain="math"), _item(2, domain="law")]
    )
    mcq = load_mcq(mixed, ["law"])
    assert [it.qid for it in mcq.items["law"]] == ["law/0", "law/2"]


def test_malformed_items_name_file_and_index(tmp_path: Path) -> None:
    rows = [_item(0), _item(1, choices=["a", "b", "c"]), _item(2, answer="E"), _item(3)]
    path = _write(tmp_path / "math.json", rows)
    with pytest.raises(RolevecError, match=r"math\.json item 1 has 3 choices.*--skip-bad"):
        load_mcq(tmp_path)
    mcq = load_mcq(tmp_path, skip_bad=True)
    assert mcq.n_skipped == 2
    assert [it.qid for it in mcq.items["math"]] == ["math/0", "math/3"]  # ids keep the file index
    _write(path, [_item(0), _item(1, answer="E")])
    with pytest.raises(RolevecError, match=r"item 1 answer 'E' is not one of A, B, C, D"):
        load_mcq(tmp_path)


def test_empty_or_missing_domain_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "law.json", [])
    _write(tmp_path / "math.json", [_item(0)])
    with pytest.raises(RolevecError, match="domain 'law' has no usable questions"):
        load_mcq(tmp_path)
    with pytest.raises(RolevecError, match="no question file for domain"):
        load_mcq(tmp_path, ["econ"])
    _write(tmp_path / "law.json", [_item(0, answer="Z")])
    with pytest.raises(RolevecError, match="no usable questions"):
        load_mcq(tmp_path, ["law"], skip_bad=True)
    with pytest.raises(RolevecError, match="does not exist"):
        load_mcq(tmp_path / "missing")


def test_hf_loader_maps_subjects_to_domains(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {"question": "q0", "subject": "professional_law", "choices": ["a", "b", "c", "d"], "answer": 2},
        {"question": "q1", "subject": "astronomy", "choices": ["a", "b", "c", "d"], "answer": 0},
        {"question": "q2", "subject": "international_law", "choices": ["a", "b", "c", "d"], "answer": 3},
        {"question": "q3", "subject": "college_mathematics", "choices": ["a", "b", "c", "d"], "answer": 1},
    ]
    calls: list[tuple[Any, ...]] = []

    def load_dataset(name: str, config: str, split: str) -> list[dict[str, Any]]:
        calls.append((name, config, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    mcq = load_mcq("hf:cais/mmlu", ["law", "math"])
    assert calls == [("cais/mmlu", "all", "test")]
    assert [(it.qid, it.answer, it.subject) for it in mcq.items["law"]] == [
        ("law/0", "C", "professional_law"),
        ("law/1", "D", "international_law"),
    ]
    assert mcq.items["math"][0].answer == "B" and mcq.source == "hf:cais/mmlu:test"


def _mcq(n_per_subject: dict[str, int], domain: str = "math") -> MCQSet:
    from rolevec.mcq import MCQItem

    items = []
    for subject, n in n_per_subject.items():
        for _ in range(n):
            i = len(items)
            items.append(MCQItem(f"{domain}/{i}", domain, f"q{i}", ("a", "b", "c", "d"), "A", subject))
    return MCQSet({domain: items}, "test-source")


def test_split_is_seeded_stratified_and_round_trips(tmp_path: Path) -> None:
    mcq = _mcq({"s1": 50, "s2": 30, "s3": 20})
    split = make_split(mcq, seed=3, val_fraction=0.2)
    val, test = split.domains["math"]["val"], split.domains["math"]["test"]
    assert len(val) == 20 and len(test) == 80 and not set(val) & set(test)
    subject = {it.qid: it.subject for it in mcq.items["math"]}
    assert sorted(subject[q] for q in val).count("s1") == 10
    assert sorted(subject[q] for q in val).count("s2") == 6
    assert make_split(mcq, seed=3, val_fraction=0.2).domains == split.domains
    assert make_split(mcq, seed=4, val_fraction=0.2).domains != split.domains
    split.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert loaded.to_json() == split.to_json()
    assert json.loads((tmp_path / "split.json").read_text())["val_fraction"] == 0.2
    picked = loaded.select(mcq, "math", "test", limit=5)
    assert [it.qid for it in picked] == test[:5]
    assert {it.qid for it in loaded.select(mcq, "math", "all")} == set(subject)
    with pytest.raises(RolevecError, match="too few"):
        make_split(_mcq({"s": 1}), seed=0)


def test_ensure_split_extends_per_domain_consistently(tmp_path: Path) -> None:
    law = _mcq({"a": 10, "b": 10}, "law")
    math = _mcq({"c": 15}, "math")
    both = MCQSet({**law.items, **math.items}, "test-source")
    path = tmp_path / "split.json"
    first = ensure_split(path, law, seed=1)
    assert list(first.domains) == ["law"]
    extended = ensure_split(path, both)
    assert extended.domains == make_split(both, seed=1).domains
    assert Split.load(path).domains == extended.domains
    with pytest.raises(RolevecError, match="seed 1"):
        ensure_split(path, both, seed=2)
    with pytest.raises(RolevecError, match="questions from test-source"):
        ensure_split(path, MCQSet(both.items, "other-source"))


def test_parse_domains_and_role_domain() -> None:
    assert parse_domains("all") is None and parse_domains("math, law") == ["math", "law"]
    assert role_domain("lawyer") == "law" and role_domain("teacher") == "natural_science"
    with pytest.raises(RolevecError, match="--domain"):
        role_domain("astronaut")


def test_paper_data_counts(paper_data: Path) -> None:
    mcq = load_mcq(paper_data / "mmlu_domains")
    counts = {d: len(v) for d, v in mcq.items.items()}
    assert counts == {
        "econ": 492,
        "eecs": 247,
        "law": 200,
        "math": 287,
        "medicine": 241,
        "natural_science": 590,
        "politics": 200,
        "psychology": 200,
    }
    assert mcq.n_skipped == 0
