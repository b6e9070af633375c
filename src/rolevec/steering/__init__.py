"""Steering with a vector: the one intervention type, :class:`~rolevec.steering.interventions.Steering`
(addition or ablation, applied as scoped hooks), and what is built on it: generation
(:mod:`.generation`), weights with the intervention folded in (:mod:`.folding`, on the residual writers
of :mod:`.writers`), which serving engines keep such a fold (:mod:`.targets`) and export to llama.cpp and
lm-evaluation-harness (:mod:`.export`).

It may import :mod:`rolevec.vectors`, :mod:`rolevec.model` and :mod:`rolevec.core`; it knows nothing of
questions or run folders' records.
"""
