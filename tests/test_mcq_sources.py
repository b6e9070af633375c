"""Question sources of issue 17: the paper's released files, column mappings, layout presets, hf: and
lm-eval: sources, namespaced ids and bad input. Offline: hub loads are monkeypatched."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from rolevec.cli.mcq_args import add_mcq_args, mcq_spec_from_args
from rolevec.data.mcq import SUBJECT_DOMAIN, MCQSet, builtin_mcq_dir, load_mcq
from rolevec.data.mcq_layouts import MCQSpec, parse_hf_source
from rolevec.data.paper_format import paper_domain, parse_instruction
from rolevec.errors import RolevecError
from rolevec.evaluation.scoring import PromptFormat

PAPER_DIR = Path("/work/shared/data/role-vectors-paper/mmlu_domains")
TRAILER = "\n\t\t\tAnswer with the letter of the correct answer.\n\t\t\tAnswer:"


def _rows(domain: str, n: int) -> list[dict[str, Any]]:
    """Real rows of the paper's domain files where present, else the built-in sample's."""
    folder = PAPER_DIR if (PAPER_DIR / f"{domain}.json").is_file() else builtin_mcq_dir()
    rows = json.loads((folder / f"{domain}.json").read_text(encoding="utf-8"))
    return list(rows[:n])


def _instruction(question: str, choices: list[str], trailer: str = TRAILER) -> str:
    lines = "".join(f"\n\t\t\t{letter}. {text}" for letter, text in zip("ABCDEFGHIJ", choices, strict=False))
    return question + lines + trailer


def _paper_file(path: Path, domain: str = "law", n: int = 6, *, drop_dataset: int | None = None) -> list[Any]:
    rows = _rows(domain, n)
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        item = {"instruction": _instruction(row["question"], row["choices"]), "target_score": row["answer"]}
        if i != drop_dataset:
            item["dataset"] = row["subject"]
        out.append(item)
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return rows


# --- the paper's released format ------------------------------------------------------------------


def test_paper_file_verbatim_and_parsed(tmp_path: Path) -> None:
    path = tmp_path / "target_test_law.json"
    rows = _paper_file(path, drop_dataset=1)
    mcq = load_mcq(path)
    assert mcq.kind == "paper" and mcq.domains == ["law"] and mcq.source == str(path.resolve())
    items = mcq.items["law"]
    assert [it.qid for it in items] == [f"paper:target_test_law/law/{i}" for i in range(len(rows))]
    for it, row in zip(items, rows, strict=True):
        assert it.question == row["question"].strip()
        assert it.choices == tuple(row["choices"])
        assert it.answer == row["answer"]
        assert it.instruction == _instruction(row["question"], row["choices"])
        # verbatim (the default) is the paper's own prompt; --rerender renders the parsed parts
        assert PromptFormat().user_text(it) == it.instruction
        rendered = PromptFormat(verbatim=False).user_text(it)
        assert (
            "\t" not in rendered
            and rendered.startswith(it.question)
            and f"D. {row['choices'][3]}" in rendered
        )
    assert items[0].subject == rows[0]["subject"]
    assert items[1].subject == "law"  # no "dataset": the domain stands in


def test_paper_domain_from_name_flag_or_map(tmp_path: Path) -> None:
    assert paper_domain("x/target_val_medicine.json") == "medicine"
    assert paper_domain("target_train_natural_science.json") == "natural_science"
    assert paper_domain("econ.json") == "econ"
    path = tmp_path / "target_val_medicine.json"
    _paper_file(path, "medicine", 4)
    assert load_mcq(path).domains == ["medicine"]
    assert (
        load_mcq(MCQSpec(str(path), domain="health")).items["health"][0].qid
        == "paper:target_val_medicine/health/0"
    )
    subject = _rows("medicine", 1)[0]["subject"]
    dmap = tmp_path / "map.json"
    dmap.write_text(json.dumps({subject: "clinic"}), encoding="utf-8")
    mapped = load_mcq(MCQSpec(str(path), domain_map=str(dmap)))
    assert set(mapped.domains) == {"clinic"}
    assert all(it.subject == subject for it in mapped.items["clinic"])


def test_paper_folder_named_by_split_prefix(tmp_path: Path) -> None:
    folder = tmp_path / "paper"
    folder.mkdir()
    _paper_file(folder / "target_test_law.json", "law", 3)
    _paper_file(folder / "target_test_math.json", "math", 3)
    mcq = load_mcq(folder, ["math"])
    assert mcq.domains == ["math"] and mcq.items["math"][2].qid == "paper:target_test_math/math/2"


def test_paper_trailing_lines_and_multiline_choice() -> None:
    text = "Q line one\nline two\n\t\t\tA. yes\n\t\t\tB. no\n\t\t\tand more\n\t\t\tC. maybe"
    text += "\n\t\t\tThink first.\nAnswer:"
    assert parse_instruction(text) == ("Q line one\nline two", ("yes", "no\nand more", "maybe"))
    assert parse_instruction("no letters here\nAnswer:") is None
    assert parse_instruction("\t\t\tA. a\n\t\t\tB. b") is None  # no question text before the choices


def test_paper_unparsable_choices(tmp_path: Path) -> None:
    path = tmp_path / "target_test_law.json"
    rows = _paper_file(path, n=4)
    data = json.loads(path.read_text(encoding="utf-8"))
    data[2]["instruction"] = "What is the rule?\nAnswer with the letter.\nAnswer:"
    data[3]["instruction"] = "Another one, no lettered lines."
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        mcq = load_mcq(path)
    lines = [str(w.message) for w in caught if "could not be parsed" in str(w.message)]
    assert (
        len(lines) == 1 and "2 item(s)" in lines[0] and "first: item 2" in lines[0] and str(path) in lines[0]
    )
    kept = mcq.items["law"][2]
    assert kept.letters == ("A", "B", "C", "D") and kept.choices == ("", "", "", "")
    assert kept.answer == rows[2]["answer"] and PromptFormat().user_text(kept) == data[2]["instruction"]
    with pytest.raises(RolevecError, match=r"target_test_law.json item 2 has an instruction whose"):
        load_mcq(MCQSpec(str(path), rerender=True))
    skipped = load_mcq(MCQSpec(str(path), rerender=True, skip_bad=True))
    assert skipped.n_skipped == 2 and len(skipped.items["law"]) == 2


def test_paper_answer_outside_choices(tmp_path: Path) -> None:
    path = tmp_path / "target_test_law.json"
    path.write_text(
        json.dumps([{"instruction": _instruction("Q?", ["a", "b", "c"]), "target_score": "D"}]),
        encoding="utf-8",
    )
    with pytest.raises(RolevecError, match=r"target_test_law.json item 0 answer 'D' is not one of A, B, C"):
        load_mcq(path)


# --- existing sources keep their ids --------------------------------------------------------------


@pytest.mark.skipif(not PAPER_DIR.is_dir(), reason="the paper's MMLU domain files are not here")
def test_paper_mmlu_folder_ids_unchanged() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # math repeats questions
        mcq = load_mcq(PAPER_DIR, ["law", "math"])
    for domain in ("law", "math"):
        rows = json.loads((PAPER_DIR / f"{domain}.json").read_text(encoding="utf-8"))
        items = mcq.items[domain]
        assert [it.qid for it in items] == [f"{domain}/{i}" for i in range(len(rows))]
        assert [(it.question, list(it.choices), it.answer, it.subject) for it in items] == [
            (r["question"], [str(c) for c in r["choices"]], r["answer"], r["subject"]) for r in rows
        ]
        assert all(it.instruction is None for it in items)


def test_builtin_ids_unchanged() -> None:
    mcq = load_mcq(builtin_mcq_dir())
    assert mcq.kind == "builtin"
    for domain, items in mcq.items.items():
        assert [it.qid for it in items] == [f"{domain}/{i}" for i in range(len(items))]


# --- column mapping -------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_mapped_columns_csv_by_answer_text(tmp_path: Path) -> None:
    rows = [
        {"q": "2+2?", "opa": "3", "opb": "four", "opc": "5", "opd": "22", "cop": "four", "topic": "arith"},
        {"q": "3*3?", "opa": "6", "opb": "33", "opc": "9", "opd": "1", "cop": "9", "topic": "arith"},
        {"q": "1+1?", "opa": "0", "opb": "2", "opc": "1", "opd": "3", "cop": "2", "topic": "arith"},
    ]
    path = _write(tmp_path / "medmcq.csv", rows)
    spec = MCQSpec(
        str(path),
        question_field="q",
        choices_field="opa,opb,opc,opd",
        answer_field="cop",
        subject_field="topic",
        domain="math",
    )
    with pytest.raises(
        RolevecError, match=r"medmcq.csv item 2 answer '2' is ambiguous: choice 2 by index, choice 1"
    ):
        load_mcq(spec)
    items = load_mcq(spec, skip_bad=True).items["math"]
    assert [(it.qid, it.answer, it.choices) for it in items] == [
        ("file:medmcq/math/0", "B", ("3", "four", "5", "22")),
        ("file:medmcq/math/1", "C", ("6", "33", "9", "1")),  # "9" is no index of 4 choices: the text
    ]
    assert items[0].subject == "arith"


def test_mapped_dict_and_index_answers(tmp_path: Path) -> None:
    rows = [
        {"prompt": "x?", "opts": {"A": "p", "B": "q", "C": "r"}, "key": "C", "area": "s1"},
        {"prompt": "y?", "opts": {"A": "p", "B": "q"}, "key": "A", "area": "s2"},
    ]
    path = _write(tmp_path / "mix.jsonl", rows)
    dmap = tmp_path / "dmap.json"
    dmap.write_text(json.dumps({"s1": "alpha"}), encoding="utf-8")
    spec = MCQSpec(
        str(path), question_field="prompt", choices_field="opts", answer_field="key", subject_field="area"
    )
    mcq = load_mcq(spec)
    assert mcq.kind == "file" and mcq.domains == ["mix"]  # no domain field: the file's name
    assert [len(it.choices) for d in mcq.items.values() for it in d] == [3, 2]
    with pytest.warns(UserWarning, match="1 item"):
        mapped = load_mcq(MCQSpec(**{**spec.to_json(), "domain_map": str(dmap)}))
    assert mapped.domains == ["alpha"] and mapped.items["alpha"][0].answer == "C"
    idx = _write(
        tmp_path / "idx.json", [{"question": "z?", "choices": ["a", "b", "c", "d", "e"], "answer": 4}]
    )
    assert load_mcq(MCQSpec(str(idx), domain="d")).items["d"][0].answer == "E"


# --- layout presets, each on rows with the dataset's own column names and answer encoding ---------


def test_layout_mmlu(tmp_path: Path) -> None:
    rows = [
        {"question": "Q0?", "subject": "professional_law", "choices": ["a", "b", "c", "d"], "answer": 3},
        {"question": "Q1?", "subject": "astronomy", "choices": ["a", "b", "c", "d"], "answer": 0},
        {"question": "Q2?", "subject": "college_medicine", "choices": ["a", "b", "c", "d"], "answer": 1},
    ]
    mcq = load_mcq(MCQSpec(str(_write(tmp_path / "mmlu.json", rows)), layout="mmlu"))
    assert SUBJECT_DOMAIN["professional_law"] == "law"
    assert {d: [(it.qid, it.answer) for it in v] for d, v in mcq.items.items()} == {
        "law": [("file:mmlu/law/0", "D")],
        "medicine": [("file:mmlu/medicine/2", "B")],
    }  # astronomy is in none of the paper's domains


def test_layout_mmlu_pro(tmp_path: Path) -> None:
    options = [f"opt{i}" for i in range(10)]
    rows = [
        {
            "question_id": 70,
            "question": "Q?",
            "options": options,
            "answer": "J",
            "answer_index": 9,
            "cot_content": "",
            "category": "law",
            "src": "ori_mmlu-x",
        },
        {
            "question_id": 71,
            "question": "R?",
            "options": options[:7],
            "answer": "C",
            "answer_index": 2,
            "cot_content": "",
            "category": "health",
            "src": "stemez",
        },
    ]
    mcq = load_mcq(MCQSpec(str(_write(tmp_path / "pro.jsonl", rows)), layout="mmlu_pro"))
    assert mcq.items["law"][0].letters[-1] == "J" and mcq.items["law"][0].answer == "J"
    assert mcq.items["health"][0].qid == "file:pro/health/1" and len(mcq.items["health"][0].choices) == 7


def test_layout_medqa_both_shapes(tmp_path: Path) -> None:
    gbaker = [
        {
            "question": "A 23-year-old ...?",
            "answer": "Nitrofurantoin",
            "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"},
            "meta_info": "step2&3",
            "answer_idx": "D",
            "metamap_phrases": ["x"],
        },
    ]
    bigbio = [
        {
            "meta_info": "step1",
            "question": "Which?",
            "answer_idx": "E",
            "answer": "five",
            "options": [
                {"key": k, "value": v}
                for k, v in zip("ABCDE", ["one", "two", "three", "four", "five"], strict=True)
            ],
        },
    ]
    a = load_mcq(MCQSpec(str(_write(tmp_path / "g.json", gbaker)), layout="medqa")).items["medicine"][0]
    b = load_mcq(MCQSpec(str(_write(tmp_path / "b.json", bigbio)), layout="medqa")).items["medicine"][0]
    assert (a.answer, a.choices[3], a.qid) == ("D", "Nitrofurantoin", "file:g/medicine/0")
    assert (b.answer, len(b.choices)) == ("E", 5)


def test_layout_arc_letter_and_number_labels(tmp_path: Path) -> None:
    rows = [
        {
            "id": "Mercury_1",
            "question": "Which is a gas?",
            "choices": {"text": ["ice", "steam", "rock", "wood"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B",
        },
        {
            "id": "NYSED_2",
            "question": "Pick three.",
            "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]},
            "answerKey": "3",
        },
        {
            "id": "X_3",
            "question": "Five?",
            "choices": {"text": ["a", "b", "c", "d", "e"], "label": ["A", "B", "C", "D", "E"]},
            "answerKey": "E",
        },
    ]
    items = load_mcq(MCQSpec(str(_write(tmp_path / "arc.jsonl", rows)), layout="arc")).items["arc"]
    assert [(it.answer, len(it.choices)) for it in items] == [("B", 4), ("C", 4), ("E", 5)]


def test_layout_commonsense_qa(tmp_path: Path) -> None:
    rows = [
        {
            "id": "075e",
            "question": "Where do you keep milk?",
            "question_concept": "milk",
            "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["fridge", "shoe", "car", "sky", "sea"]},
            "answerKey": "A",
        },
    ]
    mcq = load_mcq(MCQSpec(str(_write(tmp_path / "csqa.json", rows)), layout="commonsense_qa"))
    item = mcq.items["commonsense_qa"][0]
    assert (item.answer, item.subject, len(item.choices)) == ("A", "milk", 5)


# --- hf: ------------------------------------------------------------------------------------------


def test_parse_hf_source() -> None:
    assert parse_hf_source("hf:allenai/ai2_arc:ARC-Challenge@test") == parse_hf_source(
        "allenai/ai2_arc:ARC-Challenge@test"
    )
    src = parse_hf_source("hf:allenai/ai2_arc:ARC-Challenge@test")
    assert (src.name, src.config, src.split) == ("allenai/ai2_arc", "ARC-Challenge", "test")
    assert (parse_hf_source("hf:").name, parse_hf_source("hf:cais/mmlu").config) == ("cais/mmlu", None)
    assert parse_hf_source("hf:x/y@validation").split == "validation"
    with pytest.raises(RolevecError, match="empty split"):
        parse_hf_source("hf:x/y@")


def _fake_hub(monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[Any, ...]] = []

    def load_dataset(name: str, config: str | None = None, *, split: str) -> Any:
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hf_arc_preset_namespaced(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {
            "id": f"q{i}",
            "question": f"Q{i}?",
            "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
            "answerKey": "ABC"[i % 3],
        }
        for i in range(4)
    ]
    calls = _fake_hub(monkeypatch, rows)
    mcq = load_mcq("hf:allenai/ai2_arc:ARC-Easy")
    assert calls == [("allenai/ai2_arc", "ARC-Easy", "test")]
    assert mcq.kind == "hf" and mcq.source == "hf:allenai/ai2_arc:ARC-Easy@test"
    assert [it.qid for it in mcq.items["arc"]] == [
        f"hf:allenai/ai2_arc:ARC-Easy@test/arc/{i}" for i in range(4)
    ]
    assert [it.answer for it in mcq.items["arc"]] == ["A", "B", "C", "A"]
    load_mcq("hf:allenai/ai2_arc")
    assert calls[-1] == ("allenai/ai2_arc", "ARC-Challenge", "test")


def test_hf_mmlu_default_keeps_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {"question": f"Q{i}?", "subject": s, "choices": ["a", "b", "c", "d"], "answer": i % 4}
        for i, s in enumerate(["professional_law", "astronomy", "international_law", "college_medicine"])
    ]
    calls = _fake_hub(monkeypatch, rows)
    mcq = load_mcq("hf:cais/mmlu", ["law"])
    assert calls == [("cais/mmlu", "all", "test")]
    assert [it.qid for it in mcq.items["law"]] == ["law/0", "law/1"] and mcq.source == "hf:cais/mmlu:test"
    other = load_mcq("hf:cais/mmlu:all@validation", ["law"])
    assert calls[-1] == ("cais/mmlu", "all", "validation")
    assert [it.qid for it in other.items["law"]] == [
        "hf:cais/mmlu:all@validation/law/0",
        "hf:cais/mmlu:all@validation/law/2",
    ]


def test_hf_field_flags_and_unknown_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"stem": "Q?", "opts": ["x", "y"], "gold": 1, "cat": "c1"}]
    _fake_hub(monkeypatch, rows)
    with pytest.raises(RolevecError, match=r"no layout preset for hf:me/quiz: pass `layout`"):
        load_mcq("hf:me/quiz")
    spec = MCQSpec(
        "hf:me/quiz@train",
        question_field="stem",
        choices_field="opts",
        answer_field="gold",
        subject_field="cat",
    )
    mcq = load_mcq(spec)
    assert mcq.items["quiz"][0].qid == "hf:me/quiz@train/quiz/0" and mcq.items["quiz"][0].answer == "B"
    with pytest.raises(
        RolevecError, match=r"has no field 'stme' \(it has: stem, opts, gold, cat\); did you mean 'stem'"
    ):
        load_mcq(MCQSpec(**{**spec.to_json(), "question_field": "stme"}))


def test_hf_without_datasets_or_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RolevecError, match="needs `pip install datasets`"):
        load_mcq("hf:allenai/ai2_arc")
    monkeypatch.undo()
    datasets = pytest.importorskip("datasets")

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RolevecError) as info:
        load_mcq("hf:allenai/ai2_arc")
    assert "\n" not in str(info.value) and "hf:allenai/ai2_arc:ARC-Challenge@test" in str(info.value)


# --- lm-eval: -------------------------------------------------------------------------------------


def test_lm_eval_dispatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import rolevec.data.lm_eval_tasks as tasks
    from rolevec.data.mcq import MCQItem

    seen: list[tuple[Any, ...]] = []

    def fake(
        task: str,
        include_path: Any = None,
        domains: Any = None,
        *,
        skip_bad: bool = False,
        chat_template: bool = False,
    ) -> MCQSet:
        # rolevec renders every prompt with the chat template: the dispatch asks for lm-eval's chat delimiter
        assert chat_template is True
        seen.append((task, include_path, domains, skip_bad))
        item = MCQItem(f"lm-eval:{task}/{task}/0", task, "Q?", ("a", "b"), "A", task)
        return MCQSet({task: [item]}, f"lm-eval:{task}", 0, "lm-eval")

    monkeypatch.setattr(tasks, "load_lm_eval_task", fake)
    mcq = load_mcq(MCQSpec("lm-eval:mytask", include_path=str(tmp_path), skip_bad=True), ["mytask"])
    assert seen == [("mytask", str(tmp_path), ["mytask"], True)] and mcq.kind == "lm-eval"
    load_mcq("lm-eval:other")
    assert seen[-1] == ("other", None, None, False)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (
            {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B"]}, "answerKey": "A"},
            "has 3 choice text(s) but 2 label(s)",
        ),
        ({"question": "Q?", "choices": {"text": [], "label": []}, "answerKey": "A"}, "has 0 choice(s)"),
        (
            {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"},
            "answer 'C' is none of the item's labels A, B",
        ),
        (
            {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "A"]}, "answerKey": "A"},
            "has duplicate choice labels",
        ),
    ],
)
def test_bad_items_name_file_and_item(tmp_path: Path, row: dict[str, Any], problem: str) -> None:
    good = {"question": "ok?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    path = _write(tmp_path / "arc.json", [good, row, {**good, "question": "also ok?"}])
    with pytest.raises(RolevecError) as info:
        load_mcq(MCQSpec(str(path), layout="arc"))
    assert f"arc.json item 1 {problem}" in str(info.value) and "`skip_bad`" in str(info.value)
    mcq = load_mcq(MCQSpec(str(path), layout="arc"), skip_bad=True)
    assert mcq.n_skipped == 1 and [it.qid for it in mcq.items["arc"]] == ["file:arc/arc/0", "file:arc/arc/2"]


def test_index_answer_out_of_range(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.json", [{"question": "Q?", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(RolevecError, match=r"m.json item 0 answer 2 is outside the choices \(0-1\)"):
        load_mcq(MCQSpec(str(path), layout="mmlu", domain="x"))


def test_missing_choice_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", [{"q": "Q?", "opa": "1", "opb": "2", "ans": "A"}])
    with pytest.raises(RolevecError, match=r"c.csv item 0 has no field 'opc' \(it has: q, opa, opb, ans\)"):
        load_mcq(MCQSpec(str(path), question_field="q", choices_field="opa,opb,opc", answer_field="ans"))


# --- spec and CLI ---------------------------------------------------------------------------------


def test_spec_json_round_trip(tmp_path: Path) -> None:
    spec = MCQSpec("hf:allenai/ai2_arc", layout="arc", skip_bad=True)
    assert spec.to_json() == {"source": "hf:allenai/ai2_arc", "layout": "arc", "skip_bad": True}
    assert MCQSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(RolevecError, match="unknown key"):
        MCQSpec.from_json({"source": "x", "questions": "q"})
    path = _write(tmp_path / "m.json", [{"question": "Q?", "choices": ["a", "b"], "answer": 1}])
    assert load_mcq({"source": str(path), "domain": "d"}).items["d"][0].qid == "file:m/d/0"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_mcq_args(parser)
    return parser.parse_args(list(argv))


def test_cli_flags_make_spec() -> None:
    assert mcq_spec_from_args(_parse("--mcq-dir", "data")) == "data"
    assert mcq_spec_from_args(_parse("--mcq", "data")) == "data"
    assert mcq_spec_from_args(_parse()) is None
    spec = mcq_spec_from_args(
        _parse(
            "--mcq",
            "f.csv",
            "--question-field",
            "q",
            "--choices-field",
            "a,b",
            "--answer-field",
            "k",
            "--mcq-domain",
            "med",
            "--rerender",
        )
    )
    assert spec == MCQSpec(
        "f.csv", question_field="q", choices_field="a,b", answer_field="k", domain="med", rerender=True
    )
    with pytest.raises(RolevecError, match="--question-field needs --mcq"):
        mcq_spec_from_args(_parse("--question-field", "q"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _parse("--layout", "arc").layout == "arc"
