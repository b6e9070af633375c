"""Folding: exact where offered, a clear error elsewhere, the caller's model untouched, reloadable output."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from rolevec.cli import main
from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from rolevec.steering.folding import (
    fold,
    fold_,
    fold_problem,
    save_folded,
    steered_logits,
    verify_fold,
    write_folder,
)
from rolevec.steering.interventions import Steering
from test_interventions import role_vectors

PROMPTS = ["Explain how eigenvalues relate to stability.", "Hi"]

#: Which folds are exact per tiny architecture: (add at layer 0, add at layer 2, ablation).
SUPPORTED = {
    "llama": (True, True, True),  # mlp_bias switch
    "qwen2": (True, False, True),  # writers have no bias, config has no switch
    "gemma2": (True, False, False),  # post-norm writers
    "mistral": (True, False, True),
    "phi3": (True, False, True),
    "gpt2": (True, True, True),  # Conv1D writers with biases, wte + wpe
    "gpt_neox": (True, True, True),
}


def _steerings(hidden: int) -> list[Steering]:
    gen = torch.Generator().manual_seed(7)
    d = torch.randn(hidden, generator=gen)
    return [
        Steering(mode="add", vectors={0: d}, alpha=3.0),
        Steering(mode="add", vectors={2: d}, alpha=3.0),
        Steering(mode="ablate", vectors={1: d}),
    ]


def _state(adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter.model.state_dict().items()}


def test_fold_is_exact_or_refused(tiny: ModelAdapter) -> None:
    arch = str(tiny.config.model_type)
    before = _state(tiny)
    config_before = tiny.config.to_json_string()
    plain = steered_logits(tiny, None, PROMPTS)
    for steering, supported in zip(_steerings(tiny.hidden_size), SUPPORTED[arch], strict=True):
        if not supported:
            problem = fold_problem(tiny, steering)
            assert problem is not None and "cannot be folded exactly" in problem
            with pytest.raises(RolevecError, match="cannot be folded exactly"):
                fold(tiny, steering)
            continue
        assert fold_problem(tiny, steering) is None
        folded = fold(tiny, steering)
        hooked = steered_logits(tiny, steering, PROMPTS)
        got = steered_logits(folded, None, PROMPTS)
        assert not torch.allclose(hooked, plain, atol=1e-2), "the steering must change the logits"
        torch.testing.assert_close(got, hooked, rtol=1e-4, atol=1e-4)
        assert verify_fold(tiny, folded, steering) < 1e-5
        assert count_hooks(folded.model) == 0
    # the caller's model: same weights, same config, no hooks left, ties kept
    after = _state(tiny)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert tiny.config.to_json_string() == config_before
    assert count_hooks(tiny.model) == 0
    if tiny.config.tie_word_embeddings:
        assert tiny.unembed.weight is tiny.model.get_input_embeddings().weight


def test_fold_in_place_mutates_and_unties() -> None:
    tiny = make_adapter("gpt2")  # tied embeddings, two embedding tables
    steering = _steerings(tiny.hidden_size)[2]
    want = steered_logits(tiny, steering, PROMPTS)
    edits = fold_(tiny, steering)
    assert any("untied" in e for e in edits)
    assert tiny.config.tie_word_embeddings is False
    assert tiny.unembed.weight.data_ptr() != tiny.model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(steered_logits(tiny, None, PROMPTS), want, rtol=1e-4, atol=1e-4)
    dhat = steering.direction
    for emb in tiny.embeddings:
        assert float((emb.weight @ dhat).abs().max()) < 1e-5


def test_multi_layer_addition_folds() -> None:
    tiny = make_adapter("gpt_neox")
    gen = torch.Generator().manual_seed(1)
    steering = Steering(
        mode="add", vectors={layer: torch.randn(32, generator=gen) for layer in (0, 1, 3)}, alpha=2.0
    )
    folded = fold(tiny, steering)
    torch.testing.assert_close(
        steered_logits(folded, None, PROMPTS), steered_logits(tiny, steering, PROMPTS), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    ("arch", "index", "config_check"),
    [
        ("llama", 1, ("mlp_bias", True)),
        ("gemma2", 0, ("tie_word_embeddings", False)),
        ("gpt2", 2, ("tie_word_embeddings", False)),
    ],
)
def test_saved_checkpoint_reloads_without_rolevec(
    tmp_path: Path, arch: str, index: int, config_check: tuple[str, bool]
) -> None:
    from transformers import AutoModelForCausalLM

    tiny = make_adapter(arch)
    steering = _steerings(tiny.hidden_size)[index]
    folded = fold(tiny, steering)
    out = save_folded(folded, tmp_path / "folded", manifest={"note": "test"}, check=(tiny, steering))
    config = json.loads((out / "config.json").read_text())
    assert config[config_check[0]] is config_check[1]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "manifest.json").read_text()) == {"note": "test"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = tiny.encode([tiny.render(t) for t in PROMPTS])
    with torch.inference_mode():
        got = reloaded(**batch.model_kwargs()).logits
    torch.testing.assert_close(got, steered_logits(tiny, steering, PROMPTS), rtol=1e-4, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["folded"]


def test_write_folder_is_all_or_nothing(tmp_path: Path) -> None:
    def fail(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RolevecError("boom")

    with pytest.raises(RolevecError, match="boom"):
        write_folder(tmp_path / "out", fail)
    assert list(tmp_path.iterdir()) == []
    write_folder(tmp_path / "out", lambda tmp: (tmp / "a.txt").write_text("1"))
    with pytest.raises(RolevecError, match="`force=True`"):
        write_folder(tmp_path / "out", lambda tmp: (tmp / "b.txt").write_text("2"))
    with pytest.raises(RolevecError, match="boom"):
        write_folder(tmp_path / "out", fail, force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "rolevec-files.json"]
    write_folder(tmp_path / "out", lambda tmp: (tmp / "b.txt").write_text("2"), force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.txt", "rolevec-files.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_fold_cli_writes_a_standard_checkpoint(
    tmp_path: Path, saved_tiny: tuple[list[str], ModelAdapter], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    opts, tiny = saved_tiny
    out = tmp_path / "folded"
    assert main(["fold", *opts, "--role", "doctor", "--layer", "2", "--alpha", "3", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"]["alpha"] == 3.0 and manifest["steering"]["layers"] == [2]
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}["model.safetensors"] == 0o644
    assert manifest["model"]["fingerprint"] == tiny.fingerprint()
    assert set(manifest["versions"]) >= {"rolevec", "torch", "transformers"}
    assert len(manifest["vectors"]["sha256"]) == 64 and "mlp_bias" in manifest["fold"]["edits"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    steering = Steering(mode="add", vectors={2: role_vectors(tiny).vector("doctor", 2, -1)}, alpha=3.0)
    batch = tiny.encode([tiny.render(PROMPTS[0])])
    with torch.inference_mode():
        got = reloaded(**batch.model_kwargs()).logits
    torch.testing.assert_close(got, steered_logits(tiny, steering, PROMPTS[:1]), rtol=1e-4, atol=1e-4)

    # an existing folder is refused (one line, nothing touched), then replaced with --force
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["fold", *opts, "--role", "doctor", "--layer", "1", "--ablate", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    args = ["fold", *opts, "--role", "doctor", "--layer", "1", "--ablate", "--out", str(out), "--force"]
    assert main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["steering"]["mode"] == "ablate"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded", "model", "v.safetensors"]

    # --force replaces an earlier fold, never a folder of other files, nor a file
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (tmp_path / "file.txt").write_text("precious")
    for target in (mine, tmp_path / "file.txt"):
        capsys.readouterr()
        args = ["--role", "doctor", "--layer", "1", "--ablate", "--out", str(target), "--force"]
        assert main(["fold", *opts, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "choose another --out" in err[0]
    assert (mine / "notes.txt").read_text() == (tmp_path / "file.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--role", "doctor", "--layer", "9", "--alpha", "1"], "layer 9 is out of range"),
        (["--role", "doctor", "--layer", "1", "--position", "-99", "--alpha", "1"], "position -99"),
        (["--role", "chef", "--layer", "1", "--alpha", "1"], "role 'chef'"),
        (["--role", "doctor", "--layer", "1", "--alpha", "nan"], "finite"),
    ],
)
def test_fold_cli_bad_input_is_one_line(
    tmp_path: Path,
    saved_tiny: tuple[list[str], ModelAdapter],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    opts, _ = saved_tiny
    capsys.readouterr()
    assert main(["fold", *opts, *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rolevec: error:") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_fold_cli_refuses_inexact_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = make_adapter("qwen2")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    role_vectors(tiny).save(tmp_path / "v.safetensors")
    opts = [
        "--model",
        str(tmp_path / "model"),
        "--device",
        "cpu",
        "--vectors",
        str(tmp_path / "v.safetensors"),
    ]
    args = ["fold", *opts, "--role", "doctor", "--layer", "2", "--alpha", "1", "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(args) == 2
    # transformers may draw a loading bar first; rolevec's own message is one line, the last
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("rolevec")]
    assert len(err) == 1 and "cannot be folded exactly into qwen2" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "v.safetensors"]


@pytest.mark.e2e
def test_fold_embedded_matches_hooks(embedded: ModelAdapter) -> None:
    """SmolLM2 (GGUF-loaded, tied embeddings): mlp_bias fold, reloadable config, hooked logits."""
    from rolevec.steering.folding import check_reloadable

    gen = torch.Generator().manual_seed(0)
    d = torch.randn(embedded.hidden_size, generator=gen)
    steering = Steering(mode="add", vectors={12: d / d.norm() * 4.0}, alpha=3.0)
    folded = fold(embedded, steering, verify=False)
    check_reloadable(folded)
    assert folded.config.mlp_bias is True and getattr(folded.model, "hf_quantizer", None) is None
    assert verify_fold(embedded, folded, steering, PROMPTS[:1]) < 1e-4
    assert embedded.config.mlp_bias is False  # the caller's model is untouched
