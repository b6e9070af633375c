"""Shared-prefix key/value reuse: the chat template's fixed head is computed once per batch, not per row.

Every scored prompt starts with the same template tokens (SmolLM2's default system turn and the user
header are 24 tokens, a fifth of an MMLU prompt). Under causal attention their states depend on nothing
after them, so one row computes their keys and values, under whatever hooks are active, and every row of
the batch attends to copies of them. Steering that differs per row (the sweep's stacked candidates) runs
the prefix once per candidate group instead. The scorer's parity probe compares the result against a
plain full forward, so a model whose cache does not behave this way falls back to full rows.

A :class:`PrefixMemo` carries the states from batch to batch within one run under unchanged hooks: the
head then runs once per run instead of once per batch. A single row of 24 tokens is the least efficient
matrix product of the forward; per batch it cost about a tenth of bfloat16 scoring time on SmolLM2.

Entry points::

    split_prefix(batch, min_length=4, keep=1, at=None) -> PrefixSplit | None   # keep: tokens left per row
    prefix_kv(adapter, split, shift=None) -> PrefixKV          # shift=(layer, [groups, hidden])
    PrefixMemo(run_ids).split(batch, keep) / .states(adapter, split)
    forward_kwargs(adapter, batch, prefix=None, rows_per_group=None) -> dict
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RolevecError
from .hooks import StopForward, hooked, input_hook, output_hook
from .loading import Batch, ModelAdapter

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


def common_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares (0 for no rows)."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        token = first[i]
        if any(r[i] != token for r in rows):
            return i
    return n


def split_prefix(
    batch: Batch, min_length: int = MIN_PREFIX, keep: int = 1, at: int | None = None
) -> PrefixSplit | None:
    """None where sharing does not apply: left padding, an already split batch, or a short common head.

    ``keep``: tokens every row keeps after the cut (the positions the caller reads). ``at``: cut there at
    the latest (a run-wide common head, so that every batch of the run cuts at the same place).
    """
    if batch.padding_side != "right" or batch.prefix_length or batch.input_ids.shape[0] < 2:
        return None
    ids = batch.input_ids
    same = (ids == ids[:1]).all(dim=0).to(torch.int64)
    length = min(int(same.cumprod(dim=0).sum()), int(batch.lengths.min()) - max(1, keep))
    if at is not None:
        length = min(length, at)
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

    def select(self, groups: Sequence[int]) -> PrefixKV:
        """These groups only, in this order."""
        idx = torch.tensor(list(groups), device=self.layers[0][0].device)
        return PrefixKV(
            tuple((k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.layers), self.length
        )

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


class PrefixMemo:
    """Prefix states kept from batch to batch of one run, keyed by the prefix's tokens.

    An entry holds states computed under the hooks active when it was made, so a memo must live no longer
    than that steering: one scoring call under one intervention creates it and drops it. Given the run's
    prompts, every batch cuts at their common head, so the head runs once for the whole run.
    """

    def __init__(self, run_ids: Sequence[Sequence[int]] | None = None, max_entries: int = 8) -> None:
        length = common_length(run_ids) if run_ids else 0
        self.at = length if length >= MIN_PREFIX else None
        self.max_entries = max_entries
        self._entries: dict[tuple[int, ...], PrefixKV] = {}
        self.computed = 0

    def split(self, batch: Batch, keep: int = 1) -> PrefixSplit | None:
        return split_prefix(batch, keep=keep, at=self.at)

    def states(
        self, adapter: ModelAdapter, split: PrefixSplit, compute: Callable[..., PrefixKV] | None = None
    ) -> PrefixKV:
        """The prefix's states, run (by ``compute``, default :func:`prefix_kv`) only when not yet held."""
        key = tuple(int(t) for t in split.prefix_ids.tolist())
        kv = self._entries.get(key)
        if kv is None:
            kv = (compute or prefix_kv)(adapter, split)
            self.computed += 1
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = kv
        return kv


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
