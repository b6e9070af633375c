"""Questions scored under steering: the scoring engine (:mod:`.scoring`: prompts, the letter head,
additions resumed from a cached residual), conditions and the test stage (:mod:`.conditions`), the
layer × position × α sweep (:mod:`.sweep`) and the choice of a site on the validation split
(:mod:`.selection`).

It may import :mod:`rolevec.steering` and everything below it. The names of the former
``rolevec.evaluation`` module (``Condition``, ``evaluate_conditions``, ``score``, ...) still import from
here; those that moved to the scorer in 0.1 import with a DeprecationWarning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from .._moved import forwarder

if TYPE_CHECKING:
    from .conditions import Condition as Condition
    from .conditions import evaluate_conditions as evaluate_conditions
    from .conditions import persona_system as persona_system
    from .conditions import score as score

#: Names the 0.1 ``rolevec.evaluation`` module re-exported from the scorer -> where they are now.
_MOVED = {
    **dict.fromkeys(
        (
            "PAPER_TEMPLATE",
            "PromptFormat",
            "Prepared",
            "prepare",
            "length_batches",
            "ItemResult",
            "results_from_logits",
            "Resume",
            "LetterScorer",
            "_batch",
            "iter_scores",
        ),
        "rolevec.evaluation.scoring",
    ),
    **dict.fromkeys(
        (
            "BATCH_OVERHEAD_TOKENS",
            "ACCELERATOR_BATCH_OVERHEAD_TOKENS",
            "batch_overhead_tokens",
            "shares_prefix",
            "plan_batches",
            "state_tolerance",
        ),
        "rolevec.model.batching",
    ),
}


_conditions = forwarder(__name__, ".conditions")


def __getattr__(name: str) -> Any:
    moved = _MOVED.get(name)
    if moved is not None:
        warnings.warn(
            f"rolevec.evaluation.{name} moved to {moved}.{name}; the old path goes next release",
            DeprecationWarning,
            stacklevel=2,
        )
        value = getattr(importlib.import_module(moved), name)
        globals()[name] = value  # warn once: ``from ... import`` reads the name twice
        return value
    return _conditions(name)
