"""Shared-prefix key/value reuse: the chat template's fixed head is computed once per batch, not per row.

Every scored prompt starts with the same template tokens (SmolLM2's default system turn and the user
header are 24 tokens, a fifth of an MMLU prompt). Under causal attention their states depend on nothing
after them, so one row computes their keys and values, under whatever hooks are active, and every row of
the batch attends to copies of them. Steering that differs per row (the sweep's stacked candidates) runs
the prefix once per candidate group instead. The scorer's parity probe compares the result against a
plain full forward, so a model whose cache does not behave this way falls back to full rows.

Entry points::

    split_prefix(batch, min_length=4, keep=1) -> PrefixSplit | None   # keep: tokens left per row
    prefix_kv(adapter, split, shift=None) -> PrefixKV          # shift=(layer, [groups, hidden])
    forward_kwargs(adapter, batch, prefix=None, rows_per_group=None) -> dict
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch

from .errors import RolevecError
from .hooks import StopForward, hooked, input_hook, output_hook
from .model import Batch, ModelAdapter

#: Shorter common prefixes are not worth a second forward.
MIN_PREFIX = 4


@dataclass(frozen=True)
class PrefixSplit:
    """A right-padded batch cut after its rows' longest common prefix (at least one token left per row)."""

    prefix_ids: torch.Tensor  # [P]
    suffix: Batch  # the remaining columns; its attention mask still covers the prefix

    @property
    def length(self) -> int:
        return int(self.prefix_ids.shape[0])


def split_prefix(batch: Batch, min_length: int = MIN_PREFIX, keep: int = 1) -> PrefixSplit | None:
    """None where sharing does not apply: left padding, an already split batch, or a short common head.

    ``keep``: tokens every row keeps after the cut (the positions the caller reads).
    """
    if batch.padding_side != "right" or batch.prefix_length or batch.input_ids.shape[0] < 2:
        return None
    ids = batch.input_ids
    same = (ids == ids[:1]).all(dim=0).to(torch.int64)
    length = min(int(same.cumprod(dim=0).sum()), int(batch.lengths.min()) - max(1, keep))
    if length < min_length:
        return None
    suffix = Batch(
        ids[:, length:],
        batch.attention_mask,
        batch.position_ids[:, length:],
        batch.lengths - length,
        "right",
        prefix_length=length,
    )
    return PrefixSplit(ids[0, :length], suffix)


@dataclass(frozen=True)
class PrefixKV:
    """Keys and values of a prefix, per layer ``[groups, kv_heads, P, head_dim]``, one group per steering."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    length: int

    @property
    def groups(self) -> int:
        return int(self.layers[0][0].shape[0])

    def cache(self, rows_per_group: int) -> Any:
        """A fresh transformers cache holding ``rows_per_group`` copies of each group, group-major."""
        from transformers import DynamicCache

        data = [
            (k.repeat_interleave(rows_per_group, dim=0), v.repeat_interleave(rows_per_group, dim=0))
            for k, v in self.layers
        ]
        # No config: every layer keeps all its keys (a sliding-window layer would drop the prefix's head
        # and misplace its mask offset); the attention masks still apply each layer's window.
        return DynamicCache(data)


def _layer_states(cache: Any) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RolevecError("this transformers release's cache has no per-layer states; prefix sharing is off")
    return tuple((layer.keys, layer.values) for layer in layers)


def prefix_kv(
    adapter: ModelAdapter, split: PrefixSplit, shift: tuple[int, torch.Tensor] | None = None
) -> PrefixKV:
    """Run the prefix once per group under the hooks now active; ``shift=(layer, [G, H])`` adds one vector
    per group at the input of ``layer`` (the sweep's candidates). Stops before the final norm."""
    from transformers import DynamicCache

    groups = 1 if shift is None else int(shift[1].shape[0])
    n = split.length
    device = adapter.device
    ids = split.prefix_ids.to(device).unsqueeze(0).expand(groups, n)
    positions = torch.arange(n, device=device).unsqueeze(0).expand(groups, n)
    cache = DynamicCache()

    def stop(x: torch.Tensor) -> None:
        raise StopForward

    pre: list[Any] = []
    if shift is not None:
        layer, vectors = shift
        rows = vectors.to(device=device).unsqueeze(1)
        pre.append((adapter.residual_site(layer), input_hook(lambda x: x + rows.to(x.dtype))))
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": positions,
        adapter.cache_argument: cache,
        "use_cache": True,
    }
    post = [(adapter.final_norm, output_hook(stop))]
    with torch.inference_mode(), hooked(pre=pre, post=post), suppress(StopForward):
        adapter.model(**kwargs)
    layers = _layer_states(cache)
    if len(layers) != adapter.n_layers or any(k is None or k.shape[-2] != n for k, _ in layers):
        raise RolevecError("the prefix cache does not hold every layer's keys; prefix sharing is off")
    return PrefixKV(layers, n)


def forward_kwargs(
    adapter: ModelAdapter, batch: Batch, prefix: PrefixKV | None = None, rows_per_group: int | None = None
) -> dict[str, Any]:
    """Model keyword arguments for ``batch``; a split batch gets a cache with the prefix's states."""
    if not batch.prefix_length:
        return {**batch.model_kwargs(), "use_cache": False}
    if prefix is None or prefix.length != batch.prefix_length:
        raise RolevecError("a batch split after its common prefix needs that prefix's keys and values")
    rows = int(batch.input_ids.shape[0])
    per = rows_per_group or rows // prefix.groups
    if per * prefix.groups != rows:
        raise RolevecError(f"{rows} rows do not divide into {prefix.groups} prefix group(s)")
    return {**batch.model_kwargs(), adapter.cache_argument: prefix.cache(per), "use_cache": True}
