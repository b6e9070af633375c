"""The foundations every other layer uses: safe file writes and text reads (:mod:`.files`), the one
grammar for layers, positions and α (:mod:`.spec`), the append-only records store of a run folder
(:mod:`.records`) and which files of a folder are rolevec's to replace (:mod:`.outdir`).

It imports nothing of rolevec but :mod:`rolevec.errors`; nothing here needs torch.
"""
