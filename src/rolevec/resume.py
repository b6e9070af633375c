"""Deprecated: the resumed-addition scorer is part of :mod:`rolevec.scoring`; this path goes next release."""

from __future__ import annotations

import warnings

from .scoring import (  # noqa: F401
    DEFAULT_MAX_CACHE_BYTES,
    Work,
    cache_batches,
    cache_groups,
    check_resume,
    residual_at,
    score_additions,
    stack_rows,
)

warnings.warn(
    "rolevec.resume moved into rolevec.scoring; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
