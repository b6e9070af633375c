"""`rolevec rank`: score every prompt of a dataset by its projection on a role vector, most role-laden first.

Everything that can be checked without the model (output folder, vector file, role, site, prompt files)
is checked before it loads; the outputs are written only once every prompt is scored, each atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import RolevecError
from .common import add_batch_args, add_model_args, check_out_folder, load_from_args, present

#: What `rank` writes into --out (the manifest last: a folder with it holds a finished ranking).
OUTPUTS = ("ranked.jsonl", "histogram.png", "manifest-rank.json")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "rank",
        help="rank a prompt file by each prompt's projection on a role vector (flag role-laden data)",
        description="Project every prompt of a prompt file on one role vector (at the last prompt token, "
        "or averaged over the user text's tokens), and write the prompts ranked by that score "
        "(ranked.jsonl), a histogram of the scores and a manifest into --out.",
    )
    add_model_args(parser)
    parser.add_argument(
        "prompts",
        metavar="PROMPTS",
        help="prompt file to rank (JSON list, JSONL, CSV, text: one prompt a line) or hf:NAME[:SPLIT]",
    )
    data = parser.add_argument_group("prompts")
    data.add_argument(
        "--column", default=None, help="field/column of PROMPTS holding the text (default: instruction)"
    )
    vec = parser.add_argument_group("role vector")
    vec.add_argument("--vectors", required=True, help="vector file written by `rolevec extract`")
    vec.add_argument("--role", required=True, help="role whose vector the prompts are projected on")
    vec.add_argument("--layer", type=int, default=None, help="layer to read and take the vector from")
    vec.add_argument(
        "--position",
        type=int,
        default=None,
        help="post-instruction position the vector is taken from, -k..-1 (default: -1)",
    )
    vec.add_argument(
        "--selection", default=None, help="selection.json of a sweep: the role's layer and position"
    )
    vec.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use vectors (or a selection) whose model fingerprint differs from the loaded model",
    )
    score = parser.add_argument_group("score")
    score.add_argument(
        "--by",
        choices=["last", "mean"],
        default="last",
        help="last: the projection at the last prompt token (default); mean: the mean over the user text",
    )
    score.add_argument(
        "--zscore",
        action="store_true",
        help="also give each prompt's z-score against the base prompts' projections",
    )
    score.add_argument(
        "--base",
        default=None,
        help="base prompts for --zscore (file or hf:NAME[:SPLIT]; default: the built-in base.json)",
    )
    score.add_argument("--base-column", default=None, help="field/column of --base holding the prompt")
    run_group = parser.add_argument_group("run")
    add_batch_args(run_group)
    run_group.add_argument("--out", required=True, help="output folder")
    run_group.add_argument("--force", action="store_true", help="replace an earlier ranking in --out")
    run_group.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def site(args: argparse.Namespace, layers: int) -> tuple[int, int, dict[str, Any] | None]:
    """Layer and position: the options, else the role's entry in --selection; the layer is required."""
    from .steer_args import read_selection

    selection: dict[str, Any] | None = None
    entry: dict[str, Any] = {}
    if args.selection:
        selection, entry = read_selection(args.selection, args.role)
    layer = args.layer if args.layer is not None else entry.get("layer")
    position = args.position if args.position is not None else entry.get("position", -1)
    if layer is None:
        where = f"the entry for {args.role!r} in {args.selection} has no layer: " if selection else ""
        raise RolevecError(f"{where}pass --layer L (0..{layers}) or --selection selection.json")
    if isinstance(layer, bool) or not isinstance(layer, int) or not isinstance(position, int):
        raise RolevecError(
            f"{args.selection} gives layer {layer!r}, position {position!r}: these must be whole numbers; "
            "pass --layer and --position"
        )
    return layer, position, selection


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.projection import histogram_png, project_prompts, projection_stats, unit_directions
    from ..core.files import atomic_write
    from ..data.sources import load_base, load_prompts
    from ..model.manifest import build_manifest, vector_provenance, write_manifest
    from ..vectors.role_vectors import RoleVectors
    from .steer_args import check_selection_model

    out = check_out_folder(args.out, args.force, present(*OUTPUTS))
    if args.base is not None and not args.zscore:
        raise RolevecError("--base is only used for z-scores: add --zscore, or leave --base out")
    vectors = RoleVectors.load(args.vectors)
    if args.role not in vectors.roles:
        raise RolevecError(
            f"role {args.role!r} is not in {args.vectors} (it has: {', '.join(vectors.roles) or 'none'}): "
            "pass one of those to --role"
        )
    layer, position, selection = site(args, vectors.n_layers)
    vectors.check_layer(layer)
    vectors.position_index(position)
    prompts = load_prompts(args.prompts, column=args.column)
    base = load_base(args.base, column=args.base_column) if args.zscore else None

    adapter = load_from_args(args)
    vectors.check_compatible(adapter, allow_other_model=args.allow_other_model)
    check_selection_model(selection, adapter, args.allow_other_model)
    dirs = unit_directions(vectors, [args.role], layer, position)
    common: dict[str, Any] = {
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "progress": not args.no_progress,
    }
    stats = projection_stats(adapter, base.prompts, dirs, layer, **common) if base is not None else None
    scores = torch.empty(len(prompts), dtype=torch.float64)
    for batch in project_prompts(adapter, prompts.prompts, dirs, layer, desc="ranking", **common):
        scores[list(batch.indices)] = batch.scores(args.by)[:, 0]
    z = stats.z(scores[:, None], args.by)[:, 0] if stats is not None else None
    order = sorted(range(len(prompts)), key=lambda i: (-float(scores[i]), i))

    def write_ranked(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for rank, i in enumerate(order, start=1):
                row: dict[str, Any] = {
                    "rank": rank,
                    "index": i,
                    "text": prompts.prompts[i],
                    "score": float(scores[i]),
                }
                if z is not None:
                    row["z"] = float(z[i])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    summary = {"last": "last prompt token", "mean": "mean over the user text"}[args.by]
    png = histogram_png(
        scores.tolist(),
        label=f"projection on {args.role} ({summary}), layer {layer}, position {position}",
        title=f"{prompts.name}: {len(prompts)} prompts",
    )
    atomic_write(out / "ranked.jsonl", write_ranked, force=True)
    atomic_write(out / "histogram.png", lambda tmp: tmp.write_bytes(png), force=True)
    extra: dict[str, Any] = {
        "command": "rank",
        "vectors": vector_provenance(args.vectors, vectors.metadata),
        "role": args.role,
        "layer": layer,
        "position": position,
        "site_from": f"selection {args.selection}"
        if selection is not None and args.layer is None
        else "options",
        "by": args.by,
        "prompts": prompts.describe(),
        "scores": {"min": float(scores.min()), "max": float(scores.max()), "mean": float(scores.mean())},
        "base": None if base is None else {**base.describe(), "stats": stats.to_json() if stats else None},
    }
    args_json = {k: v for k, v in vars(args).items() if k != "func"}
    write_manifest(out / OUTPUTS[2], build_manifest(args_json, adapter, extra))
    print(f"wrote {out / OUTPUTS[0]}: {len(prompts)} prompts ranked by their projection on {args.role}")
    return 0
