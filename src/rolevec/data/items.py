"""The multiple-choice item and question set every source produces, and the checks on one item's choices
and answer that all of them share (so each source names a bad item the same way).

Entry points::

    MCQItem(qid, domain, question, choices, answer, subject, instruction=None, delimiter=" ")
    MCQSet(items, source, n_skipped=0, kind="custom")
    check_choices(choices) -> tuple[str, ...]          # raises BadItem
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Answer letters, in order: an item with N choices uses the first N (2 <= N <= 26).
ALL_LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: The four letters of MMLU-style items (the paper's format).
LETTERS = ALL_LETTERS[:4]
MIN_CHOICES, MAX_CHOICES = 2, len(ALL_LETTERS)
DOMAINS = ("econ", "eecs", "law", "math", "medicine", "natural_science", "politics", "psychology")

#: MMLU subjects per domain (the paper's grouping; table in the paper data README).
MMLU_SUBJECTS: dict[str, tuple[str, ...]] = {
    "econ": (
        "management",
        "professional_accounting",
        "econometrics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
    ),
    "eecs": ("electrical_engineering", "college_computer_science", "high_school_computer_science"),
    "law": ("professional_law", "international_law"),
    "math": ("high_school_statistics", "college_mathematics", "high_school_mathematics"),
    "medicine": ("clinical_knowledge", "college_medicine", "professional_medicine"),
    "natural_science": (
        "college_physics",
        "college_biology",
        "high_school_physics",
        "high_school_chemistry",
        "college_chemistry",
        "high_school_biology",
    ),
    "politics": ("us_foreign_policy", "high_school_government_and_politics"),
    "psychology": ("professional_psychology", "high_school_psychology"),
}
SUBJECT_DOMAIN = {s: d for d, subjects in MMLU_SUBJECTS.items() for s in subjects}


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question (2 to 26 choices, letters A.. in order); ``qid`` is unique in its source.

    Attributes:
        qid: The question's id: ``domain/index`` (its index in the source file) for a folder of domain
            files, with the source's namespace in front for other sources (``hf:NAME/...``, ...).
        domain: The domain it belongs to (``medicine``, ``law``, ...).
        question: The question text.
        choices: The answer texts, for A, B, C, ... in order.
        answer: The correct letter (``A`` for the first choice).
        subject: Its subject within the domain; the split is stratified by it.
        instruction: The whole user turn as its source wrote it (the paper's released files), used
            verbatim by default; ``None`` where the prompt template renders the question.
        delimiter: What separates the prompt from a choice's text under continuation scoring
            (lm-eval's ``target_delimiter``; default one space).

    Example:
        ```python
        item = MCQItem("medicine/0", "medicine", "Which organ makes insulin?",
                       ("Liver", "Pancreas", "Kidney", "Spleen"), "B", "anatomy")
        ```
    """

    qid: str
    domain: str
    question: str
    choices: tuple[str, ...]
    answer: str
    subject: str
    instruction: str | None = None
    delimiter: str = " "

    @property
    def letters(self) -> tuple[str, ...]:
        """The item's answer letters, one per choice."""
        return ALL_LETTERS[: len(self.choices)]

    @property
    def answer_index(self) -> int:
        return ALL_LETTERS.index(self.answer)


@dataclass
class MCQSet:
    """Questions per domain, in source order, and where they came from.

    Made by :func:`load_mcq`.

    Attributes:
        items: Domain -> its questions, in source order.
        source: Where the questions came from (a folder, a file or ``hf:NAME``).
        n_skipped: How many malformed items ``skip_bad`` left out (default 0).
        kind: ``builtin``, ``shared``, ``env``, ``custom`` or ``hf``: which kind of source it is.

    Example:
        ```python
        mcq = load_mcq(domains=["medicine", "law"])
        print(mcq.domains, len(mcq.items["law"]), mcq.n_skipped)
        ```
    """

    items: dict[str, list[MCQItem]]
    source: str
    n_skipped: int = 0
    kind: str = "custom"  # builtin | shared | env | custom | hf

    @property
    def domains(self) -> list[str]:
        return list(self.items)

    def by_qid(self) -> dict[str, MCQItem]:
        return {it.qid: it for items in self.items.values() for it in items}


class _Bad(Exception):
    """One item's problem; the caller adds the file and item to the message (or skips the item)."""


def _answer_letter(value: Any, n: int = 4) -> str:
    """Accepted: one of the item's ``n`` letters in either case (surrounding spaces ignored), an integer
    0..n-1, or the text of one (ASCII digits, leading zeros allowed); 0 is A. Anything else, booleans
    included, is refused."""
    letters = ALL_LETTERS[:n]
    expected = f"one of {', '.join(letters)} (or 0-{n - 1})"
    if isinstance(value, bool):
        raise _Bad(f"answer {value!r} is not {expected}")
    if isinstance(value, int) and 0 <= value < n:
        return letters[value]
    if isinstance(value, str):
        text = value.strip()
        if text.upper() in letters:
            return text.upper()
        digits = text.lstrip("0") or "0"
        # ASCII only: "²".isdigit() is true but int("²") fails, and a huge digit string is no answer
        if text.isascii() and text.isdigit() and len(digits) <= 2 and int(digits) < n:
            return letters[int(digits)]
    raise _Bad(f"answer {value!r} is not {expected}")


def _choices(row: Mapping[str, Any]) -> list[Any]:
    raw = row.get("choices")
    if isinstance(raw, str):  # CSV: a JSON list in one cell
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _Bad("choices is text but not a JSON list") from exc
    if raw is None and all(k in row for k in LETTERS):  # CSV: columns A, B, C, D (, E, ...)
        raw = [row[k] for k in ALL_LETTERS if row.get(k) not in (None, "")]
    if not isinstance(raw, list | tuple):
        raise _Bad("has no list of choices (pass a 'choices' list of strings or columns A, B, C, D, ...)")
    return list(raw)


def check_choices(choices: Sequence[Any]) -> tuple[str, ...]:
    """The choices as text; raises :class:`_Bad` for too few or too many, or one that is not text."""
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise _Bad(f"has {len(choices)} choice(s); an item needs {MIN_CHOICES} to {MAX_CHOICES}")
    if not all(isinstance(c, str | int | float) and not isinstance(c, bool) for c in choices):
        raise _Bad("has a choice that is not text")
    return tuple(str(x) for x in choices)
