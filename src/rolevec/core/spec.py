"""One grammar for layers, positions and α, shared by the config, every command and the Python API.

Layers: ``"L"`` or a half-open range ``"a:b"`` (like a Python slice), with ``"a:"`` and ``":b"`` open at
an end (the model's layer count closes it). Positions: ``"-1,-2"`` or ``"all"``. Alphas: ``"1,3"``.
Errors name the field (``layers``, ``positions``, ``alphas``, ``alpha``); the CLI says which flag it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import RolevecError


def check_alpha(alpha: float, *, field: str = "alpha") -> float:
    """α as a float, refused when it is not finite (the one check every path goes through)."""
    value = float(alpha)
    if not math.isfinite(value):
        raise RolevecError(f"{field} must be a finite number, not {alpha}")
    return value


def default_layers(n_layers: int, fraction: float = 0.8) -> tuple[int, int]:
    """The paper's search range, the first ``fraction`` of the layers, as half-open ``[1, b)``.

    Layer 0 is left out: its input is the token embedding, and the post-instruction tokens are the same
    template tokens for every prompt, so every role vector there is exactly zero.
    """
    return 1, max(2, round(fraction * n_layers))


def parse_layer_range(text: str | None, n_layers: int | None) -> tuple[int, int]:
    """``"a:b"``, ``"a:"``, ``":b"`` or ``"L"`` as half-open ``(a, b)``; None: the first 80% of layers.

    ``n_layers`` closes an open end and bounds the range (layers are 0..n_layers); None skips the bound,
    for callers that check layers against a vector file later.
    """
    if text is None:
        if n_layers is None:
            raise RolevecError("layers: pass a layer L or a range a:b")
        return default_layers(n_layers)
    spec = text.strip()
    try:
        if ":" in spec:
            lo, hi = spec.split(":", 1)
            a = int(lo) if lo.strip() else 0
            if hi.strip():
                b = int(hi)
            elif n_layers is None:
                raise RolevecError(f"layers {text!r} is open-ended: pass a closed range a:b")
            else:
                b = n_layers + 1
        else:
            a = int(spec)
            b = a + 1
    except ValueError:
        raise RolevecError(f"layers {text!r} is not a layer or range: pass e.g. 12, 0:24 or 10:") from None
    if a >= b:
        raise RolevecError(f"layers {text!r} is empty (a:b is half-open, b > a): pass e.g. {a}:{a + 1}")
    if a < 0 or (n_layers is not None and b > n_layers + 1):
        top = "" if n_layers is None else f": this model has layers 0..{n_layers}"
        raise RolevecError(f"layers {text!r} is out of range{top}")
    return a, b


def parse_layers(text: str | None, n_layers: int | None = None) -> list[int]:
    """The layers of :func:`parse_layer_range` as a list."""
    a, b = parse_layer_range(text, n_layers)
    return list(range(a, b))


def parse_positions(text: str | None, available: Sequence[int]) -> tuple[int, ...]:
    """``"-1,-2"`` or ``"all"`` (every post-instruction position of the vector file); None: all."""
    if text is None or text.strip() == "all":
        return tuple(available)
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise RolevecError(f"positions {text!r}: pass integers like -1,-2 or all") from None
    bad = [p for p in values if p not in available]
    if bad or not values:
        raise RolevecError(f"positions {text!r}: this vector file has positions {list(available)}")
    return values


def parse_alphas(text: str) -> tuple[float, ...]:
    """``"1,3"`` as distinct finite floats in the given order."""
    try:
        values = tuple(check_alpha(float(t), field="alphas") for t in text.split(",") if t.strip())
    except ValueError:
        raise RolevecError(f"alphas {text!r}: pass numbers like 1,3") from None
    if not values:
        raise RolevecError("alphas is empty: pass e.g. 1,3")
    return tuple(dict.fromkeys(values))
