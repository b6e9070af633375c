"""The one ``--force`` rule, as a user meets it: every command that writes a folder, on a folder of every
kind, with a user's file inside; typos and broken inputs under ``--force``; interrupts and kills midway.

Each test here failed before :mod:`rolevec.core.outdir` (fold replaced a run folder, run/evaluate deleted
results before checking their inputs, a failed run pinned its settings, nothing was set aside).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rolevec.cli import main
from rolevec.core.outdir import OWNERS_NAME, TRASH_NAME
from rolevec.core.records import RecordStore
from snapshots import changes, snapshot

NOTE = b"my notes: do not lose these\n"
QUESTIONS = [
    {
        "question": f"Which number is {i} plus one?",
        "choices": [str(i + 1), str(i + 2), str(i), str(i + 3)],
        "answer": "A",
        "subject": "high_school_mathematics",
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model, role/base/question files, a finished ``rolevec run`` folder and a folded checkpoint."""
    from rolevec.model.testing import make_model, make_tokenizer

    root = tmp_path_factory.mktemp("outdir")
    tokenizer = make_tokenizer()
    model: Any = make_model("llama", len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "roles").mkdir()
    prompts = ["Prove 2 is prime.", "Integrate x squared.", "Define a ring.", "What is a group?"]
    (root / "roles" / "mathematician.json").write_text(json.dumps(prompts), encoding="utf-8")
    (root / "base.txt").write_text("Write a poem.\nName two animals.\nGive sleep tips.\nSay hi.\n")
    (root / "mcq").mkdir()
    (root / "mcq" / "math.json").write_text(json.dumps(QUESTIONS), encoding="utf-8")
    assert main(_argv("run", root, root / "run")) == 0
    assert main(_argv("fold", root, root / "folded")) == 0
    return root


def _argv(command: str, root: Path, out: Path, *extra: str) -> list[str]:
    model = ["--model", str(root / "model"), "--device", "cpu", "--dtype", "float32"]
    vec = ["--vectors", str(root / "run" / "vectors.safetensors"), "--role", "mathematician"]
    quiet = ["--no-progress"]
    if command == "run":
        args = [*model, "--roles", "mathematician", "--domains", "math", "--roles-dir", str(root / "roles")]
        args += ["--base", str(root / "base.txt"), "--n", "4", "--n-base", "4"]
        args += ["--mcq-dir", str(root / "mcq")]
        args += ["--val-limit", "4", "--test-limit", "4", "--alphas", "1", "--positions", "-1"]
        args += ["--no-interpret", *quiet, "--out", str(out)]
    elif command == "sweep":
        args = [*model, *vec, "--mcq-dir", str(root / "mcq"), "--domain", "math", "--alphas", "1"]
        args += ["--positions", "-1", "--limit", "4", *quiet, "--out", str(out)]
    elif command == "evaluate":
        args = [*model, *vec, "--domains", "math", "--layer", "2", "--position", "-1", "--alpha", "1"]
        args += ["--mcq-dir", str(root / "mcq"), "--limit", "4", *quiet, "--out", str(out)]
    elif command == "fold":
        args = [*model, *vec, "--layer", "2", "--alpha", "1", "--out", str(out)]
    elif command == "report":
        args = [str(out)]
    else:
        raise AssertionError(command)
    return [command, *args, *extra]


def _folder(made: Path, tmp_path: Path, kind: str) -> Path:
    """A folder of ``kind`` with a user's notes.txt inside (or, for 'file', a plain file)."""
    target = tmp_path / "target"
    if kind == "file":
        target.write_bytes(NOTE)
        return target
    if kind == "run":
        shutil.copytree(made / "run", target)
    elif kind == "checkpoint":
        shutil.copytree(made / "folded", target)
    elif kind == "user":  # someone's folder whose files happen to have rolevec's names
        target.mkdir()
        for name in ("records.jsonl", "report.html", "vectors.safetensors", "config.json", "settings.json"):
            (target / name).write_bytes(b"the user's own " + name.encode() + b"\n")
    (target / "notes.txt").write_bytes(NOTE)
    return target


COMMANDS = ("run", "sweep", "evaluate", "report", "fold")
KINDS = ("run", "checkpoint", "user", "file")
#: (command, folder kind) pairs where --force is allowed; everything else must be refused untouched.
ALLOWED = {("run", "run"), ("sweep", "run"), ("evaluate", "run"), ("report", "run")}


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("rolevec: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_force_on_every_folder_kind(
    made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, kind: str
) -> None:
    target = _folder(made, tmp_path, kind)
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(_argv(command, made, target, "--force"))
    err = capsys.readouterr().err
    if (command, kind) not in ALLOWED:
        assert rc != 0
        _one_error(err)
        assert changes(before, snapshot(tmp_path)) == []
        return
    assert rc == 0, err
    assert (target / "notes.txt").read_bytes() == NOTE  # the user's file, untouched
    assert before["target/notes.txt"] == snapshot(tmp_path)["target/notes.txt"]
    assert not (target / TRASH_NAME).exists()  # the set-aside results go once the command succeeded
    owners = json.loads((target / OWNERS_NAME).read_text(encoding="utf-8"))
    assert owners["kind"] == "run" and "notes.txt" not in owners["files"]


def test_fold_force_replaces_only_its_own_checkpoint(made: Path, tmp_path: Path) -> None:
    target = tmp_path / "folded"
    shutil.copytree(made / "folded", target)
    old = (target / "model.safetensors").stat().st_mtime_ns
    assert main(_argv("fold", made, target, "--force")) == 0
    assert (target / "model.safetensors").stat().st_mtime_ns != old
    assert json.loads((target / OWNERS_NAME).read_text())["kind"] == "checkpoint"


@pytest.mark.parametrize(
    ("command", "extra", "expect"),
    [
        ("evaluate", ("--conditions", "baselin"), "baselin"),
        ("run", ("--base", "BROKEN.json"), "BROKEN.json"),
        ("run", ("--roles", "mathematican"), "mathematican"),
        ("sweep", ("--alphas", "1,x"), "--alphas"),
        ("evaluate", ("--persona-template", "you_ar", "--conditions", "persona"), "you_ar"),
    ],
)
def test_force_with_a_bad_input_touches_nothing(
    made: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    extra: tuple[str, ...],
    expect: str,
) -> None:
    """The issue's data-loss cases: a typo after --force used to delete the results, then be refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BROKEN.json").write_text('[{"colour": "blue"}]', encoding="utf-8")
    target = _folder(made, tmp_path, "run")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(_argv(command, made, target, "--force", *extra)) != 0
    assert expect in _one_error(capsys.readouterr().err)
    assert changes(before, snapshot(tmp_path)) == []


def test_failed_run_leaves_no_folder_and_the_corrected_rerun_works(
    made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"colour": "blue"}]', encoding="utf-8")
    new = tmp_path / "new"
    assert main([*_argv("run", made, new), "--base", str(broken)]) != 0
    _one_error(capsys.readouterr().err)
    assert not new.exists()
    assert main(_argv("run", made, new)) == 0
    assert (new / "records.jsonl").is_file() and (new / "settings.json").is_file()


def test_evaluate_force_moves_only_its_files_and_what_derives_from_them(made: Path, tmp_path: Path) -> None:
    target = _folder(made, tmp_path, "run")
    kept = {n: (target / n).read_bytes() for n in ("vectors.safetensors", "sweep.jsonl", "selection.json")}
    assert (target / "report.html").exists() and (target / "tables").is_dir()
    assert main(_argv("evaluate", made, target, "--force")) == 0
    assert {n: (target / n).read_bytes() for n in kept} == kept  # run's, not evaluate's: untouched
    # the report described the replaced records: it goes with them (a `rolevec report` remakes it)
    assert not (target / "report.html").exists() and not (target / "tables").exists()
    rows = [json.loads(line) for line in (target / "records.jsonl").read_text().splitlines()]
    assert rows and all(r["kind"] != "sweep" for r in rows if "kind" in r)
    assert main(["report", str(target)]) == 0
    assert (target / "report.html").exists()


def _interrupt_appends(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Make the records store raise KeyboardInterrupt (a Ctrl-C) on its ``after``-th append."""
    original = RecordStore.append
    calls = {"n": 0}

    def append(self: RecordStore, records: Any) -> int:
        calls["n"] += 1
        if calls["n"] >= after:
            raise KeyboardInterrupt
        return original(self, records)

    monkeypatch.setattr(RecordStore, "append", append)


def _assert_resumed_from(target: Path, old: dict[str, bytes]) -> None:
    """The folder continues the old results: every old record first, byte for byte, the same split,
    and the old settings kept (the resume may add its own keys, e.g. its vector's fingerprint)."""
    assert (target / "records.jsonl").read_bytes().startswith(old["records.jsonl"])
    assert (target / "split.json").read_bytes() == old["split.json"]
    settings = json.loads((target / "settings.json").read_text(encoding="utf-8"))
    assert json.loads(old["settings.json"]).items() <= settings.items()


def test_interrupted_force_keeps_the_old_results_and_a_rerun_restores_them(
    made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = _folder(made, tmp_path, "run")
    old = {n: (target / n).read_bytes() for n in ("records.jsonl", "settings.json", "split.json")}
    old_report = (target / "report.html").read_bytes()
    with monkeypatch.context() as patch:
        _interrupt_appends(patch, after=1)
        assert main(_argv("evaluate", made, target, "--force")) != 0
    trash = target / TRASH_NAME / "evaluate"
    assert {n: (trash / n).read_bytes() for n in old} == old  # set aside, intact
    assert (trash / "report.html").read_bytes() == old_report
    assert "--force" in capsys.readouterr().err
    # a rerun without --force is a resume of the old results: they are put back, byte for byte
    assert main(_argv("evaluate", made, target)) == 0
    assert "restored" in capsys.readouterr().err
    assert not (target / TRASH_NAME).exists()
    _assert_resumed_from(target, old)
    assert (target / "notes.txt").read_bytes() == NOTE


def test_interrupted_force_is_finished_by_a_second_force(
    made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = _folder(made, tmp_path, "run")
    old = (target / "records.jsonl").read_bytes()
    with monkeypatch.context() as patch:
        _interrupt_appends(patch, after=1)
        assert main(_argv("evaluate", made, target, "--force")) != 0
    assert (target / TRASH_NAME / "evaluate" / "records.jsonl").read_bytes() == old
    capsys.readouterr()
    assert main(_argv("evaluate", made, target, "--force")) == 0
    assert "finishing an interrupted --force" in capsys.readouterr().err
    assert not (target / TRASH_NAME).exists()
    assert (target / "records.jsonl").read_bytes() != old
    assert (target / "notes.txt").read_bytes() == NOTE


@pytest.fixture
def slow_child(made: Path, tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """`rolevec evaluate --force` in a child process whose record writes stall, so it can be killed midway."""
    target = _folder(made, tmp_path, "run")
    argv = _argv("evaluate", made, target, "--force")
    code = (
        "import sys, time\n"
        "from rolevec.core.records import RecordStore\n"
        "RecordStore.append = lambda self, records: time.sleep(600)\n"
        "from rolevec.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        yield target, child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_killed_force_run_loses_nothing(
    made: Path, slow_child: tuple[Path, subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    target, child = slow_child
    old = {n: (target / n).read_bytes() for n in ("records.jsonl", "settings.json", "split.json")}
    record = target / TRASH_NAME / "evaluate" / "trash.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if record.is_file() and json.loads(record.read_text() or "{}").get("done"):
            break
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read() if child.stderr else ""
    assert json.loads(record.read_text())["done"]
    time.sleep(0.5)  # well into the stalled evaluation
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert {n: (target / TRASH_NAME / "evaluate" / n).read_bytes() for n in old} == old
    # the next command in the folder (here a plain resume) puts the old results back
    capsys.readouterr()
    assert main(_argv("evaluate", made, target)) == 0
    assert "restored" in capsys.readouterr().err
    _assert_resumed_from(target, old)


def test_force_waits_for_no_one_holding_the_records_lock(
    made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = _folder(made, tmp_path, "run")
    with RecordStore(target / "records.jsonl"):
        before = snapshot(tmp_path)
        assert main(_argv("evaluate", made, target, "--force")) != 0
        assert "in use by another rolevec process" in _one_error(capsys.readouterr().err)
        assert changes(before, snapshot(tmp_path)) == []


def test_folder_from_before_the_ownership_file_is_adopted(made: Path, tmp_path: Path) -> None:
    """A run folder written by an older rolevec has its rolevec manifests: its files are adopted as
    rolevec's, and a file of the user's stays theirs."""
    target = _folder(made, tmp_path, "run")
    (target / OWNERS_NAME).unlink()
    assert main(_argv("evaluate", made, target, "--force")) == 0
    owners = json.loads((target / OWNERS_NAME).read_text())
    assert owners["kind"] == "run" and "records.jsonl" in owners["files"]
    assert "notes.txt" not in owners["files"]
    assert (target / "notes.txt").read_bytes() == NOTE


def test_untracked_file_with_a_rolevec_name_is_never_replaced(
    made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run folder where the user put their own summary.json (evaluate writes one): --force refuses."""
    target = _folder(made, tmp_path, "run")
    owners = json.loads((target / OWNERS_NAME).read_text())
    assert "summary.json" not in owners["files"]
    (target / "summary.json").write_bytes(NOTE)
    before = snapshot(tmp_path)
    assert main(_argv("evaluate", made, target, "--force")) != 0
    assert "summary.json" in _one_error(capsys.readouterr().err)
    assert changes(before, snapshot(tmp_path)) == []
