from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from rolevec.core.records import (
    FIELDS,
    RecordStore,
    check_settings,
    compare_settings,
    read_records,
    record_identity,
)
from rolevec.errors import RolevecError


def _record(qid: str, alpha: float | None = 1.0, condition: str = "add") -> dict[str, Any]:
    return {
        "condition": condition,
        "role": "lawyer",
        "persona_template": None,
        "layer": 3,
        "position": -1,
        "alpha": alpha,
        "domain": "law",
        "split": "val",
        "qid": qid,
        "subject": "professional_law",
        "gold": "A",
        "pred": "B",
        "correct": False,
        "p_gold": 0.25,
        "probs": [0.25, 0.25, 0.25, 0.25],
    }


def test_append_skips_stored_identities_and_keeps_field_order(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordStore(path) as store:
        assert store.append([_record("law/1"), _record("law/2")]) == 2
        assert store.append([_record("law/1"), _record("law/3")]) == 1
        assert store.done(record_identity(_record("law/2")))
    with RecordStore(path) as store:  # reopened: identities come from the file
        assert len(store) == 3
        assert store.append([{**_record("law/1"), "alpha": 1}]) == 0  # α 1 == 1.0
        assert store.append([_record("law/1", alpha=3.0)]) == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert list(json.loads(lines[0])) == list(FIELDS)
    with pytest.raises(RolevecError, match="lacks field"):
        RecordStore(tmp_path / "other.jsonl").append([{"condition": "add"}])


def test_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordStore(path) as store:
        store.append([_record("law/1"), _record("law/2")])
    with path.open("a") as f:
        f.write('{"condition": "add", "role": "law')  # a killed writer's partial line
    assert [r["qid"] for r in read_records(path)] == ["law/1", "law/2"]
    with RecordStore(path) as store:
        assert store.repaired_bytes > 0 and len(store) == 2
        store.append([_record("law/3")])
    assert [r["qid"] for r in read_records(path)] == ["law/1", "law/2", "law/3"]


def test_damaged_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(_record("law/1")) + "\nnot json\n" + json.dumps(_record("law/2")) + "\n")
    with pytest.raises(RolevecError, match="line 2 is not valid JSON"):
        RecordStore(path)


def test_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordStore(path), pytest.raises(RolevecError, match="in use"):
        RecordStore(path)
    RecordStore(path).close()  # free again once closed


WRITER = textwrap.dedent(
    """
    import sys
    from rolevec.core.records import RecordStore
    path, start = sys.argv[1], int(sys.argv[2])
    store = RecordStore(path)
    for batch in range(start, 100000):
        rows = []
        for j in range(7):
            rows.append({"condition": "add", "role": "r", "persona_template": None, "layer": batch,
                         "position": -1, "alpha": 1.0, "domain": "law", "split": "val", "qid": f"law/{j}",
                         "subject": "s", "gold": "A", "pred": "A", "correct": True, "p_gold": 0.9,
                         "probs": [0.9, 0.05, 0.03, 0.02] * 50})
        store.append(rows)
    """
)


def test_killed_writer_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "0"])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not path.exists() or path.stat().st_size < 200_000):
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with RecordStore(path) as store:
        n = len(store)
        assert n > 0
        # rewriting every batch written so far adds nothing; the next ones are new
        last_layer = max(r["layer"] for r in read_records(path))
        again = [
            {**_record(f"law/{j}"), "role": "r", "layer": layer, "subject": "s", "pred": "A", "correct": True}
            for layer in range(last_layer + 2)
            for j in range(7)
        ]
        added = store.append(again)
    records = list(read_records(path))
    keys = [record_identity(r) for r in records]
    assert len(keys) == len(set(keys))
    assert {(r["layer"], r["qid"]) for r in records} == {
        (b, f"law/{j}") for b in range(last_layer + 2) for j in range(7)
    }
    assert added == len(keys) - n
    assert path.read_bytes().endswith(b"\n")
    assert os.path.getsize(path) == sum(len(line) + 1 for line in path.read_text().splitlines())


def test_settings_must_match(tmp_path: Path) -> None:
    check_settings(tmp_path, {"model_fingerprint": "abc", "prompt": {"answer_prefix": None}})
    check_settings(tmp_path, {"model_fingerprint": "abc"})
    check_settings(tmp_path, {"model_fingerprint": "abc", "random_seed": 1})  # new keys are added
    with pytest.raises(RolevecError, match="random_seed"):
        check_settings(tmp_path, {"random_seed": 2})
    with pytest.raises(RolevecError, match="`force=True`"):
        check_settings(tmp_path, {"model_fingerprint": "xyz"})
    (tmp_path / "settings.json").unlink()
    check_settings(tmp_path, {"model_fingerprint": "xyz"})


def test_settings_mismatch_names_only_the_differing_fields(tmp_path: Path) -> None:
    long = "x" * 900
    study = {"base": "broken.json", "roles_dir": long, "n_prompts": 32, "layers": None}
    check_settings(tmp_path, {"study": study, "model_fingerprint": "abc"})
    before = (tmp_path / "settings.json").read_bytes()
    with pytest.raises(RolevecError) as err:
        compare_settings(tmp_path, {"study": {**study, "base": "good.json"}, "model_fingerprint": "abc"})
    message = str(err.value)
    assert "study.base" in message and "good.json" in message
    assert "roles_dir" not in message and "n_prompts" not in message and "model_fingerprint" not in message
    assert len(message) < 300
    assert (tmp_path / "settings.json").read_bytes() == before  # compare writes nothing


def test_records_with_undecodable_bytes_are_one_error(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(RolevecError, match=r"records file .*records.jsonl is not UTF-8 text .* line 2"):
        list(read_records(path))
