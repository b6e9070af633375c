"""Folding an intervention into the weights, for steering with zero run-time overhead.

Only exact constructions are offered, and every fold is checked numerically against hooked steering:

* Addition at layer L ≥ 1 becomes a bias α·d on a residual writer of block L−1 (the writers' outputs are
  summed into the residual that block L reads). Writers without a bias get one where the config has a
  switch for it (``mlp_bias`` on Llama-type models: zero biases elsewhere, so a standard checkpoint
  reloads); at layer 0 the input embedding matrix is shifted (divided by any embedding scale, e.g.
  Gemma's √hidden).
* Ablation orthogonalises every embedding that writes the residual and every residual writer's weight
  and bias, so the direction never enters the stream.

An embedding matrix shared with the LM head is untied first (``tie_word_embeddings=False``), because the
head must keep reading the original matrix. Post-norm writers (Gemma-2/3) and writers that cannot hold a
bias raise :class:`RolevecError` instead of folding approximately.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RolevecError
from ..model.hooks import StopForward, hooked, input_hook, output_hook
from ..model.loading import ModelAdapter
from .interventions import Steering, not_added
from .writers import BIAS_SWITCHES
from .writers import bias_plan as _bias_plan

#: Config switches that give a sublayer's projections biases, and the sublayer names they govern.
PROBE_TEXTS = ("Explain how a vaccine trains the immune system.", "Hi")
UNTIED = "lm_head untied from the input embeddings (tie_word_embeddings=False)"
HOOKED_ADVICE = "steer with hooks instead (`rolevec generate`, or export a control vector)"


# --- what can be folded ---------------------------------------------------------------------------


def _input_embedding(adapter: ModelAdapter) -> nn.Module:
    model: Any = adapter.model
    emb = model.get_input_embeddings()
    assert isinstance(emb, nn.Module)
    return emb


def _weight(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise RolevecError(f"{type(module).__name__} has no weight matrix; {HOOKED_ADVICE}")
    return weight


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear map whose weight is stored transposed, ``[in, out]``."""
    return not isinstance(module, nn.Linear) and isinstance(getattr(module, "nf", None), int)


def _quantization(adapter: ModelAdapter) -> str | None:
    """The quantization method the model was loaded with (e.g. ``gguf``), if any."""
    quantizer = getattr(adapter.model, "hf_quantizer", None)
    if quantizer is None:
        return None
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return str(getattr(method, "value", method) or type(quantizer).__name__).lower()


def _plain_weights(adapter: ModelAdapter) -> bool:
    """True when every parameter is an ordinary floating-point tensor (nothing left packed/quantized)."""
    return all(p.is_floating_point() and type(p) is nn.Parameter for p in adapter.model.parameters())


def drop_gguf_quantizer_(adapter: ModelAdapter) -> bool:
    """Forget that a model was read from a GGUF file once its weights are plain float tensors.

    transformers dequantizes GGUF checkpoints at load but keeps the GGUF quantizer attached, which
    refuses ``save_pretrained``; the dequantized weights are an ordinary checkpoint.
    """
    if _quantization(adapter) != "gguf" or not _plain_weights(adapter):
        return False
    model: Any = adapter.model
    model.hf_quantizer = None
    for config in {id(c): c for c in (adapter.config, adapter.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    return True


def fold_problem(adapter: ModelAdapter, steering: Steering) -> str | None:
    """Why ``steering`` cannot be folded exactly into this model, or ``None`` when it can."""
    if steering.mode == "cap":
        return f"a capping steering cannot be folded into weights: {not_added(steering)}"
    if adapter.offloaded:
        return (
            "the model's weights are offloaded (its device map puts some on disk or in CPU memory, and "
            "accelerate moves them in at each forward), so they cannot be edited in place: load it without "
            "`device_map`, or with every module on a device, to fold; or steer with hooks"
        )
    model_type = getattr(adapter.config, "model_type", type(adapter.model).__name__)
    quantization = _quantization(adapter)
    if not _plain_weights(adapter) or quantization not in (None, "gguf"):
        return (
            f"the model is quantized ({quantization or 'packed weights'}), so its weights cannot be edited "
            "exactly: load it unquantized (`dtype=float32`) to fold, or steer with hooks"
        )
    if steering.mode == "ablate":
        if adapter.arch.writer_kind != "linear":
            return (
                f"ablation cannot be folded exactly into {model_type}: its residual writers are "
                f"{adapter.arch.writer_kind} layers (post-norms), whose outputs no weight edit keeps "
                f"orthogonal to a direction; {HOOKED_ADVICE}"
            )
        for layer in range(adapter.n_layers):
            for writer in adapter.writers(layer):
                if not (isinstance(writer, nn.Linear) or _is_conv1d(writer)):
                    return f"residual writer {type(writer).__name__} is not a linear layer; {HOOKED_ADVICE}"
        for emb in adapter.embeddings:
            if not isinstance(emb, nn.Embedding):
                return f"embedding {type(emb).__name__} is not a lookup table; {HOOKED_ADVICE}"
        return None
    for layer in steering.layers:
        if not 0 <= layer <= adapter.n_layers:
            return f"layer {layer} is out of range: this model has layers 0..{adapter.n_layers}"
        if layer == 0:
            continue
        if adapter.arch.writer_kind != "linear":
            return (
                f"addition at layer {layer} cannot be folded exactly into {model_type}: the residual "
                f"writers of block {layer - 1} are post-norms, which cannot hold a bias; fold at layer 0 "
                f"(through the embeddings) or {HOOKED_ADVICE}"
            )
        if _bias_plan(adapter, layer - 1) is None:
            return (
                f"addition at layer {layer} cannot be folded exactly into {model_type}: no residual writer "
                f"of block {layer - 1} has a bias and its config has no switch to add one; fold at layer 0 "
                f"(through the embeddings) or {HOOKED_ADVICE}"
            )
    return None


# --- building blocks (all in place) ------------------------------------------------------------------


def _reference_keys(adapter: ModelAdapter, config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes a fresh model of this class builds from ``config`` (on meta, no memory)."""
    with torch.device("meta"):
        fresh = type(adapter.model)(config)
    return {k: tuple(v.shape) for k, v in fresh.state_dict().items()}


def _current_keys(adapter: ModelAdapter) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in adapter.model.state_dict().items()}


def check_reloadable(adapter: ModelAdapter) -> None:
    """Refuse a model whose parameters differ from what its config builds: it would not reload."""
    want = _reference_keys(adapter, adapter.config)
    have = _current_keys(adapter)
    if want != have:
        extra = sorted(set(have) - set(want))[:3]
        missing = sorted(set(want) - set(have))[:3]
        raise RolevecError(
            f"the folded model would not reload as a standard checkpoint (unexpected {extra}, missing "
            f"{missing}); {HOOKED_ADVICE}"
        )


def _enable_bias_switch_(adapter: ModelAdapter, flag: str) -> None:
    """Turn on ``flag`` and give every projection it governs a zero bias, in every block."""
    pattern = dict(BIAS_SWITCHES)[flag]
    targets: list[tuple[str, nn.Linear]] = []
    for i, block in enumerate(adapter.blocks):
        for child_name, child in block.named_children():
            if not re.search(pattern, child_name) or "norm" in child_name:
                continue
            for name, module in child.named_modules():
                if isinstance(module, nn.Linear) and module.bias is None:
                    targets.append((f"{adapter.arch.blocks_path}.{i}.{child_name}.{name}", module))
    config = copy.deepcopy(adapter.config)
    setattr(config, flag, True)
    want = _current_keys(adapter)
    want.update({f"{name}.bias": (module.out_features,) for name, module in targets})
    if _reference_keys(adapter, config) != want:
        raise RolevecError(
            f"turning on {flag} in {type(adapter.model).__name__} does not add exactly the biases rolevec "
            f"expects, so the folded checkpoint would not reload; {HOOKED_ADVICE}"
        )
    for _, module in targets:
        weight = module.weight
        module.bias = nn.Parameter(
            torch.zeros(module.out_features, dtype=weight.dtype, device=weight.device), requires_grad=False
        )
    setattr(adapter.config, flag, True)


def untie_embeddings_(adapter: ModelAdapter) -> bool:
    """Give the LM head its own copy of a shared embedding matrix; True when it was shared."""
    head = adapter.unembed
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    shared = any(
        isinstance(emb.weight, torch.Tensor) and emb.weight.data_ptr() == weight.data_ptr()
        for emb in adapter.embeddings
    )
    if shared:
        head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (adapter.config, adapter.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    model: Any = adapter.model
    if hasattr(model, "all_tied_weights_keys") and hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return shared


def embedding_scale(adapter: ModelAdapter) -> float:
    """The factor s with (block-0 input) = s·(input-embedding row) + other embeddings, found by a probe.

    Gemma multiplies embeddings by √hidden; most models by 1. Raises when block 0's input is not such a
    scaled sum (then a shift of the embedding matrix would not be an exact addition at layer 0).
    """
    emb = _input_embedding(adapter)
    outputs: dict[int, torch.Tensor] = {}
    block_input: list[torch.Tensor] = []

    def keep(key: int) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            outputs[key] = x.detach().double()

        return fn

    def stop(x: torch.Tensor) -> None:
        block_input.append(x.detach().double())
        raise StopForward

    ids = adapter.encode([adapter.render(PROBE_TEXTS[0])])
    post = [(m, output_hook(keep(i))) for i, m in enumerate(adapter.embeddings)]
    pre = [(adapter.blocks[0], input_hook(stop))]
    with torch.inference_mode(), hooked(pre=pre, post=post), contextlib.suppress(StopForward):
        adapter.model(**ids.model_kwargs())
    index = next((i for i, m in enumerate(adapter.embeddings) if m is emb), None)
    if not block_input or index is None or index not in outputs:
        raise RolevecError(f"could not observe the embeddings of {adapter.name}; {HOOKED_ADVICE}")
    rows = _weight(emb).detach().double()[ids.input_ids]
    own = outputs[index]
    s1 = float((own * rows).sum() / (rows * rows).sum())
    total = torch.stack(list(outputs.values())).sum(0)
    x0 = block_input[0]
    s2 = float((x0 * total).sum() / (total * total).sum())
    err = max(
        float((own - s1 * rows).norm() / own.norm().clamp_min(1e-30)),
        float((x0 - s2 * total).norm() / x0.norm().clamp_min(1e-30)),
    )
    if err > (1e-5 if adapter.dtype == torch.float32 else 1e-2):  # half precision rounds the product
        raise RolevecError(
            f"the input of block 0 in {adapter.name} is not a scaled sum of its embeddings "
            f"(error {err:.1e}): addition at layer 0 cannot be folded exactly; {HOOKED_ADVICE}"
        )
    return s1 * s2


def _project_out_(weight: torch.Tensor, d: torch.Tensor, *, dim: int) -> None:
    """Remove ``d`` from the ``dim`` axis of ``weight`` (the axis of size hidden), in float64."""
    w = weight.detach().double()
    dd = d.double().to(w.device)
    w = w - torch.outer(dd, dd @ w) if dim == 0 else w - torch.outer(w @ dd, dd)
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))


def fold_addition_(adapter: ModelAdapter, vector: torch.Tensor, *, layer: int, alpha: float) -> list[str]:
    """In place: make the model add α·vector to the residual at the input of ``layer``; says what changed."""
    steering = Steering(mode="add", vectors={layer: vector}, alpha=alpha)
    problem = fold_problem(adapter, steering)
    if problem:
        raise RolevecError(problem)
    steering.check_model(adapter, allow_other_model=True, warn_other_model=False)
    shift = steering.scaled()[layer].double()
    edits: list[str] = []
    if layer == 0:
        scale = embedding_scale(adapter)
        if untie_embeddings_(adapter):
            edits.append(UNTIED)
        emb = _input_embedding(adapter)
        weight = _weight(emb)
        with torch.no_grad():
            weight.copy_((weight.double() + (shift / scale).to(weight.device)).to(weight.dtype))
        name = next(n for n, m in adapter.model.named_modules() if m is emb)
        return [*edits, f"α·d/{scale:.6g} added to every row of {name}"]
    plan = _bias_plan(adapter, layer - 1)
    assert plan is not None  # fold_problem said so
    name, switch = plan
    if switch is not None:
        _enable_bias_switch_(adapter, switch)
        edits.append(f"{switch}=True in the config, with zero biases on the projections it adds")
    writer = adapter.blocks[layer - 1].get_submodule(name)
    bias = writer.bias
    assert isinstance(bias, torch.Tensor)
    with torch.no_grad():
        bias.copy_((bias.double() + shift.to(bias.device)).to(bias.dtype))
    return [*edits, f"α·d added to the bias of {adapter.arch.blocks_path}.{layer - 1}.{name}"]


def fold_ablation_(adapter: ModelAdapter, direction: torch.Tensor) -> list[str]:
    """In place: orthogonalise every embedding and residual writer to ``direction``; says what changed."""
    steering = Steering(mode="ablate", vectors={0: direction})
    problem = fold_problem(adapter, steering)
    if problem:
        raise RolevecError(problem)
    steering.check_model(adapter, allow_other_model=True, warn_other_model=False)
    d = steering.direction.double()
    edits = [UNTIED] if untie_embeddings_(adapter) else []
    for emb in adapter.embeddings:
        _project_out_(_weight(emb), d, dim=1)
    for layer in range(adapter.n_layers):
        for writer in adapter.writers(layer):
            weight = writer.weight
            assert isinstance(weight, torch.Tensor)
            _project_out_(weight, d, dim=1 if _is_conv1d(writer) else 0)
            bias = getattr(writer, "bias", None)
            if isinstance(bias, torch.Tensor):
                _project_out_(bias.unsqueeze(0), d, dim=1)
    embeddings = ", ".join(adapter.arch.embedding_names)
    return [*edits, f"d̂ projected out of {embeddings} and of the weight and bias of every residual writer"]


def fold_(adapter: ModelAdapter, steering: Steering) -> list[str]:
    """In place: fold ``steering`` into the adapter's own model (see :func:`fold` for a copy)."""
    problem = fold_problem(adapter, steering)
    if problem:
        raise RolevecError(problem)
    if steering.mode == "ablate":
        return fold_ablation_(adapter, steering.vectors[steering.layers[0]])
    edits: list[str] = []
    for layer in steering.layers:
        edits += fold_addition_(adapter, steering.vectors[layer], layer=layer, alpha=steering.alpha)
    return edits


# --- the safe entry points ---------------------------------------------------------------------------


def steered_logits(adapter: ModelAdapter, steering: Steering | None, texts: Sequence[str]) -> torch.Tensor:
    """Logits of chat-rendered ``texts`` (right-padded), with ``steering`` applied by hooks if given."""
    batch = adapter.encode([adapter.render(t) for t in texts])
    model: Any = adapter.model
    with torch.inference_mode():
        if steering is None:
            logits: torch.Tensor = model(**batch.model_kwargs()).logits
        else:
            with steering.apply(adapter):
                logits = model(**batch.model_kwargs()).logits
    return logits.float()


def logits_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Largest logit difference relative to the largest reference logit."""
    return float((reference - other).abs().max() / reference.abs().max().clamp_min(1.0))


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2


def verify_fold(
    original: ModelAdapter, folded: ModelAdapter, steering: Steering, texts: Sequence[str] = PROBE_TEXTS
) -> float:
    """Relative logit error of the folded model against hooked steering; raises above tolerance."""
    want = steered_logits(original, steering, texts)
    got = steered_logits(folded, None, texts)
    err = logits_error(want, got)
    if err > tolerance(original.dtype):
        raise RolevecError(
            f"the folded model differs from hooked steering (relative logit error {err:.1e}); {HOOKED_ADVICE}"
        )
    return err


def fold(
    adapter: ModelAdapter,
    steering: Steering,
    *,
    verify: bool = True,
    target: str = "transformers",
    allow_partial: bool = False,
) -> ModelAdapter:
    """A new adapter around a deep copy of the model with ``steering`` folded in; the original is untouched.

    With ``verify`` the copy is compared against hooked steering on two probe prompts and checked to
    reload from its own config.

    Args:
        adapter: The model to fold into (it is copied, not changed).
        steering: The intervention to make part of the weights.
        verify: Check the folded copy against hooked steering (default ``True``).
        target: The engine that will serve the checkpoint: ``transformers`` (default), ``llama.cpp`` or
            ``vllm``; a fold that engine's loader would drop is refused (see :mod:`.targets`).
        allow_partial: Fold although ``target`` keeps only part of the edit, with a warning.

    Returns:
        The folded :class:`ModelAdapter`; it steers with no hooks. ``source["fold_target"]`` holds the
        target's verdict.

    Example:
        ```python
        steering = resolve_steering(vectors, "doctor", layers=12, alpha=3.0, adapter=adapter)
        folded = fold(adapter, steering)
        print(generate(folded, "What causes a fever?").text)
        ```
    """
    from .targets import check_target

    problem = fold_problem(adapter, steering)
    if problem:
        raise RolevecError(problem)
    verdict = check_target(adapter, steering, target, allow_partial=allow_partial)
    steering.check_model(adapter, allow_other_model=True, warn_other_model=False)
    model = copy.deepcopy(adapter.model)
    source = {**adapter.source, "folded": steering.describe()}
    folded = ModelAdapter(
        model, adapter.tokenizer, name=adapter.name, block_pattern=adapter.arch.blocks_path, source=source
    )
    edits = fold_(folded, steering)
    if drop_gguf_quantizer_(folded):
        edits.append("GGUF quantizer marker dropped (the weights were dequantized at load)")
    folded.source["fold_edits"] = "; ".join(edits)
    folded.source["fold_target"] = f"{verdict.level}: {verdict.message()}"
    if verify:
        check_reloadable(folded)
        verify_fold(adapter, folded, steering)
    return folded


# --- writing a checkpoint ----------------------------------------------------------------------------


def check_folder_out(out: str | Path, *, force: bool = False) -> Path:
    """Refuse an ``out`` that exists without ``force``, or that ``--force`` must not replace (a run
    folder, someone's folder, a checkpoint holding files rolevec did not write): see rolevec.core.outdir."""
    from ..core.outdir import check_checkpoint_out

    return check_checkpoint_out(out, force=force)


def write_folder(out: str | Path, write: Callable[[Path], None], *, force: bool = False) -> Path:
    """Fill a temporary folder beside ``out`` and rename it into place, so ``out`` is never half-written;
    every file in it is listed as rolevec's own, so a later ``--force`` may replace it."""
    from ..core.outdir import claim_checkpoint

    target = check_folder_out(out, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        write(tmp)
        claim_checkpoint(tmp)
        tmp.chmod(0o755)  # mkdtemp makes private folders; a checkpoint is an ordinary one
        for item in tmp.rglob("*"):  # and some writers make private files (safetensors via a temp file)
            item.chmod(0o755 if item.is_dir() else 0o644)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def reload_error(path: Path, original: ModelAdapter, steering: Steering) -> float:
    """Load a saved checkpoint with plain transformers and compare it with hooked steering."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=original.dtype).to(original.device)
    reloaded.eval()
    batch = original.encode([original.render(t) for t in PROBE_TEXTS])
    with torch.inference_mode():
        got = reloaded(**batch.model_kwargs()).logits.float()
    want = steered_logits(original, steering, PROBE_TEXTS)
    return logits_error(want, got)


def save_folded(
    folded: ModelAdapter,
    out: str | Path,
    *,
    manifest: dict[str, Any] | None = None,
    force: bool = False,
    check: tuple[ModelAdapter, Steering] | None = None,
) -> Path:
    """Save a standard Hugging Face checkpoint (safetensors, config, tokenizer, manifest.json).

    With ``check=(original, steering)`` the written folder is reloaded with plain transformers and its
    logits compared with hooked steering before it is moved into place.

    Args:
        folded: The adapter returned by :func:`fold`.
        out: The checkpoint folder to write; written beside and renamed into place, never half-written.
        manifest: Provenance written as ``manifest.json`` in the folder (default: none).
        force: Replace an existing folder that rolevec wrote (default ``False``).
        check: ``(original, steering)`` to verify the written checkpoint before it is moved into place.

    Returns:
        The written folder.

    Example:
        ```python
        folded = fold(adapter, steering)
        save_folded(folded, "checkpoints/doctor-l12-a3", check=(adapter, steering))
        ```
    """
    from ..model.manifest import MANIFEST_NAME, write_manifest

    if check is not None and check[1].mode == "cap":
        raise RolevecError(f"a capping steering cannot be folded into weights: {not_added(check[1])}")
    quantization = _quantization(folded)
    if quantization is not None:
        raise RolevecError(
            f"the model is quantized ({quantization}) and transformers cannot save it: load it "
            "unquantized to fold, or fold with rolevec.steering.folding.fold, which drops a GGUF marker"
        )

    def write(tmp: Path) -> None:
        model: Any = folded.model
        # safetensors (transformers 5 writes nothing else; 4.x defaults to safe_serialization=True)
        model.save_pretrained(str(tmp))
        folded.tokenizer.save_pretrained(str(tmp))
        if manifest is not None:
            write_manifest(tmp / MANIFEST_NAME, manifest)
        if check is not None:
            original, steering = check
            err = reload_error(tmp, original, steering)
            if err > tolerance(original.dtype):
                raise RolevecError(
                    f"the saved checkpoint, reloaded with transformers, differs from hooked steering "
                    f"(relative logit error {err:.1e}); nothing was written. {HOOKED_ADVICE}"
                )

    return write_folder(out, write, force=force)
