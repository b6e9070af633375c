"""lm-eval tasks as a question source: task YAML over local JSON files, read by lm-eval's own loader."""

from __future__ import annotations

import importlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from rolevec.data import lm_eval_tasks
from rolevec.data.lm_eval_tasks import SCORING, letter_scoring_valid, load_lm_eval_task
from rolevec.errors import RolevecError

pytest.importorskip("lm_eval")

ROWS = [
    {"ctx": "The sky on a clear day is", "endings": ["blue", "green", "loud", "square"], "label": 0},
    {"ctx": "Ice is water that has", "endings": ["boiled", "frozen", "sung", "flown"], "label": 1},
    {"ctx": "A cat says", "endings": ["moo", "quack", "meow", "woof"], "label": 2},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: hub and datasets offline, and any socket connection fails the test."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets_config = importlib.import_module("datasets.config")
    monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True, raising=False)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network use: connect{args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def write_task(folder: Path, name: str, rows: list[Any], *, split: str = "test", **fields: str) -> Path:
    """A task YAML (``name.yaml``) over ``name.json`` in ``folder``; ``fields`` add or replace YAML lines."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    lines = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": f"{{data_files: {{{split}: {json.dumps(str(data))}}}}}",
        f"{split}_split": split,
        "output_type": "multiple_choice",
        "doc_to_text": json.dumps("{{ctx}}"),
        "doc_to_choice": json.dumps("{{endings}}"),
        "doc_to_target": "label",
        "metric_list": "[{metric: acc}]",
    }
    lines.update(fields)
    text = "".join(f"{key}: {value}\n" for key, value in lines.items())
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def test_text_continuation_task(tmp_path: Path) -> None:
    folder = write_task(tmp_path / "tasks", "sky", ROWS)
    mcq = load_lm_eval_task("sky", include_path=folder)
    assert mcq.kind == "lm-eval" and mcq.source == "lm-eval:sky@test" and mcq.n_skipped == 0
    assert mcq.domains == ["sky"]
    items = mcq.items["sky"]
    assert [it.qid for it in items] == ["lm-eval:sky/sky/0", "lm-eval:sky/sky/1", "lm-eval:sky/sky/2"]
    assert [it.answer for it in items] == ["A", "B", "C"]
    assert items[1].choices == ("boiled", "frozen", "sung", "flown")
    assert items[2].question == items[2].instruction == "A cat says"
    assert {it.delimiter for it in items} == {" "}
    assert {it.subject for it in items} == {"sky"}
    assert SCORING == "continuation" and not letter_scoring_valid(items)


def test_jinja_templates_text_target_delimiter_and_description(tmp_path: Path) -> None:
    rows = [
        {
            "q": "2 + 2?",
            "options": ["three", "four", "five"],
            "gold": "four",
        },  # digits would read as an index
        {"q": "Capital of France?", "options": ["Rome", "Paris"], "gold": "Rome"},
    ]
    folder = write_task(
        tmp_path,
        "quiz",
        rows,
        doc_to_text=json.dumps("Question: {{q}}\nAnswer:"),
        doc_to_choice="options",
        doc_to_target=json.dumps("{{gold}}"),
        target_delimiter=json.dumps("\t"),
        description=json.dumps("Answer briefly.\n\n"),
    )
    items = load_lm_eval_task("quiz", include_path=folder).items["quiz"]
    assert [it.answer for it in items] == ["B", "A"]  # the text of a choice -> its index
    assert [len(it.choices) for it in items] == [3, 2]
    assert items[0].question == "Question: 2 + 2?\nAnswer:"
    assert items[0].instruction == "Answer briefly.\n\nQuestion: 2 + 2?\nAnswer:"  # lm-eval's 0-shot context
    assert {it.delimiter for it in items} == {"\t"}
    chat = load_lm_eval_task("quiz", include_path=folder, chat_template=True).items["quiz"]
    assert {it.delimiter for it in chat} == {""}  # lm-eval drops it under apply_chat_template
    assert [it.answer for it in chat] == ["B", "A"]


def test_letter_choices_and_validation_split(tmp_path: Path) -> None:
    rows = [{"question": f"Q{i}", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(5)]
    folder = write_task(
        tmp_path,
        "letters",
        rows,
        split="validation",
        doc_to_text=json.dumps(
            "{{question}}\n"
            + "".join(f"{letter}. {{{{choices[{i}]}}}}\n" for i, letter in enumerate("ABCD"))
            + "Answer:"
        ),
        doc_to_choice='["A", "B", "C", "D"]',
        doc_to_target="answer",
    )
    mcq = load_lm_eval_task("letters", include_path=folder)
    assert mcq.source == "lm-eval:letters@validation"
    items = mcq.items["letters"]
    assert [it.answer for it in items] == ["A", "B", "C", "D", "A"]
    assert items[3].instruction == "Q3\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    assert letter_scoring_valid(items)


def test_group_gives_one_domain_per_subtask(tmp_path: Path) -> None:
    folder = tmp_path / "g"
    write_task(folder, "part_a", ROWS)
    write_task(folder, "part_b", ROWS[:2])
    (folder / "both.yaml").write_text("group: both\ntask:\n  - part_a\n  - part_b\n", encoding="utf-8")
    mcq = load_lm_eval_task("both", include_path=folder)
    assert sorted(mcq.domains) == ["part_a", "part_b"]
    assert [len(mcq.items[d]) for d in sorted(mcq.domains)] == [3, 2]
    assert mcq.items["part_b"][1].qid == "lm-eval:both/part_b/1"
    only = load_lm_eval_task("both", include_path=folder, domains=["part_b"])
    assert only.domains == ["part_b"]
    with pytest.raises(RolevecError, match=r"no subtask 'part_c'.*part_a"):
        load_lm_eval_task("both", include_path=folder, domains=["part_c"])


def test_target_outside_choices_raises_or_is_skipped(tmp_path: Path) -> None:
    rows = [
        *ROWS,
        {"ctx": "Bad", "endings": ["a", "b"], "label": 5},
        {"ctx": "Bad too", "endings": ["a", "b"], "label": 7},
    ]
    folder = write_task(tmp_path, "broken", rows)
    with pytest.raises(
        RolevecError, match=r"^lm-eval task broken \(test split\) item 3 has target 5 outside"
    ):
        load_lm_eval_task("broken", include_path=folder)
    mcq = load_lm_eval_task("broken", include_path=folder, skip_bad=True)
    assert mcq.n_skipped == 2 and len(mcq.items["broken"]) == 3
    text_rows = [{"ctx": "c", "endings": ["a", "b"], "gold": "z"}]
    folder = write_task(tmp_path / "t", "textgold", text_rows, doc_to_target=json.dumps("{{gold}}"))
    with pytest.raises(RolevecError, match="item 0 has target 'z', which is not one of its choices"):
        load_lm_eval_task("textgold", include_path=folder)


def test_refuses_other_output_types_and_few_shot(tmp_path: Path) -> None:
    folder = write_task(tmp_path / "a", "gen", ROWS, output_type="generate_until", doc_to_target="ctx")
    with pytest.raises(RolevecError, match="output_type 'generate_until': only multiple_choice"):
        load_lm_eval_task("gen", include_path=folder)
    folder = write_task(
        tmp_path / "b",
        "shots",
        ROWS,
        num_fewshot="2",
        fewshot_split="test",
        fewshot_config="{sampler: first_n}",
    )
    with pytest.raises(RolevecError, match="num_fewshot: 2: few-shot prompts are not supported"):
        load_lm_eval_task("shots", include_path=folder)


def test_unknown_task_lists_close_matches(tmp_path: Path) -> None:
    folder = write_task(tmp_path, "sentence_endings", ROWS)
    with pytest.raises(
        RolevecError, match=r"unknown lm-eval task 'sentence_ending'.*close: sentence_endings"
    ):
        load_lm_eval_task("sentence_ending", include_path=folder)
    with pytest.raises(RolevecError, match=r"include path .* does not exist"):
        load_lm_eval_task("sentence_endings", include_path=tmp_path / "nowhere")


def test_missing_lm_eval_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> Any:
        if name.startswith("lm_eval"):
            raise ImportError("No module named 'lm_eval'")
        return real(name, package)

    monkeypatch.setattr(lm_eval_tasks.importlib, "import_module", fake)
    with pytest.raises(RolevecError, match=r"pip install 'rolevec\[interop\]'"):
        load_lm_eval_task("anything")
