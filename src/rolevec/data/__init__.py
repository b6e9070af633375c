"""Prompt and question data: the role and base prompt sets with their built-in copies (:mod:`.sources`,
files in ``builtin/``), writing new prompt sets with a model (:mod:`.prompts`) and multiple-choice
questions and their validation/test split (:mod:`.mcq`).

It may import :mod:`rolevec.model` and :mod:`rolevec.core`. The names of the former ``rolevec.data``
module (``load_prompts``, ``PromptSet``, ...) still import from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._moved import forwarder

if TYPE_CHECKING:
    from .sources import PromptSet as PromptSet
    from .sources import available_roles as available_roles
    from .sources import load_base as load_base
    from .sources import load_prompts as load_prompts
    from .sources import load_role_prompts as load_role_prompts
    from .sources import sample as sample

__getattr__ = forwarder(__name__, ".sources")
