"""The study of the paper as stage functions over one run folder (:mod:`.stages`) and the run that chains
them from a config (:mod:`.pipeline`: prompts, vectors, questions, selection, test, interpret, report).

It may import every layer below it; only :mod:`rolevec.cli` imports it.
"""
