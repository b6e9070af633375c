from __future__ import annotations

import csv
import io
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from rolevec.data.mcq import (
    DOMAINS,
    MCQSet,
    Split,
    builtin_mcq_dir,
    default_mcq_dir,
    ensure_split,
    load_mcq,
    make_split,
    parse_domains,
)
from rolevec.data.sources import role_domain
from rolevec.errors import RolevecError


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
    import rolevec.data.mcq as mcq_module

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
    rows = [_item(0), _item(1, choices=["a"]), _item(2, answer="E"), _item(3)]
    path = _write(tmp_path / "math.json", rows)
    with pytest.raises(
        RolevecError, match=r"math\.json item 1 has 1 choice\(s\); an item needs 2 to 26.*`skip_bad`"
    ):
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
    from rolevec.data.mcq import MCQItem

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
    assert role_domain("lawyer", strict=True) == "law"
    assert role_domain("teacher", strict=True) == "natural_science"
    with pytest.raises(RolevecError, match="`domain`"):
        role_domain("astronaut", strict=True)


def test_paper_data_counts(paper_data: Path) -> None:
    with pytest.warns(UserWarning, match="repeats questions"):
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


# --- repeated questions and the split --------------------------------------------------------------


def _old_stratified(items: Any, val_fraction: float, rng: Any) -> tuple[list[str], list[str]]:
    """A verbatim copy of the split before repeated questions were kept together (rolevec 9ad8ffc)."""
    by_subject: dict[str, list[str]] = {}
    for it in items:
        by_subject.setdefault(it.subject, []).append(it.qid)
    total_val = round(val_fraction * len(items))
    subjects = sorted(by_subject)
    exact = {s: val_fraction * len(by_subject[s]) for s in subjects}
    take = {s: int(exact[s]) for s in subjects}
    order = sorted(subjects, key=lambda s: (-(exact[s] - take[s]), s))
    for s in order[: max(0, total_val - sum(take.values()))]:
        take[s] += 1
    val: list[str] = []
    test: list[str] = []
    for s in subjects:
        qids = list(by_subject[s])
        rng.shuffle(qids)
        val += qids[: take[s]]
        test += qids[take[s] :]
    rng.shuffle(val)
    rng.shuffle(test)
    return val, test


def _old_split(mcq: MCQSet, seed: int, val_fraction: float) -> dict[str, dict[str, list[str]]]:
    import random

    out = {}
    for domain, items in mcq.items.items():
        val, test = _old_stratified(items, val_fraction, random.Random(f"rolevec-split:{seed}:{domain}"))
        out[domain] = {"val": val, "test": test}
    return out


SEEDS = (0, 1, 3, 7, 123, 2024)
FRACTIONS = (0.05, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.8)


def test_split_without_repeats_is_exactly_the_old_split() -> None:
    import warnings

    builtin = load_mcq(builtin_mcq_dir())
    synthetic = _mcq({"s1": 37, "s2": 11, "s3": 5, "s4": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no repeats: no warning either
        for mcq in (builtin, synthetic):
            for seed in SEEDS:
                for fraction in FRACTIONS:
                    assert make_split(mcq, seed=seed, val_fraction=fraction).domains == _old_split(
                        mcq, seed, fraction
                    ), (mcq.source, seed, fraction)
    # recorded from the code before the change
    assert make_split(builtin, seed=0, val_fraction=0.2).domains["math"] == {
        "val": ["math/4", "math/15", "math/9", "math/6", "math/23"],
        "test": [
            *("math/11", "math/19", "math/8", "math/2", "math/17", "math/12", "math/16", "math/22"),
            *("math/0", "math/13", "math/20", "math/18", "math/14", "math/21", "math/1", "math/10"),
            *("math/7", "math/5", "math/3"),
        ],
    }
    assert make_split(builtin, seed=7, val_fraction=0.5).domains["law"]["val"] == [
        *("law/17", "law/6", "law/3", "law/12", "law/10", "law/1", "law/8", "law/16", "law/23", "law/21"),
        *("law/7", "law/20"),
    ]


def _with_repeats() -> MCQSet:
    """40 questions, 11 of them with copies (one copy under another subject), 60 items in all."""
    from rolevec.data.mcq import MCQItem

    items: list[MCQItem] = []

    def add(text: str, subject: str) -> None:
        i = len(items)
        items.append(MCQItem(f"math/{i}", "math", text, ("a", "b", "c", "d"), "A", subject))

    for i in range(40):
        add(f"q{i}", "s1" if i % 3 else "s2")
        if i % 4 == 0:
            for _ in range(1 + i % 3):
                add(f"q{i}", "s1" if i % 3 else "s2")
    add("q1", "s2")  # a copy under another subject follows its first copy (s1)
    return MCQSet({"math": items}, "test-source")


def _text_side(mcq: MCQSet, split: Split, domain: str = "math") -> dict[str, set[str]]:
    side = split.split_of(domain)
    out: dict[str, set[str]] = {}
    for it in mcq.items[domain]:
        out.setdefault(it.question, set()).add(side[it.qid])
    return out


def test_repeats_stay_on_their_first_copys_side() -> None:
    mcq = _with_repeats()
    items = mcq.items["math"]
    assert len(items) == 60 and len({it.question for it in items}) == 40
    first_of: dict[str, str] = {}
    for it in items:
        first_of.setdefault(it.question, it.qid)
    by_qid = {it.qid: it for it in items}
    firsts = MCQSet({"math": [by_qid[q] for q in first_of.values()]}, "test-source")
    straddled_before = 0
    for seed in SEEDS:
        for fraction in (0.1, 0.2, 0.5):
            with pytest.warns(UserWarning) as caught:
                split = make_split(mcq, seed=seed, val_fraction=fraction)
            assert len(caught) == 1
            assert str(caught[0].message) == (
                "the split keeps every copy of a repeated question on its first copy's side: "
                "math 20 extra copies"
            )
            val, test = split.domains["math"]["val"], split.domains["math"]["test"]
            assert sorted(val + test) == sorted(it.qid for it in items)  # every qid, once
            assert all(len(sides) == 1 for sides in _text_side(mcq, split).values())
            assert len({q.split("/")[0] for q in val}) == 1
            distinct_val = {next(it.question for it in items if it.qid == q) for q in val}
            assert len(distinct_val) == round(fraction * 40)
            # the first copies are split as the old code splits the distinct questions (by first subject)
            old = _old_split(firsts, seed, fraction)["math"]
            assert list(dict.fromkeys(first_of[by_qid[q].question] for q in val)) == old["val"]
            assert list(dict.fromkeys(first_of[by_qid[q].question] for q in test)) == old["test"]
            old_sides = _text_side(mcq, Split(seed, fraction, "test-source", _old_split(mcq, seed, fraction)))
            straddled_before += sum(len(s) > 1 for s in old_sides.values())
    assert straddled_before > 0  # the old split did put copies on both sides


def test_load_warns_once_about_repeats(tmp_path: Path) -> None:
    rows = [_item(0), _item(1), _item(0), _item(0), _item(2, subject="other"), _item(2)]
    _write(tmp_path / "math.json", rows)
    _write(tmp_path / "law.json", [_item(5), _item(5), _item(6)])
    _write(tmp_path / "econ.json", [_item(7), _item(8)])
    with pytest.warns(UserWarning) as caught:
        mcq = load_mcq(tmp_path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and str(tmp_path) in message
    assert "econ 1 extra copy, law 1 extra copy, math 3 extra copies" not in message  # source order
    assert "law 1 extra copy, math 3 extra copies;" in message and "econ" not in message
    assert [it.qid for it in mcq.items["math"]] == [f"math/{i}" for i in range(6)]  # ids unchanged
    with pytest.warns(UserWarning, match="math 3 extra copies"):
        load_mcq(tmp_path / "math.json")  # a single file too


def test_paper_data_repeats_are_kept_together(paper_data: Path) -> None:
    from rolevec.data.mcq import repeated_questions

    with pytest.warns(UserWarning, match="repeats questions"):
        mcq = load_mcq(paper_data / "mmlu_domains")
    assert sum(len(v) for v in mcq.items.values()) == 2457
    extra = {d: n for d, (n, _) in repeated_questions(mcq).items()}
    assert extra == {"econ": 3, "math": 3, "medicine": 20, "natural_science": 20, "politics": 1}
    for seed in (0, 1):
        with pytest.warns(UserWarning, match="first copy's side"):
            split = make_split(mcq, seed=seed)
        for domain, items in mcq.items.items():
            side = split.split_of(domain)
            groups: dict[tuple[str, tuple[str, ...]], set[str]] = {}
            for it in items:
                groups.setdefault((it.question, it.choices), set()).add(side[it.qid])
            assert all(len(s) == 1 for s in groups.values()), domain
            assert len(side) == len(items)
            # validation: round(0.2 x distinct) distinct questions, plus their copies
            by_qid = {it.qid: it for it in items}
            val_distinct = {(by_qid[q].question, by_qid[q].choices) for q in split.domains[domain]["val"]}
            assert len(val_distinct) == round(0.2 * len(groups))
            assert 0 <= len(split.domains[domain]["val"]) - len(val_distinct) <= extra.get(domain, 0)
            if domain not in extra:  # no repeats: today's split, unchanged
                assert split.domains[domain] == _old_split(MCQSet({domain: items}, ""), seed, 0.2)[domain]


def test_old_split_with_straddling_copies_is_kept_as_stored(tmp_path: Path) -> None:
    import warnings

    mcq = _with_repeats()
    seed = next(
        s
        for s in range(50)
        if any(
            len(x) > 1
            for x in _text_side(mcq, Split(s, 0.2, "test-source", _old_split(mcq, s, 0.2))).values()
        )
    )
    old = Split(seed, 0.2, "test-source", _old_split(mcq, seed, 0.2))
    path = old.save(tmp_path / "split.json")
    before = path.read_bytes()
    loaded = Split.load(path)
    assert loaded.domains == old.domains
    loaded.check_covers(mcq)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the save=False check stays quiet
        assert ensure_split(path, mcq, save=False).domains == old.domains
    with pytest.warns(UserWarning) as caught:
        kept = ensure_split(path, mcq, seed=seed)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"{path} has copies of a repeated question in both validation and test (math ")
    assert "used as stored" in message and "`force=True`" in message
    assert kept.domains == old.domains and path.read_bytes() == before
    with pytest.warns(UserWarning, match="the selection's split has copies .* selection was made on it"):
        ensure_split(tmp_path / "new" / "split.json", mcq, base=old)
    # a split made now has no straddling copies, so a stored one of it loads silently
    with pytest.warns(UserWarning, match="first copy's side"):
        fresh = make_split(mcq, seed=seed)
    fresh.save(tmp_path / "fresh.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensure_split(tmp_path / "fresh.json", mcq).domains == fresh.domains


def test_too_few_distinct_questions_for_a_split() -> None:
    from rolevec.data.mcq import MCQItem

    same = [MCQItem(f"law/{i}", "law", "same?", ("a", "b", "c", "d"), "A", "x") for i in range(6)]
    with pytest.raises(RolevecError, match=r"domain law has 6 question\(s\) \(1 distinct\): too few"):
        make_split(MCQSet({"law": same}, "s"))


# --- encodings -------------------------------------------------------------------------------------


def _question_bytes(suffix: str) -> bytes:
    rows = [
        _item(0),
        _item(1, answer="c"),
        {"question": "Caf\u00e9?", "choices": ["\u00e9", "b", "c", "d"], "answer": 3},
    ]
    if suffix == ".json":
        return json.dumps(rows, ensure_ascii=False).encode()
    if suffix == ".jsonl":
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\n"
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["question", "A", "B", "C", "D", "answer"])
    for r in rows:
        writer.writerow([r["question"], *r["choices"], r["answer"]])
    return out.getvalue().encode()


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_bom_is_read_transparently(tmp_path: Path, suffix: str) -> None:
    plain = tmp_path / "plain"
    bom = tmp_path / "bom"
    plain.mkdir()
    bom.mkdir()
    (plain / f"math{suffix}").write_bytes(_question_bytes(suffix))
    (bom / f"math{suffix}").write_bytes(b"\xef\xbb\xbf" + _question_bytes(suffix))
    want = load_mcq(plain).items
    assert len(want["math"]) == 3 and want["math"][2].question == "Caf\u00e9?"
    assert load_mcq(bom).items == want
    assert load_mcq(bom / f"math{suffix}").items == want  # one file as the source


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_undecodable_question_file_is_one_error(tmp_path: Path, suffix: str) -> None:
    data = _question_bytes(suffix).replace("Caf\u00e9".encode(), b"Caf\xe9")  # Latin-1, not UTF-8
    path = tmp_path / f"math{suffix}"
    path.write_bytes(data)
    for source in (tmp_path, path):
        with pytest.raises(RolevecError) as caught:
            load_mcq(source)
        message = str(caught.value)
        assert "\n" not in message
        line = 4 if suffix == ".csv" else (3 if suffix == ".jsonl" else 1)
        assert message == (
            f"question file {path} is not UTF-8 text (undecodable byte 0xe9 on line {line}): save it as UTF-8"
        )


def test_jsonl_bad_line_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "law.jsonl").write_text(json.dumps(_item(0)) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(RolevecError, match=r"law\.jsonl line 3 is not valid JSON"):
        load_mcq(tmp_path)


def test_split_file_bom_and_bad_bytes(tmp_path: Path) -> None:
    split = make_split(_mcq({"s": 10}), seed=2)
    path = split.save(tmp_path / "split.json")
    plain = path.read_bytes()
    path.write_bytes(b"\xef\xbb\xbf" + plain)
    assert Split.load(path).to_json() == split.to_json()
    path.write_bytes(plain.replace(b"test-source", b"test-\xff-source"))
    with pytest.raises(RolevecError) as caught:
        Split.load(path)
    assert str(caught.value) == (
        f"split file {path} is not UTF-8 text (undecodable byte 0xff on line 4): save it as UTF-8"
    )


# --- answers ---------------------------------------------------------------------------------------

ACCEPTED_ANSWERS: list[tuple[Any, str]] = [
    *[(letter, letter) for letter in "ABCD"],
    *[(letter.lower(), letter.upper()) for letter in "abcd"],
    (" c ", "C"),
    ("D\n", "D"),
    *[(i, "ABCD"[i]) for i in range(4)],
    *[(str(i), "ABCD"[i]) for i in range(4)],
    (" 2 ", "C"),
    ("03", "D"),
]
REFUSED_ANSWERS: list[Any] = [
    "E", "e", 4, -1, "4", "-1", "", " ", None, True, False, 1.0, "1.0", "AB", "A)", "\u00b2", "\u0663",
    "9" * 5000, [0], {"answer": "A"},
]  # fmt: skip


@pytest.mark.parametrize(("answer", "letter"), ACCEPTED_ANSWERS)
def test_accepted_answers(tmp_path: Path, answer: Any, letter: str) -> None:
    _write(tmp_path / "math.json", [_item(0, answer=answer)])
    assert load_mcq(tmp_path).items["math"][0].answer == letter


@pytest.mark.parametrize("answer", REFUSED_ANSWERS)
def test_refused_answers_are_one_error_naming_file_and_item(tmp_path: Path, answer: Any) -> None:
    path = _write(tmp_path / "math.json", [_item(0), _item(1, answer=answer)])
    with pytest.raises(RolevecError) as caught:
        load_mcq(tmp_path)
    assert str(caught.value) == (
        f"{path} item 1 answer {answer!r} is not one of A, B, C, D (or 0-3): fix the file (rolevec sweep "
        "and rolevec evaluate can skip such items with `skip_bad`)"
    )


def test_csv_answers_are_text(tmp_path: Path) -> None:
    (tmp_path / "math.csv").write_text("question,A,B,C,D,answer\nq,1,2,3,4,b\nr,1,2,3,4,3\ns,1,2,3,4,4\n")
    with pytest.raises(RolevecError, match=r"math\.csv item 2 answer '4' is not one of A, B, C, D"):
        load_mcq(tmp_path)
    assert [it.answer for it in load_mcq(tmp_path, skip_bad=True).items["math"]] == ["B", "D"]
