from __future__ import annotations

import warnings

import pytest
import torch

from rolevec.errors import RolevecError
from rolevec.model import ModelAdapter, load_model, map_architecture, resolve_device, resolve_dtype
from rolevec.testing import make_adapter, make_model, make_tokenizer

EXPECTED_WRITERS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}


def test_architecture_mapping_is_verified(tiny: ModelAdapter) -> None:
    arch = tiny.name.removeprefix("tiny-")
    assert tiny.arch.writer_names[0] == EXPECTED_WRITERS[arch]
    assert tiny.n_layers == 3
    assert tiny.verify_writers() < 1e-4
    assert tiny.residual_site(3) is tiny.final_norm
    with pytest.raises(RolevecError, match="out of range"):
        tiny.residual_site(4)


def test_gpt2_has_position_embeddings_as_residual_input() -> None:
    adapter = make_adapter("gpt2")
    assert adapter.arch.embedding_names == ("transformer.wte", "transformer.wpe")


def test_unmappable_architecture_names_the_override() -> None:
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    with pytest.raises(RolevecError, match=r"not a list; the model's module lists are: model\.layers"):
        map_architecture(model, block_pattern="model.norm")
    with pytest.raises(RolevecError, match=r"'model\.nope' is not a submodule; .*: model\.layers"):
        map_architecture(model, block_pattern="model.nope")
    assert map_architecture(model, block_pattern="model.layers").blocks_path == "model.layers"


def test_wrong_writer_mapping_is_caught() -> None:
    adapter = make_adapter("llama")
    object.__setattr__(adapter.arch, "writer_names", tuple(("self_attn.o_proj",) for _ in range(3)))
    with pytest.raises(RolevecError, match="do not explain"):
        adapter.verify_writers()


def test_post_instruction_positions_come_from_the_template(tiny_llama: ModelAdapter) -> None:
    chat = tiny_llama.chat
    text = tiny_llama.render("What is a matrix?")
    ids = tiny_llama.encode([text]).input_ids[0].tolist()
    assert ids[-chat.n_positions :] == chat.suffix_ids
    assert chat.positions == list(range(-chat.n_positions, 0))
    assert "".join(chat.position_tokens()) == "<|im_end|>\n<|im_start|>assistant\n"


def test_no_double_bos_and_system_folding() -> None:
    adapter = make_adapter("llama", template="no_system")
    bos = adapter.tokenizer.bos_token_id
    text, folded = adapter.chat.render("Q?", system="You are a doctor.")
    assert folded and "You are a doctor.\n\nQ?" in text
    ids = adapter.encode([text]).input_ids[0].tolist()
    assert ids.count(bos) == 1 and ids[0] == bos
    chatml = make_adapter("llama")
    text, folded = chatml.chat.render("Q?", system="You are a doctor.")
    assert not folded and text.startswith("<|im_start|>system\nYou are a doctor.")


def test_plain_format_without_template_warns() -> None:
    with pytest.warns(UserWarning, match="no chat template"):
        adapter = make_adapter("llama", template=None)
    assert adapter.render("Hi").endswith("### Response:\n")
    assert adapter.chat.n_positions > 0


def test_letter_ids_are_single_tokens(tiny_llama: ModelAdapter) -> None:
    ids = tiny_llama.letter_token_ids(tiny_llama.render("Which?\nAnswer:"))
    assert [tiny_llama.tokenizer.decode([i]) for i in ids] == ["A", "B", "C", "D"]
    spaced = tiny_llama.letter_token_ids(tiny_llama.render("Which?") + "The answer is")
    assert len(set(spaced)) == 4
    with pytest.raises(RolevecError, match="single token"):
        tiny_llama.letter_token_ids(tiny_llama.render("Which?"), letters=("Alpha", "Beta", "C", "D"))


def test_padding_side_does_not_change_results(tiny: ModelAdapter) -> None:
    texts = [tiny.render("Explain eigenvalues of a matrix."), tiny.render("Hi")]
    out = {}
    for side in ("left", "right"):
        batch = tiny.encode(texts, padding_side=side)
        with torch.inference_mode():
            logits = tiny.model(**batch.model_kwargs()).logits
        rows = torch.arange(len(texts))
        out[side] = logits[rows, batch.last_index()]
    torch.testing.assert_close(out["left"], out["right"], rtol=1e-4, atol=1e-4)


def test_fingerprint_differs_between_models() -> None:
    a, b = make_adapter("llama"), make_adapter("qwen2")
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == make_adapter("llama", seed=3).fingerprint()


def test_bad_inputs_give_clear_errors(tmp_path: object) -> None:
    with pytest.raises(RolevecError, match="does not exist"):
        load_model("./no/such/folder")
    with pytest.raises(RolevecError, match=r"\.gguf"):
        load_model("/no/such/model.gguf")
    with pytest.raises(RolevecError, match=r"no config\.json"):
        load_model(str(tmp_path))
    with pytest.raises(RolevecError, match="pass cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RolevecError, match="--device cpu"):
            resolve_device("cuda")
    with pytest.raises(RolevecError, match="float32"):
        resolve_dtype("int3")


def test_broken_gguf_says_so(tmp_path: pytest.TempPathFactory) -> None:
    bad = tmp_path / "broken.gguf"  # type: ignore[operator]
    bad.write_bytes(b"not a gguf file at all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RolevecError, match="GGUF"):
            load_model(str(bad))


def test_gguf_weights_are_asked_for_dequantized(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rolevec edits and reads plain weights, so a GGUF load asks transformers not to keep packed blocks."""
    import transformers
    from transformers.utils import quantization_config

    if not hasattr(quantization_config, "GgufConfig"):
        pytest.skip("this transformers release always dequantizes GGUF weights")

    seen: dict[str, object] = {}

    def capture(path: str, **kwargs: object) -> None:
        seen.update(kwargs)
        raise OSError("stop after the arguments")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    gguf = tmp_path / "m.gguf"  # type: ignore[operator]
    gguf.write_bytes(b"x")
    with pytest.raises(RolevecError, match="GGUF"):
        load_model(str(gguf))
    config = seen["quantization_config"]
    assert seen["gguf_file"] == "m.gguf" and getattr(config, "dequantize", False) is True


@pytest.mark.e2e
def test_embedded_model_mapping(embedded: ModelAdapter) -> None:
    assert embedded.n_layers == 30 and embedded.hidden_size == 576
    assert embedded.arch.writer_names[0] == ("self_attn.o_proj", "mlp.down_proj")
    assert embedded.verify_writers() < 1e-3
    assert embedded.chat.position_tokens() == ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"]
    ids = embedded.letter_token_ids(embedded.render("Q?\nAnswer:"))
    assert [embedded.tokenizer.decode([i]) for i in ids] == ["A", "B", "C", "D"]
