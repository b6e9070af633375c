from __future__ import annotations

import json

import pytest

from rolevec.cli import main


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_info_bad_model_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "./missing-model-dir"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rolevec: error:")


@pytest.mark.e2e
def test_info_on_embedded_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_layers"] == 30 and info["hidden_size"] == 576
    assert info["answer_letter_ids"] == {"A": 49, "B": 50, "C": 51, "D": 52}
