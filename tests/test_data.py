from __future__ import annotations

import json
import random
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from rolevec.data.sources import (
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
    with pytest.raises(RolevecError, match=r"nofield\.json:3 \(item 1\).*fields: question\).*`base_column`"):
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
    with pytest.raises(
        RolevecError, match=r"a\.csv:1: .*columns: x, y\).*`base_column` NAME \(config key base_column\)"
    ):
        load_prompts(ambiguous)
    with pytest.raises(RolevecError, match="no column 'z'"):
        load_prompts(ambiguous, column="z")


FORMATS = {
    "json": json.dumps(PROMPTS),
    "json-objects": json.dumps([{"instruction": p, "id": i} for i, p in enumerate(PROMPTS)]),
    "jsonl": "\n".join(json.dumps({"instruction": p}) for p in PROMPTS),
    "csv": "instruction,id\n" + "".join(f'"{p}",{i}\n' for i, p in enumerate(PROMPTS)),
    "txt": "\n".join(PROMPTS) + "\n",
}


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_a_utf8_bom_is_read_transparently(tmp_path: Path, kind: str) -> None:
    suffix = kind.split("-")[0]
    plain = load_prompts(_write(tmp_path / f"plain.{suffix}", FORMATS[kind]))
    bom = tmp_path / f"bom.{suffix}"
    bom.write_bytes(b"\xef\xbb\xbf" + FORMATS[kind].encode("utf-8"))
    assert load_prompts(bom).prompts == plain.prompts == EXPECTED


def test_bom_csv_with_an_instruction_column_finds_it(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM, glued to the first column name: `instruction` must not
    look absent while it is listed."""
    text = "instruction,id\n" + "".join(f'"{p}",{i}\n' for i, p in enumerate(PROMPTS))
    plain = load_prompts(_write(tmp_path / "plain.csv", text))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_prompts(bom).prompts == plain.prompts == EXPECTED
    assert load_prompts(bom, column="instruction").prompts == EXPECTED


@pytest.mark.parametrize(
    ("name", "data", "line"),
    [
        ("bad.json", b'[\n "ok",\n "caf\xe9"\n]', 3),
        ("bad.jsonl", b'{"instruction": "ok"}\n{"instruction": "caf\xe9"}\n', 2),
        ("bad.csv", b"instruction\nok\nmore\ncaf\xe9\n", 4),
        ("bad.txt", b"\xff\xfeP\x00r\x00", 1),  # UTF-16 saved by mistake
    ],
)
def test_undecodable_bytes_are_one_error_naming_file_and_line(
    tmp_path: Path, name: str, data: bytes, line: int
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(
        RolevecError, match=rf"{re.escape(str(path))} is not UTF-8 text .* line {line}\).*UTF-8"
    ) as err:
        load_prompts(path)
    assert "\n" not in str(err.value)


def test_role_folder_files_bom_bad_bytes_and_field_advice(tmp_path: Path) -> None:
    (tmp_path / "chef.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(["Bake bread."]).encode())
    assert load_role_prompts("chef", tmp_path).prompts == ("Bake bread.",)
    (tmp_path / "nurse.csv").write_bytes(b"instruction\nDress a wound.\nTake a pulse \x96 twice.\n")
    with pytest.raises(RolevecError, match=r"nurse\.csv is not UTF-8 text .*line 3"):
        load_role_prompts("nurse", tmp_path)
    _write(tmp_path / "baker.jsonl", json.dumps({"question": "Knead dough."}) + "\n")
    with pytest.raises(RolevecError, match=r"baker\.jsonl:1: .*fields: question\).*rename") as err:
        load_role_prompts("baker", tmp_path)
    assert "--base-column" not in str(err.value)  # role files take no column option


def test_a_wrong_base_column_lists_what_is_there(tmp_path: Path) -> None:
    csv_file = _write(tmp_path / "base.csv", "question,id\nWhy?,1\n")
    with pytest.raises(RolevecError, match=r"no column 'q' \(columns: question, id\).*`base_column`"):
        load_base(csv_file, column="q")
    jsonl = _write(tmp_path / "base.jsonl", json.dumps({"question": "Why?"}) + "\n")
    with pytest.raises(
        RolevecError, match=r"base\.jsonl:1: no field 'q' \(fields: question\).*`base_column`"
    ):
        load_base(jsonl, column="q")
    assert load_base(jsonl, column="question").prompts == ("Why?",)


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
    with pytest.raises(RolevecError, match=r"no column 'text'.*`base_column`"):
        load_prompts("hf:x/y", column="text")
    FakeDataset.column_names = ("question", "output")
    with pytest.raises(RolevecError, match=r"columns: question, output\).*`base_column` NAME"):
        load_prompts("hf:x/y")


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
