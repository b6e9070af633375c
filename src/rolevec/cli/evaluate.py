"""`rolevec evaluate`: score MCQ domains under baseline, persona, addition, ablation and random control.

Results are appended per batch to RUN_DIR/records.jsonl; rerunning the same command resumes. The run's
question split lives in RUN_DIR/split.json (or comes from the sweep that chose the site).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RolevecError
from .common import add_model_args, fraction, load_from_args, positive_int
from .executor_args import add_executor_args, executor_from_args
from .mcq_args import add_mcq_args, add_scoring_arg, mcq_spec_from_args, scoring_from_args

if TYPE_CHECKING:
    from ..data.mcq import MCQSet

CONDITION_NAMES = ("baseline", "persona", "add", "ablate", "random", "cap")
#: Conditions that steer with a role vector (a composition can stand in for the role).
STEERED_NAMES = ("add", "ablate", "random", "cap")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Question source, split and prompt options shared by `evaluate` and `sweep`."""
    data = parser.add_argument_group("questions")
    add_mcq_args(data)
    add_scoring_arg(data)
    data.add_argument(
        "--skip-bad", action="store_true", help="skip malformed questions (counted) instead of failing"
    )
    data.add_argument("--limit", type=positive_int, default=None, help="at most N questions per domain")
    data.add_argument("--seed", type=int, default=None, help="split seed (default: the run's, else 0)")
    data.add_argument(
        "--val-fraction",
        type=fraction,
        default=None,
        help="share of each domain used for validation (default 0.2)",
    )
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument(
        "--prompt-file",
        default=None,
        help="text file with the user-turn template ({question}, {A}..{D}, {subject})",
    )
    prompt.add_argument(
        "--answer-prefix",
        default=None,
        help="text appended after the generation prompt, e.g. 'The answer is' (letters then follow a space)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="run folder (created; a rerun resumes from its records)")
    run.add_argument("--batch-size", type=positive_int, default=16, help="questions per forward (default 16)")
    run.add_argument(
        "--force", action="store_true", help="discard the run folder's earlier results and start over"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="score MCQ domains under baseline/persona/add/ablate/random conditions",
        description="Score multiple-choice questions by their answer letters' logits (or, with --scoring "
        "continuation, each choice's log-likelihood) under the chosen conditions; records go to "
        "RUN_DIR/records.jsonl and a summary table is printed.",
    )
    add_model_args(parser)
    parser.add_argument("--vectors", default=None, help="role-vector file (needed for add, ablate, random)")
    parser.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use vectors whose model fingerprint differs from the loaded model (a warning, not an error)",
    )
    parser.add_argument(
        "--role", default=None, help="role, or comma-separated roles (needed except for baseline)"
    )
    parser.add_argument(
        "--compose",
        action="append",
        default=None,
        metavar="ROLE:W,...",
        help="a composition of the file's roles (e.g. doctor:1,lawyer:-0.5) steered like one more role by "
        "add, ablate, random and cap; repeat for several",
    )
    parser.add_argument(
        "--compose-mode",
        default="sum",
        choices=["sum", "orthogonal"],
        help="sum: Σ w·d (default); orthogonal: each role's vector with the earlier ones projected out first",
    )
    parser.add_argument(
        "--conditions",
        default="baseline,persona,add,ablate,random",
        help="comma-separated subset of baseline,persona,add,ablate,random,cap "
        "(default: all but cap, which needs --cap)",
    )
    site = parser.add_argument_group("steering site (or --selection)")
    site.add_argument("--layer", type=int, default=None, help="layer L (input of block L)")
    site.add_argument("--position", type=int, default=None, help="post-instruction position, e.g. -1")
    site.add_argument("--alpha", type=float, default=None, help="addition strength α")
    site.add_argument("--selection", default=None, help="selection.json of a sweep (site per role)")
    site.add_argument(
        "--cap",
        default=None,
        metavar="LO:HI",
        help="condition cap: keep the projection on the role's unit direction within [LO, HI] (write "
        "--cap=-2:5 when LO is negative)",
    )
    site.add_argument(
        "--cap-layers",
        default=None,
        metavar="L,L,...",
        help="condition cap: the layers whose input is capped (default: the site's layer)",
    )
    parser.add_argument(
        "--persona-template",
        default="you_are",
        help="you_are ('You are a/an {role}.'), imagine, talking_to, or comma-separated several",
    )
    parser.add_argument("--random-seed", type=int, default=0, help="seed of the random-direction control")
    parser.add_argument(
        "--no-reuse",
        action="store_true",
        help="score each addition and random control as a full forward (the default runs them from a "
        "shared residual of the lower layers)",
    )
    parser.add_argument("--domains", default="all", help="comma-separated domains, or all (default)")
    parser.add_argument(
        "--split", default="test", choices=["test", "val", "all"], help="which questions (default test)"
    )
    parser.add_argument(
        "--split-file", default=None, help="a split.json to use (default: the run's, or the sweep's)"
    )
    add_data_args(parser)
    add_executor_args(parser)
    parser.set_defaults(func=run)


# --- shared steps (also used by `rolevec sweep`) ----------------------------------------------------


def planned_split(run_dir: Path, mcq: Any, *, command: str, force: bool, **split_args: Any) -> Any:
    """The split a run will use, computed without writing: ``--force`` ignores the stored one (it is
    about to be set aside), so every check runs before anything in the folder changes."""
    import tempfile

    from ..core.outdir import stored_path
    from ..data.mcq import ensure_split

    if not force:
        stored = stored_path(run_dir, "split.json", command, force=False)
        return ensure_split(stored, mcq, save=False, **split_args)
    with tempfile.TemporaryDirectory() as fresh:
        return ensure_split(Path(fresh) / "split.json", mcq, save=False, **split_args)


def load_questions(args: argparse.Namespace, domains: Sequence[str] | None) -> MCQSet:
    from ..data.mcq import load_mcq

    mcq = load_mcq(mcq_spec_from_args(args), domains, skip_bad=args.skip_bad)
    kind = {
        "shared": "the paper's MMLU domain files",
        "env": "$ROLEVEC_MMLU_DIR",
        "builtin": "the built-in sample (24 questions per domain; pass --mcq for MMLU)",
        "hf": "Hugging Face",
        "custom": "--mcq",
        "paper": "the paper's released format (--mcq)",
        "file": "--mcq with field mappings",
        "lm-eval": "an lm-eval task",
    }.get(mcq.kind, mcq.kind)
    counts = ", ".join(f"{d} {len(v)}" for d, v in mcq.items.items())
    print(f"rolevec: questions from {kind}: {mcq.source} ({counts})", file=sys.stderr)
    if mcq.n_skipped:
        print(f"rolevec: skipped {mcq.n_skipped} malformed question(s) (--skip-bad)", file=sys.stderr)
    return mcq


def prompt_format_from_args(args: argparse.Namespace) -> Any:
    from ..evaluation.scoring import PAPER_TEMPLATE, PromptFormat

    template = PAPER_TEMPLATE
    if args.prompt_file:
        from ..core.files import read_text

        template = read_text(args.prompt_file, what="--prompt-file").rstrip("\n")
        try:
            return PromptFormat(template, args.answer_prefix, verbatim=not args.rerender)
        except RolevecError as exc:
            raise RolevecError(f"--prompt-file {args.prompt_file}: {exc}") from None
    return PromptFormat(template, args.answer_prefix, verbatim=not args.rerender)


def write_command_manifest(
    run_dir: Path, command: str, args: argparse.Namespace, adapter: Any, extra: dict[str, Any]
) -> None:
    from ..model.manifest import build_manifest, write_manifest

    manifest = build_manifest(
        {k: v for k, v in vars(args).items() if k != "func"}, adapter, {"command": command, **extra}
    )
    write_manifest(run_dir / f"manifest-{command}.json", manifest)


def split_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


# --- evaluate --------------------------------------------------------------------------------------


def _conditions(args: argparse.Namespace, adapter: Any, vectors: Any) -> list[Any]:
    from ..evaluation.conditions import Condition
    from ..evaluation.selection import load_selection, selected_site
    from ..steering.interventions import ablation_problem
    from .steer_args import composed, parse_cap, parse_cap_layers, parse_compose_arg

    kinds = split_list(args.conditions)
    unknown = [k for k in kinds if k not in CONDITION_NAMES]
    if not kinds or unknown:
        raise RolevecError(
            f"--conditions {args.conditions!r}: pass a comma-separated subset of {','.join(CONDITION_NAMES)}"
        )
    cap = None if args.cap is None else parse_cap(args.cap)
    cap_layers = None if args.cap_layers is None else parse_cap_layers(args.cap_layers)
    if "cap" in kinds and cap is None:
        raise RolevecError("condition cap needs a range: pass --cap LO:HI (e.g. --cap=-2:5)")
    if "cap" not in kinds and (cap is not None or cap_layers is not None):
        given = "--cap" if cap is not None else "--cap-layers"
        raise RolevecError(f"{given} applies to condition cap: add cap to --conditions")
    roles = split_list(args.role)
    compositions = [parse_compose_arg(text) for text in args.compose or ()]
    needs_role = [k for k in kinds if k != "baseline"]
    if needs_role and not roles and not compositions:
        raise RolevecError(f"conditions {','.join(needs_role)} need --role (or --compose ROLE:W,...)")
    if compositions and not any(k in STEERED_NAMES for k in kinds):
        raise RolevecError(
            f"--compose steers, so it needs one of the conditions {','.join(STEERED_NAMES)} in --conditions"
        )
    if compositions and args.selection:
        raise RolevecError(
            "a selection file holds a site per role, not per composition: with --compose pass --layer, "
            "--position (and --alpha) instead of --selection"
        )
    if "persona" in kinds and not roles:
        raise RolevecError("condition persona needs a role: pass --role (a composition has no persona)")
    steered = [k for k in kinds if k in STEERED_NAMES]
    explicit = args.layer is not None or args.position is not None or args.alpha is not None
    if steered:
        if vectors is None:
            raise RolevecError(f"conditions {','.join(steered)} need --vectors FILE")
        if args.selection and explicit:
            raise RolevecError("pass either --selection or --layer/--position/--alpha, not both")
        if not args.selection and (args.layer is None or args.position is None):
            raise RolevecError(
                f"conditions {','.join(steered)} need --layer and --position (or --selection FILE)"
            )
        if not args.selection and args.alpha is None and any(k in ("add", "random") for k in steered):
            raise RolevecError("conditions add and random need --alpha (or --selection FILE)")
    selection = load_selection(args.selection, adapter) if args.selection else None

    def steered_at(kind: str, layer: Any, position: Any, alpha: Any, **who: Any) -> Any:
        """A steered condition at a site (α only where it applies, the range only for cap); ``who`` is the
        role, or the composition."""
        return Condition.make(
            kind,
            layer=layer,
            position=position,
            alpha=None if kind in ("ablate", "cap") else alpha,
            cap=cap if kind == "cap" else None,
            cap_layers=cap_layers if kind == "cap" else None,
            **who,
        )

    templates = split_list(args.persona_template) or ["you_are"]
    out: list[Any] = []
    if "baseline" in kinds:
        out.append(Condition("baseline"))
    for role in roles:
        if steered and role not in vectors.roles:
            raise RolevecError(f"role {role!r} is not in {args.vectors} (it has: {', '.join(vectors.roles)})")
        if selection is not None:
            try:
                layer, position, alpha = selected_site(selection, role)
            except RolevecError as exc:
                raise RolevecError(f"--selection {args.selection}: {exc}") from None
        else:
            layer, position, alpha = args.layer, args.position, args.alpha
        for kind in kinds:
            if kind == "baseline":
                continue
            if kind == "persona":
                out.extend(Condition.make("persona", role=role, persona_template=t) for t in templates)
            else:
                out.append(steered_at(kind, layer, position, alpha, role=role))
    for text, terms in zip(args.compose or (), compositions, strict=True):
        composed(vectors, terms, args.compose_mode, label=f"--compose {text}")  # every role in the file
        out.extend(
            steered_at(
                kind, args.layer, args.position, args.alpha, compose=terms, compose_mode=args.compose_mode
            )
            for kind in steered
        )
    if len({c.identity() for c in out}) != len(out):
        raise RolevecError("--role or --compose names the same role twice: name each role once")
    for cond in out:  # refuse a site the file lacks, or a bad template, before the run folder is written
        if cond.kind in STEERED_NAMES:
            for layer in cond.cap_layers or ():
                vectors.check_layer(layer)
            source = cond.source(vectors)
            if cond.kind in ("ablate", "cap"):
                what = "ablate" if cond.kind == "ablate" else "cap along"
                problem = ablation_problem(
                    source, str(cond.role), [int(cond.layer)], int(cond.position), what=what
                )
                if problem:
                    raise RolevecError(problem)
            cond.steering(vectors, args.random_seed)
        elif cond.kind == "persona":
            cond.system()
    return out


def _base_split(args: argparse.Namespace, run_dir: Path) -> Any:
    from ..data.mcq import Split

    if args.split_file:
        return Split.load(args.split_file)
    if args.selection and (args.force or not (run_dir / "split.json").exists()):
        beside = Path(args.selection).parent / "split.json"
        if beside.exists():
            return Split.load(beside)
    return None


def run(args: argparse.Namespace) -> int:
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..core.outdir import check_run_folder, prepare, stored_path
    from ..core.records import SETTINGS_NAME, check_settings, compare_settings
    from ..data.mcq import ensure_split, parse_domains
    from ..evaluation.conditions import resolve_scoring, run_settings
    from ..evaluation.selection import check_held_out, load_selection
    from ..vectors.role_vectors import RoleVectors

    # Every input is checked before the folder changes: flags and files first, before the model loads.
    run_dir = check_run_folder(args.out, "evaluate", force=args.force)
    domains = parse_domains(args.domains)
    vectors = RoleVectors.load(args.vectors) if args.vectors else None
    prompt_format = prompt_format_from_args(args)
    conditions = _conditions(args, None, vectors)
    mcq = load_questions(args, domains)
    base = _base_split(args, run_dir)
    split_args: dict[str, Any] = {"seed": args.seed, "val_fraction": args.val_fraction, "base": base}
    split = planned_split(run_dir, mcq, command="evaluate", force=args.force, **split_args)
    adapter = load_from_args(args)
    if vectors is not None:
        vectors.check_compatible(adapter, allow_other_model=args.allow_other_model)
    if args.selection:
        selection = load_selection(args.selection, adapter)
        if args.split != "val":
            check_held_out(selection, split, domains or mcq.domains)
    uses_random = any(c.kind == "random" for c in conditions)
    settings = run_settings(
        adapter,
        prompt_format,
        split,
        args.random_seed if uses_random else None,
        vectors=vectors,
        roles=sorted({role for c in conditions if c.kind in STEERED_NAMES for role in c.roles}),
        scoring=resolve_scoring(scoring_from_args(args), args.mcq),
    )
    if not args.force:
        compare_settings(
            run_dir, settings, stored_at=stored_path(run_dir, SETTINGS_NAME, "evaluate", force=False)
        )
    with executor_from_args(args, adapter) as executor, prepare(run_dir, "evaluate", force=args.force):
        split = ensure_split(run_dir / "split.json", mcq, **split_args)
        check_settings(run_dir, settings)
        _evaluate(executor, args, run_dir, adapter, mcq, split, conditions, vectors, prompt_format, domains)
    return 0


def _evaluate(
    executor: Any,
    args: argparse.Namespace,
    run_dir: Path,
    adapter: Any,
    mcq: Any,
    split: Any,
    conditions: list[Any],
    vectors: Any,
    prompt_format: Any,
    domains: list[str] | None,
) -> None:
    from ..analysis.stats import format_table, per_subject, summarize
    from ..core.files import atomic_write
    from ..core.records import read_records, record_identity
    from ..evaluation.conditions import resolve_scoring
    from ..evaluation.scoring import LetterScorer
    from ..study.executors import EvalSettings
    from ..study.stages import open_records

    doms = domains if domains is not None else mcq.domains
    scorer = LetterScorer(adapter)
    with open_records(run_dir, log=lambda line: print(f"rolevec: {line}", file=sys.stderr)) as store:
        settings = EvalSettings(
            domains=tuple(doms),
            split_name=args.split,
            limit=args.limit,
            prompt_format=prompt_format,
            batch_size=args.batch_size,
            random_seed=args.random_seed,
            reuse=not args.no_reuse,
            scoring=resolve_scoring(scoring_from_args(args), args.mcq),
            skip_bad=args.skip_bad,
        )
        report = executor.evaluate(
            adapter,
            mcq,
            split,
            conditions,
            store,
            settings,
            vectors=vectors,
            scorer=scorer,
            progress=not args.no_progress,
        )
    if report.persona_folded:
        print(
            "rolevec: this chat template has no system turn; persona prompts were folded into the user turn",
            file=sys.stderr,
        )
    if report.skipped:
        print(
            f"rolevec: skipped {len(report.skipped)} question(s) whose answer letters are not single tokens "
            f"after the prompt (--skip-bad), e.g. {report.skipped[0]}",
            file=sys.stderr,
        )
    wanted = {c.identity() for c in conditions}
    qids = {it.qid for d in doms for it in split.select(mcq, d, args.split, args.limit)}
    records = [
        r
        for r in read_records(run_dir / "records.jsonl")
        if r["qid"] in qids and record_identity(r)[:-2] in wanted
    ]
    rows = summarize(records)
    subjects = per_subject(records)
    summary = {
        "split": args.split,
        "n_new_records": report.n_new,
        "n_records_reused": report.n_done_before,
        "persona_folded": report.persona_folded,
        "skipped_letters": list(report.skipped),
        "scorer": report.scorer_mode,
        "rows": [r.to_json() for r in rows],
        "per_subject": [r.to_json() for r in subjects],
    }
    text = json.dumps(summary, indent=1, ensure_ascii=False, allow_nan=True) + "\n"
    atomic_write(run_dir / "summary.json", lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)
    write_command_manifest(
        run_dir,
        "evaluate",
        args,
        adapter,
        {
            "questions": {"source": mcq.source, "kind": mcq.kind, "n_skipped": mcq.n_skipped},
            "persona_folded": report.persona_folded,
            "scorer": report.scorer_mode,
            "conditions": [c.fields() for c in conditions],
            "execution": executor.describe(),
        },
    )
    print(format_table(rows))
    print(
        f"\n{report.n_new} new record(s), {report.n_done_before} already in {run_dir / 'records.jsonl'}; "
        f"summary in {run_dir / 'summary.json'}",
        file=sys.stderr,
    )
