"""Which serving engine keeps a folded edit: a fold is only useful if the engine that serves it loads it.

A fold writes three kinds of change (see :mod:`.folding`): edited existing weights, which every loader
reads; a bias on a residual writer (addition at layer L ≥ 1), sometimes with a config switch turned on
to make room for it (``mlp_bias=True`` on Llama); and an LM head untied from the embeddings
(``tie_word_embeddings=False``, when an addition at layer 0 or an ablation edits a shared matrix).
Engines reimplement each architecture and load only what their own module has room for, so the last two
can vanish without an error. :data:`LOADER_RULES` says, per engine and ``model_type``, which writer
biases are loaded (and under which config switch) and what happens to an untied head; it was read from:

* transformers: not a table. ``save_folded(check=...)`` reloads the written folder with transformers
  and compares its logits with hooked steering, so that verdict is measured on every fold.
* llama.cpp, as vendored in llama-cpp-python 0.3.36: ``convert_hf_to_gguf.py`` with ``conversion/*.py``
  (the converter writes every tensor under its GGUF name, whatever the config switches say, except
  that the Gemma/Gemma-2 converters skip ``lm_head.weight``) and ``src/models/<arch>.cpp`` (llama
  loads ``attn_output.bias``, ``ffn_{gate,up,down}.bias`` when present; gpt2 and gptneox always have
  their biases; gemma2 always reads its head from ``token_embd``). A tensor the graph does not use
  fails the load ("wrong number of tensors"), loudly. Llama is checked end to end by
  ``benchmarks/check_llama_cpp.py``.
* vLLM main, read but not run (vLLM does not install here): ``vllm/model_executor/models/llama.py``
  (commit e06c9ba: o_proj bias iff ``attention_bias`` or ``bias``, MLP biases iff ``mlp_bias``;
  ``load_weights`` skips a ``.bias`` its module has no parameter for, silently), ``phi3.py``
  (Phi3ForCausalLM is LlamaForCausalLM), ``qwen2.py`` (cb24295), ``gpt2.py`` (e7dffa6: an untied
  ``lm_head`` is loaded; older releases skipped ``lm_head.weight``), ``gpt_neox.py`` (642d31b:
  ``dense`` bias iff ``attention_bias``, default on), ``gemma2.py`` (02cda6e:
  ``assert config.tie_word_embeddings``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RolevecError
from ..model.loading import ModelAdapter
from .interventions import Steering, not_added
from .writers import bias_plan as _bias_plan

TARGETS = ("transformers", "llama.cpp", "vllm")
#: Verdict levels: the engine serves the fold as transformers does; keeps only part of it (refused
#: unless ``allow_partial=True``); or drops it, or cannot load it.
LEVELS = ("ok", "partial", "refused")
HEAD_KEPT, HEAD_FROM_EMBEDDINGS, HEAD_REFUSED = "kept", "from_embeddings", "refused"
ADVICE = "fold with `target=transformers`, or steer with hooks"


@dataclass(frozen=True)
class LoaderRule:
    """What one engine's loader keeps of a checkpoint of one architecture.

    Attributes:
        biases: Residual writer (block-relative, as rolevec maps it) -> the config switches of which one
            must be on for the engine to load that writer's bias, each with its default when absent
            (empty: always loaded). A writer not listed has no bias in the engine.
        untied_head: ``kept`` (a separate ``lm_head`` is loaded), ``from_embeddings`` (the engine reads
            the head from the token embeddings whatever the config says) or ``refused`` (its loader
            fails on an untied head).
        source: Where the rule was read, and whether it was run.
        verified: True when rolevec has run the engine on such a fold and compared tokens.
    """

    biases: Mapping[str, tuple[tuple[str, bool], ...]]
    untied_head: str
    source: str
    verified: bool = False


_LLAMA_CPP_LLAMA = LoaderRule(
    biases={"self_attn.o_proj": (), "mlp.down_proj": ()},
    untied_head=HEAD_KEPT,
    source="llama.cpp src/models/llama.cpp: wo_b, ffn_down_b optional (TENSOR_NOT_REQUIRED)",
    verified=True,
)
_VLLM_LLAMA = LoaderRule(
    biases={
        "self_attn.o_proj": (("attention_bias", False), ("bias", False)),
        "mlp.down_proj": (("mlp_bias", False),),
    },
    untied_head=HEAD_KEPT,
    source="vllm models/llama.py LlamaDecoderLayer (unverified: read, not run)",
)
_NO_BIAS: Mapping[str, tuple[tuple[str, bool], ...]] = {}

#: engine -> model_type -> rule. transformers has no entry: its verdict is measured on every fold.
LOADER_RULES: Mapping[str, Mapping[str, LoaderRule]] = {
    "llama.cpp": {
        "llama": _LLAMA_CPP_LLAMA,
        "mistral": LoaderRule(  # MistralForCausalLM converts to the llama architecture
            _LLAMA_CPP_LLAMA.biases, HEAD_KEPT, "llama.cpp conversion/llama.py registers MistralForCausalLM"
        ),
        "qwen2": LoaderRule(_NO_BIAS, HEAD_KEPT, "llama.cpp src/models/qwen2.cpp: no wo_b/ffn_down_b"),
        "phi3": LoaderRule(_NO_BIAS, HEAD_KEPT, "llama.cpp src/models/phi3.cpp: no wo_b/ffn_down_b"),
        "gemma2": LoaderRule(
            _NO_BIAS,
            HEAD_FROM_EMBEDDINGS,
            "llama.cpp conversion/gemma.py skips lm_head.weight; src/models/gemma2.cpp output = token_embd",
        ),
        "gpt2": LoaderRule(
            {"attn.c_proj": (), "mlp.c_proj": ()},
            HEAD_KEPT,
            "llama.cpp src/models/gpt2.cpp: wo_b, ffn_down_b",
        ),
        "gpt_neox": LoaderRule(
            {"attention.dense": (), "mlp.dense_4h_to_h": ()},
            HEAD_KEPT,
            "llama.cpp src/models/gptneox.cpp: wo_b, ffn_down_b",
        ),
    },
    "vllm": {
        "llama": _VLLM_LLAMA,
        "mistral": LoaderRule(_VLLM_LLAMA.biases, HEAD_KEPT, "vllm registry: MistralForCausalLM is llama"),
        "phi3": LoaderRule(_VLLM_LLAMA.biases, HEAD_KEPT, "vllm models/phi3.py: a LlamaForCausalLM"),
        "qwen2": LoaderRule(_NO_BIAS, HEAD_KEPT, "vllm models/qwen2.py: o_proj and down_proj without bias"),
        "gemma2": LoaderRule(
            _NO_BIAS, HEAD_REFUSED, "vllm models/gemma2.py: assert config.tie_word_embeddings"
        ),
        "gpt2": LoaderRule(
            {"attn.c_proj": (), "mlp.c_proj": ()}, HEAD_KEPT, "vllm models/gpt2.py: c_proj bias=True"
        ),
        "gpt_neox": LoaderRule(
            {"attention.dense": (("attention_bias", True),), "mlp.dense_4h_to_h": ()},
            HEAD_KEPT,
            "vllm models/gpt_neox.py: dense bias iff attention_bias",
        ),
    },
}


@dataclass(frozen=True)
class TargetVerdict:
    """Whether ``target`` serves a fold as hooked steering does, and why.

    Attributes:
        target: The engine: ``transformers``, ``llama.cpp`` or ``vllm``.
        level: ``ok``, ``partial`` or ``refused``.
        reasons: One sentence per finding (empty when there is nothing to say).
        source: Where the rule comes from.
        verified: True when the engine itself was run on such a fold (transformers: on this one).
        model_type: The architecture judged (``llama``, ``gemma2``, ...).
    """

    target: str
    level: str
    reasons: tuple[str, ...] = ()
    source: str = ""
    verified: bool = False
    model_type: str = field(default="", compare=False)

    def message(self) -> str:
        """One line: what the engine does with this fold, and what to pass instead when it is not ``ok``."""
        what = f"this fold of {self.model_type}" if self.model_type else "this fold"
        why = "; ".join(self.reasons)
        if self.level == "ok":
            return f"{self.target} serves {what}" + (f": {why}" if why else "")
        if self.level == "partial":
            return (
                f"{self.target} would serve {what} only in part: {why}; pass `allow_partial=True` to fold "
                "anyway, or fold with `target=transformers`"
            )
        return f"{self.target} cannot serve {what}: {why}; {ADVICE}"

    def record(self) -> dict[str, Any]:
        """The verdict as JSON for a checkpoint's manifest."""
        return {
            "target": self.target,
            "verdict": self.level,
            "reasons": list(self.reasons),
            "source": self.source,
            "verified": self.verified,
        }


def _head_shared(adapter: ModelAdapter) -> bool:
    """True when the LM head reads an input embedding matrix (the fold would untie it)."""
    weight = getattr(adapter.unembed, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    for emb in adapter.embeddings:
        own = getattr(emb, "weight", None)
        if isinstance(own, torch.Tensor) and own.data_ptr() == weight.data_ptr():
            return True
    return False


def _bias_kept(rule: LoaderRule, writer: str, switch: str | None, config: Any) -> bool:
    if writer not in rule.biases:
        return False
    switches = rule.biases[writer]
    if not switches:
        return True
    return any(flag == switch or bool(getattr(config, flag, default)) for flag, default in switches)


def target_verdict(
    adapter: ModelAdapter,
    steering: Steering,
    target: str = "transformers",
    *,
    rules: Mapping[str, Mapping[str, LoaderRule]] = LOADER_RULES,
) -> TargetVerdict:
    """What ``target`` would do with ``steering`` folded into this model; never raises for a verdict.

    Assumes the fold itself is possible (:func:`~rolevec.steering.folding.fold_problem` is ``None``).

    Args:
        adapter: The model that will be folded.
        steering: The intervention to fold.
        target: The serving engine: ``transformers`` (default), ``llama.cpp`` or ``vllm``.
        rules: The loader table to judge by (default :data:`LOADER_RULES`).

    Returns:
        The :class:`TargetVerdict`.

    Example:
        ```python
        verdict = target_verdict(adapter, steering, "llama.cpp")
        print(verdict.level, verdict.message())
        ```
    """
    if target not in TARGETS:
        raise RolevecError(
            f"unknown serving target {target!r}: pass `target=transformers`, `target=llama.cpp` or "
            "`target=vllm`"
        )
    model_type = str(getattr(adapter.config, "model_type", type(adapter.model).__name__))
    if steering.mode == "cap":  # no engine can serve it: there is no weight edit to load
        reason = f"a capping steering cannot be folded into weights: {not_added(steering)}"
        return TargetVerdict(target, "refused", (reason,), model_type=model_type)
    if target == "transformers":
        return TargetVerdict(
            target,
            "ok",
            (),
            "measured: save_folded(check=...) reloads the written folder with transformers, compares hooks",
            True,
            model_type,
        )
    rule = rules.get(target, {}).get(model_type)
    if rule is None:
        known = ", ".join(sorted(rules.get(target, {}))) or "none"
        return TargetVerdict(
            target,
            "refused",
            (
                f"rolevec has no rule for how {target} loads {model_type} checkpoints (it knows {known}), "
                "so it cannot check that the edit survives there",
            ),
            model_type=model_type,
        )
    notes: list[str] = []
    partial: list[str] = []
    refused: list[str] = []
    if steering.mode == "add":
        kept = [layer for layer in steering.layers if layer == 0]
        dropped: list[str] = []
        for layer in steering.layers:
            plan = _bias_plan(adapter, layer - 1) if layer > 0 else None
            if plan is None:
                continue
            writer, switch = plan
            if _bias_kept(rule, writer, switch, adapter.config):
                kept.append(layer)
            else:
                dropped.append(f"layer {layer} (the bias of {writer})")
        if dropped:
            finding = f"its {model_type} loader skips the addition at {', '.join(dropped)}"
            (partial if kept else refused).append(finding)
        unties = 0 in steering.layers and _head_shared(adapter)
    else:
        unties = _head_shared(adapter)
    if unties and rule.untied_head == HEAD_REFUSED:
        refused.append(
            "the fold unties the LM head (tie_word_embeddings=False) and its loader requires tied "
            "embeddings, so the checkpoint would not load"
        )
    elif unties and rule.untied_head == HEAD_FROM_EMBEDDINGS:
        dropped_head = "it drops the untied LM head and reads the head from the folded embeddings"
        cap = getattr(adapter.config, "final_logit_softcapping", None)
        if steering.mode == "ablate":
            refused.append(f"{dropped_head}, which are orthogonalised: that changes every logit")
        elif cap:
            partial.append(
                f"{dropped_head}, which adds the same amount to every logit of a position: greedy tokens "
                f"are kept, but final_logit_softcapping={cap} changes the probabilities"
            )
        else:
            notes.append(
                f"{dropped_head}, which adds the same amount to every logit of a position (softmax "
                "ignores it)"
            )
    level = "refused" if refused else "partial" if partial else "ok"
    reasons = tuple(refused + partial + notes)
    return TargetVerdict(target, level, reasons, rule.source, rule.verified, model_type)


def check_target(
    adapter: ModelAdapter,
    steering: Steering,
    target: str = "transformers",
    *,
    allow_partial: bool = False,
    rules: Mapping[str, Mapping[str, LoaderRule]] = LOADER_RULES,
) -> TargetVerdict:
    """The verdict of :func:`target_verdict`, refusing what ``target`` would drop.

    A ``refused`` verdict raises :class:`RolevecError`; a ``partial`` one raises too unless
    ``allow_partial``, and then warns.

    Args:
        adapter: The model that will be folded.
        steering: The intervention to fold.
        target: The serving engine: ``transformers`` (default), ``llama.cpp`` or ``vllm``.
        allow_partial: Fold although the engine keeps only part of the edit, with a warning.
        rules: The loader table to judge by (default :data:`LOADER_RULES`).

    Returns:
        The :class:`TargetVerdict` (``ok``, or ``partial`` with ``allow_partial``).

    Example:
        ```python
        check_target(adapter, steering, "vllm")  # raises when vLLM would drop the edit
        ```
    """
    verdict = target_verdict(adapter, steering, target, rules=rules)
    if verdict.level == "refused" or (verdict.level == "partial" and not allow_partial):
        raise RolevecError(verdict.message())
    if verdict.level == "partial":
        warnings.warn(
            f"{verdict.target} serves this fold of {verdict.model_type} only in part: "
            f"{'; '.join(verdict.reasons)}",
            stacklevel=2,
        )
    return verdict
