"""Reading results: role × domain tables and paired tests (:mod:`.tables`, with :mod:`.stats`), the
geometry of the vectors (:mod:`.geometry`), what a vector means (:mod:`.interpret`: patch-scoping and the
logit lens), projections of prompts on a vector (:mod:`.projection`, for ranking data) and of every
token (:mod:`.monitor`, drawn by :mod:`.monitor_page`), the figures
(:mod:`.figures`) and the report of a run folder (:mod:`.report`).

It may import :mod:`rolevec.steering` (interpretation steers the model) and everything below it, not the
scorer. The names of the former ``rolevec.analysis`` module (``analyse``, ``load_records``, ...) still
import from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._moved import forwarder

if TYPE_CHECKING:
    from .tables import Analysis as Analysis
    from .tables import analyse as analyse
    from .tables import load_records as load_records

__getattr__ = forwarder(__name__, ".tables")
