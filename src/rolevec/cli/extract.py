"""`rolevec extract`: role vectors for a model from role prompt sets and a base set, into one file."""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import RolevecError
from .common import add_batch_args, add_model_args, check_out, load_from_args

if TYPE_CHECKING:
    from ..data.sources import PromptSet


def count_arg(value: str) -> int | None:
    """--n: a positive count, or 'all'."""
    if value.lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', not {value!r}")
    return n


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """The prompt sets' options, shared by the commands that read role and base prompts."""
    data = parser.add_argument_group("prompts")
    data.add_argument(
        "--roles",
        required=True,
        help="comma-separated roles (e.g. mathematician,doctor), or 'all' for every role in --roles-dir",
    )
    data.add_argument(
        "--roles-dir",
        default=None,
        help="folder of <role>.json prompt files (default: the 29 built-in roles)",
    )
    data.add_argument(
        "--base",
        default=None,
        help="base prompt file (JSON/JSONL/CSV/text) or hf:NAME[:SPLIT] (default: built-in base.json)",
    )
    data.add_argument(
        "--base-column", default=None, help="field/column of --base holding the prompt (default: instruction)"
    )
    data.add_argument(
        "--n",
        type=count_arg,
        default=128,
        help="prompts sampled per set, or 'all' (default: 128, the paper's)",
    )
    data.add_argument("--seed", type=int, default=42, help="sampling seed (default: 42, the paper's)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "extract",
        help="extract difference-in-means role vectors at every layer and post-instruction position",
        description="Extract role vectors d = mean(role prompts) - mean(base prompts) at every layer and "
        "post-instruction position, for one model, into one safetensors file.",
    )
    add_model_args(parser)
    add_prompt_args(parser)
    run_group = parser.add_argument_group("run")
    add_batch_args(run_group)
    run_group.add_argument("--out", required=True, help="output .safetensors file")
    run_group.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    run_group.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def parse_roles(spec: str, roles_dir: str | None) -> list[str]:
    from ..data.sources import available_roles, normalise_role

    if spec.strip().lower() == "all":
        roles = available_roles(roles_dir)
        if not roles:
            raise RolevecError(f"no <role>.json files in {roles_dir}: pass a folder of role prompt files")
        return roles
    roles = list(dict.fromkeys(normalise_role(r) for r in spec.split(",") if r.strip()))
    if not roles:
        raise RolevecError("--roles is empty: pass e.g. --roles mathematician,doctor or --roles all")
    return roles


def sample_sets(args: argparse.Namespace, roles: list[str]) -> tuple[dict[str, PromptSet], PromptSet]:
    """Each role's prompts and the base prompts, ``--n`` of each drawn with ``--seed``; one warning line
    for all the sets smaller than ``--n``, and a line per set on stderr saying what was read."""
    from ..data.sources import load_base, load_role_prompts, sample

    sets: dict[str, PromptSet] = {}
    with warnings.catch_warnings(record=True) as short:  # one line for all the sets smaller than --n
        warnings.simplefilter("always", UserWarning)
        for role in roles:
            sets[role] = sample(load_role_prompts(role, args.roles_dir), args.n, args.seed)
        base = sample(load_base(args.base, column=args.base_column), args.n, args.seed)
    others = [w for w in short if "fewer than n=" not in str(w.message)]
    for w in others:
        warnings.warn(str(w.message), stacklevel=1)
    short = [w for w in short if w not in others]
    if len(short) == 1:
        warnings.warn(str(short[0].message), stacklevel=1)
    elif short:
        small = [ps for ps in [*sets.values(), base] if args.n is not None and len(ps) < args.n]
        named = ", ".join(f"{ps.name} ({len(ps)})" for ps in small[:6])
        more = f" and {len(small) - 6} more" if len(small) > 6 else ""
        warnings.warn(
            f"{len(small)} prompt sets have fewer than n={args.n} prompts and are used whole: {named}{more}; "
            "pass a smaller --n, or --n all, to say so",
            stacklevel=1,
        )
    for ps in [*sets.values(), base]:
        dup = f", {ps.n_duplicates_dropped} duplicate(s) dropped" if ps.n_duplicates_dropped else ""
        print(f"{ps.name}: {len(ps)} prompts from {ps.source}{dup}", file=sys.stderr)
    return sets, base


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..vectors.extraction import extract_role_vectors

    out = check_out(args.out, args.force, example="vectors.safetensors")
    roles = parse_roles(args.roles, args.roles_dir)
    sets, base = sample_sets(args, roles)
    adapter = load_from_args(args)
    vectors = extract_role_vectors(
        adapter,
        sets,
        base,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
        max_tokens=args.max_tokens,
    )
    meta: dict[str, Any] = dict(vectors.metadata)
    meta["n_requested"] = args.n
    path = replace(vectors, metadata=meta).save(out, force=args.force)
    print(
        f"wrote {path}: {len(roles)} role(s) x {len(vectors.positions)} positions x layers "
        f"0..{vectors.n_layers} x hidden {vectors.hidden_size} ({adapter.name})"
    )
    return 0
