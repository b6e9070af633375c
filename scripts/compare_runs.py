"""Do two run folders hold the same results? For refactors that must not change what rolevec computes.

    python scripts/compare_runs.py OLD_RUN NEW_RUN [--p-tol 1e-6]

Compares the set of record identities, every prediction, p_gold (within --p-tol), the sweep.jsonl rows,
selection.json, the tensors of vectors.safetensors (bit for bit) and the interpret.json texts; prints one
line per check and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

IDENTITY = ("condition", "role", "persona_template", "layer", "position", "alpha", "split", "qid")


def _records(path: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {tuple(r[k] for k in IDENTITY): r for r in rows}


def _jsonl(path: Path) -> list[str]:
    return sorted(
        json.dumps(json.loads(line), sort_keys=True) for line in path.read_text().splitlines() if line
    )


def _texts(value: Any) -> list[str]:
    """Every string in a JSON document, in document order (the generated texts and their labels)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _texts(value[k])]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def compare(old: Path, new: Path, p_tol: float) -> list[tuple[str, bool, str]]:
    from safetensors.torch import load_file

    checks: list[tuple[str, bool, str]] = []
    a, b = _records(old / "records.jsonl"), _records(new / "records.jsonl")
    checks.append(("record identities", a.keys() == b.keys(), f"{len(a)} vs {len(b)}"))
    shared = a.keys() & b.keys()
    preds = [k for k in shared if a[k]["pred"] != b[k]["pred"]]
    checks.append(("predictions", not preds, f"{len(preds)} of {len(shared)} differ"))
    gap = max((abs(a[k]["p_gold"] - b[k]["p_gold"]) for k in shared), default=0.0)
    checks.append(("p_gold", gap <= p_tol, f"max |Δ| {gap:.2e} (tolerance {p_tol:g})"))
    same_sweep = _jsonl(old / "sweep.jsonl") == _jsonl(new / "sweep.jsonl")
    checks.append(("sweep.jsonl rows", same_sweep, ""))
    sel_a, sel_b = (json.loads((d / "selection.json").read_text()) for d in (old, new))
    checks.append(("selection.json", sel_a == sel_b, ""))
    va, vb = load_file(str(old / "vectors.safetensors")), load_file(str(new / "vectors.safetensors"))
    tensors = va.keys() == vb.keys() and all(bool((va[k] == vb[k]).all()) for k in va)
    checks.append(("vectors.safetensors tensors", tensors, f"{len(va)} tensors"))
    ia, ib = (json.loads((d / "interpret.json").read_text()) for d in (old, new))
    checks.append(("interpret.json texts", _texts(ia) == _texts(ib), f"{len(_texts(ia))} strings"))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--p-tol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    checks = compare(args.old, args.new, args.p_tol)
    for name, ok, detail in checks:
        print(f"{'same' if ok else 'DIFFERENT':9} {name}{': ' + detail if detail else ''}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
