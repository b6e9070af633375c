from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rolevec.data.sources import PromptSet, load_base, load_role_prompts, sample
from rolevec.errors import RolevecError
from rolevec.model.hooks import count_hooks, hooked
from rolevec.model.loading import ModelAdapter
from rolevec.model.testing import counted, make_adapter
from rolevec.vectors.extraction import encode_prompts, extract_role_vectors, mean_activations

PROMPTS = [
    "Prove that the square root of two is irrational.",
    "Hi",
    "What is the standard dose of amoxicillin for a child with otitis media and a fever?",
    "Write a short poem about the sea.",
    "Compare supply and demand in a market with a price ceiling, step by step, with an example.",
    "Explain eigenvalues.",
]


def _reference(adapter: ModelAdapter, prompts: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Means over prompts from output_hidden_states, one prompt at a time, float64 (layers 0..n-1).

    HF's last hidden_states entry is taken AFTER the final norm, so layer n_layers is not in this mean;
    the per-prompt normed outputs are returned for the separate check of layer n_layers.
    """
    n_pos = adapter.chat.n_positions
    total = torch.zeros(n_pos, adapter.n_layers, adapter.hidden_size, dtype=torch.float64)
    normed = []
    for prompt in prompts:
        batch = adapter.encode([adapter.render(prompt)])
        with torch.no_grad():
            hs = adapter.model(**batch.model_kwargs(), output_hidden_states=True).hidden_states
        assert len(hs) == adapter.n_layers + 1
        for layer in range(adapter.n_layers):
            total[:, layer] += hs[layer][0, -n_pos:].double()
        normed.append(hs[-1][0, -n_pos:])
    return total / len(prompts), normed


def test_parity_with_output_hidden_states(tiny: ModelAdapter) -> None:
    means = mean_activations(tiny, PROMPTS, batch_size=4, progress=False)
    n = tiny.n_layers
    assert means.dtype == torch.float64
    assert means.shape == (tiny.chat.n_positions, n + 1, tiny.hidden_size)
    ref, normed = _reference(tiny, PROMPTS)
    torch.testing.assert_close(means[:, :n], ref, rtol=1e-5, atol=1e-6)
    # Layer n_layers (the final norm's input): one prompt's "mean" is its activation, and the final norm
    # applied to it must give HF's last hidden_states entry.
    for prompt, expected in zip(PROMPTS, normed, strict=True):
        single = mean_activations(tiny, [prompt], progress=False)
        with torch.no_grad():
            got = tiny.final_norm(single[:, n].float()[None])[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_independent_of_batch_size_and_padding_side(arch: str) -> None:
    adapter = make_adapter(arch)
    prompts = PROMPTS * 3
    ref = mean_activations(adapter, prompts, batch_size=1, progress=False)
    for batch_size in (16, 5):
        for side in ("left", "right"):
            got = mean_activations(adapter, prompts, batch_size=batch_size, padding_side=side, progress=False)
            rel = float((got - ref).norm() / ref.norm())
            assert rel <= 1e-5, (batch_size, side, rel)


def test_unembedding_never_runs_and_hooks_are_removed(tiny_llama: ModelAdapter) -> None:
    calls: list[int] = []

    def count(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        calls.append(1)

    with hooked(post=[(tiny_llama.unembed, count)]):
        mean_activations(tiny_llama, PROMPTS, progress=False)
    assert calls == []
    assert count_hooks(tiny_llama.model) == 0


def test_prompt_that_breaks_the_template_suffix_is_refused(tiny_llama: ModelAdapter) -> None:
    broken = dataclasses.replace(tiny_llama.chat, suffix_ids=[*tiny_llama.chat.suffix_ids, 7])
    tiny_llama.chat = broken
    with pytest.raises(RolevecError, match="post-instruction tokens"):
        mean_activations(tiny_llama, PROMPTS, progress=False)


def test_long_prompts_are_shortened_keeping_the_template(tiny_llama: ModelAdapter) -> None:
    long = " ".join(["Explain how eigenvalues relate to matrix diagonalization."] * 40)
    enc = encode_prompts(tiny_llama, [long, "Hi"], max_tokens=60)
    assert enc.n_shortened == 1
    assert all(len(ids) <= 60 for ids in enc.ids)
    suffix = tiny_llama.chat.suffix_ids
    assert enc.ids[0][-len(suffix) :] == suffix and len(enc.ids[0]) > len(suffix) + 20
    with pytest.warns(UserWarning, match="1 prompt.*max_tokens=60"):
        means = mean_activations(tiny_llama, [long, "Hi"], max_tokens=60, progress=False)
    assert torch.isfinite(means).all()
    # the model's own context (256 positions for tiny models) is the default limit
    assert encode_prompts(tiny_llama, [long]).n_shortened == 1
    with pytest.raises(RolevecError, match="`max_tokens`"):
        encode_prompts(tiny_llama, [long], max_tokens=5)


def _kept_user_text(adapter: ModelAdapter, ids: list[int]) -> str:
    """The user text inside a rendered, tokenised prompt (the template's head and tail taken off)."""
    head, tail = adapter.render("\x00").split("\x00")
    text = str(adapter.tokenizer.decode(ids))
    assert text.startswith(head) and text.endswith(tail)
    return text[len(head) : len(text) - len(tail)]


def test_a_long_prompt_is_cut_to_a_verbatim_prefix_of_its_text(tiny_llama: ModelAdapter) -> None:
    """Multi-byte characters take several tokens: a cut between them once left a U+FFFD in the prompt."""
    prompt = "Describe " + "\U0001f600\u00e9\u6f22" * 400
    suffix = tiny_llama.chat.suffix_ids
    for limit in range(56, 72):
        ids = encode_prompts(tiny_llama, [prompt], max_tokens=limit).ids[0]
        kept = _kept_user_text(tiny_llama, ids)
        assert len(ids) <= limit and ids[-len(suffix) :] == suffix
        assert kept and "\ufffd" not in kept and prompt.startswith(kept), limit


def test_one_long_prompt_warns_once_per_extraction(tiny_llama: ModelAdapter, recwarn: Any) -> None:
    """rolevec's one warning, and not also transformers' "longer than the specified maximum sequence
    length" (a tokenizer with a model_max_length, as most hub tokenizers have)."""
    import logging

    tiny_llama.tokenizer.model_max_length = 128
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        long = "Explain how eigenvalues relate to matrix diagonalization. " * 400
        sets = {"maths": PromptSet("maths", (long, "Define a ring."), "mem")}
        base = PromptSet("base", ("Hi", "Say hello."), "mem")
        extract_role_vectors(tiny_llama, sets, base, max_tokens=60, progress=False)
    finally:
        logger.removeHandler(handler)
    messages = [str(w.message) for w in recwarn.list]
    assert messages == [
        "1 prompt(s) were longer than max_tokens=60; their user text was shortened (template tokens kept)"
    ]
    assert not seen, seen


def test_shortening_without_offsets_and_a_template_that_fills_the_limit(
    tiny_llama: ModelAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow tokenizer (no offsets) falls back to decoding the kept tokens; a limit the template alone
    fills says so instead of claiming the template is longer than it."""
    long = "Explain how eigenvalues relate to matrix diagonalization. " * 40
    tok = tiny_llama.tokenizer
    real = type(tok).__call__

    def no_offsets(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available for python tokenizers")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", no_offsets)
    ids = encode_prompts(tiny_llama, [long], max_tokens=60).ids[0]
    assert len(ids) <= 60 and long.startswith(_kept_user_text(tiny_llama, ids))
    monkeypatch.undo()
    template = len(encode_prompts(tiny_llama, [""]).ids[0])
    with pytest.raises(RolevecError, match=rf"takes {template} of max_tokens={template} .*`max_tokens`"):
        encode_prompts(tiny_llama, [long], max_tokens=template)


def test_a_very_long_prompt_gets_a_batch_of_its_own(tiny_llama: ModelAdapter) -> None:
    """Batches of one fixed size padded 15 short prompts to the long one's length (16 times its cost)."""
    widths: list[tuple[int, ...]] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        widths.append(tuple(kwargs["input_ids"].shape))

    long = "Explain how eigenvalues relate to matrix diagonalization. " * 40
    prompts = [long, *PROMPTS, *(f"{p} Again." for p in PROMPTS), "Say hi.", "Count to ten."]
    handle = tiny_llama.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with pytest.warns(UserWarning, match="1 prompt"):
            got = mean_activations(tiny_llama, prompts, batch_size=16, max_tokens=200, progress=False)
    finally:
        handle.remove()
    assert (1, 200) in widths  # the long prompt alone (after the shortening to 200 tokens)
    assert sum(rows * width for rows, width in widths) < 200 + 16 * 60, widths
    with pytest.warns(UserWarning, match="1 prompt"):
        ref = mean_activations(tiny_llama, prompts, batch_size=1, max_tokens=200, progress=False)
    assert float((got - ref).norm() / ref.norm()) <= 1e-6


def test_bad_calls(tiny_llama: ModelAdapter) -> None:
    with pytest.raises(RolevecError, match="empty prompt set"):
        mean_activations(tiny_llama, [], progress=False)
    with pytest.raises(RolevecError, match="batch size"):
        mean_activations(tiny_llama, PROMPTS, batch_size=0, progress=False)
    with pytest.raises(RolevecError, match="padding_side"):
        mean_activations(tiny_llama, PROMPTS, padding_side="middle", progress=False)


def test_extract_role_vectors(tiny_llama: ModelAdapter) -> None:
    math = PromptSet("mathematician", tuple(PROMPTS[:3]), "mem:a", n_duplicates_dropped=2)
    doctor = PromptSet("doctor", tuple(PROMPTS[2:5]), "mem:b")
    base = PromptSet("base", tuple(PROMPTS[3:]), "mem:c")
    vecs = extract_role_vectors(
        tiny_llama, {"mathematician": math, "doctor": doctor}, base, seed=42, progress=False
    )
    assert vecs.roles == ("mathematician", "doctor")
    mu = mean_activations(tiny_llama, list(math.prompts), progress=False)
    nu = mean_activations(tiny_llama, list(base.prompts), progress=False)
    torch.testing.assert_close(vecs.diff("mathematician").double(), mu - nu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vecs.base_mean.double(), nu, rtol=1e-6, atol=1e-6)
    assert vecs.positions == tuple(tiny_llama.chat.positions)
    meta = vecs.metadata
    assert meta["model_fingerprint"] == tiny_llama.fingerprint() and meta["seed"] == 42
    assert meta["prompts"]["mathematician"] == {"n": 3, "source": "mem:a", "duplicates_dropped": 2}
    assert meta["base"]["n"] == 3 and meta["n_layers"] == 3 and meta["hidden_size"] == 32
    assert {"rolevec_version", "created", "dtype", "model"} <= set(meta)
    with pytest.raises(RolevecError, match="no roles"):
        extract_role_vectors(tiny_llama, {}, base, progress=False)


def test_vector_file_roundtrip_from_extraction(tiny_llama: ModelAdapter, tmp_path: Path) -> None:
    sets = {r: sample(load_role_prompts(r), 6, 42) for r in ("mathematician", "lawyer")}
    vecs = extract_role_vectors(tiny_llama, sets, sample(load_base(), 6, 42), seed=42, progress=False)
    loaded = type(vecs).load(vecs.save(tmp_path / "v.safetensors"))
    assert loaded.metadata["prompts"] == vecs.metadata["prompts"]
    torch.testing.assert_close(loaded.vector("lawyer", 2, -1), vecs.vector("lawyer", 2, -1))
    loaded.check_compatible(tiny_llama)


@pytest.mark.e2e
def test_embedded_parity_and_padding_on_paper_data(embedded: ModelAdapter, paper_data: Path) -> None:
    prompts = list(load_role_prompts("mathematician", paper_data / "roles").prompts[:4])
    means = mean_activations(embedded, prompts, batch_size=4, progress=False)
    ref, _ = _reference(embedded, prompts)
    n = embedded.n_layers
    assert embedded.chat.n_positions == 6 and means.shape == (6, n + 1, 576)
    assert float((means[:, :n] - ref).norm() / ref.norm()) <= 1e-5
    for batch_size, side in ((1, "right"), (4, "left")):
        got = mean_activations(embedded, prompts, batch_size=batch_size, padding_side=side, progress=False)
        assert float((got - means).norm() / means.norm()) <= 1e-5, (batch_size, side)


def test_shared_prefix_gives_the_same_means(tiny: ModelAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """The template's head runs once per run (plus once for the check); the read positions stay after the
    cut, even for identical prompts (whose common head is everything)."""
    import rolevec.vectors.extraction as activations

    runs: list[int] = []
    monkeypatch.setattr(activations, "prefix_kv", counted(activations.prefix_kv, runs))
    encoded = activations.encode_prompts(tiny, [*PROMPTS, PROMPTS[0], PROMPTS[0]]).ids
    sets = [0, 1] * (len(encoded) // 2) + [0] * (len(encoded) % 2)
    bar = SimpleNamespace(update=lambda n: None)
    args: dict[str, Any] = {"batch_size": 3, "padding_side": "right", "bar": bar}
    shared = activations._accumulate(tiny, encoded, sets, 2, **args)
    assert len(encoded) > 2 * args["batch_size"]  # several split batches...
    assert len(runs) == 2  # ...one head for all of them, one for the two-prompt check
    again = activations._accumulate(tiny, encoded, sets, 2, **args)
    assert len(runs) == 3  # a later run on the same adapter keeps the check's verdict: its head only
    assert torch.equal(again, shared)
    monkeypatch.setattr(activations, "shares_prefix", lambda device: False)  # an accelerator's policy
    whole = activations._accumulate(tiny, encoded, sets, 2, **args)
    assert len(runs) == 3  # no head run: full rows
    assert float((whole - shared).norm() / shared.norm()) <= 1e-6
    plain = activations._accumulate(tiny, encoded, sets, 2, share_prefix=False, **args)
    assert float((shared - plain).norm() / plain.norm()) <= 1e-6


def test_a_prefix_cache_that_changes_activations_is_caught(
    tiny_llama: ModelAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two prompts of the first split batch are read both ways; if they disagree (simulated: the prefix's
    keys perturbed), extraction warns and reads full rows, giving the unshared means."""
    import rolevec.vectors.extraction as activations

    real = activations.prefix_kv

    def broken(*args: Any, **kwargs: Any) -> Any:
        kv = real(*args, **kwargs)
        return type(kv)(tuple((k + 1.0, v) for k, v in kv.layers), kv.length)

    monkeypatch.setattr(activations, "prefix_kv", broken)
    with pytest.warns(UserWarning, match="common prefix changes activations"):
        got = mean_activations(tiny_llama, PROMPTS * 3, batch_size=4, progress=False)
    monkeypatch.setattr(activations, "prefix_kv", real)
    encoded = activations.encode_prompts(tiny_llama, PROMPTS * 3).ids
    bar = SimpleNamespace(update=lambda n: None)
    plain = activations._accumulate(
        tiny_llama,
        encoded,
        [0] * len(encoded),
        1,
        batch_size=4,
        padding_side="right",
        bar=bar,
        share_prefix=False,
    )[0] / len(encoded)
    assert float((got - plain).norm() / plain.norm()) <= 1e-6


def test_state_tolerance_grows_with_depth_in_half_precision_only() -> None:
    from rolevec.model.batching import state_tolerance

    assert state_tolerance(torch.float32, 30) == 1e-4
    assert 4e-2 < state_tolerance(torch.bfloat16, 30) < 5e-2  # SmolLM2's batch-shape noise is 2e-2
    assert state_tolerance(torch.bfloat16, 80) > state_tolerance(torch.bfloat16, 30)
    assert state_tolerance(torch.float16, 30) == 2e-2


@pytest.mark.e2e
def test_prefix_check_accepts_bfloat16_rounding_on_the_quick_presets_prompts() -> None:
    """The quick preset's first extraction batch, in bfloat16: its two-prompt check differs from full rows
    by 2e-2, as much as the same rows do between batches of 2 and 16. That is rounding, not a broken
    cache, and must not turn prefix sharing off (it did, with a 2e-2 tolerance)."""
    import warnings

    import rolevec.vectors.extraction as activations
    from rolevec.data.sources import load_base, load_role_prompts, sample
    from rolevec.model.loading import load_model
    from rolevec.study.pipeline import PRESETS

    quick = PRESETS["quick"]
    prompts = [
        p for r in quick["roles"] for p in sample(load_role_prompts(r), quick["n_prompts"], 42).prompts
    ]
    prompts += sample(load_base(), quick["n_base"], 42).prompts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load_model(None, dtype="bfloat16")
    encoded = activations.encode_prompts(adapter, prompts).ids
    overhead = activations.batch_overhead_tokens(adapter.device)
    planned = activations.plan_batches([len(e) for e in encoded], 16, overhead_tokens=overhead)
    first = [encoded[i] for i in next(b for b in planned if len(b) > 1)]  # extraction's first split batch
    bar = SimpleNamespace(update=lambda n: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning fails the test
        activations._accumulate(
            adapter, first, [0] * len(first), 1, batch_size=16, padding_side="right", bar=bar
        )
