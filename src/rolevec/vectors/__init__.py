"""Role vectors: the vector file and its checks (:mod:`.role_vectors`), their extraction from mean
activations over prompt sets (:mod:`.extraction`), and arithmetic on them (:mod:`.arithmetic`: weighted
and orthogonalised sums, differences, scaling, projecting one role out of another, with provenance).

It may import :mod:`rolevec.data`, :mod:`rolevec.model` and :mod:`rolevec.core`. The names of the former
``rolevec.vectors`` module (``RoleVectors``, ``check_fingerprint``) still import from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._moved import forwarder

if TYPE_CHECKING:
    from .role_vectors import RoleVectors as RoleVectors
    from .role_vectors import check_fingerprint as check_fingerprint

__getattr__ = forwarder(__name__, ".role_vectors")
