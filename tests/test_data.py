from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from rolevec.data import (
    PAPER_DOMAINS,
    PromptSet,
    available_roles,
    builtin_dir,
    domain_roles,
    load_base,
    load_prompts,
    load_role_prompts,
    role_display,
    role_domain,
    sample,
)
from rolevec.errors import RolevecError

PROMPTS = [
    "Prove that 2 is prime.",
    "  Integrate x squared. ",
    "Prove that 2 is prime.",
    "",
    "Define a ring.",
]
EXPECTED = ("Prove that 2 is prime.", "Integrate x squared.", "Define a ring.")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "text", "column"),
    [
        ("p.json", json.dumps(PROMPTS), None),
        ("p.json", json.dumps([{"instruction": p, "input": ""} for p in PROMPTS]), None),
        ("p.jsonl", "\n".join(json.dumps({"instruction": p}) for p in PROMPTS), None),
        ("p.jsonl", "\n".join(json.dumps({"q": p, "x": 1}) for p in PROMPTS), "q"),
        ("p.csv", "id,question\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)), "question"),
        ("p.csv", "instruction,id\n" + "".join(f'"{p}",{i}\n' for i, p in enumerate(PROMPTS)), None),
        ("p.txt", "\n".join(PROMPTS) + "\n", None),
    ],
)
def test_formats_strip_blank_and_dedupe(tmp_path: Path, name: str, text: str, column: str | None) -> None:
    ps = load_prompts(_write(tmp_path / name, text), column=column)
    assert ps.prompts == EXPECTED
    assert ps.n_duplicates_dropped == 1
    assert ps.name == "p" and ps.source == str(tmp_path / name)


def test_missing_empty_and_folder(tmp_path: Path) -> None:
    with pytest.raises(RolevecError, match="does not exist"):
        load_prompts(tmp_path / "nope.json")
    with pytest.raises(RolevecError, match="hf:tatsu-lab/alpaca"):
        load_prompts("tatsu-lab/alpaca")
    with pytest.raises(RolevecError, match="holds no prompts"):
        load_prompts(_write(tmp_path / "empty.json", "[]"))
    with pytest.raises(RolevecError, match="holds no prompts"):
        load_prompts(_write(tmp_path / "blank.txt", "\n  \n"))
    with pytest.raises(RolevecError, match="is a folder"):
        load_prompts(tmp_path)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.json", '[\n "ok",\n "broken\n]')
    with pytest.raises(RolevecError, match=r"bad\.json:3: malformed JSON"):
        load_prompts(bad)
    wrong = _write(tmp_path / "wrong.json", '[\n "ok",\n 42\n]')
    with pytest.raises(RolevecError, match=r"wrong\.json:3 \(item 1\).*found int"):
        load_prompts(wrong)
    nofield = _write(tmp_path / "nofield.json", '[\n {"instruction": "a b c"},\n {"question": "x"}\n]')
    with pytest.raises(RolevecError, match=r"nofield\.json:3 \(item 1\).*--column"):
        load_prompts(nofield)
    lines = _write(tmp_path / "bad.jsonl", '{"instruction": "a"}\n{"instruction": \n')
    with pytest.raises(RolevecError, match=r"bad\.jsonl:2: malformed JSON line"):
        load_prompts(lines)


def test_malformed_csv_names_file_and_line(tmp_path: Path) -> None:
    ragged = _write(tmp_path / "r.csv", "instruction,id\nfirst prompt,1\nsecond, with comma,2\n")
    with pytest.raises(RolevecError, match=r"r\.csv:3: malformed CSV row"):
        load_prompts(ragged)
    quote = _write(tmp_path / "q.csv", 'instruction\n"ok"\n"open quote\n')
    with pytest.raises(RolevecError, match=r"q\.csv:\d+: malformed CSV"):
        load_prompts(quote)
    ambiguous = _write(tmp_path / "a.csv", "x,y\n1,2\n")
    with pytest.raises(RolevecError, match="--column"):
        load_prompts(ambiguous)
    with pytest.raises(RolevecError, match="no column 'z'"):
        load_prompts(ambiguous, column="z")


def test_sample_is_the_papers_procedure_and_warns_when_short() -> None:
    ps = PromptSet("r", tuple(f"prompt {i}" for i in range(300)), "mem")
    picked = sample(ps, 128, 42)
    random.seed(42)
    assert picked.prompts == tuple(random.sample(list(ps.prompts), 128))
    assert sample(ps, 128, 42) == picked and sample(ps, 128, 7) != picked
    assert sample(ps, None, 42) is ps
    with pytest.warns(UserWarning, match="only 300 prompts.*fewer than n=400"):
        assert sample(ps, 400, 42).prompts == ps.prompts
    with pytest.raises(RolevecError, match="at least 1"):
        sample(ps, 0, 42)


def test_roles_folder(tmp_path: Path) -> None:
    _write(tmp_path / "data_scientist.json", json.dumps(["Fit a model.", "Clean a table."]))
    _write(tmp_path / "chef.txt", "Bake bread.\n")
    _write(tmp_path / "notes.md", "not a role")
    assert available_roles(tmp_path) == ["chef", "data_scientist"]
    ps = load_role_prompts("Data Scientist", tmp_path)
    assert ps.name == "data_scientist" and ps.prompts == ("Fit a model.", "Clean a table.")
    with pytest.raises(RolevecError, match="pass one of chef, data_scientist"):
        load_role_prompts("lawyer", tmp_path)
    with pytest.raises(RolevecError, match="does not exist"):
        available_roles(tmp_path / "missing")


def test_builtin_data_is_complete() -> None:
    roles = available_roles()
    table = domain_roles()
    assert sorted(r for rs in table.values() for r in rs) == roles and len(roles) == 29
    for role in roles:
        ps = load_role_prompts(role)
        assert len(ps) >= 40, role
        assert ps.source == f"builtin:roles/{role}.json"
    base = load_base()
    assert len(base) >= 320 and base.source == "builtin:base.json"
    on_disk = json.loads((builtin_dir() / "domains.json").read_text(encoding="utf-8"))
    assert on_disk == {d: list(r) for d, r in PAPER_DOMAINS.items()}


def test_domain_helpers() -> None:
    table = domain_roles()
    assert list(table) == [
        "econ",
        "eecs",
        "law",
        "math",
        "medicine",
        "natural_science",
        "politics",
        "psychology",
    ]
    table["law"].append("judge")  # a fresh copy: mutating it changes nothing
    assert "judge" not in domain_roles()["law"]
    assert role_domain("data_scientist") == "eecs" and role_domain("Teacher") == "natural_science"
    assert role_domain("historian") is None
    assert role_display("data_scientist") == "data scientist"


def test_hf_datasets_loading_with_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    class FakeDataset:
        column_names = ("instruction", "output")

        def __getitem__(self, key: str) -> list[str]:
            return {"instruction": ["Say hi.", "Say hi.", "Count to 3."], "output": ["", "", ""]}[key]

    def load_dataset(name: str, split: str) -> Any:
        calls.append((name, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ps = load_prompts("hf:tatsu-lab/alpaca")
    assert calls == [("tatsu-lab/alpaca", "train")]
    assert ps.prompts == ("Say hi.", "Count to 3.") and ps.n_duplicates_dropped == 1
    assert ps.source == "hf:tatsu-lab/alpaca:train#instruction" and ps.name == "tatsu-lab/alpaca"
    assert load_base("hf:x/y:test").source == "hf:x/y:test#instruction"
    with pytest.raises(RolevecError, match="no column 'text'"):
        load_prompts("hf:x/y", column="text")


def test_paper_data(paper_data: Path) -> None:
    roles = available_roles(paper_data / "roles")
    assert len(roles) == 33
    assert set(domain_roles()["law"]) <= set(roles)
    bailiff = load_role_prompts("bailiff", paper_data / "roles")
    assert len(bailiff) == 112 and bailiff.n_duplicates_dropped == 16
    with pytest.warns(UserWarning, match="bailiff: only 112"):
        assert len(sample(bailiff, 128, 42)) == 112
    base = load_base(paper_data / "base" / "alpaca_train.json")
    assert len(base) == 18806 and base.n_duplicates_dropped == 0
    raw = json.loads((paper_data / "base" / "alpaca_train.json").read_text(encoding="utf-8"))
    random.seed(42)
    assert sample(base, 128, 42).prompts == tuple(random.sample(raw, 128))
