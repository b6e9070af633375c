from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.cli import main
from rolevec.errors import RolevecError
from rolevec.model.loading import ModelAdapter, load_model
from rolevec.model.testing import make_adapter
from rolevec.vectors.role_vectors import RoleVectors

ROLE_PROMPTS = {
    "mathematician": ["Prove that 2 is prime.", "Integrate x squared.", "Define a ring.", "Define a ring."],
    "doctor": ["Treat a mild fever.", "Explain blood pressure.", "What is an antibiotic?"],
}
BASE = ["Write a poem.", "Name two animals.", "Give three tips for sleep.", "Translate hello."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama saved as a local model folder, so the CLI loads it like any model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    adapter = make_adapter("llama")
    model: Any = adapter.model  # a transformers model
    model.save_pretrained(path)
    adapter.tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def roles_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "roles"
    folder.mkdir()
    for role, prompts in ROLE_PROMPTS.items():
        (folder / f"{role}.json").write_text(json.dumps(prompts), encoding="utf-8")
    return folder


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.txt"
    path.write_text("\n".join(BASE), encoding="utf-8")
    return path


def _extract(model: Path | None, out: Path, *extra: str) -> list[str]:
    args = ["extract", "--device", "cpu", "--out", str(out), *extra]
    return [*args, "--model", str(model)] if model is not None else args


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rolevec:")]
    assert len(err) == 1, err
    assert err[0].startswith("rolevec: error:")
    return err[0]


def test_extract_writes_one_file_with_provenance(
    tiny_dir: Path, roles_dir: Path, base_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.safetensors"
    argv = _extract(tiny_dir, out, "--roles", "mathematician,doctor", "--roles-dir", str(roles_dir))
    assert main([*argv, "--base", str(base_file), "--n", "3", "--seed", "7", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "extracting" in captured.err  # the progress bar
    assert "mathematician: 3 prompts" in captured.err and "1 duplicate(s) dropped" in captured.err
    vecs = RoleVectors.load(out)
    assert set(vecs.roles) == {"mathematician", "doctor"} and vecs.n_layers == 3
    meta = vecs.metadata
    assert meta["prompts"]["mathematician"]["duplicates_dropped"] == 1
    assert meta["prompts"]["doctor"] == {
        "n": 3,
        "source": str(roles_dir / "doctor.json"),
        "duplicates_dropped": 0,
    }
    assert meta["base"]["n"] == 3 and meta["base"]["source"] == str(base_file)
    assert meta["seed"] == 7 and meta["n_requested"] == 3 and meta["model"] == str(tiny_dir)
    assert {"model_fingerprint", "hidden_size", "n_layers", "dtype", "rolevec_version", "created"} <= set(
        meta
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_roles_all_uses_the_29_builtin_roles(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.safetensors"
    assert main([*_extract(tiny_dir, out, "--roles", "all", "--n", "2", "--no-progress")]) == 0
    vecs = RoleVectors.load(out)
    assert len(vecs.roles) == 29 and vecs.metadata["base"]["source"] == "builtin:base.json"
    assert "extracting" not in capsys.readouterr().err


def test_existing_output_needs_force(
    tiny_dir: Path, roles_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.safetensors"
    out.write_bytes(b"keep me")
    argv = _extract(
        tiny_dir, out, "--roles", "doctor", "--roles-dir", str(roles_dir), "--n", "2", "--no-progress"
    )
    assert main(argv) == 2
    assert "--force" in _one_error_line(capsys)
    assert out.read_bytes() == b"keep me"
    assert main([*argv, "--force"]) == 0
    assert RoleVectors.load(out).roles == ("doctor",)


def _bad_inputs(roles_dir: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    (roles_dir / "empty.json").write_text("[]", encoding="utf-8")
    (roles_dir / "broken.json").write_text('[\n "ok",\n "no end\n]', encoding="utf-8")
    (roles_dir / "ragged.csv").write_text("instruction,id\na,1\nb, c,2\n", encoding="utf-8")
    rd = ["--roles-dir", str(roles_dir), "--n", "2"]
    return [
        (["--roles", "doctor", "--roles-dir", str(tmp_path / "nope")], "does not exist"),
        (["--roles", "lawyer", *rd], "no prompt file for role 'lawyer'"),
        (["--roles", "empty", *rd], "holds no prompts"),
        (["--roles", "broken", *rd], "broken.json:3: malformed JSON"),
        (["--roles", "ragged", *rd], "ragged.csv:3: malformed CSV"),
        (["--roles", " , ", *rd], "--roles is empty"),
        (["--roles", "doctor", *rd, "--base", str(tmp_path / "missing.json")], "missing.json does not exist"),
    ]


def test_bad_input_is_one_line_and_nonzero(
    roles_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.safetensors"
    for extra, message in _bad_inputs(roles_dir, tmp_path):
        assert main(_extract(tmp_path / "no-model", out, *extra)) == 2, extra
        line = _one_error_line(capsys)
        assert message in line, (extra, line)
    assert main(_extract(None, tmp_path, "--roles", "doctor")) == 2
    assert "is a folder" in _one_error_line(capsys)
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(_extract(None, out, "--roles", "doctor", "--n", "0"))
    with pytest.raises(SystemExit):
        main(_extract(None, out, "--roles", "doctor", "--batch-size", "-1"))


def test_few_prompts_and_long_prompts_warn(
    tiny_dir: Path, roles_dir: Path, base_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (roles_dir / "verbose.txt").write_text(
        " ".join(["Explain how eigenvalues relate to matrix diagonalization."] * 30) + "\nShort one.\n",
        encoding="utf-8",
    )
    out = tmp_path / "v.safetensors"
    argv = _extract(tiny_dir, out, "--roles", "verbose,doctor", "--roles-dir", str(roles_dir))
    assert main([*argv, "--base", str(base_file), "--n", "4", "--max-tokens", "40", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 prompt sets have fewer than n=4 prompts and are used whole: verbose (2)" in err
    assert err.count("fewer than n=4") == 1  # one line for all the small sets
    assert "rolevec: warning: 1 prompt(s) were longer than max_tokens=40" in err
    meta = RoleVectors.load(out).metadata
    assert meta["prompts"]["verbose"]["n"] == 2 and meta["n_shortened"] == 1 and meta["max_tokens"] == 40


def test_interrupted_run_leaves_no_file(
    tiny_dir: Path,
    roles_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import safetensors.torch

    out_dir = tmp_path / "out"
    out = out_dir / "v.safetensors"
    argv = _extract(tiny_dir, out, "--roles", "doctor", "--roles-dir", str(roles_dir), "--no-progress")

    def interrupted_save(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted_save)
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []

    def interrupted_forward(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("rolevec.vectors.extraction._accumulate", interrupted_forward)
    assert main(argv) == 130
    assert not out.exists()


def test_vector_file_checks_the_model_it_is_applied_to(
    tiny_dir: Path, roles_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "v.safetensors"
    assert (
        main(_extract(tiny_dir, out, "--roles", "doctor", "--roles-dir", str(roles_dir), "--no-progress"))
        == 0
    )
    vecs = RoleVectors.load(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model: silent
        vecs.check_compatible(load_model(str(tiny_dir), device="cpu"))
    with pytest.raises(RolevecError, match="hidden size 32 and 3 layers"):
        vecs.check_compatible(make_adapter("llama", n_layers=2))
    with pytest.warns(UserWarning, match="fingerprint"):
        vecs.check_compatible(make_adapter("qwen2"))


def test_paper_data_through_the_cli(
    tiny_dir: Path, tmp_path: Path, paper_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "paper.safetensors"
    argv = _extract(
        tiny_dir, out, "--roles", "bailiff,mathematician", "--roles-dir", str(paper_data / "roles")
    )
    base = paper_data / "base" / "alpaca_train.json"
    assert main([*argv, "--base", str(base), "--n", "8", "--no-progress"]) == 0
    assert "bailiff: 8 prompts" in capsys.readouterr().err
    meta = RoleVectors.load(out).metadata
    assert meta["prompts"]["bailiff"]["duplicates_dropped"] == 16
    assert meta["base"] == {"n": 8, "source": str(base), "duplicates_dropped": 0}


@pytest.mark.e2e
def test_extract_on_the_embedded_model(
    embedded: ModelAdapter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The session's embedded model stands in for the CLI's own load (tested by `rolevec info`), saving ~15 s.
    monkeypatch.setattr("rolevec.cli.extract.load_from_args", lambda args: embedded)
    out = tmp_path / "smol.safetensors"
    argv = _extract(None, out, "--roles", "mathematician,doctor", "--n", "8", "--batch-size", "8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    assert "layers 0..30 x hidden 576" in capsys.readouterr().out
    vecs = RoleVectors.load(out)
    assert vecs.positions == (-6, -5, -4, -3, -2, -1) and vecs.n_layers == 30 and vecs.hidden_size == 576
    assert vecs.metadata["model_fingerprint"] == embedded.fingerprint()
    vecs.check_compatible(embedded)
    d = vecs.diff("mathematician")
    assert torch.isfinite(d).all() and float(d[-1, 15].norm()) > 0
    assert float(d[-1, 0].norm()) == 0  # layer 0 is the embedding of the same template token for every prompt
    with pytest.raises(RolevecError, match="hidden size 576"):
        vecs.check_compatible(make_adapter("llama"))
