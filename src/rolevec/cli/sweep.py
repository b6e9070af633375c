"""`rolevec sweep`: score every steering site of a role on its domain's validation split and pick one.

Writes per-question records (RUN_DIR/records.jsonl, resumable), the aggregated grid (sweep.jsonl) and
the chosen site per role (selection.json), then prints the choice with its validation statistics.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from ..errors import RolevecError
from .common import add_model_args, as_flags, load_from_args, positive_int
from .evaluate import (
    add_data_args,
    load_questions,
    planned_split,
    prompt_format_from_args,
    split_list,
    write_command_manifest,
)
from .executor_args import add_executor_args, executor_from_args
from .mcq_args import scoring_from_args

NEGATIVE_LIST = re.compile(r"^-\d+(\.\d+)?(,\s*-?\d+(\.\d+)?)*$|^-\d*\.\d+$")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "sweep",
        help="sweep layers x positions x alphas on the validation split and select a steering site",
        description="Score addition at every (layer, position, alpha) and ablation at every (layer, "
        "position) on the role's domain validation questions, then choose the site by the paper's "
        "criterion (addition beats the baseline, ablation does not).",
    )
    add_model_args(parser)
    parser.add_argument("--vectors", required=True, help="role-vector file")
    parser.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use vectors whose model fingerprint differs from the loaded model (a warning, not an error)",
    )
    parser.add_argument("--role", required=True, help="role, or comma-separated roles")
    parser.add_argument(
        "--domain", default=None, help="domain to sweep on (default: the role's domain in the paper's table)"
    )
    parser.add_argument("--alphas", default="1,3", help="comma-separated α values (default 1,3)")
    parser.add_argument(
        "--layers", default=None, help="half-open layer range a:b (default: the first 80%% of the layers)"
    )
    parser.add_argument(
        "--positions", default="all", help="comma-separated positions like -1,-2, or all (default: all)"
    )
    parser.add_argument(
        "--ablate",
        default="all",
        choices=["all", "passing", "none"],
        help="ablation sites: all (full grid), passing (only where addition beats the baseline: enough "
        "for the criterion, faster), none (default: all)",
    )
    speed = parser.add_argument_group("speed")
    speed.add_argument(
        "--no-reuse",
        action="store_true",
        help="run every candidate as a full forward (the default resumes from cached lower layers)",
    )
    speed.add_argument(
        "--max-rows",
        type=positive_int,
        default=None,
        help="rows per forward when candidates are stacked (default: --batch-size)",
    )
    speed.add_argument(
        "--max-cache-mb",
        type=positive_int,
        default=512,
        help="bound on cached residuals + stacked copies of one question batch, in MiB (default 512)",
    )
    add_data_args(parser)
    parser.add_argument(
        "--role-domains",
        default=None,
        help="JSON file mapping roles to the domain each is swept on (roles outside the paper's table)",
    )
    add_executor_args(parser)
    # accept `--positions -1,-2` (argparse would take "-1,-2" for an option): lists of negative numbers
    # count as values, like a single negative number does
    parser._negative_number_matcher = NEGATIVE_LIST
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..core.outdir import check_run_folder, prepare, stored_path
    from ..core.records import SETTINGS_NAME, check_settings, compare_settings
    from ..core.spec import parse_alphas, parse_layer_range, parse_positions
    from ..data.mcq import ensure_split
    from ..data.sources import load_role_domains, role_domain
    from ..evaluation.conditions import resolve_scoring, run_settings
    from ..vectors.role_vectors import RoleVectors

    # Every input is checked before the folder changes: flags and files first, before the model loads.
    run_dir = check_run_folder(args.out, "sweep", force=args.force)
    roles = split_list(args.role)
    if not roles:
        raise RolevecError("--role is empty: pass a role such as lawyer")
    vectors = RoleVectors.load(args.vectors)
    missing = [r for r in roles if r not in vectors.roles]
    if missing:
        raise RolevecError(
            f"role(s) {', '.join(missing)} not in {args.vectors} (it has: {', '.join(vectors.roles)})"
        )
    role_map = load_role_domains(args.role_domains) if args.role_domains else None
    domain_of = {r: args.domain or role_domain(r, strict=True, mapping=role_map) for r in roles}
    scoring = resolve_scoring(scoring_from_args(args), args.mcq)
    with as_flags(alphas="--alphas", positions="--positions"):
        alphas = parse_alphas(args.alphas)
        positions = parse_positions(args.positions, vectors.positions)
    prompt_format = prompt_format_from_args(args)
    mcq = load_questions(args, sorted(set(domain_of.values())))
    split_args: dict[str, Any] = {"seed": args.seed, "val_fraction": args.val_fraction}
    split = planned_split(run_dir, mcq, command="sweep", force=args.force, **split_args)
    adapter = load_from_args(args)
    vectors.check_compatible(adapter, allow_other_model=args.allow_other_model)
    with as_flags(layers="--layers"):
        layers = parse_layer_range(args.layers, adapter.n_layers)
    settings = run_settings(adapter, prompt_format, split, vectors=vectors, roles=roles, scoring=scoring)
    if not args.force:
        compare_settings(
            run_dir, settings, stored_at=stored_path(run_dir, SETTINGS_NAME, "sweep", force=False)
        )
    with executor_from_args(args, adapter) as executor, prepare(run_dir, "sweep", force=args.force):
        split = ensure_split(run_dir / "split.json", mcq, **split_args)
        check_settings(run_dir, settings)
        _sweep(
            executor,
            args,
            run_dir,
            adapter,
            vectors,
            roles,
            domain_of,
            alphas,
            positions,
            layers,
            prompt_format,
            mcq,
            split,
            scoring,
        )
    return 0


def _sweep(
    executor: Any,
    args: argparse.Namespace,
    run_dir: Any,
    adapter: Any,
    vectors: Any,
    roles: list[str],
    domain_of: dict[str, str],
    alphas: Any,
    positions: Any,
    layers: Any,
    prompt_format: Any,
    mcq: Any,
    split: Any,
    scoring: str = "letter",
) -> None:
    from ..analysis.stats import format_table, summarize
    from ..core.records import read_records
    from ..evaluation.scoring import LetterScorer
    from ..evaluation.selection import Choice
    from ..study.stages import select_sites

    scorer = LetterScorer(adapter)

    def warn_unmet(choice: Choice) -> None:
        if not choice.criterion_met:
            print(
                f"rolevec: no candidate for {choice.role} beats the validation baseline under addition while "
                "not "
                "beating it under ablation; selected the best addition candidate anyway "
                "(criterion_met false in selection.json)",
                file=sys.stderr,
            )

    picked = select_sites(
        adapter,
        vectors,
        roles,
        mcq,
        split,
        run_dir,
        domain_of=domain_of,
        layers=layers,
        positions=positions,
        alphas=alphas,
        limit=args.limit,
        prompt_format=prompt_format,
        batch_size=args.batch_size,
        max_rows=args.max_rows,
        max_cache_bytes=args.max_cache_mb * 1024**2,
        reuse=not args.no_reuse,
        ablate_scope=args.ablate,
        scorer=scorer,
        progress=not args.no_progress,
        on_choice=warn_unmet,
        log=lambda line: print(f"rolevec: {line}", file=sys.stderr),
        executor=executor,
        scoring=scoring,
    )
    choices, results = picked.choices, picked.sweeps
    write_command_manifest(
        run_dir,
        "sweep",
        args,
        adapter,
        {
            "questions": {"source": mcq.source, "kind": mcq.kind, "n_skipped": mcq.n_skipped},
            "scorer": scorer.mode,
            "reuse": {r.role: r.reuse for r in results},
            "probe_error": {r.role: r.probe_error for r in results},
            "layers": list(layers),
            "positions": list(positions),
            "alphas": list(alphas),
            "execution": executor.describe(),
        },
    )
    for choice, result in zip(choices, results, strict=True):
        qids = {it.qid for it in split.select(mcq, choice.domain, "val", args.limit)}
        chosen = [
            r
            for r in read_records(run_dir / "records.jsonl")
            if r["qid"] in qids
            and r["split"] == "val"
            and (
                r["condition"] == "baseline"
                or (
                    r["role"] == choice.role
                    and r["layer"] == choice.layer
                    and r["position"] == choice.position
                    and (r["alpha"] is None or float(r["alpha"]) == choice.alpha)
                    and r["condition"] in ("add", "ablate")
                )
            )
        ]
        met = "criterion met" if choice.criterion_met else "criterion NOT met"
        print(
            f"\n{choice.role} on {choice.domain} (validation, {len(qids)} questions): layer {choice.layer}, "
            f"position {choice.position}, α {choice.alpha:g} — {met}, {choice.n_candidates_passing} "
            f"candidate(s) passing, {len(result.rows)} grid cells, {result.reuse} mode"
        )
        print(format_table(summarize(chosen)))
    print(f"\nselection in {run_dir / 'selection.json'}, grid in {run_dir / 'sweep.jsonl'}", file=sys.stderr)
