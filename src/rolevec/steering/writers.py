"""Which residual writer of a block takes a folded addition's bias, and the config switch that makes a
loader read it: folding writes the bias there, and the serving targets check that their loader keeps it."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..model.loading import ModelAdapter

#: Config switches that give a family's writers a bias, and the writer names each covers.
BIAS_SWITCHES = (("mlp_bias", r"mlp|feed_forward|ffn"), ("attention_bias", r"attn|attention"))


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def bias_plan(adapter: ModelAdapter, block: int) -> tuple[str, str | None] | None:
    """The writer of ``block`` that takes the bias, and the config switch to turn on (if any)."""
    names = adapter.arch.writer_names[block]
    writers = adapter.writers(block)
    for name, writer in reversed(list(zip(names, writers, strict=True))):
        if has_bias(writer):
            return name, None
    for name, writer in reversed(list(zip(names, writers, strict=True))):
        if not isinstance(writer, nn.Linear):
            continue
        child = name.split(".")[0]
        for flag, pattern in BIAS_SWITCHES:
            if re.search(pattern, child) and getattr(adapter.config, flag, None) is False:
                return name, flag
    return None
