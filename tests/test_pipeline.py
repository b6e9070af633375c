from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest

from rolevec.core.records import read_records
from rolevec.data.mcq import builtin_mcq_dir
from rolevec.errors import RolevecError
from rolevec.model.testing import make_adapter
from rolevec.study.pipeline import PRESETS, StudyConfig, config_from, read_config_file, run_study

ARTEFACTS = (
    "prompts.json",
    "vectors.safetensors",
    "split.json",
    "settings.json",
    "records.jsonl",
    "sweep.jsonl",
    "selection.json",
    "interpret.json",
    "diagnostics.json",
    "report.html",
    "report.md",
    "manifest.json",
)


def _tiny_config(**changes: object) -> StudyConfig:
    base = {
        "roles": "mathematician,lawyer",
        "domains": "math,law",
        "n_prompts": 6,
        "n_base": 8,
        "mcq": str(builtin_mcq_dir()),
        "val_limit": 4,
        "test_limit": 4,
        "positions": "-1,-2",
        "alphas": "1,3",
        "dtype": "float32",
    }
    base.update(changes)
    return config_from(None, None, base)


def _check_artefacts(run_dir: Path, roles: list[str], domains: list[str]) -> None:
    for name in ARTEFACTS:
        assert (run_dir / name).is_file(), name
    records = list(read_records(run_dir / "records.jsonl"))
    test = [r for r in records if r["split"] == "test"]
    kinds = {(r["condition"], r["role"]) for r in test}
    for role in roles:
        for kind in ("persona", "add", "ablate", "random"):
            assert (kind, role) in kinds
    assert {r["domain"] for r in test} == set(domains)
    selection = json.loads((run_dir / "selection.json").read_text())
    assert set(selection["roles"]) == set(roles)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["timings_s"]) >= {"prompts", "vectors", "selection", "test", "report", "total"}
    assert "role(s)" in manifest["sampled"]
    html = (run_dir / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 5
    ElementTree.fromstring(html.split("<!DOCTYPE html>", 1)[-1].strip())  # well-formed markup


def test_study_on_tiny_model_writes_every_artefact_and_resumes(tmp_path: Path) -> None:
    adapter = make_adapter("llama")
    lines: list[str] = []
    study = run_study(adapter, _tiny_config(), tmp_path, progress=False, log=lines.append)
    _check_artefacts(tmp_path, ["mathematician", "lawyer"], ["math", "law"])
    n_records = len(list(read_records(tmp_path / "records.jsonl")))
    # per role: 4 val baseline shared, sweep 1 layer x 2 positions x 2 alphas + ablations; test grid
    assert n_records > 2 * 4 * 2 * 5
    assert any("[7/7] report" in line for line in lines)
    again = run_study(adapter, _tiny_config(), tmp_path, progress=False, log=lines.append)
    assert len(list(read_records(tmp_path / "records.jsonl"))) == n_records
    assert again.state.sampled["test"]["new_records"] == 0
    assert study.roles == again.roles


def test_changed_settings_are_refused(tmp_path: Path) -> None:
    adapter = make_adapter("llama")
    run_study(adapter, _tiny_config(interpret=False), tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(RolevecError, match="other settings"):
        run_study(adapter, _tiny_config(alphas="2"), tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(RolevecError, match="seed 0"):
        run_study(adapter, _tiny_config(split_seed=5), tmp_path, progress=False, log=lambda _: None)


def test_config_layers_and_errors(tmp_path: Path) -> None:
    quick = config_from("quick", None, {})
    assert len(quick.roles) == 8 and quick.layer_step == PRESETS["quick"]["layer_step"]
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('roles = "doctor"\nalphas = [2, 4]\n')
    cfg = config_from("paper", read_config_file(cfg_file), {"test_limit": 5})
    assert cfg.roles == ("doctor",) and cfg.alphas == (2.0, 4.0) and cfg.test_limit == 5
    assert cfg.positions == "all"
    with pytest.raises(RolevecError, match="unknown options key"):
        config_from(None, None, {"rolez": "x"})
    with pytest.raises(RolevecError, match="unknown preset"):
        config_from("huge", None, {})
    with pytest.raises(RolevecError, match="does not exist"):
        read_config_file(tmp_path / "missing.json")
    with pytest.raises(RolevecError, match=r"no domain in the paper's table.*`role_domains`"):
        run_study(make_adapter("llama"), _tiny_config(roles="historian"), tmp_path, progress=False)


@pytest.mark.parametrize("scoring", ["letter", "continuation"])
def test_study_on_domains_roles_and_choices_outside_the_paper(tmp_path: Path, scoring: str) -> None:
    """Two domains of one's own (5 and 3 choices), a role the paper's table lacks mapped by a role ->
    domain file, both scoring rules: every stage runs, records and settings say what was used."""
    mcq = tmp_path / "mcq"
    mcq.mkdir()
    for domain, n in (("medqa", 5), ("arc", 3)):
        rows = [
            {
                "question": f"{domain} question {i}?" + " Think." * (i % 3),
                "choices": [f"option {j} for {i}" for j in range(n)],
                "answer": i % n,
                "subject": f"{domain}_{i % 2}",
            }
            for i in range(20)
        ]
        (mcq / f"{domain}.json").write_text(json.dumps(rows))
    roles = tmp_path / "roles"
    roles.mkdir()
    for role in ("mathematician", "historian"):
        (roles / f"{role}.json").write_text(
            json.dumps([f"As a {role}, explain topic {i}." for i in range(8)])
        )
    role_map = tmp_path / "role_domains.json"
    role_map.write_text(json.dumps({"mathematician": "medqa", "historian": "arc"}))
    config = _tiny_config(
        roles="mathematician,historian",
        domains="all",
        roles_dir=str(roles),
        mcq=str(mcq),
        role_domains=str(role_map),
        scoring=scoring,
        interpret=False,
    )
    run_dir = tmp_path / "run"
    run_study(make_adapter("llama"), config, run_dir, progress=False, log=lambda _: None)
    records = list(read_records(run_dir / "records.jsonl"))
    test = [r for r in records if r["split"] == "test"]
    assert {r["domain"] for r in test} == {"medqa", "arc"}
    assert {r["scoring"] for r in records} == {scoring}
    assert {len(r["probs"]) for r in test if r["domain"] == "medqa"} == {5}
    assert {len(r["probs"]) for r in test if r["domain"] == "arc"} == {3}
    assert ("pred_norm" in test[0]) == (scoring == "continuation")
    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings["scoring"] == scoring
    assert settings["role_domains"] == {"mathematician": "medqa", "historian": "arc"}
    sweep = [json.loads(line) for line in (run_dir / "sweep.jsonl").read_text().splitlines()]
    assert {(r["role"], r["domain"]) for r in sweep} == {("mathematician", "medqa"), ("historian", "arc")}
    report = (run_dir / "report.md").read_text()
    assert "medqa" in report and "arc" in report and scoring in report
    assert "20.0%" in report or "20%" in report  # chance level of the 5-choice domain


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"roles": 5}, "roles must be a list"),
        ({"n_prompts": -5}, "n_prompts must be an integer >= 1"),
        ({"val_fraction": 1.5}, "val_fraction must be between 0 and 1"),
        ({"ablate_scope": "some"}, "ablate_scope must be all, passing or none"),
        ({"roles_dir": "/no/such/folder"}, "roles_dir '/no/such/folder' does not exist"),
        ({"mcq": "/no/such/file.json"}, "mcq '/no/such/file.json' does not exist"),
    ],
)
def test_bad_config_values_are_refused_up_front(changes: dict[str, object], message: str) -> None:
    with pytest.raises(RolevecError, match=message):
        _tiny_config(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layers": "3:2"}, "is empty"),
        ({"layers": "0:99"}, "out of range"),
        ({"positions": "0"}, "positions"),
        ({"persona_templates": "bogus"}, "unknown persona template"),
    ],
)
def test_a_bad_grid_is_refused_before_the_run_folder_is_written(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(RolevecError, match=message):
        run_study(make_adapter("llama"), _tiny_config(**changes), run_dir, progress=False)
    assert not run_dir.exists()  # so the corrected rerun is not refused for "other settings"


@pytest.mark.e2e
def test_rolevec_run_on_embedded_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rolevec.cli import main

    out = tmp_path / "run"
    argv = [
        "run", "--out", str(out), "--roles", "mathematician,lawyer", "--domains", "math,law",
        "--n", "8", "--n-base", "8", "--val-limit", "4", "--test-limit", "4", "--layers", "10:21",
        "--layer-step", "10", "--positions=-1", "--alphas", "1,3", "--dtype", "bfloat16",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    _check_artefacts(out, ["mathematician", "lawyer"], ["math", "law"])
    printed = capsys.readouterr().out
    assert "Sampled: 2 role(s)" in printed and "small sample" in printed
    interpret = json.loads((out / "interpret.json").read_text())
    assert interpret["roles"]["lawyer"]["patchscope"]["steered"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["model"]["fingerprint"]
        == json.loads((out / "selection.json").read_text())["model_fingerprint"]
    )
    n_records = len(list(read_records(out / "records.jsonl")))
    assert main(argv) == 0  # a rerun on the finished folder resumes: nothing new to score
    rerun = json.loads((out / "manifest.json").read_text())
    assert rerun["sampling_details"]["test"]["new_records"] == 0
    assert len(list(read_records(out / "records.jsonl"))) == n_records


def test_run_skip_bad_skips_malformed_questions_of_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rolevec run --mcq DIR` stops at a malformed item naming file and item; with --skip-bad it runs
    without it."""
    from rolevec.cli import main

    adapter = make_adapter("llama")
    model = tmp_path / "model"
    adapter.model.save_pretrained(model)
    adapter.tokenizer.save_pretrained(model)
    mcq = tmp_path / "mcq"
    mcq.mkdir()
    rows = [
        {"question": f"Q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4, "subject": "s"}
        for i in range(12)
    ]
    rows[3] = {"question": "Q3?", "choices": ["a"], "answer": 0}
    (mcq / "math.json").write_text(json.dumps(rows))
    argv = ["run", "--model", str(model), "--device", "cpu", "--dtype", "float32", "--mcq", str(mcq)]
    argv += ["--roles", "mathematician", "--domains", "math", "--n", "4", "--n-base", "4", "--val-limit", "2"]
    argv += [
        "--test-limit",
        "2",
        "--layers",
        "1:3",
        "--layer-step",
        "1",
        "--positions",
        "-1",
        "--alphas",
        "1",
    ]
    argv += ["--no-interpret"]
    argv += ["--no-progress", "--out"]
    assert main([*argv, str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "math.json item 3" in err and "--skip-bad" in err
    assert not (tmp_path / "a").exists()
    assert main([*argv, str(tmp_path / "b"), "--skip-bad"]) == 0
    records = list(read_records(tmp_path / "b" / "records.jsonl"))
    assert records and "math/3" not in {r["qid"] for r in records}


def test_all_domains_of_a_source_still_refuse_a_role_domain_it_lacks(tmp_path: Path) -> None:
    """`domains=all` reads the domains from the source once; a mapped role whose domain the source lacks is
    refused by the source's own line."""
    from rolevec.study.pipeline import check_inputs

    mcq = tmp_path / "mcq"
    mcq.mkdir()
    rows = [{"question": f"Q{i}?", "choices": ["a", "b", "c"], "answer": i % 3} for i in range(10)]
    (mcq / "arc.json").write_text(json.dumps(rows))
    role_map = tmp_path / "role_domains.json"
    role_map.write_text(json.dumps({"mathematician": "medqa"}))
    config = _tiny_config(roles="mathematician", domains="all", mcq=str(mcq), role_domains=str(role_map))
    with pytest.raises(RolevecError, match=r"no question file for domain\(s\) medqa"):
        check_inputs(config)
    role_map.write_text(json.dumps({"mathematician": "arc"}))
    assert check_inputs(config) == (["mathematician"], ["arc"])
