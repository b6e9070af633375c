"""`rolevec run`: the paper's study end to end in one resumable command."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..errors import RolevecError
from .common import add_model_args, fraction, load_from_args, positive_int
from .executor_args import add_executor_args, executor_from_args
from .mcq_args import add_mcq_args, add_scoring_arg, mcq_spec_from_args, scoring_from_args


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "run",
        help="the whole study: prompts, vectors, selection on validation, test conditions, report",
        description="Extract role vectors, choose each role's steering site on a validation split, evaluate "
        "baseline, persona, addition (each α), ablation and a random control on the test split of every "
        "domain, interpret the vectors, and write report.html. Rerunning on the same --out continues.",
    )
    add_model_args(parser)
    parser.set_defaults(dtype=None)  # the preset decides unless --dtype is given
    parser.add_argument("--preset", choices=["quick", "paper"], default="quick", help="default: quick")
    parser.add_argument("--config", default=None, help="JSON or TOML file of run options (over the preset)")
    parser.add_argument("--out", required=True, help="run folder (a rerun on it resumes)")
    parser.add_argument("--roles", default=None, help="comma-separated roles, or all (the paper's 29)")
    parser.add_argument("--domains", default=None, help="comma-separated MMLU domains, or all")
    parser.add_argument(
        "--roles-dir", default=None, help="folder of <role>.json prompt sets (default built-in)"
    )
    parser.add_argument("--base", default=None, help="generic prompts file (default: built-in)")
    parser.add_argument(
        "--base-column", default=None, help="field or CSV column of --base that holds the prompt"
    )
    parser.add_argument("--n", dest="n_prompts", type=positive_int, default=None, help="prompts per role")
    parser.add_argument("--n-base", type=positive_int, default=None, help="base prompts")
    add_mcq_args(parser)
    add_scoring_arg(parser)
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed questions of --mcq (counted) instead of failing",
    )
    parser.add_argument(
        "--role-domains",
        default=None,
        help="JSON file mapping roles to the domain each is selected on (roles outside the paper's table)",
    )
    parser.add_argument(
        "--val-limit", type=positive_int, default=None, help="validation questions per domain"
    )
    parser.add_argument("--test-limit", type=positive_int, default=None, help="test questions per domain")
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=None,
        help="share of each domain for validation (default 0.2)",
    )
    parser.add_argument("--layers", default=None, help="layer range a:b to search (default: first 80%%)")
    parser.add_argument("--layer-step", type=positive_int, default=None, help="search every k-th layer")
    parser.add_argument("--positions", default=None, help="positions to search, e.g. -1,-4, or all")
    parser.add_argument("--alphas", default=None, help="addition strengths, e.g. 1,3")
    parser.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint for the LLM judge")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="questions per forward")
    parser.add_argument("--no-interpret", action="store_true", help="skip patch-scoping and the logit lens")
    parser.add_argument(
        "--force",
        action="store_true",
        help="start over: set rolevec's earlier results in --out aside (deleted once the run succeeds)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_executor_args(parser)
    parser.set_defaults(func=run)


OVERRIDES = (
    "roles",
    "domains",
    "roles_dir",
    "base",
    "base_column",
    "n_prompts",
    "n_base",
    "mcq",
    "scoring",
    "role_domains",
    "val_limit",
    "test_limit",
    "val_fraction",
    "layers",
    "layer_step",
    "positions",
    "alphas",
    "judge_url",
    "batch_size",
)


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..core.outdir import check_run_folder
    from ..data.mcq_layouts import MCQSpec
    from ..study.pipeline import check_inputs, config_from, describe_sampling, read_config_file, run_study

    file_cfg = read_config_file(args.config) if args.config else None
    overrides: dict[str, Any] = {k: getattr(args, k) for k in OVERRIDES}
    overrides["scoring"] = scoring_from_args(args)
    spec = mcq_spec_from_args(args)
    if args.skip_bad:
        if spec is None:
            raise RolevecError("--skip-bad needs --mcq: the default questions have no malformed items")
        spec = replace(spec, skip_bad=True) if not isinstance(spec, str) else MCQSpec(spec, skip_bad=True)
    overrides["mcq"] = spec if spec is None or isinstance(spec, str) else spec.to_json()
    if args.no_interpret:
        overrides["interpret"] = False
    if args.dtype is not None:
        overrides["dtype"] = args.dtype
    config = config_from(args.preset, file_cfg, overrides)
    # before the model loads and before the folder changes: a typo or a broken file costs nothing
    run_dir = check_run_folder(args.out, "run", force=args.force)
    check_inputs(config)
    start = time.perf_counter()
    adapter = load_from_args(args, dtype=config.dtype)
    print(
        f"rolevec run ({args.preset}) on {adapter.name}, {adapter.dtype}, {adapter.device} → {run_dir}",
        file=sys.stderr,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    with executor_from_args(args, adapter) as executor:
        study = run_study(
            adapter,
            config,
            run_dir,
            args={**{k: v for k, v in vars(args).items() if k != "func"}, "dtype": config.dtype},
            preset=args.preset,
            progress=not args.no_progress,
            log=log,
            force=args.force,
            executor=executor,
        )
    from ..analysis.report import console_summary

    print()
    print(f"Sampled: {describe_sampling(study.state.sampled, study.roles, study.domains)}")
    print()
    for line in console_summary(run_dir, role_map=config.role_map()):
        print(line)
    for note in study.state.notes:
        print(f"note: {note}")
    print(f"\nreport: {run_dir / 'report.html'} ({time.perf_counter() - start:.0f} s in all)")
    return 0
