"""How prompts are grouped into forward passes on a device, and how far two computations of the same
states may differ.

Scoring and extraction both run many prompts through the model; they share this planner, the device
policy for the shared-prefix memo and the numeric tolerances, so extraction does not depend on the scorer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import RolevecError

#: The cost of one more forward call, in padded tokens (Python, hooks, the shared prefix's own forward).
BATCH_OVERHEAD_TOKENS = 64
#: The same on a GPU, where a forward of a 1B–8B model is bound by its kernel launches and Python up to
#: thousands of tokens: on an H200, 128 questions at batch 64 cut into 13 forwards (the CPU's overhead)
#: scored no faster than 16 forwards of 8 with full logits.
ACCELERATOR_BATCH_OVERHEAD_TOKENS = 1024


def batch_overhead_tokens(device: torch.device) -> int:
    """What one more forward costs on ``device``, in padded tokens (see ``plan_batches``)."""
    return BATCH_OVERHEAD_TOKENS if device.type == "cpu" else ACCELERATOR_BATCH_OVERHEAD_TOKENS


def shares_prefix(device: torch.device) -> bool:
    """Whether scoring and extraction run the prompts' common head once (see :mod:`rolevec.model.prefix`).

    On a CPU it saves the head's tokens in every row. On an H200 the head's own forward and the per-batch
    cache copies cost more than that: length-planned batches with full logits and no sharing outscored
    the shared fast path on the SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B shapes (912/813/231 against
    801/686/232 questions/s), so accelerators read full rows.
    """
    return device.type == "cpu"


def plan_batches(
    lengths: Sequence[int],
    max_rows: int,
    *,
    max_tokens: int | None = None,
    overhead_tokens: int = BATCH_OVERHEAD_TOKENS,
) -> list[list[int]]:
    """Indices in batches of similar length, longest first, cut where padding plus per-batch overhead is
    least (a dynamic programme over the sorted lengths; each batch costs rows × its longest row + overhead).

    ``max_rows`` bounds the rows of a batch and ``max_tokens`` its rows × width (a row longer than that
    still forms a batch of one).
    """
    if max_rows < 1:
        raise RolevecError(f"batch size must be at least 1, not {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end - 1, max(-1, end - 1 - max_rows), -1):
            rows = end - start
            width = lengths[order[start]]
            if rows > 1 and max_tokens is not None and rows * width > max_tokens:
                break
            cost = best[start] + rows * width + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches: list[list[int]] = []
    end = n
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def logit_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing two ways of computing the same logits."""
    return (1e-4, 1e-4) if dtype == torch.float32 else (5e-2, 2e-2)


def state_tolerance(dtype: torch.dtype, n_layers: int) -> float:
    """Relative error (of a whole state, by norm) allowed between two ways of computing the same residual
    states. Half-precision rounding grows with depth, about eps·√layers: SmolLM2 in bfloat16 gives 2e-2
    for the same rows in batches of 2 and 16. A broken prefix cache gives 0.3 and more there."""
    return max(logit_tolerance(dtype)[1], float(torch.finfo(dtype).eps) * math.sqrt(n_layers + 1))
