"""Options shared by the steering commands (generate, fold, export), checked cheapest-first.

Everything that can be checked without the model (output folder, α, role, layer, position) is checked
before the model loads, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.files import read_text
from ..errors import RolevecError, path_problem

if TYPE_CHECKING:
    from ..model.loading import ModelAdapter
    from ..vectors.role_vectors import RoleVectors

#: Layer used when neither --layer nor a selection gives one: 40% of the way up the stack.
DEFAULT_LAYER_FRACTION = 0.4


def add_vector_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_argument_group("role vector")
    group.add_argument(
        "--vectors", required=required, default=None, help="vector file written by `rolevec extract`"
    )
    group.add_argument(
        "--role",
        default=None,
        help="role to steer toward (in the file)" + ("; this or --compose is required" if required else ""),
    )
    add_compose_args(group)
    group.add_argument(
        "--position",
        type=int,
        default=None,
        help="post-instruction position the vector is taken from, -k..-1 (default -1)",
    )
    group.add_argument(
        "--allow-other-model",
        action="store_true",
        help="apply vectors whose model fingerprint differs from the loaded model",
    )


#: What ``--compose`` does in the steering commands (a command that only reads a direction says its own).
COMPOSE_HELP = (
    "steer with several roles of the file at once, weighted (e.g. doctor:1,lawyer:-0.5; a role without :W "
    "weighs 1); replaces --role"
)


def add_compose_args(group: Any, *, help: str = COMPOSE_HELP) -> None:
    """``--compose ROLE:W,...`` and ``--compose-mode`` (to an argument group or parser)."""
    group.add_argument("--compose", default=None, metavar="ROLE:W,...", help=help)
    group.add_argument(
        "--compose-mode",
        default="sum",
        choices=["sum", "orthogonal"],
        help="sum: Σ w·d (default); orthogonal: each role's vector with the earlier ones projected out first",
    )


def parse_compose_arg(text: str) -> list[tuple[str, float]]:
    """``--compose`` parsed before anything loads (names and weights; the roles are checked on the file)."""
    from ..vectors.arithmetic import parse_composition

    try:
        return parse_composition(text)
    except RolevecError as exc:
        raise RolevecError(f"--compose: {exc}") from None


def steer_vectors(args: argparse.Namespace) -> tuple[RoleVectors, str]:
    """The vector file and the role to steer with: ``--role`` as it is, or ``--compose``'s terms combined
    into one role (named canonically, e.g. ``doctor:1,lawyer:-0.5``) whose provenance rides in its
    metadata."""
    compose_text = getattr(args, "compose", None)
    if compose_text is not None and args.role:
        raise RolevecError("pass either --role ROLE or --compose ROLE:W,..., not both")
    if compose_text is None and not args.role:
        raise RolevecError("pass --role ROLE (or --compose ROLE:W,... to steer with several roles)")
    if compose_text is not None and getattr(args, "selection", None):
        raise RolevecError(
            "a selection file holds a site per role, not per composition: with --compose pass --layer "
            "(and --alpha) instead of --selection"
        )
    terms = parse_compose_arg(compose_text) if compose_text is not None else None
    vectors = load_vectors(args.vectors)
    if terms is None:
        return vectors, str(args.role)
    mix = composed(vectors, terms, args.compose_mode, label=f"--compose {compose_text}")
    return mix, mix.roles[0]


def composed(
    vectors: RoleVectors, terms: str | Sequence[tuple[str, float]], mode: str, *, label: str
) -> RoleVectors:
    """``terms`` (text or parsed) composed from ``vectors`` into one role; a bad term or a role the file
    lacks is one error line that starts with ``label`` (the flag and what was typed)."""
    from ..vectors.arithmetic import compose

    try:
        return compose(vectors, terms, mode=mode)
    except RolevecError as exc:
        raise RolevecError(f"{label}: {exc}") from None


def add_strength_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--alpha", type=float, default=None, help="addition strength α (x ← x + α·d)")
    group.add_argument(
        "--ablate", action="store_true", help="directional ablation: remove d̂ from the residual stream"
    )


def check_alpha_arg(alpha: float | None) -> None:
    from ..core.spec import check_alpha

    if alpha is not None:
        check_alpha(alpha, field="--alpha")


def load_vectors(path: str) -> RoleVectors:
    from ..vectors.role_vectors import RoleVectors

    return RoleVectors.load(path)


def default_layer(n_layers: int) -> int:
    """round(0.4 · n_layers), at least 1: early-middle layers, where role directions are well formed."""
    return max(1, min(n_layers, round(DEFAULT_LAYER_FRACTION * n_layers)))


@dataclass
class Choice:
    """Layer, position and α for one role, with where each came from."""

    layer: int
    position: int
    alpha: float | None
    origin: str


def read_selection(path: str, role: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The selection file (written by `rolevec sweep`/`evaluate`) and its entry for ``role``."""
    p = Path(path)
    if not p.is_file():
        raise RolevecError(f"selection file {p} {path_problem(p)}: pass the JSON written by `rolevec sweep`")
    text = read_text(p, what="selection file")  # BOM-transparent; bad bytes are one line naming it
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RolevecError(f"{p} is not a readable JSON selection file ({exc})") from None
    roles = data.get("roles") if isinstance(data, dict) else None
    if not isinstance(roles, dict):
        raise RolevecError(f"{p} has no 'roles' table: pass a selection file written by `rolevec sweep`")
    if role not in roles or not isinstance(roles[role], dict):
        known = ", ".join(sorted(roles)) or "none"
        raise RolevecError(f"role {role!r} is not in selection {p} (it has: {known})")
    return data, roles[role]


def choose(
    args: argparse.Namespace, vectors: RoleVectors, *, need_alpha: bool, role: str | None = None
) -> tuple[Choice, dict[str, Any] | None]:
    """Explicit options win; then the selection file; then the documented defaults."""
    selection: dict[str, Any] | None = None
    entry: dict[str, Any] = {}
    role = role if role is not None else args.role
    if getattr(args, "selection", None):
        selection, entry = read_selection(args.selection, str(role))
    origin = f"selection {args.selection}" if selection is not None else "defaults"
    if selection is not None:
        given = {"layer": args.layer, "position": args.position, "alpha": args.alpha}
        no_alpha = args.ablate or not need_alpha
        needed = [k for k, v in given.items() if v is None and not (k == "alpha" and no_alpha)]
        from ..evaluation.selection import (
            entry_problem,  # not at the top: `rolevec --help` must not import torch
        )

        problem = entry_problem(entry, needed)
        if problem:
            raise RolevecError(
                f"{origin}: the entry for {role!r} has {problem}: pass a selection.json written by "
                f"`rolevec sweep`, or {' '.join('--' + k for k in needed)}"
            )
    layer = args.layer if args.layer is not None else entry.get("layer")
    if layer is None:
        layer = default_layer(vectors.n_layers)
    position = args.position if args.position is not None else entry.get("position", -1)
    alpha = args.alpha if args.alpha is not None else entry.get("alpha")
    if need_alpha and not args.ablate and alpha is None:
        raise RolevecError(
            "addition needs a strength: pass --alpha A (the paper uses 1 or 3) or --selection FILE"
        )
    if args.ablate:
        alpha = None
    try:
        choice = Choice(int(layer), int(position), None if alpha is None else float(alpha), origin)
    except (TypeError, ValueError):
        raise RolevecError(
            f"{origin} gives layer {layer!r}, position {position!r}, alpha {alpha!r}: these must be numbers; "
            "pass --layer/--position/--alpha or a selection.json written by `rolevec sweep`"
        ) from None
    return choice, selection


def check_selection_model(selection: dict[str, Any] | None, adapter: ModelAdapter, allow: bool) -> None:
    if selection is None:
        return
    theirs = selection.get("model_fingerprint")
    if theirs and theirs != adapter.fingerprint() and not allow:
        raise RolevecError(
            f"the selection was made on {selection.get('model')!r} (fingerprint {theirs}), not on "
            f"{adapter.name!r} ({adapter.fingerprint()}): pass that model, or --allow-other-model"
        )


def add_cap_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("projection capping")
    group.add_argument(
        "--cap",
        default=None,
        metavar="LO:HI",
        help="cap the projection x·d̂ on the role's unit direction to [LO, HI] instead of adding "
        "(activation capping; write --cap=-2:5 when LO is negative); replaces --alpha/--ablate",
    )
    group.add_argument(
        "--cap-layers",
        default=None,
        metavar="L,L,...",
        help="layers whose input is capped (default: the steering layer alone)",
    )


def parse_cap(text: str) -> tuple[float, float]:
    """``LO:HI`` as two finite numbers with LO ≤ HI (checked before the model loads)."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise RolevecError(f"--cap takes LO:HI, two numbers (e.g. -2:5), not {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RolevecError(f"--cap takes two finite numbers LO:HI (e.g. -2:5), not {text!r}")
    if lo > hi:
        raise RolevecError(f"--cap range {text!r} has LO > HI: pass LO:HI with LO ≤ HI (e.g. -2:5)")
    return lo, hi


def parse_cap_layers(text: str) -> list[int]:
    """``10,11,12`` as a list of layers (their range is checked against the vector file)."""
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise RolevecError(
            f"--cap-layers takes layers separated by commas (e.g. 10,11,12), not {text!r}"
        ) from None
    return layers
