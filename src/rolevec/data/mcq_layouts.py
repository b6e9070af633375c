"""Question sources beyond the paper's domain files: column mappings, dataset layout presets and ``hf:``.

A :class:`MCQSpec` says where questions come from and how a row's fields become an item; it is frozen
and JSON-able so a study config, ``settings.json`` and remote workers can carry it. Every source read
through a mapping gets a namespace in its question ids (``file:<stem>/...``, ``hf:NAME@SPLIT/...``) so
two sources in one run folder never collide. Entry points::

    MCQSpec(source, question_field=..., choices_field=..., answer_field=..., layout=...)
    parse_hf_source("hf:allenai/ai2_arc:ARC-Challenge@test") -> HFSource
    load_hf(spec, domains) -> MCQSet
    load_mapped_file(path, spec, domains) -> MCQSet
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.files import read_text
from ..errors import RolevecError, path_problem

if TYPE_CHECKING:
    from .items import MCQItem, MCQSet


@dataclass(frozen=True)
class MCQSpec:
    """Where questions come from and how a row becomes an item (``None``: the source's own layout).

    Attributes:
        source: A folder, a file, ``hf:NAME[:CONFIG][@SPLIT]`` or ``lm-eval:TASK``.
        question_field: The field holding the question text.
        choices_field: The field holding the choices (a list, a letter -> text object, or ``{text, label}``),
            or several comma-separated fields, one per choice (``opa,opb,opc,opd``).
        answer_field: The field holding the answer: a letter or label, a 0-based index, or a choice's text.
        subject_field: The field holding the subject (the split is stratified by it).
        domain_map: A JSON file mapping subject -> domain; subjects it lacks are left out.
        domain: One domain for every item.
        layout: A preset of :data:`LAYOUTS` (``mmlu``, ``mmlu_pro``, ``medqa``, ``arc``, ``commonsense_qa``).
        include_path: A folder of lm-eval task YAML files (``lm-eval:`` sources only).
        skip_bad: Skip malformed items (counted) instead of raising.
        rerender: The prompt will be rendered from the parsed question and choices rather than a source's
            own instruction, so an instruction whose choices cannot be parsed is an error.

    Example:
        ```python
        spec = MCQSpec("hf:allenai/ai2_arc:ARC-Easy@test")
        mcq = load_mcq(spec)
        ```
    """

    source: str
    question_field: str | None = None
    choices_field: str | None = None
    answer_field: str | None = None
    subject_field: str | None = None
    domain_map: str | None = None
    domain: str | None = None
    layout: str | None = None
    include_path: str | None = None
    skip_bad: bool = False
    rerender: bool = False

    def to_json(self) -> dict[str, Any]:
        """The fields that differ from the defaults, ``source`` always (what settings.json pins)."""
        defaults = MCQSpec(self.source)
        return {k: v for k, v in asdict(self).items() if k == "source" or v != getattr(defaults, k)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "mcq") -> MCQSpec:
        """The spec a :meth:`to_json` (or a config file's ``mcq`` table) describes; bad keys are errors."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RolevecError(
                f"{where} has unknown key(s) {', '.join(unknown)}: valid keys are {', '.join(sorted(known))}"
            )
        if not isinstance(data.get("source"), str) or not data["source"]:
            raise RolevecError(f"{where} needs a 'source' string (a folder, a file, hf:NAME or lm-eval:TASK)")
        for key, value in data.items():
            flag = key in ("skip_bad", "rerender")
            if value is not None and not isinstance(value, bool if flag else str):
                raise RolevecError(f"{where} key {key} must be {'true or false' if flag else 'a string'}")
        return cls(**dict(data))

    @property
    def mapped(self) -> bool:
        """Whether a field, layout or domain option asks for the mapped reading of a file."""
        return any(
            v is not None
            for v in (
                self.question_field,
                self.choices_field,
                self.answer_field,
                self.subject_field,
                self.domain_map,
                self.domain,
                self.layout,
            )
        )


@dataclass(frozen=True)
class Layout:
    """A dataset's field names and answer encoding, and how its items get a domain.

    ``domain_rule``: ``mmlu`` (subjects to the paper's 8 domains; other subjects left out), ``subject``
    (one domain per subject/category) or ``dataset`` (every item in ``domain``).
    """

    name: str
    question: str
    choices: str
    answer: str
    subject: str | None
    domain_rule: str
    domain: str
    hf_names: tuple[str, ...]
    config: str | None = None
    split: str = "test"


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("mmlu", "question", "choices", "answer", "subject", "mmlu", "mmlu", ("cais/mmlu",), "all"),
        Layout(
            "mmlu_pro",
            "question",
            "options",
            "answer",
            "category",
            "subject",
            "mmlu_pro",
            ("tiger-lab/mmlu-pro",),
        ),
        Layout(
            "medqa",
            "question",
            "options",
            "answer_idx",
            None,
            "dataset",
            "medicine",
            ("gbaker/medqa-usmle-4-options", "bigbio/med_qa"),
        ),
        Layout(
            "arc",
            "question",
            "choices",
            "answerKey",
            None,
            "dataset",
            "arc",
            ("allenai/ai2_arc", "ai2_arc"),
            "ARC-Challenge",
        ),
        Layout(
            "commonsense_qa",
            "question",
            "choices",
            "answerKey",
            "question_concept",
            "dataset",
            "commonsense_qa",
            ("tau/commonsense_qa", "commonsense_qa"),
            None,
            "validation",  # the test split has no answers
        ),
    )
}


def layout_named(name: str) -> Layout:
    if name not in LAYOUTS:
        raise RolevecError(f"unknown `layout` {name!r}: pass one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def layout_for_dataset(name: str) -> Layout | None:
    """The preset of a hub dataset, by its name (case-insensitive), or ``None``."""
    lowered = name.lower()
    return next((lay for lay in LAYOUTS.values() if lowered in lay.hf_names), None)


# --- hf: sources -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFSource:
    """A parsed ``hf:NAME[:CONFIG][@SPLIT]``; ``config``/``split`` are ``None`` where not written."""

    name: str
    config: str | None
    split: str | None


def parse_hf_source(text: str) -> HFSource:
    """``hf:allenai/ai2_arc:ARC-Challenge@test`` -> name, config, split; ``hf:`` alone is ``cais/mmlu``."""
    rest = text[3:] if text.startswith("hf:") else text
    split: str | None = None
    if "@" in rest:
        rest, split = rest.rsplit("@", 1)
        if not split:
            raise RolevecError(f"{text!r} has an empty split after '@': pass e.g. hf:cais/mmlu@test")
    name, _, config = rest.partition(":")
    if ":" in config:
        raise RolevecError(f"{text!r} has more than one ':': pass hf:NAME[:CONFIG][@SPLIT]")
    return HFSource(name or "cais/mmlu", config or None, split)


def hf_rows(name: str, config: str | None, split: str) -> Any:
    """The rows of one split of a hub dataset (``datasets.load_dataset``), as an iterable of mappings."""
    try:
        import datasets
    except ImportError as exc:
        raise RolevecError(
            "loading from the hub needs `pip install datasets`; or pass `mcq` as a local file"
        ) from exc
    where = f"{name}" + (f":{config}" if config else "") + f"@{split}"
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # hub unreachable, unknown name/config/split: one line either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RolevecError(
            f"could not load hf:{where} from the hub ({first}); check the name, config and split, "
            "or pass `mcq` as a local file"
        ) from None


def is_legacy_mmlu(source: HFSource) -> bool:
    """``hf:cais/mmlu`` (all@test): read as before, ids ``domain/index``, so old run folders resume."""
    return source.name == "cais/mmlu" and source.config in (None, "all") and source.split in (None, "test")


# --- mapped reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fields:
    question: str
    choices: str
    answer: str
    subject: str | None
    rule: str
    domain: str | None
    domain_map: dict[str, str] | None


def _fields(spec: MCQSpec, layout: Layout | None, default_domain: str) -> _Fields:
    def pick(given: str | None, preset: str | None, fallback: str | None) -> str | None:
        return given if given is not None else preset if layout is not None else fallback

    domain_map = _read_domain_map(spec.domain_map) if spec.domain_map else None
    rule = "map" if domain_map else layout.domain_rule if layout else "field"
    if spec.domain:
        rule = "one"
    question = pick(spec.question_field, layout.question if layout else None, "question")
    choices = pick(spec.choices_field, layout.choices if layout else None, "choices")
    answer = pick(spec.answer_field, layout.answer if layout else None, "answer")
    subject = pick(spec.subject_field, layout.subject if layout else None, "subject")
    domain = spec.domain or (layout.domain if layout and layout.domain_rule == "dataset" else default_domain)
    assert question is not None and choices is not None and answer is not None
    return _Fields(question, choices, answer, subject, rule, domain, domain_map)


def _read_domain_map(path: str) -> dict[str, str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise RolevecError(f"`domain_map` {p} {path_problem(p)}: pass a JSON file of subject -> domain")
    try:
        data = json.loads(read_text(p, what="domain map"))
    except json.JSONDecodeError as exc:
        raise RolevecError(
            f"`domain_map` {p} is not valid JSON ({exc}): pass a subject -> domain object"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
        raise RolevecError(f"`domain_map` {p} must be a JSON object of subject -> domain name")
    return {str(k): v for k, v in data.items()}


def missing_field(where: str, name: str, row: Mapping[str, Any], option: str) -> RolevecError:
    """One line naming the absent field, the fields that are there and the closest one."""
    present = [str(k) for k in row]
    close = difflib.get_close_matches(name, present, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RolevecError(
        f"{where} has no field {name!r} (it has: {', '.join(present) or 'none'}){hint} pass `{option}` "
        "with one of those"
    )


def check_fields(where: str, row: Any, spec_fields: _Fields) -> None:
    """The named fields exist in the first row: a wrong name is one error, not every item skipped."""
    if not isinstance(row, Mapping):
        return
    wanted = [("question_field", spec_fields.question)]
    wanted += [("choices_field", c.strip()) for c in spec_fields.choices.split(",")]
    wanted.append(("answer_field", spec_fields.answer))
    for option, name in wanted:
        if name not in row:
            raise missing_field(where, name, row, option)


def _labelled(raw: Any, columns: Sequence[str], row: Mapping[str, Any]) -> tuple[list[Any], list[str] | None]:
    """Choice texts and their labels (``None`` where the source gives none) from one row."""
    from .items import _Bad

    if len(columns) > 1:
        return [row.get(c) for c in columns], None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _Bad(f"{columns[0]} is text but not a JSON list or object") from exc
    if isinstance(raw, Mapping):
        if "text" in raw and "label" in raw:
            texts, labels = raw["text"], raw["label"]
            if not isinstance(texts, list | tuple) or not isinstance(labels, list | tuple):
                raise _Bad(f"{columns[0]} text and label are not lists")
            if len(texts) != len(labels):
                raise _Bad(f"has {len(texts)} choice text(s) but {len(labels)} label(s) (ragged choices)")
            return list(texts), [str(x).strip() for x in labels]
        return list(raw.values()), [str(k).strip() for k in raw]
    if isinstance(raw, list | tuple):
        if raw and all(isinstance(x, Mapping) and "key" in x and "value" in x for x in raw):
            return [x["value"] for x in raw], [str(x["key"]).strip() for x in raw]
        return list(raw), None
    raise _Bad(f"{columns[0]} is not a list of choices (a list, a letter -> text object, or {{text, label}})")


def _answer_index(value: Any, labels: Sequence[str] | None, choices: Sequence[str]) -> int:
    """A label, a letter, a 0-based index or a choice's exact text -> the choice's position."""
    from .items import ALL_LETTERS, _Bad

    n = len(choices)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < n:
            return value
        raise _Bad(f"answer {value} is outside the choices (0-{n - 1})")
    if isinstance(value, str):
        text = value.strip()
        if labels is not None and text in labels:
            return labels.index(text)
        if labels is None and text.upper() in ALL_LETTERS[:n]:
            return ALL_LETTERS.index(text.upper())
        as_text = list(choices).index(value) if value in choices else None
        if text.isascii() and text.isdigit() and labels is None:
            as_index = int(text) if int(text) < n else None
            if as_index is not None and as_text is not None and as_index != as_text:
                raise _Bad(
                    f"answer {value!r} is ambiguous: choice {as_index} by index, choice {as_text} by text "
                    "(give letters, or JSON integers for indices)"
                )
            found = as_index if as_index is not None else as_text
            if found is not None:
                return found
            raise _Bad(f"answer {value!r} is outside the choices (0-{n - 1})")
        if as_text is not None:
            return as_text
    known = f"labels {', '.join(labels)}" if labels else f"letters {', '.join(ALL_LETTERS[:n])}, 0-{n - 1}"
    raise _Bad(f"answer {value!r} is none of the item's {known} or choice texts")


def mapped_item(row: Any, f: _Fields, index: int, namespace: str) -> MCQItem | None:
    """One row as an item under the mapping ``f``; ``None`` where the domain map leaves its subject out."""
    from .items import ALL_LETTERS, SUBJECT_DOMAIN, MCQItem, _Bad, check_choices

    if not isinstance(row, Mapping):
        raise _Bad(f"is a {type(row).__name__}, not an object")
    question = row.get(f.question)
    if not isinstance(question, str) or not question.strip():
        raise _Bad(f"has no question text in {f.question!r}")
    columns = [c.strip() for c in f.choices.split(",")]
    texts, labels = _labelled(row.get(columns[0]), columns, row)
    choices = check_choices(texts)
    if labels is not None and len(set(labels)) != len(labels):
        raise _Bad(f"has duplicate choice labels ({', '.join(labels)})")
    answer = ALL_LETTERS[_answer_index(row.get(f.answer), labels, choices)]
    subject_value = row.get(f.subject) if f.subject else None
    subject = str(subject_value) if subject_value not in (None, "") else None
    if f.rule == "one":
        domain = f.domain
    elif f.rule == "map":
        assert f.domain_map is not None
        domain = f.domain_map.get(subject or "")
    elif f.rule == "mmlu":
        domain = SUBJECT_DOMAIN.get(subject or "")
    elif f.rule == "subject":
        domain = subject or f.domain
    elif f.rule == "field":
        domain = str(row["domain"]) if row.get("domain") else f.domain
    else:
        domain = f.domain
    if domain is None:
        return None
    return MCQItem(f"{namespace}{domain}/{index}", domain, question, choices, answer, subject or domain)


def mapped_items(
    rows: Any, spec: MCQSpec, layout: Layout | None, where: str, namespace: str, default_domain: str
) -> tuple[dict[str, list[MCQItem]], int, int]:
    """Items per domain, how many were malformed (skipped under ``skip_bad``) and how many were unmapped."""
    from .items import _Bad

    f = _fields(spec, layout, default_domain)
    out: dict[str, list[MCQItem]] = {}
    bad = unmapped = 0
    for index, row in enumerate(rows):
        if index == 0:
            check_fields(f"{where} item 0", row, f)
        try:
            item = mapped_item(row, f, index, namespace)
        except _Bad as exc:
            if not spec.skip_bad:
                raise RolevecError(f"{where} item {index} {exc}: fix the source or pass `skip_bad`") from None
            bad += 1
            continue
        if item is None:
            unmapped += 1
        else:
            out.setdefault(item.domain, []).append(item)
    if unmapped and f.rule == "map":
        warnings.warn(
            f"{where}: {unmapped} item(s) have a subject that {spec.domain_map} does not map; left out",
            UserWarning,
            stacklevel=4,
        )
    return out, bad, unmapped


def select_domains(
    items: dict[str, list[MCQItem]], domains: Sequence[str] | None, where: str
) -> dict[str, list[MCQItem]]:
    """The chosen domains' items; a domain the source lacks is one error listing those it has."""
    if domains is None:
        return items
    missing = [d for d in domains if d not in items]
    if missing:
        raise RolevecError(
            f"{where} has no questions for domain(s) {', '.join(missing)} (it has: "
            f"{', '.join(items) or 'none'}); pass domains from that list or a `domain_map`"
        )
    return {d: items[d] for d in domains}


def load_hf(spec: MCQSpec, domains: Sequence[str] | None) -> MCQSet:
    """A hub dataset read through its layout preset (by name, or ``layout``) or the field options."""
    from .items import MCQSet

    src = parse_hf_source(spec.source)
    layout = layout_named(spec.layout) if spec.layout else layout_for_dataset(src.name)
    if layout is None and not (spec.question_field or spec.choices_field or spec.answer_field):
        raise RolevecError(
            f"no layout preset for hf:{src.name}: pass `layout` (one of {', '.join(LAYOUTS)}) or "
            "`question_field`, `choices_field` and `answer_field`"
        )
    config = src.config if src.config is not None else (layout.config if layout else None)
    split = src.split or (layout.split if layout else "test")
    label = f"hf:{src.name}" + (f":{config}" if config else "") + f"@{split}"
    rows = hf_rows(src.name, config, split)
    default = (layout.domain if layout else src.name.rsplit("/", 1)[-1]).lower()
    items, bad, _ = mapped_items(rows, spec, layout, label, f"{label}/", default)
    return MCQSet(select_domains(items, domains, label), label, bad, "hf")


def load_mapped_file(
    path: Path,
    rows: Sequence[Any],
    spec: MCQSpec,
    domains: Sequence[str] | None,
    *,
    default_domain: str | None = None,
) -> MCQSet:
    """A JSON/JSONL/CSV file read through ``spec``'s fields or layout; ids ``file:<stem>/<domain>/<i>``."""
    from .items import MCQSet

    layout = layout_named(spec.layout) if spec.layout else None
    default = default_domain or path.stem
    items, bad, _ = mapped_items(rows, spec, layout, str(path), f"file:{path.stem}/", default)
    return MCQSet(select_domains(items, domains, str(path)), f"file:{path.resolve()}", bad, "file")
