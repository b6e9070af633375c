"""`rolevec monitor`: per-token projections of a text, a prompt file or a (steered) generation on role
vectors, as an HTML page, CSV/JSON tables and line plots.

Everything that can be checked without the model (inputs, output folder, vector file, roles, site,
compositions, steering) is checked before it loads; the outputs are written only once every prompt is
read, each atomically, the manifest last.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RolevecError
from .common import add_model_args, check_out_folder, load_from_args, positive_int
from .steer_args import add_cap_args, add_compose_args, add_strength_args, composed

if TYPE_CHECKING:
    import torch

    from ..steering.interventions import Steering
    from ..vectors.role_vectors import RoleVectors

#: What `monitor` writes into --out (besides figures/monitor-<i>.png); the manifest last.
OUTPUTS = ("monitor.html", "projections.csv", "projections.json", "manifest-monitor.json")
FIGURES = "figures"
#: Prompts a --prompts file contributes unless --limit says otherwise (one page section each).
DEFAULT_LIMIT = 100


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "monitor",
        help="per-token projections of a text or a (steered) generation on role vectors, as an HTML page",
        description="Project every token of TEXT, of each prompt of --prompts, or of --generate's prompt and "
        "the model's answer, on role vectors at one layer (the residual at the input of block --layer "
        "dotted with each role's unit direction), and write monitor.html (tokens coloured by projection, "
        "one row per role), projections.csv/.json, a line plot per prompt and a manifest into --out.",
    )
    add_model_args(parser)
    parser.add_argument(
        "text", nargs="?", default=None, metavar="TEXT", help="the text to monitor (as the user turn)"
    )
    given = parser.add_argument_group("input (one of TEXT, --prompts, --generate)")
    given.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="a prompt file (JSON list, JSONL, CSV, text: one prompt a line, or hf:NAME[:SPLIT]): one "
        "section per prompt",
    )
    given.add_argument("--column", default=None, help="field/column of --prompts holding the text")
    given.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help=f"monitor the first N prompts of --prompts (default {DEFAULT_LIMIT}; a longer file is refused "
        "without --limit)",
    )
    given.add_argument(
        "--generate",
        default=None,
        metavar="PROMPT",
        help="answer PROMPT greedily (steered with --steer) and monitor prompt and answer",
    )
    given.add_argument(
        "--max-new-tokens", type=positive_int, default=None, help="longest answer of --generate (default 64)"
    )
    given.add_argument("--system", default=None, help="optional system prompt for the chat template")
    vec = parser.add_argument_group("role vectors")
    vec.add_argument("--vectors", required=True, help="vector file written by `rolevec extract`")
    vec.add_argument(
        "--roles", default=None, metavar="R1,R2", help="roles to monitor (default: every role in the file)"
    )
    add_compose_args(
        vec,
        help="also monitor a composition of the file's roles as one more row (e.g. doctor:1,lawyer:-0.5; a "
        "role without :W weighs 1)",
    )
    vec.add_argument("--layer", type=int, required=True, help="layer read (the input of block L)")
    vec.add_argument(
        "--position",
        type=int,
        default=-1,
        help="post-instruction position the vectors are taken from, -k..-1 (default -1)",
    )
    vec.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use vectors whose model fingerprint differs from the loaded model",
    )
    score = parser.add_argument_group("z-scores")
    score.add_argument(
        "--zscore", action="store_true", help="also z-score each token against the base prompts' projections"
    )
    score.add_argument(
        "--base",
        default=None,
        help="base prompts for --zscore (file or hf:NAME[:SPLIT]; default: the built-in base.json)",
    )
    score.add_argument("--base-column", default=None, help="field/column of --base holding the prompt")
    score.add_argument("--batch-size", type=positive_int, default=16, help="base prompts per forward (16)")
    steer = parser.add_argument_group("steering (applied to the generation and to the read)")
    steer.add_argument(
        "--steer",
        default=None,
        metavar="ROLE|ROLE:W,...",
        help="steer with a role of --vectors, or a composition of several (e.g. doctor:1,lawyer:-0.5)",
    )
    steer.add_argument(
        "--steer-layer", type=int, default=None, help="layer whose input is steered (default: --layer)"
    )
    add_strength_args(parser, required=False)
    add_cap_args(parser)
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", required=True, help="output folder")
    run_group.add_argument("--force", action="store_true", help="replace an earlier monitor's files in --out")
    run_group.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def _held(out: Path) -> list[str]:
    """Monitor's files already in ``out``."""
    held = [name for name in OUTPUTS if (out / name).exists()]
    figures = out / FIGURES
    if figures.is_dir():
        held += [f"{FIGURES}/{p.name}" for p in sorted(figures.glob("monitor-*.png"))]
    return held


def _check_flags(args: argparse.Namespace) -> tuple[tuple[float, float] | None, list[int] | None]:
    """Every check on the flags alone: the input, z-score, steering and capping options."""
    from .steer_args import check_alpha_arg, parse_cap, parse_cap_layers

    inputs = [f for f, v in (("TEXT", args.text), ("--prompts", args.prompts), ("--generate", args.generate))
              if v is not None]  # fmt: skip
    if len(inputs) > 1:
        raise RolevecError(
            f"pass one input, not {' and '.join(inputs)}: TEXT, --prompts FILE or --generate PROMPT"
        )
    if not inputs:
        raise RolevecError("nothing to monitor: pass TEXT, --prompts FILE or --generate PROMPT")
    for flag, value in (("TEXT", args.text), ("--generate", args.generate)):
        if value is not None and not value.strip():
            raise RolevecError(f"{flag} is empty: pass some text to monitor")
    if args.prompts is None and (args.column is not None or args.limit is not None):
        raise RolevecError("--column and --limit apply to --prompts FILE: pass --prompts, or leave them out")
    if args.generate is None and args.max_new_tokens is not None:
        raise RolevecError("--max-new-tokens applies to --generate PROMPT: pass --generate, or leave it out")
    if not args.zscore and (args.base is not None or args.base_column is not None):
        raise RolevecError("--base is only used for z-scores: add --zscore, or leave --base out")
    check_alpha_arg(args.alpha)
    cap = None if args.cap is None else parse_cap(args.cap)
    cap_layers = None if args.cap_layers is None else parse_cap_layers(args.cap_layers)
    if args.steer is None:
        for flag, value in (
            ("--alpha", args.alpha),
            ("--ablate", args.ablate or None),
            ("--cap", args.cap),
            ("--cap-layers", args.cap_layers),
            ("--steer-layer", args.steer_layer),
        ):
            if value is not None:
                raise RolevecError(f"{flag} applies to steering: pass --steer ROLE too, or leave {flag} out")
        return None, None
    if not args.steer.strip():
        raise RolevecError("--steer is empty: pass a role of --vectors, or ROLE:W,... to compose several")
    if cap_layers is not None and cap is None:
        raise RolevecError("--cap-layers only applies to capping: pass --cap LO:HI too")
    if cap is not None and (args.alpha is not None or args.ablate):
        raise RolevecError("--cap replaces the addition: pass one of --cap, --alpha or --ablate")
    if cap is None and args.alpha is None and not args.ablate:
        raise RolevecError("--steer needs a strength: pass --alpha A, --ablate or --cap LO:HI")
    return cap, cap_layers


def _roles(args: argparse.Namespace, vectors: RoleVectors) -> list[str]:
    """--roles (checked against the file), else every role of the file."""
    if args.roles is None:
        return list(vectors.roles)
    roles = [r.strip() for r in args.roles.split(",")]
    if not all(roles):
        raise RolevecError(
            f"--roles takes role names separated by commas (e.g. doctor,lawyer), not {args.roles!r}"
        )
    unknown = [r for r in roles if r not in vectors.roles]
    if unknown:
        raise RolevecError(
            f"role{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} not in {args.vectors} "
            f"(it has: {', '.join(vectors.roles)}): pass some of those to --roles"
        )
    if len(set(roles)) != len(roles):
        raise RolevecError(f"--roles names a role twice ({args.roles!r}): name each role once")
    return roles


def _steering(
    args: argparse.Namespace,
    vectors: RoleVectors,
    cap: tuple[float, float] | None,
    cap_layers: list[int] | None,
    adapter: Any = None,
) -> Steering:
    """--steer's role (or composition) resolved with the strength flags; with ``adapter``, checked on it."""
    from ..steering.interventions import resolve_steering

    text = args.steer.strip()
    if ":" in text or "," in text:
        source = composed(vectors, text, args.compose_mode, label=f"--steer {text}")
        role = source.roles[0]
    elif text in vectors.roles:
        source, role = vectors, text
    else:
        raise RolevecError(
            f"--steer role {text!r} is not in {args.vectors} (it has: {', '.join(vectors.roles)}): pass "
            "one of those, or ROLE:W,... to compose several"
        )
    layer = args.layer if args.steer_layer is None else args.steer_layer
    if not 0 <= layer <= vectors.n_layers:
        raise RolevecError(
            f"--steer-layer {layer} is out of range: {args.vectors} has layers 0..{vectors.n_layers}"
        )
    return resolve_steering(
        source,
        role,
        layers=layer,
        position=args.position,
        alpha=None if cap is not None else args.alpha,
        ablate=args.ablate,
        cap=cap,
        cap_layers=cap_layers,
        adapter=adapter,
        allow_other_model=args.allow_other_model,
        warn_zero=adapter is None,
    )


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..analysis.monitor import monitor, reference_stats
    from ..analysis.monitor_page import CSV_HEADER, figure_png, render_html, table_rows
    from ..core.files import atomic_write
    from ..data.sources import load_base, load_prompts
    from ..model.manifest import build_manifest, vector_provenance, write_manifest
    from ..steering.interventions import ZERO_NORM
    from ..vectors.role_vectors import RoleVectors

    cap, cap_layers = _check_flags(args)
    out = check_out_folder(args.out, args.force, _held)
    vectors = RoleVectors.load(args.vectors)
    vectors.check_layer(args.layer)
    vectors.position_index(args.position)
    roles = _roles(args, vectors)
    directions: dict[str, torch.Tensor] = {r: vectors.vector(r, args.layer, args.position) for r in roles}
    if args.compose is not None:
        mix = composed(vectors, args.compose, args.compose_mode, label=f"--compose {args.compose}")
        name = mix.roles[0]
        if name in directions:
            raise RolevecError(f"--compose {args.compose} is named {name!r}, a role already monitored")
        directions[name] = mix.vector(name, args.layer, args.position)
    scale = float(vectors.base_mean[vectors.position_index(args.position), args.layer].float().norm())
    for role, d in directions.items():
        if float(d.float().norm()) <= ZERO_NORM * max(scale, 1e-30):
            raise RolevecError(
                f"the vector of {role!r} at layer {args.layer}, position {args.position} is zero, so it has "
                "no direction to project on: pass another --layer (or leave the role out of --roles)"
            )
    steering = None if args.steer is None else _steering(args, vectors, cap, cap_layers)
    if args.prompts is not None:
        prompt_set = load_prompts(args.prompts, column=args.column)
        limit = args.limit if args.limit is not None else DEFAULT_LIMIT
        if len(prompt_set) > limit and args.limit is None:
            raise RolevecError(
                f"{args.prompts} holds {len(prompt_set)} prompts, more than the {DEFAULT_LIMIT} monitor puts "
                "on one page by default: pass --limit N to monitor the first N"
            )
        texts = list(prompt_set.prompts[:limit])
    else:
        texts = [args.text if args.text is not None else args.generate]
    base = load_base(args.base, column=args.base_column) if args.zscore else None

    adapter = load_from_args(args)
    vectors.check_compatible(adapter, allow_other_model=args.allow_other_model)
    if steering is not None:
        steering = _steering(args, vectors, cap, cap_layers, adapter)
    progress = not args.no_progress
    stats = None
    if base is not None:
        stats = reference_stats(
            adapter, base.prompts, directions, args.layer, batch_size=args.batch_size, progress=progress
        )
    generate = args.generate is not None
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else 64
    traces = []
    for text in tqdm(texts, desc="monitoring", unit="prompt", disable=not progress or len(texts) < 2):
        traces.append(
            monitor(
                adapter,
                text,
                directions,
                args.layer,
                steering=steering,
                generate=generate,
                max_new_tokens=max_new_tokens,
                stats=stats,
                system=args.system,
            )
        )

    settings = {
        "model": f"{adapter.name} ({adapter.fingerprint()})",
        "vectors": str(args.vectors),
        "layer": f"{args.layer} (the residual at the input of block {args.layer})",
        "position": str(args.position),
        "roles": ", ".join(directions),
        "steering": "none" if steering is None else steering.describe(),
        "input": "generation (greedy, " + f"at most {max_new_tokens} new tokens)"
        if generate
        else (f"{len(texts)} prompt(s) of {args.prompts}" if args.prompts is not None else "text"),
        "z-scores": "none"
        if base is None
        else f"against {base.name} ({len(base)} prompts; tokens: their pooled user-text tokens; last "
        "token and user-text mean: their last tokens and user-text means)",
    }
    figures = [
        figure_png(t, title=f"prompt {i}: {t.prompt[:80]}" + ("…" if len(t.prompt) > 80 else ""))
        for i, t in enumerate(traces)
    ]
    page = render_html(traces, settings, figures=figures)
    base_json = None if base is None else {**base.describe(), "stats": stats.to_json() if stats else None}
    document: dict[str, Any] = {
        "settings": {
            "layer": args.layer,
            "position": args.position,
            "roles": list(directions),
            "compose": args.compose,
            "compose_mode": args.compose_mode if args.compose is not None else None,
            "steering": None if steering is None else steering.provenance(),
            "generate": generate,
            "max_new_tokens": max_new_tokens if generate else None,
            "system": args.system,
            "zscore": base is not None,
        },
        "base": base_json,
        "prompts": [{"index": i, **t.to_json()} for i, t in enumerate(traces)],
    }

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            writer.writerows(table_rows(traces))

    def writer(data: bytes) -> Callable[[Path], object]:
        return lambda tmp: tmp.write_bytes(data)

    names = [f"monitor-{i:03d}.png" for i in range(len(traces))]
    for name, png in zip(names, figures, strict=True):
        atomic_write(out / FIGURES / name, writer(png), force=True)
    for stale in (out / FIGURES).glob("monitor-*.png"):  # an earlier monitor's, replaced by --force
        if stale.name not in names:
            stale.unlink()
    atomic_write(out / OUTPUTS[1], write_csv, force=True)
    text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    atomic_write(out / OUTPUTS[2], lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)
    atomic_write(out / OUTPUTS[0], lambda tmp: tmp.write_text(page, encoding="utf-8"), force=True)
    extra: dict[str, Any] = {
        "command": "monitor",
        "vectors": vector_provenance(args.vectors, vectors.metadata),
        **document["settings"],
        "prompts": {"n": len(traces), "source": args.prompts},
        "summaries": [{r: s.to_json() for r, s in t.summaries.items()} for t in traces],
        "base": base_json,
    }
    args_json = {k: v for k, v in vars(args).items() if k != "func"}
    write_manifest(out / OUTPUTS[3], build_manifest(args_json, adapter, extra))
    print(f"wrote {out / OUTPUTS[0]}: {len(traces)} prompt(s), {sum(len(t.tokens) for t in traces)} tokens, "
          f"{len(directions)} role(s)")  # fmt: skip
    return 0
