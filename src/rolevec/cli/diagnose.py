"""`rolevec diagnose`: which layers' role vectors to trust — consistency, separation and stability of each
role's vector at every requested layer, against random directions and label shuffles.

Everything that can be checked without the model (roles, prompt files, counts, layers, output folder) is
checked before it loads; each prompt set is read once, all layers in one forward per batch, and the
outputs are written only once every role is diagnosed, each atomically, the manifest last.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RolevecError
from .common import (
    add_batch_args,
    add_model_args,
    as_flags,
    check_out_folder,
    load_from_args,
    present,
)
from .extract import add_prompt_args, parse_roles, sample_sets

if TYPE_CHECKING:
    from ..vectors.diagnostics import Diagnostics

#: What `diagnose` writes into --out (the manifest last: a folder with it holds a finished diagnosis).
OUTPUTS = (
    "diagnostics-layers.json",
    "diagnostics-layers.csv",
    "figures/diagnostics-layers.png",
    "manifest-diagnose.json",
)
FORMAT = 1
#: The library's defaults (rolevec.vectors.diagnostics, tested equal), spelled here so that --help needs
#: no torch.
DEFAULT_FOLDS, DEFAULT_BOOTSTRAPS, DEFAULT_RANDOM, DEFAULT_SHUFFLES = 5, 20, 20, 20


def at_least_two(value: str) -> int:
    """--folds, --bootstraps, --random, --shuffles: each needs two draws to say anything."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, not {value!r}") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, not {value!r}")
    return n


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "diagnose",
        help="which layers' role vectors to trust: consistency, separation, stability at every layer",
        description="For each role, compute the diagnostics of its vector (consistency, cross-fitted "
        "separation, bootstrap stability, each against random directions and label shuffles) at every "
        "requested layer and one post-instruction position, reading each prompt set once, and write "
        "diagnostics-layers.json/.csv, figures/diagnostics-layers.png and a manifest into --out.",
    )
    add_model_args(parser)
    add_prompt_args(parser)
    site = parser.add_argument_group("site")
    site.add_argument(
        "--layers",
        default=None,
        help="layers: L, a half-open range a:b (a: runs to the last), or 'all' (default: all, every layer "
        "1..n_layers; layer 0's vectors are zero and it is refused)",
    )
    site.add_argument(
        "--position", type=int, default=-1, help="post-instruction position, -k..-1 (default -1)"
    )
    stats = parser.add_argument_group("diagnostics")
    stats.add_argument(
        "--folds", type=at_least_two, default=DEFAULT_FOLDS, help=f"cross-fitting folds ({DEFAULT_FOLDS})"
    )
    stats.add_argument(
        "--bootstraps",
        type=at_least_two,
        default=DEFAULT_BOOTSTRAPS,
        help=f"bootstrap resamples of the stability ({DEFAULT_BOOTSTRAPS})",
    )
    stats.add_argument(
        "--random",
        type=at_least_two,
        default=DEFAULT_RANDOM,
        help=f"random directions of the first null ({DEFAULT_RANDOM})",
    )
    stats.add_argument(
        "--shuffles",
        type=at_least_two,
        default=DEFAULT_SHUFFLES,
        help=f"label shuffles of the second null ({DEFAULT_SHUFFLES})",
    )
    run_group = parser.add_argument_group("run")
    add_batch_args(run_group)
    run_group.add_argument("--out", required=True, help="output folder")
    run_group.add_argument(
        "--force", action="store_true", help="replace an earlier diagnosis's files in --out (others stay)"
    )
    run_group.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def check_layer_request(text: str | None) -> None:
    """--layers before the model loads: its grammar, and no layer 0 (the layer count is checked later)."""
    if text is None or text.strip().lower() == "all":
        return
    spec = text.strip()
    lo, colon, hi = spec.partition(":")
    try:
        first = int(lo) if lo.strip() or not colon else 0
        stop = int(hi) if hi.strip() else None
    except ValueError:
        raise RolevecError(
            f"--layers {text!r} is not a layer or range: pass e.g. 12, 1:24 (half-open), 10: or all"
        ) from None
    if first < 0:
        raise RolevecError(f"--layers {text!r} is out of range: layers count from 1 (0 is refused)")
    if colon and stop is not None and stop <= first:
        raise RolevecError(
            f"--layers {text!r} is empty (a:b is half-open, b > a): pass e.g. {first}:{first + 1}"
        )
    if first == 0:
        raise RolevecError(
            f"--layers {text!r} includes layer 0, the token embedding: the post-instruction tokens are the "
            "same template tokens for every prompt, so the role vectors there are zero; start at 1 (e.g. 1:) "
            "or leave --layers out for every layer from 1"
        )


def layer_request(text: str | None, n_layers: int) -> list[int]:
    """--layers as a list: None or 'all' is 1..n_layers; a range is half-open (``a:`` runs to n_layers)."""
    from ..core.spec import parse_layer_range

    check_layer_request(text)
    spec = "1:" if text is None or text.strip().lower() == "all" else text.strip()
    with as_flags(layers="--layers"):
        first, stop = parse_layer_range(spec, n_layers)
    return list(range(first, stop))


def _ranges(layers: Sequence[int]) -> str:
    """[1, 2, 3, 7] as '1-3, 7'; none as '-'."""
    if not layers:
        return "-"
    parts: list[str] = []
    start = prev = layers[0]
    for layer in [*layers[1:], None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if layer is not None:
            start = prev = layer
    return ", ".join(parts)


def csv_rows(results: Mapping[str, Mapping[int, Diagnostics]]) -> list[dict[str, Any]]:
    """One row per role per layer: every diagnostic, both nulls' 95th percentiles, the flags."""
    from ..vectors.diagnostics import CHECKED

    rows = []
    for role, by_layer in results.items():
        for layer, d in by_layer.items():
            row: dict[str, Any] = {"role": role, "layer": layer, "position": d.position}
            row |= {"n_role": d.n_role, "n_base": d.n_base}
            for name in CHECKED:
                row[name] = getattr(d, name)
                row[f"{name}_random95"] = d.thresholds[name]
                row[f"{name}_shuffled95"] = d.shuffle_thresholds[name]
            row |= {"split_half": d.split_half, "norm": d.norm, "flagged": ";".join(d.flagged)}
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..analysis.figures import diagnostics_layers_figure
    from ..core.files import atomic_write
    from ..model.manifest import build_manifest, write_manifest
    from ..vectors.diagnostics import (
        DEFAULT_SEED,
        best_layer,
        diagnose_layer_activations,
        layer_activations,
    )

    out = check_out_folder(args.out, args.force, present(*OUTPUTS))
    check_layer_request(args.layers)
    if args.position >= 0:
        raise RolevecError(
            f"--position {args.position}: positions count from the end of the prompt, -k..-1 (default -1)"
        )
    roles = parse_roles(args.roles, args.roles_dir)
    sets, base = sample_sets(args, roles)
    small = [ps for ps in [*sets.values(), base] if len(ps) < 2]
    if small:
        named = ", ".join(f"{ps.name} ({len(ps)})" for ps in small)
        verb = "has" if len(small) == 1 else "have"
        raise RolevecError(
            f"diagnostics need at least 2 prompts per set, and {named} {verb} fewer: pass --n 2 or more, "
            "or larger prompt files"
        )

    adapter = load_from_args(args)
    layers = layer_request(args.layers, adapter.n_layers)
    if args.position not in adapter.chat.positions:
        raise RolevecError(
            f"--position {args.position} is not a post-instruction position of {adapter.name}'s template: "
            f"pass one of {list(adapter.chat.positions)}"
        )
    settings = {
        "folds": args.folds,
        "bootstraps": args.bootstraps,
        "n_random": args.random,
        "shuffles": args.shuffles,
        "seed": DEFAULT_SEED,
    }
    read: dict[str, Any] = {
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "progress": not args.no_progress,
    }
    base_acts = layer_activations(adapter, base.prompts, layers, args.position, desc="base", **read)
    results: dict[str, dict[int, Diagnostics]] = {}
    for role, ps in sets.items():  # one role's reads at a time: memory is the base's and one role's
        acts = layer_activations(adapter, ps.prompts, layers, args.position, desc=role, **read)
        results[role] = diagnose_layer_activations(acts, base_acts, layers, args.position, **settings)
        del acts
    best = {role: best_layer(by_layer) for role, by_layer in results.items()}
    trusted = {
        role: [la for la, d in by_layer.items() if not d.flagged] for role, by_layer in results.items()
    }

    doc: dict[str, Any] = {
        "format": FORMAT,
        "model": adapter.name,
        "model_fingerprint": adapter.fingerprint(),
        "position": args.position,
        "layers": layers,
        "settings": {**settings, "n_requested": args.n, "sampling_seed": args.seed},
        "prompts": {
            "base": {"n": len(base), "source": base.source},
            "roles": {role: {"n": len(ps), "source": ps.source} for role, ps in sets.items()},
        },
        "roles": {
            role: {
                "best_layer": best[role],
                "trusted_layers": trusted[role],
                "layers": {str(la): d.to_json() for la, d in by_layer.items()},
            }
            for role, by_layer in results.items()
        },
    }
    rows = csv_rows(results)

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    png = diagnostics_layers_figure(results, best)
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    atomic_write(out / OUTPUTS[0], lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)
    atomic_write(out / OUTPUTS[1], write_csv, force=True)
    atomic_write(out / OUTPUTS[2], lambda tmp: tmp.write_bytes(png), force=True)
    extra = {
        "command": "diagnose",
        "layers": layers,
        "position": args.position,
        **doc["settings"],
        "prompts": doc["prompts"],
        "best_layers": best,
    }
    args_json = {k: v for k, v in vars(args).items() if k != "func"}
    write_manifest(out / OUTPUTS[3], build_manifest(args_json, adapter, extra))

    width = max(len("role"), *(len(r) for r in results))
    print(f"{'role':<{width}}  {'unflagged layers':<24}  highest separation")
    for role, by_layer in results.items():
        top = by_layer[best[role]]
        print(
            f"{role:<{width}}  {_ranges(trusted[role]):<24}  layer {best[role]} "
            f"({top.separation:.3f}, bar {top.bar('separation'):.3f})"
        )
    print(f"wrote {out}: {len(results)} role(s) x {len(layers)} layer(s), position {args.position}")
    return 0
