"""Choosing a role's steering site on the validation grid, by the paper's criterion, and ``selection.json``.

Criterion (paper): a candidate (layer, position, α) qualifies when addition beats the validation baseline
and ablating the same (layer, position) direction does not. Among qualifying candidates the best is
taken by a fixed order of keys, so reruns always pick the same site:

1. higher validation accuracy under addition;
2. lower accuracy under ablation (the model depends more on that direction);
3. smaller α (the gentler intervention);
4. lower layer;
5. position nearer the end of the prompt (-1 before -2).

When nothing qualifies the best addition candidate by the same order is still returned, with
``criterion_met`` false, so a run can go on — and says so. Entry points::

    select(rows) -> Choice
    write_selection(path, adapter, *, split_seed, layers, choices, validation=None, force=False) -> Path
    check_held_out(selection, split, domains)
    load_selection(path, adapter=None) -> dict
    selected_site(selection, role) -> tuple[int, int, float]
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.files import atomic_write, read_text
from ..data.mcq import Split
from ..errors import RolevecError, path_problem
from ..model.loading import ModelAdapter
from .sweep import GridRow


@dataclass(frozen=True)
class Choice:
    """The chosen site of one role (a ``roles`` entry of ``selection.json``, plus the role's name)."""

    role: str
    domain: str
    layer: int
    position: int
    alpha: float
    val_accuracy: float
    val_baseline: float
    val_ablate_accuracy: float | None
    criterion_met: bool
    n_candidates_passing: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("role")
        return out


def _rank(row: GridRow, ablated: float | None) -> tuple[float, float, float, int, int]:
    return (
        -row.accuracy,
        ablated if ablated is not None else math.inf,
        float(row.alpha or 0.0),
        row.layer,
        -row.position,
    )


def select(rows: Sequence[GridRow]) -> Choice:
    """The best addition candidate of one role's grid under the paper's criterion (see module doc)."""
    adds = [r for r in rows if r.condition == "add"]
    if not adds:
        raise RolevecError("the sweep grid has no addition rows: run `rolevec sweep` first")
    roles = {(r.role, r.domain) for r in rows}
    if len(roles) != 1:
        raise RolevecError(f"select() takes the grid of one role and domain, got {sorted(roles)}")
    ablate = {(r.layer, r.position): r.accuracy for r in rows if r.condition == "ablate"}
    passing = [
        r
        for r in adds
        if r.accuracy > r.baseline_accuracy
        and (r.layer, r.position) in ablate
        and ablate[(r.layer, r.position)] <= r.baseline_accuracy
    ]
    pool = passing or adds
    best = min(pool, key=lambda r: _rank(r, ablate.get((r.layer, r.position))))
    return Choice(
        role=best.role,
        domain=best.domain,
        layer=best.layer,
        position=best.position,
        alpha=float(best.alpha or 0.0),
        val_accuracy=best.accuracy,
        val_baseline=best.baseline_accuracy,
        val_ablate_accuracy=ablate.get((best.layer, best.position)),
        criterion_met=bool(passing),
        n_candidates_passing=len(passing),
    )


def write_selection(
    path: str | Path,
    adapter: ModelAdapter,
    *,
    split_seed: int,
    layers: tuple[int, int],
    choices: Sequence[Choice],
    validation: Mapping[str, Sequence[str]] | None = None,
    force: bool = False,
) -> Path:
    """Write (or update: roles are merged) ``selection.json`` atomically.

    ``validation`` lists, per domain, the questions the choices were made on, so an evaluation can refuse
    to test on them whatever its split. Merging into an existing file needs the same model, split seed and
    layer range; ``force`` replaces it.
    """
    p = Path(path)
    roles: dict[str, Any] = {}
    used: dict[str, set[str]] = {}
    if p.exists() and not force:
        old = load_selection(p)
        same = (
            old.get("model_fingerprint") == adapter.fingerprint()
            and old.get("split_seed") == split_seed
            and list(old.get("layers", [])) == list(layers)
        )
        if not same:
            raise RolevecError(
                f"{p} holds a selection for another model, split seed or layer range: pass `force=True` to "
                "replace it, or choose another `run_dir`"
            )
        roles.update(old["roles"])
        used.update({d: set(q) for d, q in (old.get("validation_qids") or {}).items()})
    roles.update({c.role: c.to_json() for c in choices})
    for domain, qids in (validation or {}).items():
        used.setdefault(domain, set()).update(qids)
    doc = {
        "model": adapter.name,
        "model_fingerprint": adapter.fingerprint(),
        "split_seed": split_seed,
        "layers": [layers[0], layers[1]],
        "roles": roles,
        "validation_qids": {d: sorted(q) for d, q in sorted(used.items())},
    }
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    atomic_write(p, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)
    return p


def load_selection(path: str | Path, adapter: ModelAdapter | None = None) -> dict[str, Any]:
    """Read ``selection.json``; with ``adapter``, refuse one made on a different model."""
    p = Path(path)
    if not p.is_file():
        raise RolevecError(f"selection file {p} {path_problem(p)}: make one with `rolevec sweep --out DIR`")
    try:
        doc = json.loads(read_text(p, what="selection file"))
    except ValueError as exc:
        raise RolevecError(f"{p} is not a readable selection file ({exc})") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("roles"), Mapping):
        raise RolevecError(
            f"{p} is not a selection file (no 'roles' object): pass the selection.json of a sweep"
        )
    if adapter is not None and doc.get("model_fingerprint") != adapter.fingerprint():
        raise RolevecError(
            f"{p} was made on model {doc.get('model')!r} (fingerprint {doc.get('model_fingerprint')}), "
            f"not on {adapter.name!r} ({adapter.fingerprint()}): sweep this model first, or pass "
            "`layer`/`position`/`alpha`"
        )
    return dict(doc)


def check_held_out(selection: Mapping[str, Any], split: Split, domains: Sequence[str]) -> None:
    """Refuse to test on questions the selection was made on (a selection without that record: its seed)."""
    used = selection.get("validation_qids")
    if not isinstance(used, Mapping):
        if int(selection.get("split_seed", split.seed)) != split.seed:
            raise RolevecError(
                f"the selection was made on split seed {selection['split_seed']} but this run's split has "
                f"seed {split.seed}: its test questions may include the validation questions used to "
                "select; evaluate in the sweep's run folder or pass `split_file` with the sweep's split.json"
            )
        return
    for domain in domains:
        if domain not in used or domain not in split.domains:
            continue
        leaked = set(used[domain]) & set(split.qids(domain, "test"))
        if leaked:
            raise RolevecError(
                f"{len(leaked)} {domain} question(s) of this run's test split were used to select the site "
                f"(e.g. {sorted(leaked)[0]}): evaluate in the sweep's run folder, or pass `split_file` with "
                "the sweep's split.json"
            )


def selected_site(selection: Mapping[str, Any], role: str) -> tuple[int, int, float]:
    """The (layer, position, α) chosen for ``role``."""
    roles = selection["roles"]
    if role not in roles:
        raise RolevecError(
            f"the selection has no role {role!r} (it has: {', '.join(roles) or 'none'}): "
            "sweep that role first"
        )
    entry = roles[role]
    problem = entry_problem(entry)
    if problem:
        raise RolevecError(
            f"the selection's entry for {role!r} has {problem}: pass a selection.json written by "
            "`rolevec sweep`, or `layer`/`position`/`alpha`"
        )
    return int(entry["layer"]), int(entry["position"]), float(entry["alpha"])


def entry_problem(entry: Any, fields: Sequence[str] = ("layer", "position", "alpha")) -> str | None:
    """What is wrong with one role's selection entry (missing or non-numeric fields), or None."""
    if not isinstance(entry, Mapping):
        return f"a {type(entry).__name__}, not an object with layer, position and alpha"
    wrong: list[str] = []
    for name in fields:
        value = entry.get(name)
        whole = name != "alpha"
        if value is None:
            wrong.append(f"no {name}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or (whole and value != int(value)):
            wrong.append(f"{name} {value!r}")
    return " and ".join(wrong) or None
