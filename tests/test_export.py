"""Export to llama.cpp control vectors and lm-evaluation-harness steering files, and import back."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from rolevec.cli import main
from rolevec.errors import RolevecError
from rolevec.model.hooks import hooked, output_hook
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from rolevec.steering.export import (
    export_control_vector,
    export_lm_eval,
    lm_eval_config,
    lm_eval_hookpoint,
    read_control_vector,
    read_control_vector_file,
    steering_from_control_vector,
    write_control_vector,
)
from rolevec.steering.folding import steered_logits
from rolevec.steering.interventions import Steering
from test_interventions import role_vectors, zero_at

PROMPTS = ["Explain how eigenvalues relate to stability."]


def _steering(hidden: int, layers: tuple[int, ...] = (2, 3), alpha: float = 2.5) -> Steering:
    gen = torch.Generator().manual_seed(9)
    return Steering(mode="add", vectors={k: torch.randn(hidden, generator=gen) for k in layers}, alpha=alpha)


def _block_output_logits(adapter: ModelAdapter, added: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits with ``added[N]`` added to the output of block N, the way llama.cpp applies direction.N."""

    def add(v: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: x + v.to(x.dtype)

    batch = adapter.encode([adapter.render(t) for t in PROMPTS])
    post = [(adapter.blocks[n], output_hook(add(v))) for n, v in added.items()]
    with torch.inference_mode(), hooked(post=post):
        return adapter.model(**batch.model_kwargs()).logits.float()


def test_control_vector_layout_and_semantics(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    tiny = make_adapter("llama")
    steering = _steering(tiny.hidden_size)
    path = export_control_vector(steering, tmp_path / "role.gguf", model_hint="llama")
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = reader.fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "llama"
    count = reader.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == 2
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]  # rolevec layer L -> direction.(L-1)
    for layer in (2, 3):
        t = tensors[f"direction.{layer - 1}"]
        assert t.tensor_type == GGMLQuantizationType.F32 and t.data.shape == (tiny.hidden_size,)
        np.testing.assert_array_equal(t.data, (2.5 * steering.vectors[layer]).numpy())
    # llama.cpp adds direction.N to block N's output: the same logits as rolevec addition at N+1
    added = {int(k.split(".")[1]): torch.from_numpy(t.data.copy()) for k, t in tensors.items()}
    want = steered_logits(tiny, steering, PROMPTS)
    torch.testing.assert_close(_block_output_logits(tiny, added), want, rtol=1e-5, atol=1e-5)


def test_control_vector_round_trip_and_repeng_layout(tmp_path: Path) -> None:
    import gguf

    steering = _steering(32, layers=(2, 3, 4))
    path = export_control_vector(steering, tmp_path / "a.gguf", model_hint="llama")
    back = read_control_vector(path)
    assert sorted(back) == [2, 3, 4]
    for layer, vector in steering.scaled().items():
        assert torch.equal(back[layer], vector)
    meta, _ = read_control_vector_file(path)
    assert meta["rolevec"]["layers"] == "2,3,4" and meta["rolevec"]["alpha"] == "2.5"
    imported = steering_from_control_vector(path, scale=0.5)
    assert imported.alpha == 0.5 and imported.layers == [2, 3, 4]

    # a file as repeng writes it: uint32 layer count, direction.N for N = 1.., no rolevec metadata
    repeng = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(repeng), "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", 2)
    vectors = {n: np.full(8, float(n), dtype=np.float32) for n in (1, 5)}
    for n, v in vectors.items():
        writer.add_tensor(f"direction.{n}", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta, directions = read_control_vector_file(repeng)
    assert meta == {"model_hint": "mistral", "layer_count": 2}
    assert sorted(directions) == [2, 6] and torch.equal(directions[6], torch.full((8,), 5.0))


def test_control_vector_errors(tmp_path: Path) -> None:
    import gguf

    with pytest.raises(RolevecError, match="layer 1 cannot be exported"):
        export_control_vector(_steering(32, layers=(1, 2)), tmp_path / "x.gguf", model_hint="llama")
    with pytest.raises(RolevecError, match="layer 0 cannot be exported"):
        write_control_vector(tmp_path / "x.gguf", {0: torch.ones(4)}, model_hint="llama")
    with pytest.raises(RolevecError, match="only addition"):
        export_control_vector(
            Steering(mode="ablate", vectors={3: torch.ones(4)}), tmp_path / "x.gguf", model_hint="x"
        )
    assert not list(tmp_path.iterdir())
    path = export_control_vector(_steering(32), tmp_path / "x.gguf", model_hint="llama")
    with pytest.raises(RolevecError, match="`force=True`"):
        export_control_vector(_steering(32), path, model_hint="llama")
    with pytest.raises(RolevecError, match="does not exist"):
        read_control_vector(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(RolevecError, match="not a readable GGUF"):
        read_control_vector(junk)
    model_like = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model_like), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(RolevecError, match="not a control vector"):
        read_control_vector(model_like)


def test_lm_eval_file_reproduces_hooked_steering(tmp_path: Path, tiny: ModelAdapter) -> None:
    steering = _steering(tiny.hidden_size, layers=(3,), alpha=3.0)
    path = export_lm_eval(steering, tiny, tmp_path / "steer.pt")
    config = torch.load(path, weights_only=True)  # how lm-evaluation-harness reads it
    (hookpoint,) = config
    entry = config[hookpoint]
    assert set(entry) == {"action", "steering_coefficient", "steering_vector", "bias"}
    assert entry["action"] == "add" and entry["steering_coefficient"] == 3.0 and entry["bias"] is None
    assert entry["steering_vector"].dtype == torch.float32
    assert torch.equal(entry["steering_vector"], steering.vectors[3])
    # lm-evaluation-harness resolves hookpoints in model.base_model and adds coef·vector to their output
    modules = dict(tiny.model.base_model.named_modules())
    target = modules[hookpoint]
    assert target is tiny.blocks[2]
    shift = entry["steering_coefficient"] * entry["steering_vector"]
    batch = tiny.encode([tiny.render(t) for t in PROMPTS])
    with torch.inference_mode(), hooked(post=[(target, output_hook(lambda acts: acts + shift))]):
        got = tiny.model(**batch.model_kwargs()).logits.float()
    torch.testing.assert_close(got, steered_logits(tiny, steering, PROMPTS), rtol=1e-5, atol=1e-5)


def test_lm_eval_bad_input(tmp_path: Path, tiny_llama: ModelAdapter) -> None:
    assert lm_eval_hookpoint(tiny_llama, 1) == "layers.0"
    assert lm_eval_hookpoint(tiny_llama, tiny_llama.n_layers) == f"layers.{tiny_llama.n_layers - 1}"
    assert make_adapter("gpt2").arch.blocks_path == "transformer.h"
    assert lm_eval_hookpoint(make_adapter("gpt2"), 2) == "h.1"
    with pytest.raises(RolevecError, match="layer 0 cannot be exported"):
        lm_eval_config(_steering(32, layers=(0,)), tiny_llama)
    with pytest.raises(RolevecError, match=r"\.pt"):
        export_lm_eval(_steering(32), tiny_llama, tmp_path / "steer.bin")
    config = lm_eval_config(_steering(32), tiny_llama, dtype=torch.bfloat16)
    assert all(e["steering_vector"].dtype == torch.bfloat16 for e in config.values())
    assert not list(tmp_path.iterdir())


def test_export_cli(
    tmp_path: Path, saved_tiny: tuple[list[str], ModelAdapter], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, tiny = saved_tiny
    vecs = role_vectors(tiny)
    gguf_out = tmp_path / "doctor.gguf"
    args = ["export", *opts, "--format", "gguf", "--role", "doctor", "--alpha", "2", "--layers", "2:4"]
    assert main([*args, "--out", str(gguf_out)]) == 0
    back = read_control_vector(gguf_out)
    assert sorted(back) == [2, 3]
    for layer in (2, 3):
        torch.testing.assert_close(back[layer], 2.0 * vecs.vector("doctor", layer, -1))
    pt_out = tmp_path / "doctor.pt"
    args = ["export", *opts, "--format", "pt", "--role", "doctor", "--alpha", "2", "--layer", "1"]
    assert main([*args, "--position", "-2", "--out", str(pt_out)]) == 0
    config = torch.load(pt_out, weights_only=True)
    assert list(config) == ["layers.0"]
    assert torch.equal(config["layers.0"]["steering_vector"], vecs.vector("doctor", 1, -2))

    base = ["export", *opts, "--role", "doctor", "--alpha", "2"]
    cases = [
        ([*base, "--format", "gguf", "--layer", "1", "--out", str(tmp_path / "a.gguf")], "layer 1 cannot"),
        ([*base, "--format", "pt", "--layer", "0", "--out", str(tmp_path / "a.pt")], "layer 0 cannot"),
        ([*base, "--format", "gguf", "--layer", "2", "--out", str(tmp_path / "a.pt")], ".gguf"),
        ([*base, "--format", "gguf", "--layer", "2", "--out", str(gguf_out)], "--force"),
        ([*base, "--format", "gguf", "--layer", "9", "--out", str(tmp_path / "a.gguf")], "layer 9"),
        ([*base, "--format", "gguf", "--layers", "4:2", "--out", str(tmp_path / "a.gguf")], "empty"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rolevec")]
        assert len(err) == 1 and message in err[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "doctor.gguf",
        "doctor.pt",
        "model",
        "v.safetensors",
    ]


def test_generate_cli_reads_a_control_vector(
    tmp_path: Path, saved_tiny: tuple[list[str], ModelAdapter], capsys: pytest.CaptureFixture[str]
) -> None:
    from rolevec.steering.generation import generate

    opts, tiny = saved_tiny
    steering = _steering(tiny.hidden_size, layers=(2,), alpha=3.0)
    path = export_control_vector(steering, tmp_path / "cv.gguf", model_hint="llama")
    model_opts = opts[:4]
    assert main(["generate", *model_opts, "--control-vector", str(path), "--max-new-tokens", "6", "Hi"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[steered: add α=1 (role 'cv', layer 2, position -1)]")
    assert generate(tiny, "Hi", steering=steering, max_new_tokens=6).text in out
    # the file carries its layers: a --layer beside it would be ignored, so it is refused
    assert main(["generate", *model_opts, "--control-vector", str(path), "--layer", "3", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layer would be ignored" in err[0]


def test_real_lm_eval_loader_reproduces_hooked_steering(tmp_path: Path) -> None:
    """Needs lm-evaluation-harness (≥ 0.4.13): scripts/test.sh installs it, so CI runs this rather than
    skipping it; elsewhere it is skipped where the harness is missing (rolevec does not need it)."""
    if os.environ.get("CI"):
        import lm_eval.models.hf_steered as steered
    else:
        steered = pytest.importorskip("lm_eval.models.hf_steered")
    tiny = make_adapter("llama")
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    steering = _steering(tiny.hidden_size, layers=(1, 3), alpha=2.0)
    path = export_lm_eval(steering, tiny, tmp_path / "steer.pt")
    lm = steered.SteeredModel(
        pretrained=str(tmp_path / "model"), steer_path=str(path), device="cpu", dtype="float32"
    )
    batch = tiny.encode([tiny.render(t) for t in PROMPTS])
    with torch.no_grad():
        got = lm._model_call(batch.input_ids).float()
    torch.testing.assert_close(got, steered_logits(tiny, steering, PROMPTS), rtol=1e-5, atol=1e-5)


def test_export_cli_warns_once_about_a_zero_vector(
    tmp_path: Path, saved_tiny: tuple[list[str], ModelAdapter], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, tiny = saved_tiny
    zero_at(role_vectors(tiny), 2).save(tmp_path / "v.safetensors", force=True)
    out = tmp_path / "z.gguf"
    args = ["export", *opts, "--format", "gguf", "--role", "doctor", "--alpha", "2", "--layers", "2:4"]
    assert main([*args, "--out", str(out)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "changes nothing" in line]
    assert len(warned) == 1 and "at layer 2, position -1 is zero" in warned[0]
    assert out.is_file()
