"""Multiple-choice questions grouped in the paper's 8 domains, and the seeded validation/test split.

Sources, all giving the same :class:`MCQItem` records:

* a folder of ``<domain>.json`` / ``.jsonl`` / ``.csv`` files (the paper's ``mmlu_domains/`` layout, or the
  built-in sample in ``rolevec/data/builtin/mcq``);
* one JSON / JSONL / CSV file whose rows carry a ``domain`` field (or whose file name is the domain);
* Hugging Face ``cais/mmlu`` (``hf:cais/mmlu``), subjects mapped to domains with :data:`MMLU_SUBJECTS`.

Every item gets a stable id ``"<domain>/<index in its source file>"`` so records, splits and resumes agree
across runs. Entry points::

    default_mcq_dir(cwd=None, env=None) -> tuple[Path, str]
    load_mcq(source=None, domains=None, *, skip_bad=False) -> MCQSet
    make_split(mcq, *, seed=0, val_fraction=0.2) -> Split
    Split.load(path) / Split.save(path) / Split.select(mcq, domain, "val"|"test"|"all")
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.files import read_text
from ..errors import RolevecError, path_problem

# the item model lives in .items; it is re-exported here, where callers have always found it
from .items import (
    ALL_LETTERS as ALL_LETTERS,
)
from .items import (
    DOMAINS as DOMAINS,
)
from .items import (
    LETTERS as LETTERS,
)
from .items import (
    MAX_CHOICES as MAX_CHOICES,
)
from .items import (
    MIN_CHOICES as MIN_CHOICES,
)
from .items import (
    MMLU_SUBJECTS as MMLU_SUBJECTS,
)
from .items import (
    SUBJECT_DOMAIN as SUBJECT_DOMAIN,
)
from .items import (
    MCQItem as MCQItem,
)
from .items import (
    MCQSet as MCQSet,
)
from .items import (
    _answer_letter,
    _Bad,
    _choices,
)
from .items import (
    check_choices as check_choices,
)
from .mcq_layouts import MCQSpec, is_legacy_mmlu, load_hf, load_mapped_file, parse_hf_source
from .paper_format import is_paper_rows, paper_domain, paper_items

ENV_VAR = "ROLEVEC_MMLU_DIR"
SHARED_RELATIVE = Path("shared") / "data" / "role-vectors-paper" / "mmlu_domains"
SPLITS = ("val", "test", "all")
_EXTENSIONS = (".json", ".jsonl", ".csv")


def builtin_mcq_dir() -> Path:
    return Path(__file__).resolve().parent / "builtin" / "mcq"


def default_mcq_dir(cwd: Path | None = None, env: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """The paper's MMLU domain files when reachable, else the built-in sample; and which one it is.

    Looks at ``$ROLEVEC_MMLU_DIR``, then ``../shared/data/role-vectors-paper/mmlu_domains`` next to the
    repository and next to the current folder or any of its parents.
    """
    env = os.environ if env is None else env
    if env.get(ENV_VAR):
        path = Path(env[ENV_VAR]).expanduser()
        if not path.is_dir():
            raise RolevecError(f"${ENV_VAR} is {path}, which is not a folder: unset it or fix the path")
        return path, "env"
    here = Path(cwd or Path.cwd()).resolve()
    repo = Path(__file__).resolve().parents[3]  # src/rolevec/data/mcq.py -> repository root
    for base in [repo, here, *here.parents]:
        candidate = base.parent / SHARED_RELATIVE
        if candidate.is_dir():
            return candidate, "shared"
    return builtin_mcq_dir(), "builtin"


# --- parsing ---------------------------------------------------------------------------------------


def _parse(row: Any, domain: str, index: int, namespace: str = "") -> MCQItem:
    if not isinstance(row, Mapping):
        raise _Bad(f"is a {type(row).__name__}, not an object")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _Bad("has no question text")
    choices = check_choices(_choices(row))
    answer = _answer_letter(row.get("answer"), len(choices))
    subject = str(row.get("subject") or domain)
    return MCQItem(f"{namespace}{domain}/{index}", domain, question, choices, answer, subject)


def _read_rows(path: Path) -> list[Any]:
    """Rows of one question file; UTF-8 with or without a byte-order mark (a CSV's first column name
    would otherwise carry it), anything undecodable one error naming the file and line."""
    text = read_text(path, what="question file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RolevecError(
                        f"{path} line {number} is not valid JSON ({exc}); pass one JSON object per line"
                    ) from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RolevecError(f"{path} is not valid JSON ({exc}); pass a JSON list, JSONL or CSV file") from exc
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        data = data["questions"]
    if not isinstance(data, list):
        raise RolevecError(f"{path} holds a JSON {type(data).__name__}; expected a list of question objects")
    return data


def _parse_rows(
    rows: Sequence[Any], path: Path, default_domain: str | None, skip_bad: bool
) -> tuple[dict[str, list[MCQItem]], int]:
    out: dict[str, list[MCQItem]] = {}
    bad = 0
    for index, row in enumerate(rows):
        domain = default_domain
        if isinstance(row, Mapping) and row.get("domain"):
            domain = str(row["domain"])
        if domain is None:
            raise RolevecError(f"{path} item {index} has no 'domain' field and the file name names no domain")
        try:
            out.setdefault(domain, []).append(_parse(row, domain, index))
        except _Bad as exc:
            if not skip_bad:
                raise RolevecError(
                    f"{path} item {index} {exc}: fix the file (rolevec sweep and rolevec evaluate can "
                    "skip such items with `skip_bad`)"
                ) from None
            bad += 1
    return out, bad


def load_mcq_file(path: str | Path, *, skip_bad: bool = False) -> tuple[dict[str, list[MCQItem]], int]:
    """Items of one file, per domain (``domain`` field, else the file name), and how many were skipped."""
    p = Path(path)
    return _parse_file_rows(_read_rows(p), p, skip_bad=skip_bad)


def _parse_file_rows(
    rows: Sequence[Any], path: Path, *, skip_bad: bool
) -> tuple[dict[str, list[MCQItem]], int]:
    has_field = any(isinstance(r, Mapping) and r.get("domain") for r in rows)
    return _parse_rows(rows, path, None if has_field else path.stem, skip_bad)


def _domain_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in _EXTENSIONS and path.is_file() and not path.name.startswith("."):
            domain = paper_domain(path)  # target_test_<domain>.json names its domain
            if domain in files:
                raise RolevecError(f"{folder} has two files for domain {domain!r}: keep one")
            files[domain] = path
    return files


def load_hf_mmlu(
    name: str = "cais/mmlu", *, split: str = "test", domains: Sequence[str] | None = None
) -> MCQSet:
    """MMLU from the Hugging Face hub, subjects mapped to the paper's domains (needs ``datasets``)."""
    try:
        import datasets
    except ImportError as exc:
        raise RolevecError(
            "loading from the hub needs `pip install datasets`; or pass --mcq-dir DIR"
        ) from exc
    try:
        data = datasets.load_dataset(name, "all", split=split)
    except Exception as exc:
        raise RolevecError(f"could not load {name!r} split {split!r} from the hub ({exc})") from exc
    wanted = set(domains or DOMAINS)
    items: dict[str, list[MCQItem]] = {d: [] for d in DOMAINS if d in wanted}
    for row in data:
        domain = SUBJECT_DOMAIN.get(str(row["subject"]))
        if domain is None or domain not in wanted:
            continue
        index = len(items[domain])
        parsed = _parse(
            {"question": row["question"], "choices": list(row["choices"]), "answer": row["answer"]},
            domain,
            index,
        )
        items[domain].append(replace(parsed, subject=str(row["subject"])))
    return MCQSet(items, f"hf:{name}:{split}", 0, "hf")


def load_mcq(
    source: str | Path | MCQSpec | Mapping[str, Any] | None = None,
    domains: Sequence[str] | None = None,
    *,
    skip_bad: bool = False,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> MCQSet:
    """Questions of the chosen domains (all found when ``None``) from a folder, a file, the hub or lm-eval.

    ``source=None`` uses :func:`default_mcq_dir`. Raises on a malformed item unless ``skip_bad`` (then the
    count is in ``n_skipped``), on an unknown domain, and on a domain with no questions. Warns once when a
    domain repeats a question (same text and choices): every copy stays an item with its own id.

    Args:
        source: A folder of ``<domain>.json/.jsonl/.csv`` files, one such file (rows of question/choices/
            answer, or the paper's released instruction/target_score format), ``hf:NAME[:CONFIG][@SPLIT]``
            (``hf:`` alone is ``cais/mmlu``), ``lm-eval:TASK``, or an :class:`MCQSpec` (or its JSON form)
            naming one of those with field mappings or a layout; ``None`` for the paper's MMLU files or
            the built-in sample.
        domains: The domains to load; ``None`` (default) loads every domain found.
        skip_bad: Skip malformed items (counted in ``n_skipped``) instead of raising.
        cwd: Where the search for the default source starts (default: the current folder).
        env: The environment read for ``$ROLEVEC_MMLU_DIR`` (default: ``os.environ``).

    Returns:
        The questions as an :class:`MCQSet`.

    Example:
        ```python
        mcq = load_mcq()  # the paper's MMLU domains when found, else the built-in sample
        mcq = load_mcq("data/mcq", domains=["medicine"], skip_bad=True)
        mcq = load_mcq(MCQSpec("hf:allenai/ai2_arc:ARC-Easy@test"))
        ```
    """
    if isinstance(source, Mapping):
        source = MCQSpec.from_json(source)
    spec: MCQSpec | None = None
    if isinstance(source, MCQSpec):
        spec = replace(source, skip_bad=True) if skip_bad else source
        source = spec.source
    mcq = _load(source, spec, domains, skip_bad=skip_bad, cwd=cwd, env=env)
    _check_nonempty(mcq, domains)
    _warn_repeats(mcq)
    return mcq


def _load(
    source: str | Path | None,
    spec: MCQSpec | None,
    domains: Sequence[str] | None,
    *,
    skip_bad: bool,
    cwd: Path | None,
    env: Mapping[str, str] | None,
) -> MCQSet:
    kind = "custom"
    if source is None:
        path, kind = default_mcq_dir(cwd, env)
        source = path
    if isinstance(source, str) and source.startswith("lm-eval:"):
        from .lm_eval_tasks import load_lm_eval_task

        task = source[len("lm-eval:") :]
        if not task:
            raise RolevecError("`mcq` lm-eval: names no task: pass e.g. lm-eval:arc_easy")
        # rolevec renders every prompt with the chat template: the items take the delimiter lm-eval uses
        # with apply_chat_template (none), so the scores are lm-eval's under --apply_chat_template
        return load_lm_eval_task(
            task,
            spec.include_path if spec else None,
            domains,
            skip_bad=skip_bad or bool(spec and spec.skip_bad),
            chat_template=True,
        )
    if isinstance(source, str) and source.startswith("hf:"):
        hf = parse_hf_source(source)
        if is_legacy_mmlu(hf) and (spec is None or not spec.mapped):
            return load_hf_mmlu(hf.name, domains=domains)
        return load_hf(spec or MCQSpec(source, skip_bad=skip_bad), domains)
    path = Path(source).expanduser()
    if kind == "custom" and path.resolve() == builtin_mcq_dir().resolve():
        kind = "builtin"
    spec = spec or MCQSpec(str(source), skip_bad=skip_bad)
    if path.is_dir():
        return _load_folder(path, spec, domains, kind)
    if path.is_file():
        rows = _read_rows(path)
        if is_paper_rows(rows):
            return paper_items(rows, path, spec, domains)
        if spec.mapped:
            return load_mapped_file(path, rows, spec, domains)
        all_items, bad = _parse_file_rows(rows, path, skip_bad=spec.skip_bad)
        wanted = list(domains) if domains is not None else list(all_items)
        missing = [d for d in wanted if d not in all_items]
        if missing:
            raise RolevecError(
                f"{path} has no questions for domain(s) {', '.join(missing)} "
                f"(it has: {', '.join(all_items) or 'none'})"
            )
        return MCQSet({d: all_items[d] for d in wanted}, str(path.resolve()), bad, kind)
    raise RolevecError(
        f"question source {str(source)!r} does not exist: pass a folder of <domain>.json files, one "
        "JSON/JSONL/CSV file, hf:NAME[:CONFIG][@SPLIT] or lm-eval:TASK"
    )


def _load_folder(path: Path, spec: MCQSpec, domains: Sequence[str] | None, kind: str) -> MCQSet:
    """A folder of domain files: ids ``domain/index`` as before, namespaced where the files are the
    paper's released format or read through a mapping."""
    files = _domain_files(path)
    if not files:
        raise RolevecError(f"{path} holds no .json/.jsonl/.csv question files: pass `mcq` DIR")
    wanted = list(domains) if domains is not None else list(files)
    missing = [d for d in wanted if d not in files]
    if missing:
        raise RolevecError(
            f"no question file for domain(s) {', '.join(missing)} in {path} "
            f"(it has: {', '.join(files)}); pass domains from that list"
        )
    items: dict[str, list[MCQItem]] = {}
    bad = 0
    for domain in wanted:
        rows = _read_rows(files[domain])
        if is_paper_rows(rows) or spec.mapped:
            if is_paper_rows(rows):
                sub = paper_items(rows, files[domain], spec, None)
            else:
                sub = load_mapped_file(files[domain], rows, spec, None, default_domain=domain)
            for d, its in sub.items.items():
                items.setdefault(d, []).extend(its)
            bad += sub.n_skipped
            continue
        parsed, n_bad = _parse_rows(rows, files[domain], domain, spec.skip_bad)
        items[domain] = parsed.get(domain, [])
        extra = [d for d in parsed if d != domain]
        if extra:
            raise RolevecError(f"{files[domain]} holds items of other domains ({', '.join(extra)})")
        bad += n_bad
    return MCQSet(items, str(path.resolve()), bad, kind)


def _repeat_groups(items: Sequence[MCQItem]) -> list[list[MCQItem]]:
    """Items grouped by identical question text and choices, groups in the order of their first copy."""
    groups: dict[tuple[str, tuple[str, ...]], list[MCQItem]] = {}
    for it in items:
        groups.setdefault((it.question, it.choices), []).append(it)
    return list(groups.values())


def repeated_questions(mcq: MCQSet) -> dict[str, tuple[int, int]]:
    """Per domain that repeats questions: (extra copies, questions that have copies); others left out."""
    out: dict[str, tuple[int, int]] = {}
    for domain, items in mcq.items.items():
        repeated = [g for g in _repeat_groups(items) if len(g) > 1]
        if repeated:
            out[domain] = (sum(len(g) - 1 for g in repeated), len(repeated))
    return out


def _repeat_counts(counts: Mapping[str, tuple[int, int]]) -> str:
    parts = (f"{d} {extra} extra cop{'y' if extra == 1 else 'ies'}" for d, (extra, _) in counts.items())
    return ", ".join(parts)


def _warn_repeats(mcq: MCQSet) -> None:
    """One line per load: repeated questions are kept (ids unchanged) but weigh more in an accuracy."""
    counts = repeated_questions(mcq)
    if counts:
        warnings.warn(
            f"{mcq.source} repeats questions (same text and choices): {_repeat_counts(counts)}; every copy "
            "keeps its own id and is scored, and a split keeps all copies on the same side",
            UserWarning,
            stacklevel=3,
        )


def _check_nonempty(mcq: MCQSet, domains: Sequence[str] | None) -> None:
    for domain in domains or mcq.domains:
        if not mcq.items.get(domain):
            raise RolevecError(
                f"domain {domain!r} has no usable questions in {mcq.source}: choose other domains or pass "
                "questions for it"
            )


def parse_domains(text: str | None, available: Iterable[str] = DOMAINS) -> list[str] | None:
    """``"math,law"`` -> ``["math", "law"]``; ``"all"`` or ``None`` -> ``None`` (every domain found)."""
    if text is None or text.strip() == "all":
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise RolevecError("`domains` is empty: pass e.g. math,law or all")
    return names


# --- split -----------------------------------------------------------------------------------------


@dataclass
class Split:
    """Which question ids of each domain are validation and which are test; saved as ``split.json``.

    Made by :func:`make_split`, or read back with ``Split.load(path)``.

    Attributes:
        seed: The seed the split was drawn with.
        val_fraction: The fraction of each domain's (distinct) questions given to validation.
        source: Where the questions came from (the :class:`MCQSet`'s ``source``).
        domains: Domain -> ``{"val": [qid, ...], "test": [qid, ...]}``, each in its shuffled order.

    Example:
        ```python
        split = Split.load("runs/quick/split.json")
        test_items = split.select(load_mcq(), "medicine", "test", limit=50)
        ```
    """

    seed: int
    val_fraction: float
    source: str
    domains: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "source": self.source,
            "domains": self.domains,
        }

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        from ..core.files import atomic_write

        out = Path(path)
        text = json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n"
        atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Split:
        p = Path(path)
        if not p.is_file():
            raise RolevecError(f"split file {p} {path_problem(p)}: pass the split.json of an earlier run")
        text = read_text(p, what="split file")
        try:
            data = json.loads(text)
            return cls(int(data["seed"]), float(data["val_fraction"]), str(data["source"]), data["domains"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RolevecError(
                f"{p} is not a readable split file ({exc}); delete it or pass another"
            ) from exc

    def qids(self, domain: str, split: str) -> list[str]:
        if split not in SPLITS:
            raise RolevecError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        if domain not in self.domains:
            raise RolevecError(
                f"the split has no domain {domain!r} (it has {', '.join(self.domains)}); "
                "make a new run folder"
            )
        parts = self.domains[domain]
        return list(parts["val"]) + list(parts["test"]) if split == "all" else list(parts[split])

    def split_of(self, domain: str) -> dict[str, str]:
        parts = self.domains[domain]
        return {**{q: "val" for q in parts["val"]}, **{q: "test" for q in parts["test"]}}

    def select(self, mcq: MCQSet, domain: str, split: str, limit: int | None = None) -> list[MCQItem]:
        """The domain's items of one split, in the split's (seeded, shuffled) order, first ``limit``."""
        by_qid = {it.qid: it for it in mcq.items.get(domain, [])}
        qids = self.qids(domain, split)
        missing = [q for q in qids if q not in by_qid]
        if missing:
            raise RolevecError(
                f"split file lists {len(missing)} question(s) of {domain} that the data lacks (e.g. "
                f"{missing[0]}): the questions changed since the split was made; use a new run folder"
            )
        if limit is not None:
            if limit < 1:
                raise RolevecError(f"`limit` must be at least 1, not {limit}")
            qids = qids[:limit]
        return [by_qid[q] for q in qids]

    def check_covers(self, mcq: MCQSet) -> None:
        for domain, items in mcq.items.items():
            if domain not in self.domains:
                continue
            known = set(self.qids(domain, "all"))
            new = [it.qid for it in items if it.qid not in known]
            if new:
                raise RolevecError(
                    f"the saved split of {domain} lacks {len(new)} question(s) of the data (e.g. {new[0]}): "
                    "the questions changed since the split was made; use a new run folder or `force=True`"
                )


def _stratified(
    items: Sequence[MCQItem], val_fraction: float, rng: random.Random
) -> tuple[list[str], list[str]]:
    by_subject: dict[str, list[str]] = {}
    for it in items:
        by_subject.setdefault(it.subject, []).append(it.qid)
    total_val = round(val_fraction * len(items))
    subjects = sorted(by_subject)
    exact = {s: val_fraction * len(by_subject[s]) for s in subjects}
    take = {s: int(exact[s]) for s in subjects}
    # largest remainder, ties by subject name, so the domain total is exactly round(fraction * n)
    order = sorted(subjects, key=lambda s: (-(exact[s] - take[s]), s))
    for s in order[: max(0, total_val - sum(take.values()))]:
        take[s] += 1
    val: list[str] = []
    test: list[str] = []
    for s in subjects:
        qids = list(by_subject[s])
        rng.shuffle(qids)
        val += qids[: take[s]]
        test += qids[take[s] :]
    rng.shuffle(val)
    rng.shuffle(test)
    return val, test


def make_split(mcq: MCQSet, *, seed: int = 0, val_fraction: float = 0.2) -> Split:
    """Seeded split of every domain, stratified by subject (largest-remainder allocation per subject).

    A question repeated in a domain (same text and choices) is split once, as its first copy (whose
    subject it counts under); every other copy follows its first copy to the same side, right after it,
    so no question is in both validation and test. Validation then holds round(fraction x distinct
    questions) distinct questions plus their copies. A domain without repeats gets exactly the split of
    the algorithm before repeats were handled (same ids, same order, every seed and fraction).

    Args:
        mcq: The questions to split.
        seed: The shuffle seed (default 0); the same seed and questions give the same split.
        val_fraction: The fraction of each domain's distinct questions put in validation (default 0.2).

    Returns:
        The :class:`Split`, to save with ``split.save("split.json")``.

    Example:
        ```python
        split = make_split(load_mcq(), seed=0, val_fraction=0.2)
        split.save("runs/mine/split.json")
        ```
    """
    domains = _split_domains(mcq, seed, val_fraction)
    counts = repeated_questions(mcq)
    if counts:
        warnings.warn(
            f"the split keeps every copy of a repeated question on its first copy's side: "
            f"{_repeat_counts(counts)}",
            UserWarning,
            stacklevel=2,
        )
    return Split(seed, val_fraction, mcq.source, domains)


def _split_domains(mcq: MCQSet, seed: int, val_fraction: float) -> dict[str, dict[str, list[str]]]:
    """:func:`make_split`'s work, without its warning (ensure_split's caller has had load_mcq's)."""
    if not 0.0 < val_fraction < 1.0:
        raise RolevecError(f"val_fraction must be between 0 and 1 (exclusive), not {val_fraction}")
    domains: dict[str, dict[str, list[str]]] = {}
    for domain, items in mcq.items.items():
        rng = random.Random(f"rolevec-split:{seed}:{domain}")
        groups = _repeat_groups(items)
        copies = {g[0].qid: [it.qid for it in g] for g in groups}
        first_val, first_test = _stratified([g[0] for g in groups], val_fraction, rng)
        val = [q for first in first_val for q in copies[first]]
        test = [q for first in first_test for q in copies[first]]
        if not val or not test:
            distinct = "" if len(groups) == len(items) else f" ({len(groups)} distinct)"
            raise RolevecError(
                f"domain {domain} has {len(items)} question(s){distinct}: too few for a validation/test "
                f"split with val_fraction {val_fraction}; pass more data or another `val_fraction`"
            )
        domains[domain] = {"val": val, "test": test}
    return domains


def ensure_split(
    path: str | Path,
    mcq: MCQSet,
    *,
    seed: int | None = None,
    val_fraction: float | None = None,
    base: Split | None = None,
    save: bool = True,
) -> Split:
    """The run's split: loaded from ``path`` (else copied from ``base``, else new), extended, saved
    (``save=False``: only returned, for checks that must pass before a run folder is written).

    ``seed`` / ``val_fraction`` of None mean "as stored" (defaults 0 and 0.2 for a new split); given values
    must match a stored split. Each domain's split depends only on the seed, the fraction and that
    domain's questions, so a domain added later gets exactly what a split of all domains at once gives.

    A stored split is the run's record and is kept as it is, never re-made: one saved before repeated
    questions were kept together may have copies of a question on both sides; it still loads and is
    used unchanged, with a warning (from the saving call only) that names the domains; a new run folder,
    or --force, makes a new one.
    """
    p = Path(path)
    if p.exists():
        current = Split.load(p)
        if base is not None:
            shared = [d for d in base.domains if d in current.domains]
            if (base.seed, base.val_fraction) != (current.seed, current.val_fraction) or any(
                base.domains[d] != current.domains[d] for d in shared
            ):
                raise RolevecError(
                    f"{p} differs from the split the selection was made on: use the sweep's run folder as "
                    "`run_dir`, or another `run_dir`"
                )
    elif base is not None:
        current = Split(base.seed, base.val_fraction, base.source, dict(base.domains))
    else:
        current = Split(
            0 if seed is None else seed, 0.2 if val_fraction is None else val_fraction, mcq.source
        )
    if (seed is not None and seed != current.seed) or (
        val_fraction is not None and val_fraction != current.val_fraction
    ):
        made = p if p.exists() else "the selection's split (`split_file`, or split.json beside `selection`)"
        raise RolevecError(
            f"{made} was made with seed {current.seed} and val fraction {current.val_fraction}, not "
            f"{seed} and {val_fraction}: pass those (or neither), `force=True` to start the run over, "
            "or another `run_dir`"
        )
    if current.source != mcq.source:
        raise RolevecError(
            f"the split covers questions from {current.source}, but this call reads {mcq.source}: pass the "
            "same `mcq`, `force=True` to start the run over, or another `run_dir`"
        )
    current.check_covers(mcq)
    if save and (p.exists() or base is not None):  # the saving call; its save=False check stays quiet
        _warn_straddling(p if p.exists() else None, current, mcq)
    missing = {d: items for d, items in mcq.items.items() if d not in current.domains}
    if missing:
        added = _split_domains(MCQSet(missing, mcq.source), current.seed, current.val_fraction)
        current.domains.update(added)
    if save and (missing or not p.exists()):
        current.save(p, force=True)
    return current


def _warn_straddling(path: Path | None, split: Split, mcq: MCQSet) -> None:
    """One line when a stored split (from before repeats were kept together) has a question on both sides."""
    counts: dict[str, int] = {}
    for domain, items in mcq.items.items():
        if domain not in split.domains:
            continue
        side = split.split_of(domain)
        both = [g for g in _repeat_groups(items) if len({side.get(it.qid) for it in g} - {None}) > 1]
        if both:
            counts[domain] = len(both)
    if counts:
        where = path or "the selection's split"
        listed = ", ".join(f"{d} {n}" for d, n in counts.items())
        fix = (
            "a new run folder or `force=True` makes a split that keeps copies together"
            if path
            else "the selection was made on it; a new sweep makes a split that keeps copies together"
        )
        warnings.warn(
            f"{where} has copies of a repeated question in both validation and test ({listed} question(s)); "
            f"it is used as stored: {fix}",
            UserWarning,
            stacklevel=3,
        )
