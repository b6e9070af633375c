from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.cli import main
from rolevec.core.records import read_records, record_identity
from rolevec.data.mcq import builtin_mcq_dir
from rolevec.model.testing import make_adapter
from rolevec.vectors.role_vectors import RoleVectors


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama saved as a model folder, with a random vector file for two roles."""
    root = tmp_path_factory.mktemp("tiny_model")
    adapter = make_adapter("llama")
    adapter.model.save_pretrained(root / "model")
    adapter.tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    shape = (len(adapter.chat.positions), adapter.n_layers + 1, adapter.hidden_size)
    RoleVectors(
        role_means={"lawyer": torch.randn(shape), "mathematician": torch.randn(shape)},
        base_mean=torch.randn(shape),
        positions=tuple(adapter.chat.positions),
        position_tokens=tuple(adapter.chat.position_tokens()),
        metadata={"model": "tiny", "model_fingerprint": adapter.fingerprint()},
    ).save(root / "vectors.safetensors")
    return root


def _common(tiny_dir: Path, out: Path) -> list[str]:
    return [
        "--model",
        str(tiny_dir / "model"),
        "--device",
        "cpu",
        "--mcq-dir",
        str(builtin_mcq_dir()),
        "--out",
        str(out),
        "--no-progress",
    ]


def _sweep_args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        "--vectors",
        str(tiny_dir / "vectors.safetensors"),
        "--role",
        "lawyer",
        "--alphas",
        "1,3",
        "--positions",
        "-1,-2",
        "--layers",
        "0:3",
        "--limit",
        "4",
        *_common(tiny_dir, out),
        *extra,
    ]


def test_sweep_then_evaluate_selection(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(_sweep_args(tiny_dir, run)) == 0
    out = capsys.readouterr()
    assert "built-in sample" in out.err
    assert "lawyer on law" in out.out and "McNemar p" in out.out
    selection = json.loads((run / "selection.json").read_text())
    assert selection["layers"] == [0, 3] and selection["split_seed"] == 0
    entry = selection["roles"]["lawyer"]
    assert entry["domain"] == "law" and entry["position"] in (-1, -2) and entry["alpha"] in (1.0, 3.0)
    grid = [json.loads(line) for line in (run / "sweep.jsonl").read_text().splitlines()]
    assert len(grid) == 3 * 2 * 2 + 3 * 2
    split = json.loads((run / "split.json").read_text())
    assert set(split) == {"seed", "val_fraction", "source", "domains"}
    assert len(split["domains"]["law"]["val"]) == 5 and len(split["domains"]["law"]["test"]) == 19
    val_qids = set(split["domains"]["law"]["val"][:4])
    assert {r["qid"] for r in read_records(run / "records.jsonl")} == val_qids

    args = [
        "evaluate",
        "--vectors",
        str(tiny_dir / "vectors.safetensors"),
        "--role",
        "lawyer",
        "--selection",
        str(run / "selection.json"),
        "--domains",
        "law,math",
        "--limit",
        "3",
        *_common(tiny_dir, run),
    ]
    assert main(args) == 0
    out = capsys.readouterr()
    table = out.out.splitlines()
    assert table[0].split()[:3] == ["condition", "domain", "accuracy"] and "McNemar p" in table[0]
    assert len(table) == 2 + 2 * 5  # header, rule, 5 conditions x 2 domains
    test_records = [r for r in read_records(run / "records.jsonl") if r["split"] == "test"]
    assert len(test_records) == 5 * 2 * 3
    add = [r for r in test_records if r["condition"] == "add"]
    assert {(r["layer"], r["position"], r["alpha"]) for r in add} == {
        (entry["layer"], entry["position"], entry["alpha"])
    }
    assert not {r["qid"] for r in test_records} & set(split["domains"]["law"]["val"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scorer"] == "fast" and len(summary["rows"]) == 10
    assert (run / "manifest-sweep.json").exists() and (run / "manifest-evaluate.json").exists()
    # the same command again resumes: nothing new
    assert main(args) == 0
    assert "0 new record(s), 30 already" in capsys.readouterr().err


def test_killed_sweep_resumes_without_loss_or_duplicates(tiny_dir: Path, tmp_path: Path) -> None:
    # 12 questions x (baseline + 3 layers x 2 positions x (2 alphas + ablation)), one question per forward
    wide = ["--limit", "12", "--val-fraction", "0.5", "--batch-size", "1"]
    killed = tmp_path / "killed"
    args = _sweep_args(tiny_dir, killed, *wide)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # steady pace on a busy machine
    proc = subprocess.Popen(
        [sys.executable, "-m", "rolevec", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    records = killed / "records.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if records.exists() and records.read_bytes().count(b"\n") >= 40:
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    n_before = sum(1 for _ in read_records(records))
    assert 40 <= n_before < 12 * 19
    with records.open("a") as f:  # as if killed in the middle of a line
        f.write('{"condition": "add", "role": "lawyer", "persona_te')
    assert main(args) == 0
    resumed = list(read_records(records))
    keys = [record_identity(r) for r in resumed]
    assert len(keys) == len(set(keys)) and len(keys) > n_before
    assert records.read_bytes().endswith(b"\n")

    reference = tmp_path / "reference"
    assert main(_sweep_args(tiny_dir, reference, *wide)) == 0
    ref = {record_identity(r): r for r in read_records(reference / "records.jsonl")}
    assert set(ref) == set(keys) and len(keys) == 12 * 19
    for r in resumed:
        other: dict[str, Any] = ref[record_identity(r)]
        assert r["pred"] == other["pred"] and r["probs"] == pytest.approx(other["probs"], abs=1e-5)
    assert (killed / "selection.json").read_text() != ""
    sel_a = json.loads((killed / "selection.json").read_text())["roles"]
    sel_b = json.loads((reference / "selection.json").read_text())["roles"]
    assert sel_a == sel_b


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rolevec: error:")
    return err[-1]


def _bad_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    good = {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "A", "subject": "s"}
    rows = [good, {**good, "choices": ["a"]}, {**good, "question": "Q2?"}, {**good, "answer": "F"}]
    rows += [{**good, "question": "Q3?"}, {**good, "question": "Q4?"}]
    (folder / "math.json").write_text(json.dumps(rows))
    (folder / "law.json").write_text("[]")
    return folder


def test_bad_input_is_one_clear_error(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _bad_dir(tmp_path)
    base = ["evaluate", "--conditions", "baseline", "--model", str(tiny_dir / "model"), "--device", "cpu"]
    base += ["--no-progress", "--val-fraction", "0.5"]
    msg = _error(capsys, [*base, "--mcq-dir", str(bad), "--domains", "math", "--out", str(tmp_path / "a")])
    assert "math.json item 1 has 1 choice(s)" in msg and "--skip-bad" in msg
    assert (
        main([*base, "--mcq-dir", str(bad), "--domains", "math", "--skip-bad", "--out", str(tmp_path / "a")])
        == 0
    )
    assert "skipped 2 malformed question(s)" in capsys.readouterr().err
    msg = _error(capsys, [*base, "--mcq-dir", str(bad), "--domains", "law", "--out", str(tmp_path / "b")])
    assert "domain 'law' has no usable questions" in msg
    builtin = ["--mcq-dir", str(builtin_mcq_dir()), "--domains", "law", "--limit", "2"]
    msg = _error(capsys, [*base, *builtin, "--answer-prefix", "The answer is ", "--out", str(tmp_path / "c")])
    assert "not a single token" in msg
    # a rerun in the same folder with other settings is refused, --force starts over
    assert main([*base, *builtin, "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    msg = _error(capsys, [*base, *builtin, "--answer-prefix", "The answer is", "--out", str(tmp_path / "d")])
    assert "other settings" in msg and "--force" in msg
    assert (
        main([*base, *builtin, "--answer-prefix", "The answer is", "--out", str(tmp_path / "d"), "--force"])
        == 0
    )
    capsys.readouterr()
    msg = _error(
        capsys,
        [
            "evaluate",
            *base[1:],
            "--conditions",
            "add",
            "--role",
            "lawyer",
            *builtin,
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert "--vectors" in msg


def test_failed_commands_leave_nothing_behind(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad site, template, role or output path is refused before the run folder is written, so the
    corrected rerun is not refused for "other settings"; an unwritable --out is one line, no traceback."""
    vectors = ["--vectors", str(tiny_dir / "vectors.safetensors")]
    site = ["--layer", "1", "--position", "-1", "--alpha", "1"]
    out = tmp_path / "run"
    for bad, message in (
        (["--conditions", "random", "--role", "lawyer", *vectors, *site[2:], "--layer", "99"], "layer 99"),
        (["--conditions", "persona", "--role", "lawyer", "--persona-template", "bogus"], "persona template"),
        (["--conditions", "add", "--role", "poet", *vectors, *site], "role 'poet'"),
    ):
        assert "evaluate" not in bad
        msg = _error(capsys, ["evaluate", *bad, *_common(tiny_dir, out), "--limit", "2"])
        assert message in msg
        assert not out.exists()
    assert (
        main(
            [
                "evaluate",
                "--conditions",
                "random",
                "--role",
                "lawyer",
                *vectors,
                *site,
                *_common(tiny_dir, out),
                "--limit",
                "2",
            ]
        )
        == 0
    )
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for argv in (
        ["evaluate", "--conditions", "baseline", *_common(tiny_dir, blocker / "run")],
        _sweep_args(tiny_dir, blocker / "run"),
        ["extract", "--roles", "doctor", "--model", str(tiny_dir / "model"), "--out", str(blocker / "v.st")],
        [
            "export",
            "--format",
            "gguf",
            "--alpha",
            "1",
            "--vectors",
            str(tiny_dir / "vectors.safetensors"),
            "--role",
            "lawyer",
            "--layer",
            "2",
            "--out",
            str(blocker / "cv.gguf"),
        ],
    ):
        msg = _error(capsys, argv)
        assert f"{blocker} is a file, not a folder" in msg
    assert blocker.read_text() == "x"


def test_selection_from_another_model_is_refused(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    selection = tmp_path / "selection.json"
    selection.write_text(
        json.dumps(
            {
                "model": "other",
                "model_fingerprint": "0123456789abcdef",
                "split_seed": 0,
                "layers": [0, 2],
                "roles": {"lawyer": {"domain": "law", "layer": 1, "position": -1, "alpha": 1.0}},
            }
        )
    )
    argv = ["evaluate", "--vectors", str(tiny_dir / "vectors.safetensors"), "--role", "lawyer"]
    argv += ["--conditions", "add", "--selection", str(selection), "--domains", "law", "--limit", "2"]
    msg = _error(capsys, [*argv, *_common(tiny_dir, tmp_path / "run")])
    assert "fingerprint 0123456789abcdef" in msg
    explicit = ["--layer", "1", "--position", "-1", "--alpha", "1"]
    msg = _error(capsys, [*argv, *explicit, *_common(tiny_dir, tmp_path / "run")])
    assert "either --selection or" in msg


def test_vectors_from_another_model_need_allow_other_model(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As generate, fold and export do: refused by default, a warning with --allow-other-model."""
    other = tmp_path / "other.safetensors"
    vecs = RoleVectors.load(tiny_dir / "vectors.safetensors")
    RoleVectors(
        vecs.role_means, vecs.base_mean, vecs.positions, vecs.position_tokens, {"model_fingerprint": "f" * 16}
    ).save(other)
    site = ["--layer", "1", "--position", "-1", "--alpha", "1", "--domains", "law", "--limit", "2"]
    evaluate = ["evaluate", "--vectors", str(other), "--role", "lawyer", "--conditions", "add", *site]
    sweep = ["sweep", "--vectors", str(other), "--role", "lawyer", "--layers", "1:2", "--positions", "-1"]
    sweep += ["--limit", "2", "--ablate", "none"]
    for k, argv in enumerate((evaluate, sweep)):
        out = tmp_path / f"run{k}"
        msg = _error(capsys, [*argv, *_common(tiny_dir, out)])
        assert "fingerprint ffffffffffffffff" in msg and "--allow-other-model" in msg
        assert not out.exists()
        assert main([*argv, *_common(tiny_dir, out), "--allow-other-model"]) == 0
        assert "rolevec: warning: vectors come from" in capsys.readouterr().err


def test_other_vectors_do_not_resume_into_a_run(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Records are keyed by role and site, so the run remembers which vectors made them."""
    vecs = RoleVectors.load(tiny_dir / "vectors.safetensors")
    changed = tmp_path / "changed.safetensors"
    means = dict(vecs.role_means)
    means["lawyer"] = means["lawyer"] + 1.0
    RoleVectors(means, vecs.base_mean, vecs.positions, vecs.position_tokens, dict(vecs.metadata)).save(
        changed
    )
    site = ["--layer", "1", "--position", "-1", "--alpha", "1", "--domains", "law", "--limit", "2"]
    out = tmp_path / "run"
    argv = ["evaluate", "--role", "lawyer", "--conditions", "add", *site, *_common(tiny_dir, out)]
    assert main([*argv, "--vectors", str(tiny_dir / "vectors.safetensors")]) == 0
    assert main([*argv, "--vectors", str(tiny_dir / "vectors.safetensors")]) == 0  # the same: resumes
    capsys.readouterr()
    msg = _error(capsys, [*argv, "--vectors", str(changed)])
    assert "other settings" in msg and "vectors:lawyer" in msg
    assert main([*argv, "--vectors", str(changed), "--force"]) == 0


def _paper_file(path: Path, domain: str, n: int, unparsable: int | None = None) -> list[dict[str, Any]]:
    """The paper's released format (tab-indented lettered lines), from the built-in sample's rows."""
    rows = json.loads((builtin_mcq_dir() / f"{domain}.json").read_text(encoding="utf-8"))[:n]
    out = []
    for i, r in enumerate(rows):
        lines = "".join(f"\n\t\t\t{x}. {c}" for x, c in zip("ABCD", r["choices"], strict=True))
        text = r["question"] + lines + "\n\t\t\tAnswer with the letter of the correct answer.\n\t\t\tAnswer:"
        out.append(
            {"instruction": "Pick one.\nAnswer:" if i == unparsable else text, "target_score": r["answer"]}
        )
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return rows


def test_evaluate_paper_released_file(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--mcq target_test_law.json` is read as the paper's format (it used to stop at item 0 'has no question
    text'); the prompt is the instruction verbatim unless --rerender."""
    paper = tmp_path / "target_test_law.json"
    _paper_file(paper, "law", 8, unparsable=5)
    base = ["evaluate", "--conditions", "baseline", "--model", str(tiny_dir / "model"), "--device", "cpu"]
    base += ["--no-progress", "--val-fraction", "0.5", "--split", "all", "--mcq", str(paper)]
    assert main([*base, "--out", str(tmp_path / "v")]) == 0
    err = capsys.readouterr().err
    assert "paper's released format" in err and "law 8" in err
    assert err.count("could not be parsed") == 1 and "(first: item 5)" in err
    records = list(read_records(tmp_path / "v" / "records.jsonl"))
    assert sorted(r["qid"] for r in records) == sorted(f"paper:target_test_law/law/{i}" for i in range(8))
    msg = _error(capsys, [*base, "--rerender", "--out", str(tmp_path / "r")])
    assert "target_test_law.json item 5 has an instruction whose" in msg and "--skip-bad" in msg
    assert main([*base, "--rerender", "--skip-bad", "--out", str(tmp_path / "r")]) == 0
    assert "skipped 1 malformed" in capsys.readouterr().err
    assert len(list(read_records(tmp_path / "r" / "records.jsonl"))) == 7


def test_evaluate_an_lm_eval_task_by_continuation(tiny_dir: Path, tmp_path: Path) -> None:
    """`--mcq lm-eval:TASK --include-path DIR` scores by continuation by default (lm-eval's rule), every
    condition, records say so, a rerun resumes, and `--scoring letter` on the same folder is refused."""
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [
        {"ctx": f"Item {i}: the sky on a clear day is", "endings": ["blue", "green", "loud"], "label": i % 3}
        for i in range(12)
    ]
    (tasks / "sky.json").write_text(json.dumps(rows))
    (tasks / "sky.yaml").write_text(
        "task: sky\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(tasks / 'sky.json'))}}}}}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: label\n'
        "metric_list: [{metric: acc}]\n"
    )
    out = tmp_path / "run"
    argv = [
        "evaluate",
        "--model",
        str(tiny_dir / "model"),
        "--device",
        "cpu",
        "--mcq",
        "lm-eval:sky",
        "--include-path",
        str(tasks),
        "--vectors",
        str(tiny_dir / "vectors.safetensors"),
        "--conditions",
        "baseline,add,ablate",
        "--role",
        "lawyer",
        "--layer",
        "1",
        "--position",
        "-1",
        "--alpha",
        "2",
        "--split",
        "all",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    records = list(read_records(out / "records.jsonl"))
    assert len(records) == 3 * 12
    assert {r["scoring"] for r in records} == {"continuation"}
    assert all(r["qid"].startswith("lm-eval:sky/sky/") and len(r["logliks"]) == 3 for r in records)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["scoring"] == "continuation" and settings["mcq"] == "lm-eval:sky@test"
    assert main(argv) == 0  # resumes: nothing new
    assert len(list(read_records(out / "records.jsonl"))) == 3 * 12
    assert main([*argv, "--scoring", "letter"]) == 2
