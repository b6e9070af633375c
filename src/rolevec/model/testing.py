"""Tiny random models and tokenizers built from configs, for fast offline tests and examples.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in memory on a few sentences,
and each model is a random initialisation of a real transformers architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .loading import ModelAdapter

ARCHITECTURES = ("llama", "qwen2", "gemma2", "mistral", "phi3", "gpt2", "gpt_neox")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Rejects a system turn, like Gemma's template, and starts with the BOS token text.
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain how eigenvalues relate to matrix diagonalization and stability.",
    "What is the standard dose of amoxicillin for a child with otitis media?",
    "Draft a contract clause about liability and indemnity for a software vendor.",
    "Answer with the letter of the correct answer. Answer: A B C D",
    "Write a short poem about the sea, the sun and the wind.",
    "Compare supply and demand in a market with a price ceiling.",
    "You are a mathematician. You are a doctor. You are a lawyer.",
    "Question: which of the following is a prime number? 0 1 2 3 4 5 6 7 8 9",
    *["The answer is A. The answer is B. The answer is C. The answer is D."] * 8,
]


def make_tokenizer(template: str | None = "chatml", vocab_size: int = 320) -> Any:
    """A small fast tokenizer with ChatML-like special tokens; ``template`` is chatml, no_system or None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    chat_template = {"chatml": CHATML, "no_system": NO_SYSTEM, None: None}[template]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def make_config(arch: str, vocab_size: int, n_layers: int = 3) -> Any:
    """A tiny config of a real architecture (hidden 32, 4 heads), eager attention for exact comparisons."""
    import transformers as tf

    ids: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    common: dict[str, Any] = {"vocab_size": vocab_size, "num_hidden_layers": n_layers, **ids}
    llama_like: dict[str, Any] = {
        **common,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    if arch == "llama":
        cfg = tf.LlamaConfig(**llama_like)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**llama_like)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**llama_like, sliding_window=None)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(
            **{**llama_like, "head_dim": 8, "sliding_window": 16, "tie_word_embeddings": True}
        )
    elif arch == "phi3":
        cfg = tf.Phi3Config(**{**llama_like, "num_key_value_heads": 4})
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab_size, n_layer=n_layers, n_embd=32, n_head=4, n_positions=256, **ids
        )
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            vocab_size=vocab_size,
            num_hidden_layers=n_layers,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            max_position_embeddings=256,
            **ids,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    cfg._attn_implementation = "eager"
    return cfg


def make_model(arch: str, vocab_size: int, *, seed: int = 0, n_layers: int = 3) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        make_config(arch, vocab_size, n_layers), attn_implementation="eager"
    )
    with torch.no_grad():  # random norms weights, so that norm placement matters in tests
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.eval()
    assert isinstance(model, torch.nn.Module)
    return model


def make_adapter(
    arch: str = "llama", *, template: str | None = "chatml", seed: int = 0, n_layers: int = 3
) -> ModelAdapter:
    """A ready adapter around a tiny random model of ``arch``."""
    tokenizer = make_tokenizer(template)
    model = make_model(arch, len(tokenizer), seed=seed, n_layers=n_layers)
    return ModelAdapter(model, tokenizer, name=f"tiny-{arch}")


def counted(fn: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    """``fn`` that appends to ``calls`` each time it runs: tests count prefix or probe forwards with it."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper
