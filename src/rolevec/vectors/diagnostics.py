"""Which role vectors to trust: consistency, separation and stability of d = μ_role − ν_base at one site.

A difference of means always exists, even between two sets of noise; these diagnostics say whether it is
more than that. Each is computed from one activation per prompt at the chosen (layer, position) only, so
memory is O(prompts × hidden), and each is set against the same statistic of random directions of the
same norm, whose 95th percentile is the bar a vector must clear:

- consistency: the mean cosine between each role prompt's own difference from ν_base and d — do the
  prompts agree on the direction, or does a few of them carry the mean?
- separation: the AUROC of projections on d/|d| of role prompts against base prompts, cross-fitted: the
  prompts of each fold are scored with a vector built from the other folds, so a direction fitted to
  noise scores 0.5, not more;
- stability: the mean cosine between vectors from bootstrap resamples of the prompts (and the cosine of
  the two split halves' vectors) — would other prompts of the same kind give the same vector?

For the random null, consistency and separation are those of each random direction; its stability is the
cosine between two independent random directions (what resamples that share no direction would give).

Random directions are a weak bar for consistency and stability: the vector of two sets of pure noise is
the mean of its own prompts' differences, so its prompts agree with it and its resamples with each other
far more than random directions do. The second null asks the right question of them, "would a split of
these same prompts that ignores the role do as well?": the role and base prompts are pooled and dealt
into two sets of the original sizes again and again (label shuffles), and every diagnostic is computed
for each shuffle exactly as for the real split. A vector is flagged on a diagnostic that does not beat
the 95th percentile of either null.

On request the same diagnostics are computed at every layer (:func:`diagnose_layers`, ``rolevec
diagnose``): each prompt set is read once, all layers in one forward per batch
(:func:`layer_activations`), which holds prompts × layers × hidden float32 numbers and nothing else that
grows with the prompt count.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import RolevecError
from ..model.batching import plan_batches
from ..model.hooks import StopForward, hooked, input_hook
from ..model.loading import ModelAdapter
from ..model.prefix import forward_kwargs
from .extraction import _warn_shortened, encode_prompts

#: Defaults: folds of the cross-fitted AUROC, bootstrap resamples, random directions, the seed.
DEFAULT_FOLDS = 5
DEFAULT_BOOTSTRAPS = 20
DEFAULT_RANDOM = 20
#: Label shuffles of the second null (each computes every diagnostic as for the real split).
DEFAULT_SHUFFLES = 20
DEFAULT_SEED = 0
#: The percentile of the random directions' diagnostics a vector must exceed.
NULL_PERCENTILE = 95.0
#: The diagnostics that are checked against the random null, in table order.
CHECKED = ("consistency", "separation", "stability")


def layer_activations(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    layers: Sequence[int],
    position: int,
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "",
) -> torch.Tensor:
    """One residual activation per prompt at ``position`` of each of ``layers``: ``[len(layers),
    len(prompts), hidden]``, in the order ``layers`` are given.

    Read as extraction reads it (chat template, block input, post-instruction position from the end), in
    batches of similar length, every layer in one forward per batch: a hook on each requested block's
    input copies its row, and the forward stops at the highest one, so no later block runs. Memory is the
    result, ``len(layers) × len(prompts) × hidden`` numbers, plus one batch's forward; nothing else grows
    with the prompt count. ``dtype`` (default float32, float64 for a model that computes in float64) is
    what is stored: float32 halves the memory of float64 and loses nothing for float32, bfloat16 and
    float16 models.
    """
    if not prompts:
        raise RolevecError("no prompts to read: pass at least one prompt")
    if batch_size < 1:
        raise RolevecError(f"batch size must be at least 1, not {batch_size}: pass `batch_size` >= 1")
    if position not in adapter.chat.positions:
        raise RolevecError(
            f"position {position} is not a post-instruction position of this template: pass one of "
            f"{adapter.chat.positions} as `position`"
        )
    if not layers:
        raise RolevecError("no layers to read: pass at least one layer")
    if len(set(layers)) != len(layers):
        raise RolevecError(f"layers {list(layers)} name a layer twice: pass each layer once")
    sites = {layer: adapter.residual_site(layer) for layer in layers}  # checks each layer
    top = max(layers)
    if dtype is None:
        dtype = torch.float64 if adapter.dtype == torch.float64 else torch.float32
    encoded = encode_prompts(adapter, prompts, max_tokens=max_tokens)
    _warn_shortened(encoded.n_shortened, max_tokens, adapter)
    acc_device = torch.device("cpu") if adapter.device.type == "mps" else adapter.device
    out = torch.zeros(len(layers), len(prompts), adapter.hidden_size, dtype=dtype, device=acc_device)
    state: dict[str, torch.Tensor] = {}

    def reader(slot: int, layer: int) -> Callable[[torch.Tensor], None]:
        def read(hidden: torch.Tensor) -> None:
            # under a device map each block's input is on its own device; the result stays on one
            rows, cols = state["rows"].to(hidden.device), state["cols"].to(hidden.device)
            out[slot, state["index"]] = hidden[rows, cols].to(acc_device, dtype)
            if layer == top:
                raise StopForward

        return read

    pre = [(sites[layer], input_hook(reader(slot, layer))) for slot, layer in enumerate(layers)]
    batches = plan_batches([len(e) for e in encoded.ids], batch_size)
    bar = tqdm(
        total=len(prompts), desc=desc or "activations", unit="prompt", file=sys.stderr, disable=not progress
    )
    with bar, torch.inference_mode(), hooked(pre=pre):
        for chunk in batches:
            batch = adapter.pad([encoded.ids[i] for i in chunk], padding_side="right")
            state["rows"] = torch.arange(len(chunk))
            state["cols"] = batch.last_index().cpu() + position + 1
            state["index"] = torch.tensor(chunk, device=acc_device)
            try:
                adapter.model(**forward_kwargs(adapter, batch, None))
            except StopForward:
                pass
            else:
                raise RolevecError(f"the forward pass never reached layer {top}; check `block_pattern`")
            finally:
                state.clear()
            bar.update(len(chunk))
    return out.cpu()


def site_activations(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    layer: int,
    position: int,
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
    desc: str = "",
) -> torch.Tensor:
    """One residual activation per prompt at (``layer``, ``position``): float64 ``[len(prompts), hidden]``.

    :func:`layer_activations` at one layer, kept in float64 as it always was; the forward stops at that
    block, so no later layer runs or is kept.
    """
    read = layer_activations(
        adapter,
        prompts,
        [layer],
        position,
        batch_size=batch_size,
        max_tokens=max_tokens,
        dtype=torch.float64,
        progress=progress,
        desc=desc or "diagnostics",
    )
    return read[0]


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann–Whitney U over all pairs."""
    if positive.numel() == 0 or negative.numel() == 0:
        raise RolevecError("AUROC needs at least one score on each side: pass prompts of both sets")
    diff = positive.reshape(-1, 1) - negative.reshape(1, -1)
    wins = (diff > 0).sum().item() + 0.5 * (diff == 0).sum().item()
    return float(wins / diff.numel())


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm: torch.Tensor = v.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    return v / norm


def _consistency(role: torch.Tensor, base_mean: torch.Tensor, direction: torch.Tensor) -> float:
    """Mean cosine between each role prompt's difference from the base mean and ``direction``."""
    own = _unit(role - base_mean)
    return float((own @ _unit(direction)).mean())


def _folds(n: int, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=gen).tensor_split(k))


def _cross_fitted_auroc(role: torch.Tensor, base: torch.Tensor, k: int, gen: torch.Generator) -> float:
    """Pairs within each fold, scored with the vector of the other folds; the share the role side wins."""
    wins, pairs = 0.0, 0
    for r_test, b_test in zip(_folds(len(role), k, gen), _folds(len(base), k, gen), strict=True):
        r_keep = torch.ones(len(role), dtype=torch.bool)
        b_keep = torch.ones(len(base), dtype=torch.bool)
        r_keep[r_test], b_keep[b_test] = False, False
        unit = _unit(role[r_keep].mean(0) - base[b_keep].mean(0))
        n = len(r_test) * len(b_test)
        wins += auroc(role[r_test] @ unit, base[b_test] @ unit) * n
        pairs += n
    return wins / pairs


def _mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    unit = _unit(vectors)
    sims = unit @ unit.T
    n = len(vectors)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def _percentile(values: Sequence[float]) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), NULL_PERCENTILE / 100).item())


@dataclass(frozen=True)
class Diagnostics:
    """The diagnostics of one role vector at one site, with the random-direction thresholds.

    Attributes:
        consistency: Mean cosine of each role prompt's difference from ν_base with d.
        separation: Cross-fitted AUROC of role against base prompts on d/|d|.
        stability: Mean pairwise cosine of the bootstrap vectors.
        split_half: Cosine between the vectors of two random halves of the prompts.
        norm: |d| of the vector from all prompts (the random directions' norm).
        thresholds: Each checked diagnostic's 95th percentile over the random directions.
        flagged: The checked diagnostics that do not beat both of their thresholds (empty: trusted).
        shuffle_thresholds: Each checked diagnostic's 95th percentile over label shuffles of the prompts.
        shuffles: How many label shuffles the second null took.
    """

    layer: int
    position: int
    n_role: int
    n_base: int
    consistency: float
    separation: float
    stability: float
    split_half: float
    norm: float
    thresholds: dict[str, float]
    flagged: tuple[str, ...]
    folds: int
    bootstraps: int
    n_random: int
    seed: int
    shuffle_thresholds: dict[str, float]
    shuffles: int

    def bar(self, name: str) -> float:
        """The value diagnostic ``name`` must exceed: the higher of its two nulls' 95th percentiles."""
        return max(self.thresholds[name], self.shuffle_thresholds[name])

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["flagged"] = list(self.flagged)
        return out


def _bootstrap_stability(
    role: torch.Tensor, base: torch.Tensor, bootstraps: int, gen: torch.Generator
) -> float:
    boot = torch.stack(
        [
            role[torch.randint(len(role), (len(role),), generator=gen)].mean(0)
            - base[torch.randint(len(base), (len(base),), generator=gen)].mean(0)
            for _ in range(bootstraps)
        ]
    )
    return _mean_pairwise_cosine(boot)


def _shuffle_null(
    role: torch.Tensor, base: torch.Tensor, k: int, bootstraps: int, shuffles: int, gen: torch.Generator
) -> dict[str, list[float]]:
    """Every checked diagnostic of ``shuffles`` label shuffles: the prompts pooled and dealt again into
    sets of the original sizes, each scored exactly as the real split is."""
    pooled = torch.cat([role, base])
    n = len(role)
    null: dict[str, list[float]] = {name: [] for name in CHECKED}
    for _ in range(shuffles):
        order = torch.randperm(len(pooled), generator=gen)
        r, b = pooled[order[:n]], pooled[order[n:]]
        b_mean = b.mean(0)
        null["consistency"].append(_consistency(r, b_mean, r.mean(0) - b_mean))
        null["separation"].append(_cross_fitted_auroc(r, b, k, gen))
        null["stability"].append(_bootstrap_stability(r, b, bootstraps, gen))
    return null


def diagnose_activations(
    role: torch.Tensor,
    base: torch.Tensor,
    *,
    layer: int,
    position: int,
    folds: int = DEFAULT_FOLDS,
    bootstraps: int = DEFAULT_BOOTSTRAPS,
    n_random: int = DEFAULT_RANDOM,
    seed: int = DEFAULT_SEED,
    shuffles: int = DEFAULT_SHUFFLES,
) -> Diagnostics:
    """The diagnostics from per-prompt activations at one site (``[n_role, H]`` and ``[n_base, H]``).

    Every random choice (folds, resamples, halves, directions, shuffles) comes from one generator seeded
    with ``seed``, so the result is a function of the activations and the seed. ``folds`` is lowered to
    the smaller prompt count when a set has fewer prompts; the value used is recorded.
    """
    checks = (
        ("folds", folds, 2),
        ("bootstraps", bootstraps, 2),
        ("n_random", n_random, 2),
        ("shuffles", shuffles, 2),
    )
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RolevecError(f"`{name}` must be an integer >= {low}, not {value!r}")
    if role.ndim != 2 or base.ndim != 2 or role.shape[1] != base.shape[1]:
        raise RolevecError(
            f"activations must be [prompts, hidden] of one width, not {tuple(role.shape)} and "
            f"{tuple(base.shape)}: pass the output of site_activations"
        )
    if len(role) < 2 or len(base) < 2:
        raise RolevecError(
            f"diagnostics need at least 2 role and 2 base prompts, not {len(role)} and {len(base)}: "
            "pass more prompts (`n_prompts`, `n_base`)"
        )
    role, base = role.double().cpu(), base.double().cpu()
    gen = torch.Generator().manual_seed(seed)
    base_mean = base.mean(0)
    d = role.mean(0) - base_mean
    norm = float(d.norm())
    k = min(folds, len(role), len(base))

    values = {
        "consistency": _consistency(role, base_mean, d),
        "separation": _cross_fitted_auroc(role, base, k, gen),
    }
    values["stability"] = _bootstrap_stability(role, base, bootstraps, gen)
    halves = [
        t.tensor_split(2)
        for t in (torch.randperm(len(role), generator=gen), torch.randperm(len(base), generator=gen))
    ]
    (r1, r2), (b1, b2) = halves
    v1 = role[r1].mean(0) - base[b1].mean(0)
    v2 = role[r2].mean(0) - base[b2].mean(0)
    split_half = float(_unit(v1) @ _unit(v2))

    random = torch.randn(n_random, role.shape[1], generator=gen, dtype=torch.float64)
    random = _unit(random) * norm
    null: dict[str, list[float]] = {
        "consistency": [_consistency(role, base_mean, r) for r in random],
        "separation": [auroc(role @ _unit(r), base @ _unit(r)) for r in random],
    }
    unit = _unit(random)
    sims = unit @ unit.T
    pairs = torch.triu_indices(n_random, n_random, offset=1)
    null["stability"] = sims[pairs[0], pairs[1]].tolist()
    thresholds = {name: _percentile(null[name]) for name in CHECKED}
    # drawn after everything above, so the values and the random null do not depend on `shuffles`
    shuffled = _shuffle_null(role, base, k, bootstraps, shuffles, gen)
    shuffle_thresholds = {name: _percentile(shuffled[name]) for name in CHECKED}
    flagged = tuple(
        name
        for name in CHECKED
        if not values[name] > max(thresholds[name], shuffle_thresholds[name]) or math.isnan(values[name])
    )
    return Diagnostics(
        layer=layer,
        position=position,
        n_role=len(role),
        n_base=len(base),
        consistency=values["consistency"],
        separation=values["separation"],
        stability=values["stability"],
        split_half=split_half,
        norm=norm,
        thresholds=thresholds,
        flagged=flagged,
        folds=k,
        bootstraps=bootstraps,
        n_random=n_random,
        seed=seed,
        shuffle_thresholds=shuffle_thresholds,
        shuffles=shuffles,
    )


def diagnose(
    adapter: ModelAdapter,
    role_prompts: Sequence[str],
    base_prompts: Sequence[str],
    layer: int,
    position: int,
    *,
    folds: int = DEFAULT_FOLDS,
    bootstraps: int = DEFAULT_BOOTSTRAPS,
    n_random: int = DEFAULT_RANDOM,
    seed: int = DEFAULT_SEED,
    shuffles: int = DEFAULT_SHUFFLES,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Diagnostics:
    """Read both prompt sets at the site and return their :class:`Diagnostics`.

    Example:
        ```python
        adapter = load_model()
        diag = diagnose(adapter, doctor_prompts, base_prompts, layer=12, position=-1)
        print(diag.separation, diag.thresholds["separation"], diag.flagged)
        ```
    """
    read = {
        name: site_activations(
            adapter, prompts, layer, position, batch_size=batch_size, max_tokens=max_tokens, progress=progress
        )
        for name, prompts in (("role", role_prompts), ("base", base_prompts))
    }
    return diagnose_activations(
        read["role"],
        read["base"],
        layer=layer,
        position=position,
        folds=folds,
        bootstraps=bootstraps,
        n_random=n_random,
        seed=seed,
        shuffles=shuffles,
    )


def _check_layers(layers: Sequence[int]) -> list[int]:
    """Layer 0 is refused: its input is the token embedding, and the post-instruction tokens are the same
    template tokens for every prompt, so every role vector there is zero and its diagnostics mean nothing."""
    out = list(layers)
    if 0 in out:
        raise RolevecError(
            "layer 0 is the token embedding: the post-instruction tokens are the same template tokens for "
            "every prompt, so the role vector there is zero and has nothing to diagnose; pass `layers` "
            "from 1 up"
        )
    return out


def diagnose_layer_activations(
    role: torch.Tensor,
    base: torch.Tensor,
    layers: Sequence[int],
    position: int,
    *,
    folds: int = DEFAULT_FOLDS,
    bootstraps: int = DEFAULT_BOOTSTRAPS,
    n_random: int = DEFAULT_RANDOM,
    seed: int = DEFAULT_SEED,
    shuffles: int = DEFAULT_SHUFFLES,
) -> dict[int, Diagnostics]:
    """:func:`diagnose_activations` at each of ``layers``, from ``[len(layers), n, hidden]`` reads of
    :func:`layer_activations`; every layer uses the same ``seed``, so each equals a one-site diagnosis."""
    layers = _check_layers(layers)
    if role.ndim != 3 or base.ndim != 3 or not len(role) == len(base) == len(layers):
        raise RolevecError(
            f"activations must be [layers, prompts, hidden] with one row per layer of {layers}, not "
            f"{tuple(role.shape)} and {tuple(base.shape)}: pass the output of layer_activations"
        )
    return {
        layer: diagnose_activations(
            role[i],
            base[i],
            layer=layer,
            position=position,
            folds=folds,
            bootstraps=bootstraps,
            n_random=n_random,
            seed=seed,
            shuffles=shuffles,
        )
        for i, layer in enumerate(layers)
    }


def diagnose_layers(
    adapter: ModelAdapter,
    role_prompts: Sequence[str],
    base_prompts: Sequence[str],
    layers: Sequence[int],
    position: int,
    *,
    folds: int = DEFAULT_FOLDS,
    bootstraps: int = DEFAULT_BOOTSTRAPS,
    n_random: int = DEFAULT_RANDOM,
    seed: int = DEFAULT_SEED,
    shuffles: int = DEFAULT_SHUFFLES,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict[int, Diagnostics]:
    """The :class:`Diagnostics` of one role's vector at every one of ``layers`` (at one position).

    Each prompt set is read once, all layers in the same forward (:func:`layer_activations`), so memory is
    ``len(layers) × (role + base prompts) × hidden`` float32 numbers; each layer's result equals
    :func:`diagnose` at that layer with the same settings. Layer 0 is refused: its post-instruction
    vectors are zero (the same template tokens for every prompt).

    Example:
        ```python
        adapter = load_model()
        by_layer = diagnose_layers(adapter, doctor_prompts, base_prompts, range(1, 31), -1)
        trusted = [layer for layer, d in by_layer.items() if not d.flagged]
        ```
    """
    layers = _check_layers(layers)
    read = {
        name: layer_activations(
            adapter,
            prompts,
            layers,
            position,
            batch_size=batch_size,
            max_tokens=max_tokens,
            progress=progress,
            desc=name,
        )
        for name, prompts in (("role", role_prompts), ("base", base_prompts))
    }
    return diagnose_layer_activations(
        read["role"],
        read["base"],
        layers,
        position,
        folds=folds,
        bootstraps=bootstraps,
        n_random=n_random,
        seed=seed,
        shuffles=shuffles,
    )


def best_layer(by_layer: Mapping[int, Diagnostics]) -> int:
    """The layer of highest separation; ties (a saturated AUROC) go to the higher consistency, then the
    lower layer."""
    if not by_layer:
        raise RolevecError("no layers diagnosed: pass the result of diagnose_layers for at least one layer")
    return min(by_layer, key=lambda layer: (-by_layer[layer].separation, -by_layer[layer].consistency, layer))
