"""The question-source flags shared by `rolevec run`, `sweep` and `evaluate`, and the spec they make."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..data.mcq_layouts import MCQSpec

#: Flag dest -> MCQSpec field, for the options that only a spec carries.
_SPEC_FIELDS = {
    "question_field": "question_field",
    "choices_field": "choices_field",
    "answer_field": "answer_field",
    "subject_field": "subject_field",
    "domain_map": "domain_map",
    "mcq_domain": "domain",
    "layout": "layout",
    "include_path": "include_path",
}


def add_mcq_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--mcq`` (alias ``--mcq-dir``), the column-mapping flags, ``--layout``, ``--include-path`` and
    ``--rerender``; one place so the three commands spell them alike."""
    from ..data.mcq_layouts import LAYOUTS

    parser.add_argument(
        "--mcq",
        "--mcq-dir",
        dest="mcq",
        default=None,
        help="questions: a folder of <domain>.json/.jsonl/.csv, one such file (also the paper's released "
        "instruction/target_score files), hf:NAME[:CONFIG][@SPLIT] or lm-eval:TASK (default: "
        "$ROLEVEC_MMLU_DIR if set, else the paper's files in ../shared/data/role-vectors-paper/mmlu_domains, "
        "else the built-in sample of 24 questions per domain)",
    )
    parser.add_argument("--question-field", default=None, help="field holding the question text")
    parser.add_argument(
        "--choices-field",
        default=None,
        help="field holding the choices (a list, a letter->text object or {text, label}), or several "
        "comma-separated fields, one per choice (e.g. opa,opb,opc,opd)",
    )
    parser.add_argument(
        "--answer-field",
        default=None,
        help="field holding the answer: letter or label, 0-based index, or text",
    )
    parser.add_argument("--subject-field", default=None, help="field holding the subject")
    parser.add_argument(
        "--domain-map", default=None, help="JSON file of subject -> domain (unmapped subjects are left out)"
    )
    parser.add_argument("--mcq-domain", default=None, help="one domain name for every question")
    parser.add_argument(
        "--layout",
        default=None,
        choices=sorted(LAYOUTS),
        help="a dataset's field layout (hf: picks it by name)",
    )
    parser.add_argument("--include-path", default=None, help="folder of lm-eval task YAML files (lm-eval:)")
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="render prompts from the template even for items that carry their own instruction (the "
        "paper's files; default: use the instruction verbatim)",
    )


def mcq_spec_from_args(args: argparse.Namespace) -> MCQSpec | str | None:
    """The plain ``--mcq`` value where no other question flag is given (ids and settings as before),
    else an :class:`MCQSpec`."""
    from ..data.mcq_layouts import MCQSpec
    from ..errors import RolevecError

    given = [dest for dest in _SPEC_FIELDS if getattr(args, dest, None) is not None]
    options = {_SPEC_FIELDS[dest]: getattr(args, dest) for dest in given}
    rerender = bool(getattr(args, "rerender", False))
    if not options and not rerender:
        return args.mcq  # type: ignore[no-any-return]
    if args.mcq is None:
        if given:
            raise RolevecError(f"--{given[0].replace('_', '-')} needs --mcq: pass the questions too")
        return None  # the default sources carry no instructions: nothing to re-render differently
    return MCQSpec(str(args.mcq), rerender=rerender, **options)


def add_scoring_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--scoring``: how a question is scored (see docs/evaluation.md)."""
    parser.add_argument(
        "--scoring",
        choices=["auto", "letter", "continuation"],
        default="auto",
        help="letter: the answer letters' logits at the last prompt position; continuation: each choice's "
        "summed log-likelihood after the prompt (lm-eval's acc and acc_norm); auto (default): continuation "
        "for lm-eval: tasks, letter otherwise",
    )


def scoring_from_args(args: argparse.Namespace) -> str | None:
    """``--scoring``; ``None`` for ``auto``, which the question source decides (lm-eval scores its
    multiple-choice tasks by continuation; every other source lists lettered choices in its prompt)."""
    scoring = getattr(args, "scoring", None)
    return None if scoring in (None, "auto") else str(scoring)
