"""Prompt and question data: the role and base prompt sets with their built-in copies (:mod:`.sources`,
files in ``builtin/``), writing new prompt sets with a model (:mod:`.prompts`) and multiple-choice
questions and their validation/test split (:mod:`.mcq`).

It may import :mod:`rolevec.model` and :mod:`rolevec.core`. The names of the former ``rolevec.data``
module (``load_prompts``, ``PromptSet``, ...) still import from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sources import (
        PromptSet as PromptSet,
    )
    from .sources import (
        available_roles as available_roles,
    )
    from .sources import (
        load_base as load_base,
    )
    from .sources import (
        load_prompts as load_prompts,
    )
    from .sources import (
        load_role_prompts as load_role_prompts,
    )
    from .sources import (
        sample as sample,
    )


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module(".sources", __name__), name)
