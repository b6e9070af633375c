"""Steered generation: steering on every decoding step, cache = no cache, batch = single, CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rolevec.cli import main
from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks, hooked, input_hook
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import make_adapter
from rolevec.steering.generation import TextStream, generate, generate_batch
from rolevec.steering.interventions import Steering
from test_interventions import role_vectors, zero_at

PROMPTS = ["Explain eigenvalues.", "Hi", "What is the standard dose of amoxicillin for a child?"]


def _steering(adapter: ModelAdapter, layer: int = 1, alpha: float = 4.0) -> Steering:
    gen = torch.Generator().manual_seed(5)
    return Steering(mode="add", vectors={layer: torch.randn(adapter.hidden_size, generator=gen)}, alpha=alpha)


@pytest.mark.parametrize("where", ["all", "prompt", "generated"])
def test_every_decoding_step_is_steered(tiny_llama: ModelAdapter, where: str) -> None:
    steering = _steering(tiny_llama, layer=2)
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []

    def keep(store: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            store.append(x.detach().clone())

        return fn

    site = tiny_llama.residual_site(2)
    # observers outside the steering see each input before the shift, those inside after it
    with (
        hooked(pre=[(site, input_hook(keep(before)))]),
        steering.apply(tiny_llama, where=where),
        hooked(pre=[(site, input_hook(keep(after)))]),
    ):
        result = generate(tiny_llama, PROMPTS[0], max_new_tokens=6)
    assert len(result.token_ids) == 6 and not result.stopped
    assert len(before) == len(after) == 6  # one prompt forward, then one forward per new token
    assert before[0].shape[1] > 1 and all(x.shape[1] == 1 for x in before[1:])
    shift = steering.scaled()[2]
    for step, (x, y) in enumerate(zip(before, after, strict=True)):
        steered = where == "all" or (where == "prompt") == (step == 0)
        expected = shift.expand_as(x) if steered else torch.zeros_like(x)
        torch.testing.assert_close(y - x, expected, rtol=0, atol=1e-5)
    assert count_hooks(tiny_llama.model) == 0


def test_cached_generation_equals_uncached(tiny: ModelAdapter) -> None:
    steering = _steering(tiny)
    cached = generate(tiny, PROMPTS[0], steering=steering, max_new_tokens=8)
    uncached = generate(tiny, PROMPTS[0], steering=steering, max_new_tokens=8, use_cache=False)
    plain = generate(tiny, PROMPTS[0], max_new_tokens=8)
    assert cached.token_ids == uncached.token_ids
    assert len(cached.token_ids) == 8
    assert cached.token_ids != plain.token_ids  # the steering changes the answer


def test_left_padded_batch_equals_single_prompts(tiny: ModelAdapter) -> None:
    steering = _steering(tiny)
    batch = generate_batch(tiny, PROMPTS, steering=steering, max_new_tokens=6)
    for prompt, row in zip(PROMPTS, batch, strict=True):
        single = generate(tiny, prompt, steering=steering, max_new_tokens=6)
        assert row.token_ids == single.token_ids and row.text == single.text and row.prompt == prompt


def test_sampling_is_seeded_and_streaming_matches(tiny_llama: ModelAdapter) -> None:
    first = generate(tiny_llama, "Hi", max_new_tokens=12, temperature=1.0, seed=11)
    again = generate(tiny_llama, "Hi", max_new_tokens=12, temperature=1.0, seed=11)
    other = generate(tiny_llama, "Hi", max_new_tokens=12, temperature=1.0, seed=12)
    assert first.token_ids == again.token_ids and first.token_ids != other.token_ids
    pieces: list[str] = []
    streamed = generate(tiny_llama, "Hi", max_new_tokens=12, stream=pieces.append)
    assert "".join(pieces) == streamed.text and len(pieces) > 1


def test_stop_token_ends_a_row() -> None:
    tiny = make_adapter("llama")
    first = generate(tiny, "Hi", max_new_tokens=3).token_ids
    tiny.model.generation_config.eos_token_id = first[1]  # make the model's second token a stop token
    result = generate(tiny, "Hi", max_new_tokens=10)
    assert result.stopped and result.token_ids == first[:2]


def test_text_stream_holds_back_partial_characters() -> None:
    tok = make_adapter("llama").tokenizer
    ids = tok("héllo ✓", add_special_tokens=False)["input_ids"]
    out: list[str] = []
    stream = TextStream(tok, out.append)
    for i in ids:
        stream.put(i)
    stream.end()
    assert "".join(out) == "héllo ✓" and all("\ufffd" not in p for p in out)


def test_bad_generation_options(tiny_llama: ModelAdapter) -> None:
    steering = _steering(tiny_llama)
    with pytest.raises(RolevecError, match="max_new_tokens"):
        generate(tiny_llama, "Hi", max_new_tokens=0)
    with pytest.raises(RolevecError, match="temperature"):
        generate(tiny_llama, "Hi", temperature=-1.0)
    with pytest.raises(RolevecError, match="use_cache"):
        generate(tiny_llama, "Hi", steering=steering, where="prompt", use_cache=False)
    with pytest.raises(RolevecError, match="where"):
        generate(tiny_llama, "Hi", steering=steering, where="everywhere")
    with pytest.raises(RolevecError, match="no prompts"):
        generate_batch(tiny_llama, [])
    assert count_hooks(tiny_llama.model) == 0


def test_generate_cli_streams_and_compares(
    saved_tiny: tuple[list[str], ModelAdapter], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, tiny = saved_tiny
    args = ["generate", *opts, "--role", "doctor", "--layer", "2", "--alpha", "3", "--max-new-tokens", "8"]
    assert main([*args, "--compare", PROMPTS[0]]) == 0
    out = capsys.readouterr().out
    steered = generate(
        tiny,
        PROMPTS[0],
        steering=Steering(mode="add", vectors={2: role_vectors(tiny).vector("doctor", 2, -1)}, alpha=3.0),
        max_new_tokens=8,
    )
    plain = generate(tiny, PROMPTS[0], max_new_tokens=8)
    head, _, tail = out.partition("[unsteered]")
    assert head.startswith("[steered: add α=3 (role 'doctor', layer 2, position -1)]")
    assert steered.text in head and plain.text in tail


def test_generate_cli_takes_defaults_from_a_selection(
    tmp_path: Path, saved_tiny: tuple[list[str], ModelAdapter], capsys: pytest.CaptureFixture[str]
) -> None:
    opts, tiny = saved_tiny
    selection = tmp_path / "selection.json"
    entry = {"layer": 1, "position": -2, "alpha": 2.5, "val_accuracy": 0.5}
    doc = {"model": tiny.name, "model_fingerprint": tiny.fingerprint(), "roles": {"doctor": entry}}
    selection.write_text(json.dumps(doc))
    base = ["generate", *opts, "--role", "doctor", "--max-new-tokens", "2"]
    assert main([*base, "--selection", str(selection), "Hi"]) == 0
    assert "[steered: add α=2.5 (role 'doctor', layer 1, position -2)]" in capsys.readouterr().out
    assert main([*base, "--selection", str(selection), "--alpha", "1", "--layer", "3", "Hi"]) == 0
    assert "add α=1 (role 'doctor', layer 3, position -2)" in capsys.readouterr().out
    assert main([*base, "--ablate", "Hi"]) == 0  # documented default layer: round(0.4 * 3) = 1
    assert "ablate (role 'doctor', direction from layer 1, position -1)" in capsys.readouterr().out

    doc["model_fingerprint"] = "ffffffffffffffff"
    selection.write_text(json.dumps(doc))
    cases = [
        ([*base, "Hi"], "--alpha"),
        ([*base, "--selection", str(selection), "Hi"], "fingerprint ffffffffffffffff"),
        ([*base, "--selection", str(tmp_path / "missing.json"), "Hi"], "does not exist"),
        ([*base, "--alpha", "inf", "Hi"], "finite"),
        ([*base, "--alpha", "1", "--temperature", "-1", "Hi"], "--temperature"),
        (["generate", *opts, "--role", "chef", "--alpha", "1", "Hi"], "role 'chef'"),
    ]
    doc["model_fingerprint"] = tiny.fingerprint()
    doc["roles"]["doctor"] = {**entry, "layer": "abc"}
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    cases.append(([*base, "--selection", str(broken), "Hi"], "has layer 'abc'"))
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2
        captured = capsys.readouterr()
        err = [line for line in captured.err.splitlines() if line.startswith("rolevec")]
        assert len(err) == 1 and message in err[0], (args, err)
        assert "[steered" not in captured.out  # refused before anything is generated


@pytest.mark.e2e
def test_generate_on_embedded_model(embedded: ModelAdapter) -> None:
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(embedded.hidden_size, generator=gen)
    steering = Steering(mode="add", vectors={12: d / d.norm() * 8.0}, alpha=3.0)
    prompt = "Name a famous scientist."
    steered = generate(embedded, prompt, steering=steering, max_new_tokens=8)
    uncached = generate(embedded, prompt, steering=steering, max_new_tokens=8, use_cache=False)
    plain = generate(embedded, prompt, max_new_tokens=8)
    assert steered.token_ids == uncached.token_ids
    assert steered.token_ids != plain.token_ids
    assert plain.text.strip()
    assert count_hooks(embedded.model) == 0


def test_generate_cli_zero_vector(
    tmp_path: Path, saved_tiny: tuple[list[str], ModelAdapter], capsys: pytest.CaptureFixture[str]
) -> None:
    """Ablating layer 0's zero vector is refused before the model loads (the model path here does not
    exist, so a later check would report that instead); adding it warns once, not once per resolution."""
    opts, tiny = saved_tiny
    zero_at(role_vectors(tiny), 0).save(tmp_path / "v.safetensors", force=True)
    base = ["generate", *opts, "--role", "doctor", "--layer", "0", "--max-new-tokens", "2"]
    no_model = [*base, "--model", str(tmp_path / "missing-model"), "--ablate", "Hi"]
    assert main(no_model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer 0 is the input of block 0" in err[0] and "--layer (1..3)" in err[0]
    assert main([*base, "--alpha", "2", "Hi"]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "changes nothing" in line]
    assert len(warned) == 1 and warned[0].startswith(
        "rolevec: warning: the vector of role 'doctor' at layer 0"
    )
    assert "[steered: add α=2 (role 'doctor', layer 0" in captured.out


def test_selection_file_is_read_bom_transparently(tmp_path: Path) -> None:
    from rolevec.cli.steer_args import read_selection

    path = tmp_path / "selection.json"
    doc = {"roles": {"doctor": {"layer": 2, "position": -1, "alpha": 3.0}}}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())  # as Windows editors save it
    assert read_selection(str(path), "doctor")[1] == doc["roles"]["doctor"]
    path.write_bytes(b'{"roles": {"doctor": "\xff"}}')
    with pytest.raises(
        RolevecError, match=rf"^selection file {path} is not UTF-8 text \(undecodable byte 0xff"
    ):
        read_selection(str(path), "doctor")
