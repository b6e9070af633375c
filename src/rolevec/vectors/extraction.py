"""Difference-in-means extraction: mean residual activations at every (post-instruction position, layer).

One forward per batch reads the residual at the input of every decoder block and at the final norm's
input (layer n_layers), then stops before the unembedding. Prompts of all sets share one pass in batches
of similar length (little padding; a very long prompt runs alone), and sums go straight into float64
accumulators per set, so memory does not grow with the number of prompts and the result does not depend
on batch size or padding side.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.sources import PromptSet
from ..errors import RolevecError
from ..model.batching import batch_overhead_tokens, plan_batches, shares_prefix, state_tolerance
from ..model.hooks import StopForward, hooked, input_hook
from ..model.loading import Batch, ModelAdapter
from ..model.prefix import PrefixKV, PrefixMemo, forward_kwargs, prefix_kv, split_prefix
from .role_vectors import RoleVectors

DEFAULT_MAX_TOKENS = 2048


def default_max_tokens(adapter: ModelAdapter) -> int:
    """The model's context length (max_position_embeddings / n_positions), else 2048."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(adapter.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class Encoded:
    """Token ids of rendered prompts, and how many had their user text shortened to fit."""

    ids: list[list[int]]
    n_shortened: int


#: Cuts tried by lowering the kept tokens by each overshoot, before a binary search takes over.
SHORTEN_GUESSES = 3


def _tokens(adapter: ModelAdapter, text: str) -> list[int]:
    # verbose=False: a too-long prompt is shortened and reported once here, not also by transformers
    enc = adapter.tokenizer(text, add_special_tokens=adapter.chat.add_special_tokens, verbose=False)
    return list(enc["input_ids"])


def _user_tokens(adapter: ModelAdapter, user: str) -> tuple[list[int], list[int] | None]:
    """The user text's token ids and, for a fast tokenizer, where in the text each prefix ends."""
    tok = adapter.tokenizer
    try:
        enc = tok(user, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer has no offsets
        return list(tok(user, add_special_tokens=False, verbose=False)["input_ids"]), None
    return list(enc["input_ids"]), list(accumulate((int(end) for _, end in offsets), max))


def _shorten(adapter: ModelAdapter, user: str, ids: list[int], max_tokens: int) -> list[int]:
    """Cut the user text (never the template) so that the rendered prompt fits in ``max_tokens``.

    The long text is tokenised once; its offsets give the cut as a verbatim prefix of it. Re-rendering
    checks the cut (tokens can merge differently there): a few overshoot corrections, then a binary
    search, so even a pathological tokenizer costs ~20 short tokenisations, not one per token.
    """
    user_ids, ends = _user_tokens(adapter, user)
    budget = max_tokens - (len(ids) - len(user_ids))  # what the template leaves for the user text

    def render(keep: int) -> list[int]:
        if ends is not None:
            text = user[: ends[keep - 1]].strip()
        else:
            text = str(adapter.tokenizer.decode(user_ids[:keep], skip_special_tokens=True)).strip()
        return _tokens(adapter, adapter.render(text))

    hi = min(budget, len(user_ids) - 1)  # the most user tokens that can fit (and fewer than all)
    guess = hi
    for _ in range(SHORTEN_GUESSES):
        if guess < 1:
            break
        out = render(guess)
        if len(out) <= max_tokens:
            return out
        hi = guess - 1
        guess -= max(1, len(out) - max_tokens)
    lo, best = 1, None  # the largest cut in [lo, hi] that fits
    while lo <= hi:
        mid = (lo + hi) // 2
        out = render(mid)
        if len(out) <= max_tokens:
            best, lo = out, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise RolevecError(
            f"the chat template takes {len(ids) - len(user_ids)} of max_tokens={max_tokens} tokens and "
            "leaves no room for the prompt: pass a larger `max_tokens`"
        )
    return best


def encode_prompts(
    adapter: ModelAdapter, prompts: Sequence[str], *, max_tokens: int | None = None
) -> Encoded:
    """Render each prompt as the user turn (no system prompt) and tokenise it, checking the template suffix.

    A prompt longer than ``max_tokens`` (default: the model's context) has its user text shortened.
    """
    limit = default_max_tokens(adapter) if max_tokens is None else max_tokens
    if limit < 1:
        raise RolevecError(f"max_tokens must be positive, not {limit}")
    suffix = list(adapter.chat.suffix_ids)
    out: list[list[int]] = []
    shortened = 0
    for prompt in prompts:
        ids = _tokens(adapter, adapter.render(prompt))
        if len(ids) > limit:
            ids = _shorten(adapter, prompt, ids, limit)
            shortened += 1
        if ids[-len(suffix) :] != suffix:
            raise RolevecError(
                f"prompt {prompt[:60]!r} does not end with the template's post-instruction tokens "
                f"{adapter.chat.position_tokens()} after tokenisation; remove trailing special characters "
                "from it or pass another prompt file"
            )
        out.append(ids)
    return Encoded(out, shortened)


def _accumulate(
    adapter: ModelAdapter,
    encoded: Sequence[Sequence[int]],
    set_index: Sequence[int],
    n_sets: int,
    *,
    batch_size: int,
    padding_side: str,
    bar: Any,
    share_prefix: bool | None = None,
) -> torch.Tensor:
    """Sum of activations per set, float64 ``[n_sets, P, n_layers + 1, H]`` (one pass over all prompts).

    ``share_prefix`` (default: on a CPU only, see ``batching.shares_prefix``) runs the common head once.
    """
    if batch_size < 1:
        raise RolevecError(f"batch size must be at least 1, not {batch_size}")
    if padding_side not in {"left", "right"}:
        raise RolevecError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    n_pos = adapter.chat.n_positions
    n_sites = adapter.n_layers + 1
    device = adapter.device
    acc_device = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
    sums = torch.zeros(n_sets, n_pos, n_sites, adapter.hidden_size, dtype=torch.float64, device=acc_device)
    offsets = torch.arange(-n_pos + 1, 1, device=device)
    state: dict[str, torch.Tensor] = {}
    # Where a reader puts what it picked: None adds to ``sums``; a dict keeps it per layer (the check).
    captured: list[dict[int, torch.Tensor] | None] = [None]

    def reader(layer: int) -> Any:
        def fn(hidden: torch.Tensor) -> None:
            if "rows" not in state:  # a shared prefix's own forward: nothing to read there
                return None
            # Under a device map each block's input is on its own device; the sums stay on one.
            rows, cols = state["rows"].to(hidden.device), state["cols"].to(hidden.device)
            picked = hidden[rows[:, None], cols].to(acc_device, torch.float64)  # [B, P, H]
            keep = captured[0]
            if keep is None:
                sums[:, :, layer].index_add_(0, state["sets"], picked)
            else:
                keep[layer] = picked
            if layer == adapter.n_layers:
                raise StopForward
            return None

        return fn

    def read(batch: Batch, prefix: PrefixKV | None, chunk: Sequence[int]) -> None:
        state["rows"] = torch.arange(len(chunk), device=device)
        state["cols"] = batch.last_index()[:, None] + offsets[None, :]
        state["sets"] = torch.tensor([set_index[i] for i in chunk], device=acc_device)
        try:
            adapter.model(**forward_kwargs(adapter, batch, prefix))
        except StopForward:
            pass
        else:
            raise RolevecError("the forward pass never reached the final norm; check `block_pattern`")
        finally:
            state.clear()

    def agrees(rows: Sequence[int]) -> bool | None:
        """Read a few prompts whole and split after their common prefix (None: they share none)."""
        sub = adapter.pad([encoded[i] for i in rows], padding_side=padding_side)
        parts = split_prefix(sub, keep=n_pos)
        if parts is None:
            return None
        reads: list[dict[int, torch.Tensor]] = [{}, {}]
        for keep, (b, p) in zip(reads, ((sub, None), (parts.suffix, prefix_kv(adapter, parts))), strict=True):
            captured[0] = keep
            try:
                read(b, p, rows)
            finally:
                captured[0] = None
        ref = torch.stack([reads[0][k] for k in sorted(reads[0])])
        got = torch.stack([reads[1][k] for k in sorted(reads[0])])
        error = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
        if error <= state_tolerance(adapter.dtype, adapter.n_layers):
            return True
        warnings.warn(
            f"sharing the prompts' common prefix changes activations by {error:.2e} (relative) on "
            f"{adapter.name}; reading full rows instead (slower)",
            stacklevel=4,
        )
        return False

    pre = [(adapter.residual_site(layer), input_hook(reader(layer))) for layer in range(n_sites)]
    # Longest first, cut where padding plus per-forward overhead is least: one very long prompt gets a
    # batch of its own instead of padding batch_size - 1 short ones to its length.
    batches = plan_batches(
        [len(e) for e in encoded], batch_size, overhead_tokens=batch_overhead_tokens(device)
    )
    if share_prefix is None:  # a model split over devices reads full rows, as the scorer does
        share_prefix = shares_prefix(device) and len(adapter.devices) == 1
    check_key = ("extraction-shared-prefix", str(adapter.dtype), padding_side, n_pos)
    unchecked = share_prefix and check_key not in adapter.checks
    share_prefix = share_prefix and adapter.checks.get(check_key, True)
    # The readers are the only hooks, so one head serves every batch.
    memo = PrefixMemo(encoded) if share_prefix else None
    with torch.inference_mode(), hooked(pre=pre):
        for chunk in batches:
            batch = adapter.pad([encoded[i] for i in chunk], padding_side=padding_side)
            # The template's head (and any common start) runs once; the read positions stay in the rest.
            parts = memo.split(batch, keep=n_pos) if memo is not None else None
            if parts is not None and unchecked:  # two prompts of the first split batch, both ways
                verdict = agrees(chunk[-2:])
                if verdict is not None:
                    unchecked = False
                    adapter.checks[check_key] = verdict
                    if not verdict:
                        memo = parts = None
            if memo is None or parts is None:
                read(batch, None, chunk)
            else:
                read(parts.suffix, memo.states(adapter, parts, prefix_kv), chunk)
            bar.update(len(chunk))
    return sums.cpu()


def _bar(total: int, desc: str, progress: bool) -> Any:
    return tqdm(total=total, desc=desc or "prompts", unit="prompt", file=sys.stderr, disable=not progress)


def _warn_shortened(n: int, max_tokens: int | None, adapter: ModelAdapter) -> None:
    if n:
        limit = default_max_tokens(adapter) if max_tokens is None else max_tokens
        warnings.warn(
            f"{n} prompt(s) were longer than max_tokens={limit}; their user text was shortened "
            "(template tokens kept)",
            stacklevel=3,
        )


def mean_activations(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    padding_side: str = "right",
    max_tokens: int | None = None,
    progress: bool = True,
    desc: str = "",
) -> torch.Tensor:
    """Mean residual activation over ``prompts``: float64 ``[n_positions, n_layers + 1, hidden]``.

    Each prompt is wrapped in the model's chat template; positions are the post-instruction tokens
    (``adapter.chat.positions``), layer L is the input of block L and layer n_layers the final output.

    Args:
        adapter: The model to read activations from.
        prompts: The user prompts to average over (at least one).
        batch_size: Prompts per forward (default 16); the mean does not depend on it.
        padding_side: ``right`` (default) or ``left``; the mean does not depend on it.
        max_tokens: Longer prompts have their user text shortened (default: the model's context).
        progress: Show a progress bar.
        desc: The progress bar's label.

    Returns:
        The mean as a float64 tensor.

    Example:
        ```python
        adapter = load_model()
        mu = mean_activations(adapter, ["Explain photosynthesis.", "Describe a cell."], batch_size=8)
        mu.shape  # (n_positions, adapter.n_layers + 1, adapter.hidden_size)
        ```
    """
    if not prompts:
        raise RolevecError("cannot average over an empty prompt set: pass at least one prompt")
    encoded = encode_prompts(adapter, prompts, max_tokens=max_tokens)
    _warn_shortened(encoded.n_shortened, max_tokens, adapter)
    with _bar(len(prompts), desc, progress) as bar:
        sums = _accumulate(
            adapter,
            encoded.ids,
            [0] * len(prompts),
            1,
            batch_size=batch_size,
            padding_side=padding_side,
            bar=bar,
        )
    return sums[0] / len(prompts)


def extract_role_vectors(
    adapter: ModelAdapter,
    role_sets: Mapping[str, PromptSet],
    base: PromptSet,
    *,
    batch_size: int = 16,
    seed: int | None = None,
    progress: bool = True,
    max_tokens: int | None = None,
) -> RoleVectors:
    """μ_role for every role and ν_base, in one pass; d = μ − ν is derived by :class:`RoleVectors`.

    ``seed`` is the seed the sets were sampled with; it is recorded in the metadata.

    Args:
        adapter: The model to read activations from.
        role_sets: Role name -> its prompt set D_r.
        base: The base prompt set D_base (:func:`load_base`); a role may not share its name.
        batch_size: Prompts per forward (default 16); the means do not depend on it.
        seed: The seed the sets were sampled with, for the metadata only.
        progress: Show a progress bar.
        max_tokens: Longer prompts have their user text shortened (default: the model's context).

    Returns:
        The :class:`RoleVectors`, ready to ``save``.

    Example:
        ```python
        adapter = load_model()
        roles = {r: sample(load_role_prompts(r), 64, seed=42) for r in ("doctor", "lawyer")}
        vectors = extract_role_vectors(adapter, roles, sample(load_base(), 64, seed=42), seed=42)
        vectors.save("runs/mine/vectors.safetensors")
        ```
    """
    from .._version import __version__

    if not role_sets:
        raise RolevecError("no roles to extract: pass at least one role")
    if base.name in role_sets or "__base__" in role_sets:
        raise RolevecError(f"a role may not be called {base.name!r} or '__base__': rename it")
    sets: list[tuple[str, PromptSet]] = [*role_sets.items(), ("__base__", base)]
    for name, ps in sets:
        if not ps.prompts:
            raise RolevecError(f"prompt set {name!r} ({ps.source}) is empty: pass at least one prompt")
    all_prompts = [p for _, ps in sets for p in ps.prompts]
    set_index = [i for i, (_, ps) in enumerate(sets) for _ in ps.prompts]
    encoded = encode_prompts(adapter, all_prompts, max_tokens=max_tokens)
    _warn_shortened(encoded.n_shortened, max_tokens, adapter)
    with _bar(len(all_prompts), "extracting", progress) as bar:
        sums = _accumulate(
            adapter,
            encoded.ids,
            set_index,
            len(sets),
            batch_size=batch_size,
            padding_side="right",
            bar=bar,
        )
    means = {name: (sums[i] / len(ps.prompts)).float() for i, (name, ps) in enumerate(sets)}
    base_mean = means.pop("__base__")
    metadata: dict[str, Any] = {
        "model": adapter.name,
        "model_fingerprint": adapter.fingerprint(),
        "model_source": dict(adapter.source),
        "hidden_size": adapter.hidden_size,
        "n_layers": adapter.n_layers,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "prompts": {name: ps.describe() for name, ps in role_sets.items()},
        "base": base.describe(),
        "seed": seed,
        "max_tokens": default_max_tokens(adapter) if max_tokens is None else max_tokens,
        "n_shortened": encoded.n_shortened,
        "system_prompt": None,
        "accumulation": "float64 sums, stored as float32",
        "rolevec_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return RoleVectors(
        role_means=means,
        base_mean=base_mean,
        positions=tuple(adapter.chat.positions),
        position_tokens=tuple(adapter.chat.position_tokens()),
        metadata=metadata,
    )
