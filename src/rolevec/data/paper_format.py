"""The paper's released question files: JSON lists of ``{"instruction", "target_score", "dataset"}``.

The instruction is the whole user turn, already rendered (question, lettered choice lines, the answer
request). Items keep it verbatim, so prompts match the paper's by default; the question and choices are
also parsed out of it so a prompt template can re-render them (``rerender``). Entry points::

    is_paper_rows(rows) -> bool
    paper_domain(path) -> str
    parse_instruction(text) -> (question, choices) | None
    paper_items(rows, path, spec, domains) -> MCQSet
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RolevecError

if TYPE_CHECKING:
    from .items import MCQItem, MCQSet
    from .mcq_layouts import MCQSpec

_CHOICE_LINE = re.compile(r"^\s*([A-Z])\.[ \t]?(.*)$")
_SPLIT_PREFIX = re.compile(r"^target_(?:test|val|train)_(.+)$")
#: The letters a paper item keeps when its choices cannot be parsed (the paper's files have four).
PAPER_LETTERS = 4


def is_paper_rows(rows: Sequence[Any]) -> bool:
    """Whether a file's rows are the paper's format (objects with ``instruction`` and ``target_score``)."""
    return (
        bool(rows) and isinstance(rows[0], Mapping) and "instruction" in rows[0] and "target_score" in rows[0]
    )


def paper_domain(path: str | Path) -> str:
    """``target_test_law.json`` (also ``target_val_``/``target_train_``) or ``law.json`` -> ``law``."""
    stem = Path(path).stem
    match = _SPLIT_PREFIX.match(stem)
    return match[1] if match else stem


def parse_instruction(text: str) -> tuple[str, tuple[str, ...]] | None:
    """The question and the choice texts of a rendered instruction; ``None`` when they cannot be found.

    Choice lines are ``X. text`` with consecutive letters from A; a line between two choice lines
    continues the choice above it; lines after the last choice (the answer request) are not choices.
    """
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if (m := _CHOICE_LINE.match(line)) and m[1] == "A"]
    for start in starts:
        chain = [start]
        letter = 1
        for i in range(start + 1, len(lines)):
            m = _CHOICE_LINE.match(lines[i])
            if m and m[1] == chr(ord("A") + letter):
                chain.append(i)
                letter += 1
        if len(chain) < 2:
            continue
        question = "\n".join(lines[:start]).strip()
        if not question:
            return None
        choices = []
        for k, at in enumerate(chain):
            m = _CHOICE_LINE.match(lines[at])
            assert m is not None
            end = chain[k + 1] if k + 1 < len(chain) else at + 1
            parts = [m[2], *(line.strip() for line in lines[at + 1 : end])]
            choices.append("\n".join(parts).strip())
        return question, tuple(choices)
    return None


def paper_items(rows: Sequence[Any], path: Path, spec: MCQSpec, domains: Sequence[str] | None) -> MCQSet:
    """A paper-format file as an :class:`MCQSet`; ids ``paper:<stem>/<domain>/<index>``.

    An instruction whose choices cannot be parsed keeps its item (letters A-D, empty choice texts) for
    verbatim prompts, named in one warning; with ``spec.rerender`` it is an error naming the item.
    """
    from .items import ALL_LETTERS, MCQItem, MCQSet, _answer_letter, _Bad, check_choices
    from .mcq_layouts import _read_domain_map, select_domains

    domain_map = _read_domain_map(spec.domain_map) if spec.domain_map else None
    file_domain = spec.domain or paper_domain(path)
    items: dict[str, list[MCQItem]] = {}
    bad = 0
    unparsed: list[int] = []
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, Mapping):
                raise _Bad(f"is a {type(row).__name__}, not an object")
            instruction = row.get("instruction")
            if not isinstance(instruction, str) or not instruction.strip():
                raise _Bad("has no instruction text")
            parsed = parse_instruction(instruction)
            if parsed is None:
                if spec.rerender:
                    raise _Bad(
                        "has an instruction whose question and lettered choices (A. ..., B. ...) cannot be "
                        "parsed, so it cannot be re-rendered: drop `rerender` to use it verbatim"
                    )
                unparsed.append(index)
                question, choices = instruction.strip(), ("",) * PAPER_LETTERS
            else:
                question, choices = parsed[0], check_choices(parsed[1])
            answer = _answer_letter(row.get("target_score"), len(choices))
            subject = str(row.get("dataset") or "") or None
            domain = file_domain
            if domain_map is not None and not spec.domain:
                domain = domain_map.get(subject or "") or ""
                if not domain:
                    continue
            item = MCQItem(
                f"paper:{path.stem}/{domain}/{index}",
                domain,
                question,
                choices,
                answer,
                subject or domain,
                instruction=instruction,
            )
            assert item.letters == ALL_LETTERS[: len(choices)]
        except _Bad as exc:
            if not spec.skip_bad:
                raise RolevecError(f"{path} item {index} {exc}: fix the file or pass `skip_bad`") from None
            bad += 1
            continue
        items.setdefault(domain, []).append(item)
    if unparsed:
        warnings.warn(
            f"{path}: the choices of {len(unparsed)} item(s) could not be parsed from the instruction "
            f"(first: item {unparsed[0]}); they are scored verbatim with letters A-D and cannot be "
            "re-rendered",
            UserWarning,
            stacklevel=3,
        )
    return MCQSet(select_domains(items, domains, str(path)), str(path.resolve()), bad, "paper")
