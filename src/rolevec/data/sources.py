"""Prompt sets: the role sets D_r and the generic base set, loaded from files, folders or `datasets`.

Every loader returns a :class:`PromptSet` of stripped, non-empty, de-duplicated prompts (first occurrence
kept, in file order) and says where they came from, so a vector file can record its provenance. Errors
name the file and line, because prompt files are edited by hand.
"""

from __future__ import annotations

import csv
import json
import random
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

from ..core.files import read_text
from ..errors import RolevecError, path_problem

#: Paper Table 2: the 8 MMLU domains and the 29 roles used for them (in the paper's order).
PAPER_DOMAINS: Mapping[str, tuple[str, ...]] = {
    "econ": ("economic_researcher", "economist", "financial_analyst"),
    "eecs": (
        "electronics_technician",
        "data_scientist",
        "electrical_engineer",
        "software_engineer",
        "web_developer",
    ),
    "law": ("bailiff", "lawyer"),
    "math": ("data_analyst", "mathematician", "statistician"),
    "medicine": ("nurse", "doctor", "physician", "dentist", "surgeon"),
    "natural_science": ("geneticist", "biologist", "physicist", "teacher", "chemist", "ecologist"),
    "politics": ("politician", "sheriff", "enthusiast", "partisan"),
    "psychology": ("psychologist",),
}

#: File types a role folder may hold, in the order they are looked for.
PROMPT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")
#: Fields tried, in order, for objects in JSON/JSONL files and columns in CSV files.
DEFAULT_FIELDS = ("instruction", "prompt", "text")
HF_PREFIX = "hf:"
#: How to name the prompt field of a --base file: the flag of `rolevec extract`/`run` and the config key.
BASE_COLUMN_ADVICE = "pass `base_column` NAME (config key base_column) with the one that holds the prompt"
#: What to do when the field named by --base-column (``column=``) is not there.
WRONG_COLUMN_ADVICE = "pass one of them as `base_column` (config key base_column)"
#: Role files take no column option: their field must be one of DEFAULT_FIELDS.
ROLE_COLUMN_ADVICE = f"rename the field that holds the prompt to {DEFAULT_FIELDS[0]!r} in the role file"


def builtin_dir() -> Path:
    """The data shipped inside the package (roles, base set, domain table, MCQs)."""
    return Path(__file__).resolve().parent / "builtin"


@dataclass(frozen=True)
class PromptSet:
    """Prompts for one role (or the base set), with where they came from.

    Usually made by :func:`load_prompts`, :func:`load_role_prompts` or :func:`load_base`.

    Args:
        name: The role (or ``base``) the prompts are for; names the set in vector metadata.
        prompts: The prompts, stripped, non-empty and de-duplicated.
        source: Where they came from (a path, ``builtin:...`` or ``hf:...``).
        n_duplicates_dropped: How many duplicate prompts the loader dropped (default 0).

    Example:
        ```python
        ps = PromptSet(name="doctor", prompts=("Diagnose a rash.", "Explain statins."), source="notes")
        len(ps)  # 2
        ```
    """

    name: str
    prompts: tuple[str, ...]
    source: str
    n_duplicates_dropped: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def describe(self) -> dict[str, Any]:
        """Provenance as stored in a vector file's metadata."""
        return {
            "n": len(self.prompts),
            "source": self.source,
            "duplicates_dropped": self.n_duplicates_dropped,
        }


def _dedupe(items: Iterable[str]) -> tuple[tuple[str, ...], int]:
    seen: dict[str, None] = {}
    dropped = 0
    for item in items:
        if item in seen:
            dropped += 1
        else:
            seen[item] = None
    return tuple(seen), dropped


def _names(names: Iterable[Any]) -> str:
    return ", ".join(map(str, names)) or "(none)"


def _pick_field(obj: Mapping[str, Any], column: str | None, where: str, advice: str) -> Any:
    if column is not None:
        if column not in obj:
            raise RolevecError(f"{where}: no field {column!r} (fields: {_names(obj)}); {WRONG_COLUMN_ADVICE}")
        return obj[column]
    for name in DEFAULT_FIELDS:
        if name in obj:
            return obj[name]
    raise RolevecError(
        f"{where}: object has none of the fields {', '.join(DEFAULT_FIELDS)} (its fields: {_names(obj)}); "
        f"{advice}"
    )


def _as_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RolevecError(f"{where}: expected a string prompt, found {type(value).__name__}")
    return value


def _item_text(item: Any, column: str | None, where: str, advice: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return _as_text(_pick_field(item, column, where, advice), where)
    raise RolevecError(f"{where}: expected a string or an object, found {type(item).__name__}")


def _json_line_of(text: str, index: int) -> int | None:
    """Best-effort line number of the index-th element of a top-level JSON list (for error messages)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    for i in range(index + 1):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if i == index:
            return text.count("\n", 0, pos) + 1
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
    return None


def _from_json(path: Path, column: str | None, advice: str) -> list[str]:
    text = read_text(path, what="prompt file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RolevecError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from exc
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise RolevecError(
                f"{path}: expected a JSON list of prompts (strings or objects with an 'instruction' field)"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise RolevecError(f"{path}: expected a JSON list of prompts, found {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        try:
            out.append(_item_text(item, column, f"{path} (item {i})", advice))
        except RolevecError:
            line = _json_line_of(text, i)
            if line is None:
                raise
            out.append(_item_text(item, column, f"{path}:{line} (item {i})", advice))
    return out


def _from_jsonl(path: Path, column: str | None, advice: str) -> list[str]:
    out = []
    for lineno, line in enumerate(read_text(path, what="prompt file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RolevecError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from exc
        out.append(_item_text(item, column, f"{path}:{lineno}", advice))
    return out


def _from_csv(path: Path, column: str | None, advice: str) -> list[str]:
    text = read_text(path, what="prompt file")
    reader = csv.reader(text.splitlines(), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise RolevecError(f"{path}:1: malformed CSV header ({exc})") from exc
    header = [h.strip() for h in header]
    if column is not None:
        if column not in header:
            raise RolevecError(
                f"{path}:1: no column {column!r} (columns: {_names(header)}); {WRONG_COLUMN_ADVICE}"
            )
        col = header.index(column)
    else:
        found = [name for name in DEFAULT_FIELDS if name in header]
        if found:
            col = header.index(found[0])
        elif len(header) == 1:
            col = 0
        else:
            raise RolevecError(
                f"{path}:1: no column is named {', '.join(DEFAULT_FIELDS)} (columns: {_names(header)}); "
                f"{advice}"
            )
    out = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise RolevecError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise RolevecError(
                f"{path}:{reader.line_num}: malformed CSV row with {len(row)} fields, the header has "
                f"{len(header)} (quote fields that contain commas)"
            )
        out.append(row[col])
    return out


def _from_lines(path: Path) -> list[str]:
    return read_text(path, what="prompt file").splitlines()


def _from_hf(spec: str, column: str | None, advice: str) -> tuple[list[str], str]:
    """``hf:NAME`` or ``hf:NAME:SPLIT`` (default split: train), read with the `datasets` library."""
    rest = spec[len(HF_PREFIX) :]
    name, _, split = rest.partition(":")
    split = split or "train"
    if not name:
        raise RolevecError(f"{spec!r} names no dataset: pass hf:OWNER/NAME or hf:OWNER/NAME:SPLIT")
    try:
        import datasets
    except ImportError as exc:
        raise RolevecError(
            "loading a Hugging Face dataset needs the `datasets` package: `pip install datasets` "
            "(or `pip install rolevec[datasets]`), or pass a local file"
        ) from exc
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RolevecError(
            f"could not load dataset {name!r} split {split!r} ({first}); pass a local file instead"
        ) from exc
    columns = list(ds.column_names)
    if column is None:
        found = [c for c in DEFAULT_FIELDS if c in columns]
        if not found:
            raise RolevecError(
                f"dataset {name!r} has none of the columns {', '.join(DEFAULT_FIELDS)} (columns: "
                f"{_names(columns)}); {advice}"
            )
        column = found[0]
    elif column not in columns:
        raise RolevecError(
            f"dataset {name!r} has no column {column!r} (columns: {_names(columns)}); {WRONG_COLUMN_ADVICE}"
        )
    values = ds[column]
    return [_as_text(v, f"{name}[{i}]") for i, v in enumerate(values)], f"hf:{name}:{split}#{column}"


def load_prompts(path: str | Path, *, column: str | None = None, name: str | None = None) -> PromptSet:
    """Load a prompt file (JSON, JSONL, CSV, text) or ``hf:NAME[:SPLIT]``; strip, drop blanks, de-duplicate.

    ``column`` picks the field (JSON/JSONL objects) or column (CSV, datasets) holding the prompt; by
    default ``instruction``, then ``prompt``, then ``text``.

    Args:
        path: A prompt file (.json, .jsonl, .csv, anything else read as one prompt a line) or
            ``hf:NAME[:SPLIT]`` for a Hugging Face dataset.
        column: The field or column holding the prompt (default: the first of the three above found).
        name: The set's name (default: the file's stem, or the dataset name).

    Returns:
        The loaded :class:`PromptSet`; raises ``RolevecError`` when it holds no prompts.

    Example:
        ```python
        ps = load_prompts("data/chemist.jsonl", column="prompt", name="chemist")
        print(len(ps), ps.n_duplicates_dropped)
        ```
    """
    return _load(path, column, name, BASE_COLUMN_ADVICE)


def _load(path: str | Path, column: str | None, name: str | None, advice: str) -> PromptSet:
    """load_prompts, with the advice for a missing prompt field fitted to where the file came from."""
    spec = str(path)
    if spec.startswith(HF_PREFIX):
        raw, source = _from_hf(spec, column, advice)
        label = name or spec[len(HF_PREFIX) :].partition(":")[0]
    else:
        p = Path(path).expanduser()
        if p.is_dir():
            raise RolevecError(
                f"{p} is a folder: pass a prompt file, or use it as a roles folder (`roles_dir`) holding "
                "<role>.json files"
            )
        if not p.is_file():
            hint = (
                f"; for a Hugging Face dataset pass hf:{spec}"
                if re.fullmatch(r"[\w.-]+/[\w.-]+", spec)
                else ""
            )
            raise RolevecError(
                f"prompt file {p} {path_problem(p)}: pass a JSON, JSONL, CSV or text file{hint}"
            )
        suffix = p.suffix.lower()
        if suffix == ".json":
            raw = _from_json(p, column, advice)
        elif suffix == ".jsonl":
            raw = _from_jsonl(p, column, advice)
        elif suffix == ".csv":
            raw = _from_csv(p, column, advice)
        else:
            raw = _from_lines(p)
        source = str(p)
        label = name or p.stem
    prompts, dropped = _dedupe(s for s in (r.strip() for r in raw) if s)
    if not prompts:
        raise RolevecError(f"{source} holds no prompts: pass a file with at least one non-empty prompt")
    return PromptSet(name=label, prompts=prompts, source=source, n_duplicates_dropped=dropped)


def normalise_role(role: str) -> str:
    """'Data Scientist' / 'data-scientist' -> 'data_scientist' (the file-name form)."""
    return re.sub(r"[\s\-]+", "_", role.strip()).lower()


def role_display(role: str) -> str:
    """The natural-language form used in persona prompts: 'data_scientist' -> 'data scientist'."""
    return normalise_role(role).replace("_", " ")


def _roles_dir(roles_dir: str | Path | None) -> Path:
    if roles_dir is None:
        return builtin_dir() / "roles"
    path = Path(roles_dir).expanduser()
    if not path.is_dir():
        raise RolevecError(
            f"roles folder {path} {path_problem(path, folder=True)}: pass a folder of <role>.json files"
        )
    return path


def available_roles(roles_dir: str | Path | None = None) -> list[str]:
    """Roles with a prompt file in ``roles_dir`` (default: the 29 built-in roles), sorted.

    Args:
        roles_dir: A folder of ``<role>.json`` (or .jsonl/.csv/.txt) files; ``None`` for the built-in roles.

    Returns:
        The role names (file stems), sorted.

    Example:
        ```python
        roles = available_roles()  # ['accountant', 'biologist', ...]
        mine = available_roles("my_roles")
        ```
    """
    folder = _roles_dir(roles_dir)
    return sorted({p.stem for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES})


def load_role_prompts(role: str, roles_dir: str | Path | None = None) -> PromptSet:
    """The prompt set D_r of one role, from ``<roles_dir>/<role>.json`` (or .jsonl/.csv/.txt).

    Args:
        role: The role; normalised to the file-name form ("Data Scientist" -> ``data_scientist``).
        roles_dir: The folder holding the role files; ``None`` (default) for the built-in roles.

    Returns:
        The role's :class:`PromptSet`; raises ``RolevecError`` naming the known roles when none is found.

    Example:
        ```python
        doctor = load_role_prompts("doctor")
        chemist = load_role_prompts("chemist", roles_dir="my_roles")
        ```
    """
    folder = _roles_dir(roles_dir)
    key = normalise_role(role)
    for suffix in PROMPT_SUFFIXES:
        path = folder / f"{key}{suffix}"
        if path.is_file():
            ps = _load(path, None, key, ROLE_COLUMN_ADVICE)
            if roles_dir is None:
                ps = replace(ps, source=f"builtin:roles/{path.name}")
            return ps
    known = available_roles(roles_dir)
    where = "the built-in roles" if roles_dir is None else str(folder)
    raise RolevecError(
        f"no prompt file for role {role!r} in {where}: pass one of {', '.join(known) or '(none found)'}, "
        "or `roles_dir` with a folder holding <role>.json"
    )


def load_base(path: str | Path | None = None, *, column: str | None = None) -> PromptSet:
    """The generic base set D_base (default: the built-in Alpaca-style instructions).

    Args:
        path: A prompt file or ``hf:NAME[:SPLIT]`` as for :func:`load_prompts`; ``None`` for the built-in set.
        column: The field or column holding the prompt (ignored for the built-in set).

    Returns:
        The base :class:`PromptSet`, named ``base``.

    Example:
        ```python
        base = load_base()
        base = load_base("hf:tatsu-lab/alpaca", column="instruction")
        ```
    """
    if path is None:
        ps = load_prompts(builtin_dir() / "base.json", name="base")
        return replace(ps, source="builtin:base.json")
    return load_prompts(path, column=column, name="base")


def sample(ps: PromptSet, n: int | None, seed: int) -> PromptSet:
    """``n`` prompts drawn as the paper does (``random.seed(seed); random.sample(prompts, n)``).

    With fewer than ``n`` prompts, all are used (in file order) and a warning says so; ``None`` keeps all.

    Args:
        ps: The prompt set to draw from.
        n: How many prompts to draw (at least 1); ``None`` keeps the whole set.
        seed: The random seed, so the same seed draws the same prompts.

    Returns:
        A :class:`PromptSet` with the drawn prompts (the same set when nothing is drawn).

    Example:
        ```python
        doctor = sample(load_role_prompts("doctor"), 128, seed=42)
        base = sample(load_base(), 128, seed=42)
        ```
    """
    if n is None:
        return ps
    if n < 1:
        raise RolevecError(f"`n` must be at least 1, not {n}")
    if len(ps.prompts) < n:
        warnings.warn(
            f"{ps.name}: only {len(ps.prompts)} prompts (after dropping {ps.n_duplicates_dropped} "
            f"duplicates) in {ps.source}, fewer than n={n}; using all of them",
            stacklevel=2,
        )
        return ps
    picked = random.Random(seed).sample(list(ps.prompts), n)
    return replace(ps, prompts=tuple(picked))


def domain_roles() -> dict[str, list[str]]:
    """The paper's 8 domains -> 29 roles (Table 2); a fresh copy each call."""
    return {domain: list(roles) for domain, roles in PAPER_DOMAINS.items()}


def load_role_domains(path: str | Path) -> dict[str, str]:
    """A role -> domain map from a JSON object, so roles outside the paper's table get a domain.

    Selection needs each role's own domain; the paper's Table 2 covers 29 roles on 8 MMLU domains, and
    this file covers any other role or domain. Role names are normalised as role files are
    ("Data Scientist" -> ``data_scientist``); domains are kept as written.

    Args:
        path: A JSON file holding one object, e.g. ``{"nurse": "medqa", "teacher": "arc"}``.

    Returns:
        The map, role (normalised) -> domain; raises ``RolevecError`` naming the file and the entry.

    Example:
        ```python
        mapping = load_role_domains("role_domains.json")
        role_domain("nurse", mapping=mapping)  # 'medqa'
        ```
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise RolevecError(f"role -> domain map {p} {path_problem(p)}: pass a JSON file of role -> domain")
    text = read_text(p, what="role -> domain map")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RolevecError(
            f"{p}:{exc.lineno}: malformed JSON ({exc.msg}): pass a JSON object of role -> domain"
        ) from exc
    if not isinstance(data, dict):
        raise RolevecError(
            f"{p} holds a JSON {type(data).__name__}, not an object: pass a JSON object of role -> domain, "
            'e.g. {"nurse": "medqa"}'
        )
    if not data:
        raise RolevecError(
            f'{p} maps no role: pass at least one role -> domain entry, e.g. {{"nurse": "medqa"}}'
        )
    out: dict[str, str] = {}
    for role, domain in data.items():
        if not isinstance(domain, str) or not domain.strip():
            shown = json.dumps(domain, ensure_ascii=False)
            raise RolevecError(
                f"{p} entry {role!r} maps to {shown}: pass the domain as a non-empty string, e.g. "
                f'{{"{role}": "medqa"}}'
            )
        key = normalise_role(role)
        if not key:
            raise RolevecError(f'{p} has an entry with an empty role name: name the role, e.g. "nurse"')
        if key in out and out[key] != domain.strip():
            raise RolevecError(
                f"{p} maps role {key!r} twice ({out[key]!r} and {domain.strip()!r}): keep one entry per role"
            )
        out[key] = domain.strip()
    return out


@overload
def role_domain(role: str, *, strict: Literal[True], mapping: Mapping[str, str] | None = None) -> str: ...
@overload
def role_domain(
    role: str, *, strict: bool = False, mapping: Mapping[str, str] | None = None
) -> str | None: ...
def role_domain(role: str, *, strict: bool = False, mapping: Mapping[str, str] | None = None) -> str | None:
    """The domain whose questions a role is evaluated on: ``mapping`` first, then the paper's Table 2.

    ``mapping`` is a role -> domain map (:func:`load_role_domains`), so roles and domains outside the
    paper's table can be studied. A role in neither has None, or with ``strict`` an error that asks for one.
    """
    key = normalise_role(role)
    if mapping:
        for name, domain in mapping.items():
            if normalise_role(name) == key:
                return domain
    for domain, roles in PAPER_DOMAINS.items():
        if key in roles:
            return domain
    if strict:
        raise RolevecError(
            f"role {role!r} has no domain in the paper's table"
            + (" nor in the role -> domain map" if mapping else "")
            + f": pass `domain` (one of {', '.join(PAPER_DOMAINS)}, or any domain of the questions) or "
            "`role_domains` with a JSON file mapping the role to its domain"
        )
    return None
