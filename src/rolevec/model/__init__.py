"""The language model and what runs through it: loading any Hugging Face causal LM or a GGUF file into a
:class:`~rolevec.model.loading.ModelAdapter` (:mod:`.loading`), scoped forward hooks (:mod:`.hooks`), the
shared-prefix memo (:mod:`.prefix`), batch planning and tolerances (:mod:`.batching`), the manifest of a
run (:mod:`.manifest`) and tiny random models for tests (:mod:`.testing`).

It may import :mod:`rolevec.core`; nothing about roles, vectors or questions lives here. The names of the
former ``rolevec.model`` module (``load_model``, ``ModelAdapter``, ...) still import from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._moved import forwarder

if TYPE_CHECKING:
    from .loading import ArchitectureMap as ArchitectureMap
    from .loading import Batch as Batch
    from .loading import ChatFormat as ChatFormat
    from .loading import ModelAdapter as ModelAdapter
    from .loading import load_model as load_model

__getattr__ = forwarder(__name__, ".loading")
